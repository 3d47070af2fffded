"""Auto-scaling decisions (DESIGN §5), pure: the process wiring carries them out through a
provisioner.

- below the band: average F of the serving (live, not draining) instances stays under
  `scale_up_freeness` for `cooldown_s` -> start one instance (up to max_workers). The
  requests held in the scheduler's pending queue count as if spread evenly over the
  serving instances' free blocks: they are demand no instance had room for;
- above the band: it stays over `scale_down_freeness` for `cooldown_s` -> drain the
  serving instance holding the fewest requests (down to min_workers). Draining makes its
  virtual usage infinite, so the migration pairing moves its requests away;
- a drained instance with nothing left (no requests, no migrations) is terminated;
- fewer serving or starting instances than min_workers -> start the missing ones at once.
Between two scale actions at least `cooldown_s` pass (for a start: counted from when the new
instance registers); one start at a time is in flight.

`autoscale_round` is one round, decided and carried out: the scheduler process runs it every
second with its LocalProcessProvisioner, the simulator (bench/sim.py) with its own
instances as the provisioner.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ferry.common.wire import LoadFields
from ferry.services.scheduler.load import freeness, num_requests

if TYPE_CHECKING:
    from ferry.common.config import SchedulerConfig
    from ferry.services.scheduler.core import Out, SchedulerCore
    from ferry.services.scheduler.provisioner import WorkerHandle

# A started instance that has not registered after this long is given up (and stopped).
DEFAULT_START_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class ScaleUp:
    pass


@dataclass(frozen=True, slots=True)
class Drain:
    instance_id: str


@dataclass(frozen=True, slots=True)
class Terminate:
    instance_id: str


ScaleAction = ScaleUp | Drain | Terminate
ACTION_NAMES = {ScaleUp: "scale_up", Drain: "drain", Terminate: "terminate"}  # metrics labels


class Provisioner(Protocol):
    """Where instances come from (services/scheduler/provisioner.py; the simulator)."""

    def start_worker(self) -> WorkerHandle:
        """Start one instance; it registers by itself."""
        ...

    def stop_worker(self, instance_id: str, *, now: float) -> bool:
        """Stop one; False: it cannot stop now and serves on."""
        ...


def make_autoscaler(cfg: SchedulerConfig) -> Autoscaler:
    return Autoscaler(
        min_workers=cfg.min_workers,
        max_workers=cfg.max_workers,
        scale_up_freeness=cfg.scale_up_freeness,
        scale_down_freeness=cfg.scale_down_freeness,
        cooldown_s=cfg.scale_cooldown_s,
        headroom_blocks=cfg.high_priority_headroom_blocks,
    )


def autoscale_round(autoscaler: Autoscaler, core: SchedulerCore, provisioner: Provisioner,
                    now: float, *, removable: Collection[str] | None = None
                    ) -> tuple[Out, list[ScaleAction]]:
    """Decide on the core's loads (and its pending queue's demand), start and stop instances
    through the provisioner, drain and forget them in the core. Returns the messages for
    the core's peers and the actions decided. removable: as in Autoscaler.decide."""
    pending = core.pending.demand_blocks if core.pending is not None else 0
    actions = autoscaler.decide(core.table.loads(), now, removable=removable,
                                pending_demand_blocks=pending)
    out: Out = []
    for action in actions:
        if isinstance(action, ScaleUp):
            autoscaler.started(provisioner.start_worker().instance_id, now)
        elif isinstance(action, Drain):
            out += core.drain(action.instance_id)
        elif provisioner.stop_worker(action.instance_id, now=now):
            out += core.terminate(action.instance_id, now)
    return out, actions


