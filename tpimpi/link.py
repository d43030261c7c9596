"""An emulated network link for runs on one machine (this kernel has no netem): comm.py's algorithms wait
as each message would on a link of the given latency and bandwidth, so cluster-like timings can be measured
without one (tpimpi.planner's cost model uses the same arithmetic)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import TpimpiError


@dataclass(frozen=True)
class Link:
    """An emulated network link (this kernel has no netem): a message waits latency + bytes / bandwidth
    before it is sent. Zero latency and bandwidth 0 (unlimited) emulate nothing."""

    latency_s: float = 0.0
    bandwidth_Bps: float = 0.0

    @classmethod
    def from_cli(cls, latency_ms: float, bandwidth_mbps: float) -> "Link":
        """From the command line's milliseconds and megabits per second (0 = not emulated)."""
        if latency_ms < 0 or bandwidth_mbps < 0:
            raise TpimpiError("--link-latency-ms and --link-bandwidth-mbps must not be negative")
        return cls(latency_ms / 1e3, bandwidth_mbps * 1e6 / 8)

    @property
    def active(self) -> bool:
        return self.latency_s > 0 or self.bandwidth_Bps > 0

    def wait(self, nbytes: int, copies: int = 1, hops: int = 1) -> None:
        """Sleep for `hops` message latencies plus `copies` messages of nbytes through the link."""
        t = hops * self.latency_s + (copies * nbytes / self.bandwidth_Bps if self.bandwidth_Bps else 0.0)
        if t > 0:
            time.sleep(t)
