"""Step-time model fitted to measured engine steps (`ferry profile` writes the profile).

A step's time is modelled as a non-negative combination of what it does:

    step_s = base_s
           + per_prefill_step_s    * [P > 0]  a step with prefill chunks runs eagerly
                                               (on GPU, outside the decode CUDA graphs)
           + per_prefill_token_s   * P      P: tokens fed by prefill chunks
           + per_prefill_attn_s    * A      A: sum over prefill chunks of q_len * kv_len
           + per_decode_seq_s      * D      D: decode requests (q_len == 1)
           + per_decode_context_s  * C      C: sum over decodes of kv_len (KV bytes read)
           + per_eager_decode_seq_s     * D * [P > 0]  what a decode costs more, and per
           + per_eager_decode_context_s * C * [P > 0]  context token, in an eager step
                                               (outside the decode CUDA graphs' kernels)

The profile JSON holds the raw samples and the fitted coefficients:

    {"name": str, "device": str, "model": {...}, "block_size": int,
     "kv_block_bytes": int, "num_blocks": int,
     "coefficients": {"base_s": float, ...}, "samples": [{"P":..,"A":..,"D":..,"C":..,"step_s":..}]}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ferry.services.worker.engine.batch import ModelBatch

FEATURES = ("P", "A", "D", "C")


@dataclass(frozen=True, slots=True, kw_only=True)
class StepFeatures:
    P: int  # prefill tokens
    A: int  # prefill attention work: sum of q_len * kv_len
    D: int  # decode requests
    C: int  # decode context tokens

    @classmethod
    def of(cls, batch: ModelBatch) -> StepFeatures:
        num_prefill = prefill_attn = num_decode = decode_ctx = 0
        for chunk in batch.chunks:
            q_len = len(chunk.token_ids)
            if q_len == 1 and chunk.start_pos > 0:
                num_decode += 1
                decode_ctx += chunk.end_pos
            else:
                num_prefill += q_len
                prefill_attn += q_len * chunk.end_pos
        return cls(P=num_prefill, A=prefill_attn, D=num_decode, C=decode_ctx)

    def vector(self) -> list[float]:
        """The regressors, in LatencyModel's coefficient order."""
        eager = 1.0 if self.P else 0.0
        return [1.0, eager, float(self.P), float(self.A), float(self.D), float(self.C),
                eager * self.D, eager * self.C]


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyModel:
    base_s: float
    per_prefill_token_s: float
    per_prefill_attn_s: float
    per_decode_seq_s: float
    per_decode_context_s: float
    # Measured on an H100 (llama2-7b, in situ): a mixed step costs ~9 ms more than the
    # linear terms say, the eager launch of every layer's kernels. Profiles fitted before
    # this term existed lack it (0: their base and per-token terms absorbed it).
    per_prefill_step_s: float = 0.0
    # Decodes riding in an eager step (one with prefill chunks) cost more than in a decode
    # step's CUDA graph: measured on an H100 (llama3-8b, prompts to 64k, in situ), 1.05e-7
    # s a context token more (1.8x), and mixed steps with 8+ decodes were 13% slower than
    # the model without it (bench/results/h100/simchecklongctx-2026-12-06). 0 in profiles
    # fitted before these terms existed.
    per_eager_decode_seq_s: float = 0.0
    per_eager_decode_context_s: float = 0.0
    # Step-to-step spread around the model, from a worker's own steps (step_log.fit), as
    # evenly spaced quantiles (0 .. 1). Empty: deterministic steps (profiles timed on a
    # grid). Near the knee the spread, not the mean, sets P99
    # (bench/results/h100/sim-check3-2026-12-06).
    # - decode_spread: measured / modelled time of decode-only steps (CUDA graphs: tight,
    #   0.94x-1.07x for llama3-8b on an H100).
    # - prefill_noise_s: measured - modelled seconds of steps with prefill. They run
    #   eagerly and the host's noise adds a few ms whatever the step's size (H100,
    #   llama3-8b: p10 -4 ms, p90 +5..+11 ms in every prefill-size bin from 1 to 4096
    #   tokens), so it is added, not scaled: a ratio measured mostly on small steps made
    #   a long prefill up to 1.7x slower (bench/results/h100/simcheckknee-2026-12-06).
    decode_spread: tuple[float, ...] = ()
    prefill_noise_s: tuple[float, ...] = ()
    # An eager step drawn with noise takes at least this share of its modelled time.
    MIN_NOISY_SHARE = 0.5

    COEFFICIENTS = ("base_s", "per_prefill_token_s", "per_prefill_attn_s", "per_decode_seq_s",
                    "per_decode_context_s", "per_prefill_step_s", "per_eager_decode_seq_s",
                    "per_eager_decode_context_s")

    def drawn_step_time(self, features: StepFeatures, u: float) -> float:
        """The step's time at quantile u in [0, 1) of the measured spread around the
        model (step_time() itself without one): a decode step's modelled time times its
        ratio quantile, an eager step's plus its noise quantile (at least
        MIN_NOISY_SHARE of the modelled time)."""
        modelled = self.step_time(features)
        if features.P:
            if not self.prefill_noise_s:
                return modelled
            return max(self.MIN_NOISY_SHARE * modelled,
                       modelled + _quantile(self.prefill_noise_s, u))
        if not self.decode_spread:
            return modelled
        return modelled * _quantile(self.decode_spread, u)

    def step_time(self, features: StepFeatures) -> float:
        coef = (
            self.base_s,
            self.per_prefill_step_s,
            self.per_prefill_token_s,
            self.per_prefill_attn_s,
            self.per_decode_seq_s,
            self.per_decode_context_s,
            self.per_eager_decode_seq_s,
            self.per_eager_decode_context_s,
        )
        return float(sum(c * x for c, x in zip(coef, features.vector(), strict=True)))

    @classmethod
    def fit(cls, samples: list[tuple[StepFeatures, float]]) -> LatencyModel:
        """Non-negative least squares on relative error (each row scaled by 1/step_s), so
        short decode steps weigh as much as long prefills."""
        x = np.array([f.vector() for f, _ in samples], dtype=np.float64)
        y = np.array([t for _, t in samples], dtype=np.float64)
        weights = 1.0 / np.maximum(y, 1e-9)
        coef = _nnls(x * weights[:, None], y * weights)
        return cls(
            base_s=coef[0],
            per_prefill_step_s=coef[1],
            per_prefill_token_s=coef[2],
            per_prefill_attn_s=coef[3],
            per_decode_seq_s=coef[4],
            per_decode_context_s=coef[5],
            per_eager_decode_seq_s=coef[6],
            per_eager_decode_context_s=coef[7],
        )


