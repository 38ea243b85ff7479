"""The link model of :mod:`tandem.bench.netem`: a profile (delay, jitter, bandwidth, down)
and the schedule that says when each message crossing one direction of the link is delivered.

Per direction (edge → cloud and cloud → edge, same profile each way), a message that reaches
the relay at ``arrival`` is delivered at

    release = max(previous release, wire_done + delay + U(-jitter, +jitter))

where ``wire_done`` is when its last byte left a wire of ``bandwidth`` bytes/s that sends one
message at a time (``arrival`` when the bandwidth is unlimited). A message's size is the sum
of its frames (ZMTP framing is not counted). The ``max`` keeps each direction in order, as
TCP does: jitter spreads delays but never reorders. See :class:`LinkSchedule`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """One link, the same each way: ``delay_ms`` one way (ms), ``jitter_ms`` (uniform ±, ms,
    never reordering), ``bandwidth`` (bytes/s; None: unlimited), ``down`` (the link is cut)."""

    name: str = "custom"
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth: float | None = None
    down: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay_ms) and self.delay_ms >= 0):
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms}")
        if not (math.isfinite(self.jitter_ms) and self.jitter_ms >= 0):
            raise ValueError(f"jitter_ms must be >= 0, got {self.jitter_ms}")
        if self.bandwidth is not None and not (
            math.isfinite(self.bandwidth) and self.bandwidth > 0
        ):
            raise ValueError(f"bandwidth must be > 0 bytes/s (or None), got {self.bandwidth}")

    def describe(self) -> str:
        if self.down:
            return f"{self.name}: link down"
        bw = "unlimited" if self.bandwidth is None else f"{self.bandwidth * 8 / 1e6:g} Mbit/s"
        return f"{self.name}: {self.delay_ms:g} ± {self.jitter_ms:g} ms one way, {bw}"


PROFILES: dict[str, LinkProfile] = {
    p.name: p
    for p in (
        # wired LAN: 0.25 ms one way (0.5 ms round trip), no jitter, unlimited bandwidth
        LinkProfile("lan", delay_ms=0.25),
        # good Wi-Fi: 2 ± 1 ms one way, unlimited bandwidth
        LinkProfile("wifi", delay_ms=2.0, jitter_ms=1.0),
        # LTE: 25 ± 5 ms one way, 20 Mbit/s (2.5 MB/s) each way
        LinkProfile("lte", delay_ms=25.0, jitter_ms=5.0, bandwidth=20e6 / 8),
        # a congested cellular link: 60 ± 20 ms one way, 2 Mbit/s (250 kB/s) each way
        LinkProfile("congested", delay_ms=60.0, jitter_ms=20.0, bandwidth=2e6 / 8),
        # no link: every message is lost
        LinkProfile("offline", down=True),
    )
}
"""Built-in profiles: ``lan`` 0.25 ms one way; ``wifi`` 2 ± 1 ms; ``lte`` 25 ± 5 ms at
20 Mbit/s; ``congested`` 60 ± 20 ms at 2 Mbit/s; ``offline`` link down."""


def custom(
    *,
    delay_ms: float = 0.0,
    jitter_ms: float = 0.0,
    bandwidth: float | None = None,
    name: str = "custom",
) -> LinkProfile:
    """A profile with these figures (ms one way, bytes/s)."""
    return LinkProfile(name, delay_ms=delay_ms, jitter_ms=jitter_ms, bandwidth=bandwidth)


def profile(name: str) -> LinkProfile:
    """The built-in profile ``name``."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; built in: {', '.join(PROFILES)}") from None


class LinkSchedule:
    """When each message crossing one direction of a link is delivered (seconds, on the
    relay's monotonic clock).

    Worked example: delay 10 ms, no jitter, bandwidth 1000 bytes/s. A 5-byte message arriving
    at t = 0 is on the wire 0 → 0.005 s and delivered at 0.015 s; a 5-byte message arriving at
    0.001 s waits for the wire (0.005 → 0.010 s) and is delivered at 0.020 s. With jitter
    ±10 ms as well, draws of 0 and −8 ms would deliver the second at 0.010 + 0.002 = 0.012 s,
    before the first: it is held to 0.015 s instead, since delivery never reorders.
    """

    def __init__(self, link: LinkProfile, rng: random.Random | None = None) -> None:
        self.delay_s = link.delay_ms / 1e3
        self.jitter_s = link.jitter_ms / 1e3
        self.bandwidth = link.bandwidth
        self._rng = rng or random.Random()
        self._wire_free = -math.inf  # when the wire finishes the message on it
        self._last = -math.inf  # the previous release

    def release(self, arrival: float, nbytes: int) -> float:
        sent = arrival
        if self.bandwidth is not None:
            sent = self._wire_free = max(arrival, self._wire_free) + nbytes / self.bandwidth
        delay = self.delay_s
        if self.jitter_s:
            delay = max(0.0, delay + self._rng.uniform(-self.jitter_s, self.jitter_s))
        t = self._last = max(self._last, sent + delay)
        return t