class Autoscaler:
    def __init__(
        self,
        *,
        min_workers: int,
        max_workers: int,
        scale_up_freeness: float,
        scale_down_freeness: float,
        cooldown_s: float,
        headroom_blocks: int,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        if not 0 <= min_workers <= max_workers:
            raise ValueError(
                f"need 0 <= min_workers <= max_workers, got {min_workers}, {max_workers}"
            )
        if scale_up_freeness >= scale_down_freeness:
            raise ValueError("scale_up_freeness must be below scale_down_freeness (a band)")
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.scale_up_freeness = scale_up_freeness
        self.scale_down_freeness = scale_down_freeness
        self.cooldown_s = cooldown_s
        self.headroom_blocks = headroom_blocks
        self.start_timeout_s = start_timeout_s
        self.starting: dict[str, float] = {}  # instance_id -> when it was started (unregistered)
        self.drained_ids: set[str] = set()  # instances this autoscaler drained
        self.below_since: float | None = None  # average F under the band since
        self.above_since: float | None = None  # average F over the band since
        self.last_action_s = float("-inf")

    def started(self, instance_id: str, now: float) -> None:
        """The wiring started instance_id for a ScaleUp; it counts until it registers."""
        self.starting[instance_id] = now
        self.last_action_s = now

    def forget(self, instance_id: str) -> None:
        """The instance's process is gone (it crashed, or it was stopped)."""
        self.starting.pop(instance_id, None)
        self.drained_ids.discard(instance_id)

    def decide(
        self,
        loads: Mapping[str, LoadFields],
        now: float,
        *,
        removable: Collection[str] | None = None,
        pending_demand_blocks: int = 0,
    ) -> list[ScaleAction]:
        """loads: estimated loads of the live instances (draining ones included).
        removable: the instances scale-down may pick (those the provisioner can stop);
        None: any. pending_demand_blocks: what the scheduler's pending queue needs."""
        actions: list[ScaleAction] = []
        actions += self._settle_starting(loads, now)
        actions += self._terminate_drained(loads)
        serving = {i: load for i, load in loads.items() if not load.draining}
        num_serving = len(serving) + len(self.starting)
        if num_serving < self.min_workers:
            return actions + [ScaleUp()] * (self.min_workers - num_serving)

        self._track_band(serving, now, pending_demand_blocks)
        if self.starting or now - self.last_action_s < self.cooldown_s:
            return actions
        if self._held(self.below_since, now) and num_serving < self.max_workers:
            self.below_since = now
            return actions + [ScaleUp()]
        too_many = len(serving) > self.max_workers
        candidates = [i for i in serving if removable is None or i in removable]
        if (
            (too_many or self._held(self.above_since, now))
            and len(serving) > self.min_workers
            and candidates
        ):
            victim = min(candidates, key=lambda i: (num_requests(serving[i]), i))
            self.drained_ids.add(victim)
            self.above_since = now
            self.last_action_s = now
            return actions + [Drain(victim)]
        return actions

    def _settle_starting(self, loads: Mapping[str, LoadFields], now: float) -> list[ScaleAction]:
        actions: list[ScaleAction] = []
        for instance_id, started_s in list(self.starting.items()):
            if instance_id in loads:
                # Its capacity shows in F only from now on: the cooldown starts over.
                del self.starting[instance_id]
                self.last_action_s = now
                self.below_since = None
            elif now - started_s > self.start_timeout_s:
                del self.starting[instance_id]
                actions.append(Terminate(instance_id))
        return actions

    def _terminate_drained(self, loads: Mapping[str, LoadFields]) -> list[ScaleAction]:
        actions: list[ScaleAction] = []
        for instance_id in sorted(self.drained_ids):
            load = loads.get(instance_id)
            if load is None:  # dead or gone already
                self.drained_ids.discard(instance_id)
            elif num_requests(load) == 0 and load.num_migrations_in + load.num_migrations_out == 0:
                self.drained_ids.discard(instance_id)
                actions.append(Terminate(instance_id))
        return actions

    def _track_band(
        self, serving: Mapping[str, LoadFields], now: float, pending_demand_blocks: int
    ) -> None:
        if not serving:
            self.below_since = self.above_since = None
            return
        share = pending_demand_blocks / len(serving)  # blocks of pending demand per instance
        total = sum(
            freeness(load, headroom_blocks=self.headroom_blocks) - share / max(1, load.num_running)
            for load in serving.values()
        )
        average = total / len(serving)
        if average < self.scale_up_freeness:
            self.below_since = now if self.below_since is None else self.below_since
            self.above_since = None
        elif average > self.scale_down_freeness:
            self.above_since = now if self.above_since is None else self.above_since
            self.below_since = None
        else:
            self.below_since = self.above_since = None

    def _held(self, since: float | None, now: float) -> bool:
        return since is not None and now - since >= self.cooldown_s
