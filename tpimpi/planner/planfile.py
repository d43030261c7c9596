"""The plan file: which devices run, their shares, memory modes and the allreduce, with the prediction.

Written by `python -m tpimpi.plan`; `convert`, `generate`, `bench` (and the server) take `--plan-file`
and use it as it is, after checking that it was made for this model and for the ranks launched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig
from ..errors import TpimpiError, UsageError
from .costmodel import Mode

FORMAT, VERSION = "tpimpi-plan", 1


def resolve_model(model: str | None) -> tuple[ModelConfig, str, str | None]:
    """(config, label, store dtype or None) of a store, a GGUF / Hugging Face source, a shape name of
    tpimpi.synth, or the default model (None). Reads headers only."""
    from ..models import default_model_path, is_store
    from ..sources import open_source
    from ..store import load_manifest
    from ..synth import SHAPES, shape_config

    if model is not None and model in SHAPES and not Path(model).exists():
        return shape_config(model), model, None
    if model is not None and is_store(Path(model)):
        m = load_manifest(model)
        return m["config"], model, m["dtype"]
    source = Path(model) if model is not None else default_model_path()
    if source.is_file():  # a store converted from this very file already has its config (reading a GGUF takes seconds)
        from ..errors import StoreError
        from ..models import cached_store_dir

        for manifest in sorted(cached_store_dir(source, 1, (1.0,), "float32").parent.glob("*/manifest.json")):
            try:
                return load_manifest(manifest.parent)["config"], model or "default", None
            except StoreError:
                continue
    return open_source(source).config, model or "default", None


@dataclass(frozen=True)
class PlanFile:
    """A plan as read from its file."""

    path: str
    config: dict
    model: str
    dtype: str
    allreduce: str
    ratios: tuple[float, ...]
    modes: tuple[Mode, ...]
    devices: tuple[int, ...]  # the profile's index of the device each rank runs on
    hosts: tuple[str, ...]
    max_seq: int
    chunk: int
    predicted: dict
    mpirun: str
    raw: dict  # the whole file, for the record (traces keep it to draw the prediction beside the run)

    @property
    def world(self) -> int:
        return len(self.ratios)

    def memory_options(self, rank: int, io: str = "cache", compute: str = "float32"):
        """The MemoryOptions rank `rank` runs with."""
        from dataclasses import replace

        return replace(self.modes[rank].options(self.chunk, io), compute=compute)

    def check(self, world: int, cfg: ModelConfig | None = None) -> None:
        """Refuse a launch of another rank count, or another model, with one message saying what to do."""
        if world != self.world:
            raise UsageError(f"plan file {self.path!r} is for {self.world} ranks (devices "
                             f"{', '.join(map(str, self.devices))} of its profile), launched with {world}; "
                             f"launch it as the plan says: {self.mpirun} ...")
        if cfg is not None and _key(cfg.to_dict()) != _key(self.config):
            mine, theirs = _shape(cfg.to_dict()), _shape(self.config)
            raise UsageError(f"plan file {self.path!r} was made for {self.model!r} ({theirs}), not this model "
                             f"({mine}); make a plan for it with: "
                             f"python -m tpimpi.plan --profile PROFILE --model MODEL")


SHAPE_KEYS = ("arch", "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "tied_embeddings",
              "attn_bias")  # what the split, the blocks and so the plan depend on


def _key(c: dict) -> tuple:
    return tuple(c.get(k) for k in SHAPE_KEYS)


def _shape(c: dict) -> str:
    return (f"{c['arch']}, {c['n_layers']} layers, hidden {c['hidden']}, {c['n_heads']} heads ({c['n_kv_heads']} KV), "
            f"FFN {c['ffn']}, vocab {c['vocab']}")


def write_plan(path: str, d: dict) -> None:
    """Write the plan's dict atomically (a half-written plan never looks valid)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dict(d, format=FORMAT, version=VERSION), f, indent=1)
    os.replace(tmp, path)


def load_plan(path: str) -> PlanFile:
    """Read a plan file, refusing anything that is not one with a clear message."""
    return _parse(_read_text(path), path)