def _quantile(q: tuple[float, ...], u: float) -> float:
    """Linear interpolation at u in [0, 1) between evenly spaced quantiles q."""
    x = u * (len(q) - 1)
    i = min(int(x), len(q) - 2)
    return q[i] + (x - i) * (q[i + 1] - q[i])


def _nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 100) -> list[float]:
    """Least squares with x >= 0 by repeated clipping (Lawson-Hanson would be exact; this
    is enough for eight well-scaled features). Columns are normalised first."""
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a_n = a / scale
    active = np.ones(a.shape[1], dtype=bool)
    x = np.zeros(a.shape[1])
    for _ in range(max_iter):
        x[:] = 0
        x[active], *_ = np.linalg.lstsq(a_n[:, active], b, rcond=None)
        negative = active & (x < 0)
        if not negative.any():
            break
        active &= ~negative
        if not active.any():
            break
    x = np.maximum(x, 0) / scale
    return [float(v) for v in x]


BUNDLED_PROFILES = Path(__file__).parent / "profiles"  # package data: measured profiles


def bundled_profile(name: str) -> Path:
    """The path of a profile shipped with Ferry, e.g. "llama3-8b-h200"."""
    return BUNDLED_PROFILES / f"{name}.json"


def bundled_profile_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED_PROFILES.glob("*.json"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    name: str
    device: str
    model: dict
    block_size: int
    kv_block_bytes: int  # bytes of one KV block (all layers, K and V)
    num_blocks: int  # KV blocks the profiled instance had
    max_model_len: int
    vocab_size: int
    latency: LatencyModel
    samples: list[dict]

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """A profile JSON file, or a bundled profile by name ("llama3-8b-h200-serving")."""
        name = str(path)
        if not Path(path).exists() and "/" not in name and not name.endswith(".json"):
            if not bundled_profile(name).exists():
                raise ValueError(f"{name}: no such profile file, nor a bundled profile "
                                 f"(bundled: {', '.join(bundled_profile_names())})")
            path = bundled_profile(name)
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                name=data["name"],
                device=data["device"],
                model=data["model"],
                block_size=int(data["block_size"]),
                kv_block_bytes=int(data["kv_block_bytes"]),
                num_blocks=int(data["num_blocks"]),
                max_model_len=int(data["max_model_len"]),
                vocab_size=int(data["vocab_size"]),
                latency=LatencyModel(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in data["coefficients"].items()}),
                samples=list(data.get("samples", [])),
            )
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid Ferry profile ({exc})") from None

    def save(self, path: str | Path) -> None:
        data = {
            "name": self.name,
            "device": self.device,
            "model": self.model,
            "block_size": self.block_size,
            "kv_block_bytes": self.kv_block_bytes,
            "num_blocks": self.num_blocks,
            "max_model_len": self.max_model_len,
            "vocab_size": self.vocab_size,
            "coefficients": asdict(self.latency),
            "samples": self.samples,
        }
        Path(path).write_text(json.dumps(data, indent=1) + "\n")
