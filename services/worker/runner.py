"""ModelRunner: the Executor (engine/batch.py) that runs a real Llama-family model.

It owns the weights and the worker's KV cache, turns each ModelBatch into flat model
inputs plus AttentionMetadata, runs the model, computes logits only for the last row of
each chunk that samples, and samples. On GPU, decode-only batches replay CUDA graphs
(model/cuda_graphs.py); the only host sync per step is reading the sampled tokens.

    kv_cache: [num_blocks + 1, num_layers, 2, block_size, num_kv_heads, head_dim]

Blocks 0 .. num_blocks-1 are the engine's; block `num_blocks` is the runner's scratch
block, where padding rows of CUDA-graph batches write. Migration indexes
`kv_cache[block_ids]` with the engine's ids.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ferry.common.sampling import SamplingParams
from ferry.kernels.backend import FusedOps, fused_ops, get_backend
from ferry.kernels.kv_layout import allocate_kv_cache, bytes_per_block
from ferry.kernels.metadata import AttentionMetadata
from ferry.services.worker.engine.batch import ModelBatch, Sampled, SeqChunk, needs_history
from ferry.services.worker.grammar import GrammarRow, Grammars
from ferry.services.worker.history_arrays import HistoryArrays
from ferry.services.worker.model.config import ModelConfig
from ferry.services.worker.model.cuda_graphs import DEFAULT_BATCH_SIZES, DecodeGraphs
from ferry.services.worker.model.llama import LlamaModel, PagedAttention, WriteKV
from ferry.services.worker.model.loader import build_random_model, load_model
from ferry.services.worker.sampler import (
    SamplerOutput,
    SamplingTensors,
    TokenHistory,
    run_sampler,
    sample,
    token_logprobs,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerConfig:
    model_dir: str | None = None  # Hugging Face directory; None: random weights
    model_config: ModelConfig | None = None  # the random model's shape (model_dir None)
    seed: int = 0  # the random model's weights seed
    random_on_device: bool = False  # random weights drawn on the device (fast; see loader)
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    dtype: str | None = None  # "float32" | "bfloat16" | "float16"; None: fp32 CPU, bf16 GPU
    attention_backend: str = "auto"  # "torch" | "triton" | "flash" | "auto" (triton on a
    #                                  GPU that takes it, else torch)
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV blocks; else sized by kv_cache_gb, else (GPU) memory
    kv_cache_gb: float | None = None  # KV cache size in GiB
    gpu_memory_fraction: float = 0.9  # KV share of the GPU memory free after the weights and
    #                                   the largest step's activations (the rest: graphs, slack)
    max_model_len: int | None = None  # cap on sequence length (default: the model's)
    max_num_tokens: int = 8192  # largest step the engine runs (GPU activation profiling)
    max_num_seqs: int = 256  # most requests in one step (profiling, largest CUDA graph)
    cuda_graphs: bool = True  # capture decode graphs (GPU, non-torch attention backend)
    fused_ops: str = "auto"  # element-wise steps: "torch" | "triton" | "auto" (triton
    #                          whenever the attention backend is not torch)
    cpu_threads: int | None = 1  # torch intra-op threads (process-wide) on CPU; None: torch's
    #                              default (one per core). Several workers sharing a small
    #                              CPU with more threads than cores run decode 10-25x slower.
    tokenizer_dir: str | None = None  # tokenizer.json for structured output; None: model_dir
    grammar_threads: int | None = None  # llguidance's mask threads; None: half the cores, <= 4
    warm_up: bool = True  # GPU: run the eager (prefill / mixed) step shapes once at start,
    #                       so no request waits for a kernel compile (~1 s each on an H100)


def runner_config_for(model: str, **settings) -> RunnerConfig:
    """The RunnerConfig of a `--model` argument (a model directory, a preset, or
    random:PRESET: the preset's shape with weights drawn on the device, no files, for GPU
    benchmarks of 7-8B shapes without writing 16 GB first). The tokenizer is the model
    directory's either way (random:PRESET: the preset's), which structured output needs;
    `settings` are the other fields (a tokenizer_dir among them overrides it)."""
    from ferry.services.worker.model.resolve import RANDOM_PREFIX, preset_config, resolve_model

    is_random = model.startswith(RANDOM_PREFIX)
    model_dir = str(resolve_model(model))
    return RunnerConfig(**{
        "model_dir": None if is_random else model_dir,
        "model_config": preset_config(model) if is_random else None,
        "random_on_device": is_random,
        "tokenizer_dir": model_dir,
        **settings})


class ModelRunner:
    def __init__(self, config: RunnerConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            # Streams, graphs and kernel launches follow the current device.
            torch.cuda.set_device(self.device)
        dtype_name = config.dtype or ("bfloat16" if on_gpu else "float32")
        if dtype_name not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype_name!r}")
        self.dtype = _DTYPES[dtype_name]
        if not on_gpu and config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)

        if config.model_dir is not None:
            self.model_config = ModelConfig.from_dir(config.model_dir)
        elif config.model_config is not None:
            self.model_config = config.model_config
        else:
            raise ValueError("RunnerConfig needs model_dir or model_config")
        # Checks the cache config now (a clear error at startup) and resolves "auto".
        backend = get_backend(
            config.attention_backend,
            device=self.device,
            block_size=config.block_size,
            head_dim=self.model_config.head_dim,
            dtype=self.dtype,
        )
        self.attention_backend = backend.name
        self.max_model_len = min(
            self.model_config.max_model_len, config.max_model_len or self.model_config.max_model_len
        )
        self.fused_ops = config.fused_ops
        if self.fused_ops == "auto":
            self.fused_ops = "torch" if backend.name == "torch" else "triton"
        self.model: LlamaModel = self._build_model(
            (backend.write_kv, backend.paged_attention), fused_ops(self.fused_ops)
        )

        # Executor protocol
        self.block_size = config.block_size
        self.vocab_size = self.model_config.vocab_size
        self.eos_token_ids = self.model_config.eos_token_ids
        self.num_blocks = self._choose_num_blocks()
        self.pad_block_id = self.num_blocks
        self.kv_cache = self._allocate_kv(self.num_blocks + 1)

        # Structured output: grammars compiled from the model's tokenizer (none: refused)
        tokenizer_dir = config.tokenizer_dir or config.model_dir
        self.grammars = None if tokenizer_dir is None else Grammars.from_dir(
            tokenizer_dir, vocab_size=self.vocab_size, eos_token_ids=self.eos_token_ids,
            num_threads=config.grammar_threads, pin_memory=on_gpu)
        self.supports_grammar = self.grammars is not None
        self._grammar_thread: ThreadPoolExecutor | None = None
        self.grammar_wait_s = 0.0  # time steps waited for masks after their forward pass
        self.grammar_mask_s = 0.0  # time the helper thread spent filling masks

        # Penalized requests' histories between steps (the sampler's host work per step
        # is then per new token, not per token seen); two batches' worth of requests.
        self.history_arrays = HistoryArrays(max_entries=2 * config.max_num_seqs)

        self.graphs: DecodeGraphs | None = None
        if on_gpu and config.cuda_graphs and self.attention_backend != "torch":
            with torch.inference_mode():
                self.graphs = DecodeGraphs(
                    self.model,
                    self.kv_cache,
                    batch_sizes=[b for b in DEFAULT_BATCH_SIZES if b <= config.max_num_seqs],
                    block_size=self.block_size,
                    pad_block_id=self.pad_block_id,
                    max_model_len=self.max_model_len,
                )
        if on_gpu and config.warm_up and self.attention_backend != "torch":
            self._warm_up_eager_steps()

    def execute(self, batch: ModelBatch) -> list[int]:
        """Run every chunk (writing its KV); one sampled token per sample=True chunk."""
        return self.launch(batch).result()

    @torch.inference_mode()
    def launch(self, batch: ModelBatch) -> PendingTokens:
        """Enqueue the step's GPU work and return at once; the tokens are read with
        `PendingTokens.result()` (after `wait()`, which blocks without holding the GIL)."""
        chunks = batch.chunks
        if not chunks:
            return PendingTokens(None, None)
        self._check(chunks)
        sample_rows = [i for i, c in enumerate(chunks) if c.sample]
        sampled = [chunks[i] for i in sample_rows]
        # Grammar masks fill on a helper thread while the forward pass runs. Its Python
        # (advancing each matcher) takes turns with this thread's at the GIL, so it starts
        # only once a decode graph is launched: a later launch delays the whole step. An
        # eager forward is host-bound throughout, so there the masks start first.
        if self._use_graph(chunks):
            assert self.graphs is not None
            hidden = self.graphs.run(
                [c.token_ids[0] for c in chunks],
                [c.end_pos for c in chunks],
                [c.block_ids for c in chunks],
            )
            masks = self._start_masks(sampled)
            rows = sample_rows
        else:
            masks = self._start_masks(sampled)
            inputs = prepare_inputs(chunks, block_size=self.block_size, device=self.device)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
            rows = [inputs.last_rows[i] for i in sample_rows]
        if not sample_rows:
            return PendingTokens(None, self._done_event())
        index = torch.tensor(rows, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        index = index.to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden.index_select(0, index))  # [n, vocab] fp32
        params = [c.sampling for c in sampled]
        st = SamplingTensors.build(  # while the masks are being filled
            params,
            [c.end_pos for c in sampled],
            vocab_size=self.vocab_size,
            device=self.device,
            histories=[TokenHistory(*self.history_arrays.get(
                c.req_id, c.prompt_token_ids, c.output_token_ids))
                       if needs_history(c.sampling) else None for c in sampled],
            eos_token_ids=self.eos_token_ids,
        )
        grammar_rows, bitmask = self._finish_masks(masks)
        if bitmask is not None:
            st = st.with_grammar(grammar_rows, bitmask, vocab_size=self.vocab_size)
        out = run_sampler(logits, st)  # device tensors
        if self.device.type != "cuda":
            return PendingTokens(out, None, st, params)
        host = out.to("cpu", non_blocking=True)  # pinned (torch does for non_blocking D2H)
        return PendingTokens(host, self._done_event(), st, params)

    def _start_masks(self, sampled: Sequence[SeqChunk]
                     ) -> tuple[list[int], Future[torch.Tensor]] | None:
        """Start filling the grammar bitmask of the step's constrained rows (their output
        tokens so far are known before the step runs) on a helper thread; llguidance
        drops the GIL, so it overlaps the forward pass on GPU and on CPU alike."""
        rows = [i for i, c in enumerate(sampled) if c.sampling.has_grammar]
        if not rows:
            return None
        if self.grammars is None:
            raise ValueError(f"request {sampled[rows[0]].req_id}: structured output needs a "
                             f"tokenizer")
        if self._grammar_thread is None:
            self._grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="ferry-grammar")
        grammar_rows = [GrammarRow(sampled[i].req_id, sampled[i].sampling,
                                   sampled[i].output_token_ids) for i in rows]
        return rows, self._grammar_thread.submit(self._fill_bitmask, grammar_rows)

    def _fill_bitmask(self, rows: list[GrammarRow]) -> torch.Tensor:
        """On the helper thread: the rows' bitmask, its time counted in grammar_mask_s."""
        start = time.perf_counter()
        try:
            return self.grammars.fill_bitmask(rows)
        finally:
            self.grammar_mask_s += time.perf_counter() - start

    def _finish_masks(self, masks: tuple[list[int], Future[torch.Tensor]] | None
                      ) -> tuple[list[int], torch.Tensor | None]:
        if masks is None:
            return [], None
        rows, future = masks
        start = time.perf_counter()
        bitmask = future.result()
        self.grammar_wait_s += time.perf_counter() - start
        return rows, bitmask

    def _done_event(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    # -- step helpers ------------------------------------------------------------------

    def _use_graph(self, chunks: Sequence[SeqChunk]) -> bool:
        return (
            self.graphs is not None
            and len(chunks) <= self.graphs.max_batch_size
            and all(len(c.token_ids) == 1 for c in chunks)
        )

    def _check(self, chunks: Sequence[SeqChunk]) -> None:
        for c in chunks:
            if not c.token_ids:
                raise ValueError(f"request {c.req_id}: empty chunk")
            if c.end_pos > self.max_model_len:
                raise ValueError(
                    f"request {c.req_id}: position {c.end_pos - 1} exceeds max_model_len "
                    f"{self.max_model_len}"
                )
            if len(c.block_ids) * self.block_size < c.end_pos:
                raise ValueError(
                    f"request {c.req_id}: {len(c.block_ids)} blocks cannot hold {c.end_pos} tokens"
                )

    # -- construction ------------------------------------------------------------------

    def _build_model(
        self, attention: tuple[WriteKV, PagedAttention], ops: FusedOps
    ) -> LlamaModel:
        if self.config.model_dir is not None:
            return load_model(
                self.config.model_dir,
                device=self.device,
                dtype=self.dtype,
                attention=attention,
                ops=ops,
                max_model_len=self.max_model_len,
            )
        return build_random_model(
            self.model_config,
            device=self.device,
            dtype=self.dtype,
            seed=self.config.seed,
            attention=attention,
            ops=ops,
            max_model_len=self.max_model_len,
            on_device=self.config.random_on_device,
        )

    def _allocate_kv(self, num_blocks: int) -> torch.Tensor:
        c = self.model_config
        return allocate_kv_cache(
            num_blocks=num_blocks,
            num_layers=c.num_layers,
            block_size=self.block_size,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block (all layers, keys and values)."""
        c = self.model_config
        return bytes_per_block(
            num_layers=c.num_layers,
            block_size=self.block_size,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            dtype=self.dtype,
        )

    def _choose_num_blocks(self) -> int:
        if self.config.num_blocks is not None:
            num_blocks = self.config.num_blocks
        elif self.config.kv_cache_gb is not None:
            num_blocks = int(self.config.kv_cache_gb * 2**30) // self.block_bytes
        elif self.device.type == "cuda":
            num_blocks = self._num_blocks_from_free_memory()
        else:
            raise ValueError("on CPU, set num_blocks or kv_cache_gb")
        if num_blocks < 1:
            raise ValueError(f"the KV cache would hold {num_blocks} blocks; give it more memory")
        return num_blocks

    def _num_blocks_from_free_memory(self) -> int:
        """Blocks fitting in gpu_memory_fraction of the memory free once the weights are
        loaded and the peak activations of the largest step (a max_num_tokens prefill,
        then sampling max_num_seqs rows) are set aside."""
        activation_bytes = self._profile_activation_bytes()
        free_bytes, _ = torch.cuda.mem_get_info(self.device)
        kv_bytes = (free_bytes - activation_bytes) * self.config.gpu_memory_fraction
        return int(kv_bytes) // self.block_bytes

    def _warm_up_eager_steps(self) -> None:
        """Compile every variant of the eager step's kernels before serving. The prefill
        kernel's tile height follows the step's longest chunk (16 to 128 rows of
        q_len x GQA group: default_prefill_config), so one mixed step (a prefill chunk and
        a decode) per height covers them; the step-varying ints are not specialized.
        Writes only blocks no request owns yet (the cache is empty at start)."""
        group = self.model_config.num_heads // self.model_config.num_kv_heads
        greedy = SamplingParams(temperature=0.0, seed=0)
        for rows in (16, 32, 64, 128):
            q_len = min(-(-rows // group), self.max_model_len - 1)
            prefill_blocks = -(-q_len // self.block_size)
            decode_block = prefill_blocks
            if decode_block >= self.num_blocks:
                return  # a cache this small is a test's; nothing worth warming
            batch = ModelBatch(chunks=(
                SeqChunk(req_id="warm-up-prefill", token_ids=(0,) * q_len, start_pos=0,
                         block_ids=tuple(range(prefill_blocks)), sample=True,
                         sampling=greedy),
                SeqChunk(req_id="warm-up-decode", token_ids=(0,), start_pos=1,
                         block_ids=(decode_block,), sample=True, sampling=greedy),
            ))
            self.execute(batch)

    @torch.inference_mode()
    def _profile_activation_bytes(self) -> int:
        num_tokens = min(self.config.max_num_tokens, self.max_model_len)
        num_blocks = math.ceil(num_tokens / self.block_size)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        kv_cache = self._allocate_kv(num_blocks)
        base = torch.cuda.memory_allocated(self.device)
        chunk = SeqChunk(
            req_id="profile",
            token_ids=(0,) * num_tokens,
            start_pos=0,
            block_ids=tuple(range(num_blocks)),
            sample=True,
            sampling=SamplingParams(),
        )
        inputs = prepare_inputs([chunk], block_size=self.block_size, device=self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, kv_cache, inputs.meta)
        num_rows = min(self.config.max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden[:num_rows])
        del hidden
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=0)  # the full-sort path
        st = SamplingTensors.build(
            [params] * num_rows, [0] * num_rows, vocab_size=self.vocab_size, device=self.device
        )
        sample(logits, st)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del kv_cache, logits, st, inputs
        torch.cuda.empty_cache()
        return peak


class PendingTokens:
    """A launched step's sampled tokens (and logprobs). On GPU they are being copied to
    host memory behind `event`; `wait()` blocks on the event with the GIL released (so
    other threads, such as the KV-transfer ones, run meanwhile), `result()` reads them."""

    __slots__ = ("output", "event", "st", "params")

    def __init__(self, output: SamplerOutput | None, event: torch.cuda.Event | None,
                 st: SamplingTensors | None = None,
                 params: Sequence[SamplingParams] = ()) -> None:
        self.output = output  # host tensors on GPU (once the event completes), else CPU ones
        self.event = event  # None: already complete
        self.st = st  # the step's sampling tensors (which rows asked for logprobs)
        self.params = params

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def result(self) -> Sampled:
        self.wait()
        if self.output is None:
            return Sampled()
        token_ids = self.output.token_ids.tolist()
        if self.output.logprobs is None:
            return Sampled(token_ids)
        return Sampled(token_ids, token_logprobs(self.output, self.st, self.params))


@dataclass(frozen=True, slots=True, kw_only=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64, device
    positions: torch.Tensor  # [T] int64, device
    meta: AttentionMetadata
    last_rows: tuple[int, ...]  # per chunk, its last row in the flat [T] layout


# Triton specializes a kernel's pointer arguments on 16-byte alignment: a view that starts
# aligned in one step and not in the next compiles a new variant (~1 s on an H100).
VIEW_ALIGN_BYTES = 16


def _aligned_views(segments: Sequence[list[int]], dtype: torch.dtype, device: torch.device
                   ) -> list[torch.Tensor]:
    """The segments in one host-to-device copy, as views that each start 16-byte aligned
    (zero padding between them)."""
    align = VIEW_ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
    flat: list[int] = []
    starts = []
    for segment in segments:
        flat.extend([0] * (-len(flat) % align))
        starts.append(len(flat))
        flat.extend(segment)
    host = torch.tensor(flat, dtype=dtype, pin_memory=device.type == "cuda")
    buffer = host.to(device, non_blocking=True)
    return [buffer[start:start + len(segment)]
            for start, segment in zip(starts, segments, strict=True)]


def prepare_inputs(
    chunks: Sequence[SeqChunk], *, block_size: int, device: torch.device
) -> StepInputs:
    """Flat model inputs of a step (layout in kernels/metadata.py), in two host-to-device
    copies: one int64 vector and one int32 vector, sliced into 16-byte aligned views."""
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    for c in chunks:
        token_ids.extend(c.token_ids)
        positions.extend(range(c.start_pos, c.end_pos))
        pos = c.start_pos
        while pos < c.end_pos:  # one run of slots per block touched
            block, offset = divmod(pos, block_size)
            num = min(block_size - offset, c.end_pos - pos)
            base = c.block_ids[block] * block_size + offset
            slots.extend(range(base, base + num))
            pos += num
        query_start_loc.append(len(token_ids))
    num_reqs = len(chunks)
    seq_lens = [c.end_pos for c in chunks]
    # Only the blocks holding tokens (the engine may hand out more), zero-padded.
    needed = [-(-n // block_size) for n in seq_lens]
    width = max(needed)
    tables = [
        x
        for c, n in zip(chunks, needed, strict=True)
        for x in (*c.block_ids[:n], *[0] * (width - n))
    ]
    input_ids, positions_t, slot_mapping = _aligned_views(
        (token_ids, positions, slots), torch.int64, device)
    seq_lens_t, query_start_loc_t, tables_t = _aligned_views(
        (seq_lens, query_start_loc, tables), torch.int32, device)
    query_lens = tuple(len(c.token_ids) for c in chunks)
    meta = AttentionMetadata(
        query_start_loc=query_start_loc_t,
        seq_lens=seq_lens_t,
        block_tables=tables_t.view(num_reqs, width),
        slot_mapping=slot_mapping,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_host=query_lens,
        seq_lens_host=tuple(seq_lens),
    )
    return StepInputs(
        input_ids=input_ids,
        positions=positions_t,
        meta=meta,
        last_rows=tuple(q - 1 for q in query_start_loc[1:]),
    )
