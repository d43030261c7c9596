"""What a profile says about each device, and the cluster profile's JSON file (written by tpimpi.profile).

All figures are measured on the device itself, by the rank that will run there, with the threads it will
use: decode products as weight bytes per second (the runtime's own path for each storage dtype: BLAS for
float32, upcast one block then BLAS for 16-bit), prefill products as flops per second, the fixed cost of
one attention and one MLP block besides their products (norms, rotary embedding, attention over a short
context, the layer loop's Python) and of rank 0's per-token work besides the head's products, the
memory it may plan for (its cgroup's limit included), disk reads with O_DIRECT and from the page cache,
the link to rank 0 (half a ping-pong round trip: latency at a few bytes, bandwidth at a large message),
and the CPU quota of its cgroup where it has one (an emulated slow device: tpimpi.cpulimit).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import UsageError

FORMAT, VERSION = "tpimpi-profile", 1
OPTIONAL = ("cores", "threads", "token_overhead_s", "cpu_quota", "cpu_period_s")  # fields a profile may leave out (older ones do)


@dataclass(frozen=True)
class Device:
    """One rank's device as the cost model sees it."""

    host: str
    matvec_Bps: dict  # storage dtype -> weight bytes per second in a one-token product
    gemm_flops: dict  # storage dtype -> flops per second in a prefill product
    attn_overhead_s: float  # fixed cost of one attention block (everything but streaming its weights)
    mlp_overhead_s: float  # the same for one MLP block
    mem_bytes: int  # memory this rank may plan for (node's available share, or its cgroup's limit)
    disk_direct_Bps: float  # O_DIRECT sequential reads of block-sized chunks
    disk_cache_Bps: float  # the same reads served from the page cache
    link_latency_s: float = 0.0  # one message to rank 0 (0 on rank 0)
    link_Bps: float = math.inf  # bandwidth to rank 0 (inf on rank 0)
    cores: int = 1
    threads: int = 1
    token_overhead_s: float = 0.0  # rank 0's work per token besides the head's products (norm, sampling)
    cpu_quota: float = 0.0  # cores of CPU time its cgroup allows (CFS bandwidth control); 0: no quota
    cpu_period_s: float = 0.0  # the quota's period

    def to_dict(self) -> dict:
        d = asdict(self)
        d["link_Bps"] = None if math.isinf(self.link_Bps) else self.link_Bps
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Device":
        known = {f.name for f in fields(cls)}
        missing = {f.name for f in fields(cls) if f.name not in OPTIONAL} - set(d)
        if missing or set(d) - known:
            raise UsageError(f"{where}: device entry has missing fields {sorted(missing)} or unknown "
                             f"ones {sorted(set(d) - known)}")
        d = dict(d, link_Bps=math.inf if d["link_Bps"] is None else d["link_Bps"])
        dev = cls(**d)
        rates = list(dev.matvec_Bps.values()) + list(dev.gemm_flops.values())
        positive = [dev.disk_direct_Bps, dev.disk_cache_Bps, dev.link_Bps, dev.mem_bytes, *rates]
        if not dev.matvec_Bps or not all(isinstance(v, (int, float)) and v > 0 for v in positive) or \
                min(dev.attn_overhead_s, dev.mlp_overhead_s, dev.link_latency_s, dev.token_overhead_s,
                    dev.cpu_quota, dev.cpu_period_s) < 0:
            raise UsageError(f"{where}: device figures must be positive numbers (got {d})")
        return dev


@dataclass(frozen=True)
class Profile:
    """The devices of a cluster, in launch order (index = the rank that measured it; 0 is the master)."""

    devices: tuple[Device, ...]
    model: str = ""  # the model whose shapes the products were measured at
    allreduce_s: dict | None = None  # measured allreduce medians at the profile's size, for reference
    config: dict | None = None  # the model config the products were measured at

    @property
    def hosts(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, d in enumerate(self.devices):
            out.setdefault(d.host, []).append(i)
        return out

    def to_json(self, extra: dict | None = None) -> str:
        d = {"format": FORMAT, "version": VERSION, "model": self.model, "hosts": self.hosts,
             "ranks_per_host": {h: len(r) for h, r in self.hosts.items()},
             "devices": [dv.to_dict() for dv in self.devices], "allreduce_s": self.allreduce_s, **(extra or {})}
        return json.dumps(d, indent=1)


def load_profile(path: str | Path) -> Profile:
    """Read and check a profile written by tpimpi.profile (or by hand, for devices measured elsewhere)."""
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read profile {str(path)!r}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"profile {str(path)!r} is not JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
        raise UsageError(f"{path}: not a {FORMAT} file of version {VERSION} (write one with: "
                         f"mpirun -np N python -m tpimpi.profile --out {path})")
    devs = d.get("devices")
    if not isinstance(devs, list) or not devs:
        raise UsageError(f"{path}: the profile lists no devices")
    return Profile(tuple(Device.from_dict(x, f"{path}: device {i}") for i, x in enumerate(devs)),
                   str(d.get("model", "")), d.get("allreduce_s"), d.get("config"))