def _parse(text: str, path: str) -> PlanFile:
    try:
        d = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--plan-file {path!r} is not JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
        raise UsageError(f"--plan-file {path!r} is not a {FORMAT} file of version {VERSION} "
                         f"(make one with: python -m tpimpi.plan --profile PROFILE --out {path})")
    try:
        ranks = d["ranks"]
        ModelConfig.from_dict(d["config"])
        p = PlanFile(str(path), d["config"], str(d["model"]), str(d["dtype"]), str(d["allreduce"]),
                     tuple(float(r["ratio"]) for r in ranks), tuple(Mode.from_dict(r["mode"]) for r in ranks),
                     tuple(int(r["device"]) for r in ranks), tuple(str(r["host"]) for r in ranks),
                     int(d["max_seq"]), int(d["chunk"]), dict(d["predicted"]), str(d["mpirun"]), d)
    except (KeyError, TypeError, ValueError, TpimpiError) as e:
        raise UsageError(f"--plan-file {path!r} is malformed ({type(e).__name__}: {e})") from None
    if not p.ratios or not all(r > 0 for r in p.ratios) or any(m.kind not in ("resident", "window", "budget")
                                                             for m in p.modes):
        raise UsageError(f"--plan-file {path!r} is malformed (ratios must be positive, modes resident/window/budget)")
    return p


def read_on_rank0(comm, path: str) -> PlanFile:
    """Collective: rank 0 reads the plan file (the only rank that need have it), every rank parses it."""
    from ..engine import collective

    text = collective(comm, lambda: _read_text(path) if comm.rank == 0 else "")
    raw = comm.bcast_bytes(text.encode() if comm.rank == 0 else None).decode()
    tmp = Path(path)
    return _parse(raw, str(tmp))


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read --plan-file {path!r}: {e.strerror}") from None


def apply_to_args(comm, args) -> PlanFile | None:
    """For an entry point's --plan-file (generate, bench, and the server's): read and check the plan
    against the launched ranks, refuse options it decides, and set the ratios, dtype, allreduce, context
    and (unless given) this rank's threads from it; the caller then takes each rank's memory options from
    plan.memory_options(rank) and checks the store with check_store. None without --plan-file."""
    if not getattr(args, "plan_file", None):
        return None
    plan = read_on_rank0(comm, args.plan_file)
    plan.check(comm.size)
    clash = [o for o, v in (("--ratios", args.ratios), ("--resident", getattr(args, "resident", False)),
                            ("--window", getattr(args, "window", None)),
                            ("--mem-budget", getattr(args, "mem_budget", None))) if v]
    if clash:
        raise UsageError(f"--plan-file sets every rank's share and memory mode; drop {', '.join(clash)}")
    # equal shares are no ratios at all: the same split, and the store cached for it
    args.ratios = None if len(set(plan.ratios)) == 1 else ",".join(repr(r) for r in plan.ratios)
    args.dtype, args.allreduce = plan.dtype, plan.allreduce
    figures = plan.raw.get("device_figures") or []
    if getattr(args, "threads", None) is None and len(figures) == plan.world:
        # the device was profiled with this many threads: with others (e.g. fewer ranks now share the
        # node) its figures, and so the plan, would not hold
        args.threads = int(figures[comm.rank].get("threads", 0)) or None
    if getattr(args, "max_seq_len", None) is None:
        args.max_seq_len = plan.max_seq
    return plan


def check_store(plan: PlanFile, path: str) -> None:
    """The store about to run was made for this plan: same model, split and dtype."""
    from ..shard import plan as split_plan
    from ..store import load_manifest

    m = load_manifest(path)
    plan.check(len(m["ratios"]), m["config"])
    cfg = m["config"]
    same = split_plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, m["ratios"]) == \
        split_plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, plan.ratios)
    if not same or m["dtype"] != plan.dtype:
        raise UsageError(f"store {path!r} is split with ratios {m['ratios']} in {m['dtype']}, the plan asks "
                         f"{list(plan.ratios)} in {plan.dtype}; split it with: python -m tpimpi.convert SOURCE "
                         f"--plan-file {plan.path}")
