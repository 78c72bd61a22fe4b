"""Autoscaling policy: how many replicas the load asks for. Plain Python (no gRPC, no Ray).

The signal is the one users of Ray Serve LLM and KServe ask for: the queue, not the request
count. Every tick (about a second) the gateway observes, over its ready replicas, the requests
waiting for a first step in the replicas' schedulers, the sequences running, and the share of
KV-cache pages in use:
- up: waiting per ready replica >= up_queue, or KV use >= up_kv, held for `window` seconds;
- down: nothing waiting, KV use < down_kv, and the running sequences would fill the other
  replicas' sequence slots to at most `down_busy`, held for `window` seconds (the replica drains
  before it goes, so nothing is lost; without the last rule a saturated pair of replicas with an
  empty queue would shrink and refill its queue: flapping);
- after a change, nothing moves for `cooldown` seconds, so it does not flap; one replica at a
  time, always within [min_replicas, max_replicas].
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AutoscaleConfig:
    """Bounds and thresholds of the policy."""

    min_replicas: int
    max_replicas: int
    up_queue: float = 2.0  # waiting requests per ready replica that ask for one more replica
    up_kv: float = 0.9  # KV-cache use (pages in use / pages) that asks for one more
    down_kv: float = 0.5  # with nothing waiting and KV use below this, one fewer ...
    down_busy: float = 0.5  # ... if the running sequences fill at most this share of the others' slots
    window: float = 10.0  # seconds a signal must hold before the policy acts on it
    cooldown: float = 30.0  # seconds after a change before the next

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if not self.up_queue > 0:
            raise ValueError(f"up_queue must be > 0, got {self.up_queue}")
        if not 0 <= self.down_kv < self.up_kv <= 1:
            raise ValueError(f"need 0 <= down_kv < up_kv <= 1, got {self.down_kv}, {self.up_kv}")
        if not 0 < self.down_busy <= 1:
            raise ValueError(f"down_busy must be in (0, 1], got {self.down_busy}")
        if self.window < 0 or self.cooldown < 0:
            raise ValueError(f"window and cooldown must be >= 0, got {self.window}, {self.cooldown}")

    def bounded(self, replicas: int) -> int:
        """`replicas` moved inside [min_replicas, max_replicas]."""
        return min(max(replicas, self.min_replicas), self.max_replicas)


@dataclasses.dataclass(frozen=True)
class Load:
    """One observation of the ready replicas."""

    ready: int  # replicas serving
    waiting: int  # requests waiting for their first step in the replicas' schedulers
    kv_use: float  # pages in use / pages, over the ready replicas (0..1)
    running: int = 0  # sequences running in the ready replicas
    slots: int = 0  # sequences one replica may run at once (its max_num_seqs)


class Autoscaler:
    """Turns a stream of observations into the number of replicas wanted."""

    def __init__(self, config: AutoscaleConfig):
        self.config = config
        self._signal = 0  # +1 up, -1 down, 0 neither: what the load asked for at the last tick
        self._since: float | None = None  # when that signal started
        self._changed_at: float | None = None  # when the last change was made

    def signal(self, load: Load) -> int:
        """+1 when the load asks for a replica more, -1 for one fewer, 0 otherwise."""
        c = self.config
        if load.ready and (load.waiting / load.ready >= c.up_queue or load.kv_use >= c.up_kv):
            return 1
        others = (load.ready - 1) * load.slots  # sequence slots left if one replica goes
        if load.waiting == 0 and load.kv_use < c.down_kv and load.running <= c.down_busy * others:
            return -1
        return 0

    def desired(self, now: float, load: Load, current: int) -> int:
        """Replicas wanted at time `now` (seconds, monotonic) given `current` replicas."""
        c = self.config
        cooling = self._changed_at is not None and now - self._changed_at < c.cooldown
        bounded = c.bounded(current)
        if bounded != current:  # out of bounds (at start, or set by hand): back inside, no window
            return current if cooling else self._changed(now, bounded)
        signal = self.signal(load)
        if signal != self._signal:
            self._signal, self._since = signal, now
        if signal == 0 or now - self._since < c.window or cooling:
            return current
        wanted = c.bounded(current + signal)
        return self._changed(now, wanted) if wanted != current else current

    def _changed(self, now: float, wanted: int) -> int:
        self._changed_at, self._since = now, now  # the new size must earn the next change afresh
        return wanted

    def failed(self, now: float) -> None:
        """A change could not be made (a replica that never got placed): wait a cooldown to retry."""
        self._changed_at = now
