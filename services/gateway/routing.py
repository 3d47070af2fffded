"""Where the gateway sends Dispatch and Release: to the scheduler normally; straight to
the workers of the last InstanceView when the scheduler has been silent for
`bypass_after_s` (bypass mode, DESIGN §7). Pure: the caller passes the clock."""

from __future__ import annotations

from ferry.common import wire


class Routes:
    def __init__(self, *, bypass_after_s: float, now: float) -> None:
        self.bypass_after_s = bypass_after_s
        self.bypass = False
        self.view: wire.InstanceView | None = None  # the scheduler's last word on instances
        self.last_heard = now  # monotonic, of any scheduler message; start-up counts (grace)
        self._addr_of: dict[str, str] = {}  # instance_id -> worker inbox
        self._next = 0  # round-robin cursor over view.instances

    def heard(self, now: float) -> None:
        """Any message from the scheduler shows it is alive."""
        self.last_heard = now

    def on_view(self, view: wire.InstanceView, now: float) -> bool:
        """Remember the view; True when this ends bypass mode."""
        self.view = view
        self.last_heard = now
        self._addr_of = {i.instance_id: i.inbox_addr for i in view.instances}
        was_bypass, self.bypass = self.bypass, False
        return was_bypass

    def check(self, now: float) -> bool:
        """Enter bypass mode once the scheduler is silent for too long; True on the switch.
        Never before a first view: without instances there is nothing to bypass to, and the
        scheduler learns of this gateway only from its messages."""
        if self.bypass or self.view is None or now - self.last_heard <= self.bypass_after_s:
            return False
        self.bypass = True
        return True

    @property
    def num_instances(self) -> int:
        return len(self._addr_of)

    def next_worker(self) -> wire.InstanceAddr | None:
        """Round robin over the last view's instances (bypass dispatch)."""
        if self.view is None or not self.view.instances:
            return None
        instances = self.view.instances
        self._next = (self._next + 1) % len(instances)
        return instances[self._next]

    def addr_of(self, instance_id: str | None) -> str | None:
        return self._addr_of.get(instance_id) if instance_id is not None else None

    def departed_addr(self, instance_id: str) -> str | None:
        """The inbox of a dead instance, unless another instance of the view has it too:
        the gateway closes its socket there."""
        addr = self._addr_of.get(instance_id)
        if addr is None or any(a == addr for i, a in self._addr_of.items() if i != instance_id):
            return None
        return addr

    def health(self) -> tuple[bool, str]:
        """(ready?, reason) for /health: ready once some instance can take a request, that
        is while the last view (or, in bypass mode, the last view kept) lists one."""
        if not self.bypass:
            if self.view is None:
                return False, "no instance view from the scheduler yet"
            if not self.num_instances:
                return False, "the scheduler knows no instance that can serve yet"
            return True, f"scheduler view with {self.num_instances} instances"
        if self.num_instances:
            return True, f"bypass mode: scheduler silent, {self.num_instances} instances known"
        return False, "scheduler silent and no instances known"
