"""Per-token traces: when each rank computed, waited for a read, waited in an allreduce, and what it read
and sent, written to HDF5 (`--trace FILE.h5` on generate and bench) and drawn by `tpimpi.report --timeline`.

Recording is off unless asked. When on, the forward pass, the scheduler and its reader thread append
(step, kind, start, end, bytes) rows to preallocated int64 arrays, with perf_counter_ns times: no
allocation per event, one branch per event when off. At the end every rank's rows go to rank 0 (as
int64 words, nothing pickled), times measured from a barrier every rank passed together.

File layout (times in seconds from that barrier; [steps, ranks] arrays, a step = one forward pass, the
prompt's chunks first, then one per generated token):
    steps/start, steps/end            the forward pass on each rank (rank 0's head and sampling follow it)
    steps/compute_s, io_wait_s, allreduce_s    the pass split three ways (allreduce: waiting for the slowest
                                      rank included; rank 0's waits for head chunks, between passes, are
                                      only in events)
    steps/bytes_read, bytes_sent      read by the window's reader; sent in allreduces and broadcasts
    steps/positions [steps]           prompt positions (or 1) of the pass
    events [n, 6]                     rank, step, kind, start ns, end ns, bytes (kinds: attrs["kinds"])
    attrs: ranks, allreduce, hidden, model, and the plan (JSON) when the run had --plan-file
"""

from __future__ import annotations

import json
import time

import numpy as np

KINDS = ("step", "allreduce", "io_wait", "read")
STEP, ALLREDUCE, IO_WAIT, READ = range(len(KINDS))


class _Rows:
    """A growable table of int64 rows [step, kind, t0 ns, t1 ns, bytes]; one writer thread per table."""

    def __init__(self, capacity: int):
        self.a = np.zeros((capacity, 5), dtype=np.int64)  # [rows, (step, kind, t0, t1, bytes)]
        self.n = 0

    def add(self, step: int, kind: int, t0: float, t1: float, nbytes: int) -> None:
        if self.n == len(self.a):  # rare: doubled outside any per-token budget the caller sized for
            self.a = np.concatenate([self.a, np.zeros_like(self.a)])
        self.a[self.n] = (step, kind, int(t0 * 1e9), int(t1 * 1e9), nbytes)
        self.n += 1


class Tracer:
    """The events of one rank. `add` is called from the compute thread, `add_read` from the reader."""

    def __init__(self, capacity: int = 1 << 15):
        self.main, self.reads = _Rows(capacity), _Rows(capacity)
        self.step = 0
        self.zero = time.perf_counter()

    def add(self, kind: int, t0: float, t1: float, nbytes: int = 0) -> None:
        self.main.add(self.step, kind, t0, t1, nbytes)

    def end_step(self, t0: float, t1: float, positions: int) -> None:
        self.main.add(self.step, STEP, t0, t1, positions)
        self.step += 1

    def add_read(self, t0: float, t1: float, nbytes: int) -> None:
        self.reads.add(self.step, READ, t0, t1, nbytes)

    def rows(self) -> np.ndarray:
        """[n, 5] rows of both tables, times from this tracer's zero."""
        a = np.concatenate([self.main.a[: self.main.n], self.reads.a[: self.reads.n]])
        a[:, 2:4] -= int(self.zero * 1e9)
        return a


def attach(engine, comm) -> Tracer:
    """Start tracing an engine's forward passes, scheduler and reader (collective: the zero is a barrier)."""
    tr = Tracer()
    comm.barrier()
    tr.zero = time.perf_counter()
    engine.model.trace = tr
    engine.blocks.trace = tr
    if engine.blocks._reader is not None:
        engine.blocks._reader.trace = tr
    return tr


def _gather_rows(comm, rows: np.ndarray) -> list[np.ndarray]:
    n = max(r[0] for r in comm.gather_ints([len(rows)]))
    pad = np.full((n, 5), -1, dtype=np.int64)
    pad[: len(rows)] = rows
    return [np.array(r, dtype=np.int64).reshape(n, 5) for r in comm.gather_ints(pad.reshape(-1))]


def summarize(per_rank: list[np.ndarray], algo: str, hidden: int) -> dict[str, np.ndarray]:
    """The [steps, ranks] arrays of the file from every rank's rows."""
    from .planner.costmodel import CTRL_BYTES, bytes_sent

    k = len(per_rank)
    steps = min(int((r[:, 1] == STEP).sum()) for r in per_rank)
    out = {name: np.zeros((steps, k)) for name in ("start", "end", "compute_s", "io_wait_s", "allreduce_s")}
    out.update(bytes_read=np.zeros((steps, k), dtype=np.int64), bytes_sent=np.zeros((steps, k), dtype=np.int64),
               positions=np.zeros(steps, dtype=np.int64))
    for r, rows in enumerate(per_rank):
        rows = rows[rows[:, 1] >= 0]
        s, kind = rows[:, 0], rows[:, 1]
        dur = (rows[:, 3] - rows[:, 2]) / 1e9
        for i in range(steps):
            st = rows[(s == i) & (kind == STEP)][0]
            out["start"][i, r], out["end"][i, r] = st[2] / 1e9, st[3] / 1e9
            out["positions"][i] = st[4]
            inside = (rows[:, 2] >= st[2]) & (rows[:, 3] <= st[3])  # rank 0's head waits fall between passes
            ar = inside & (kind == ALLREDUCE)
            io = inside & (kind == IO_WAIT)
            out["allreduce_s"][i, r] = dur[ar].sum()
            out["io_wait_s"][i, r] = dur[io].sum()
            out["compute_s"][i, r] = (st[3] - st[2]) / 1e9 - dur[ar].sum() - dur[io].sum()
            out["bytes_read"][i, r] = rows[(s == i) & (kind == READ), 4].sum()
            sent = sum(bytes_sent(algo, r, k, int(b)) for b in rows[ar, 4]) if algo != "auto" else 0
            if r == 0:
                sent += (k - 1) * (CTRL_BYTES + int(st[4]) * hidden * 4)
            out["bytes_sent"][i, r] = sent
    return out


def write(comm, tracer: Tracer, path: str, attrs: dict) -> None:
    """Collective: gather every rank's events and write the HDF5 file on rank 0 (under a temporary name,
    renamed at the end: a half-written trace never looks complete)."""
    per_rank = _gather_rows(comm, tracer.rows())
    if comm.rank != 0:
        return
    import os

    import h5py

    summary = summarize(per_rank, attrs.get("allreduce", "star"), int(attrs["hidden"]))
    tmp = f"{path}.tmp-{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        for name, arr in summary.items():
            f.create_dataset(f"steps/{name}", data=arr)
        ev = np.concatenate([np.column_stack([np.full(len(x), r), x]) for r, x in enumerate(per_rank)])
        f.create_dataset("events", data=ev[ev[:, 2] >= 0], compression="gzip")
        f.attrs["kinds"] = ",".join(KINDS)
        f.attrs["ranks"] = len(per_rank)
        for k, v in attrs.items():
            f.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v)
    os.replace(tmp, path)


def read(path: str) -> dict:
    """A trace file as {'steps': {name: array}, 'events': array, 'attrs': dict}."""
    import h5py

    with h5py.File(path, "r") as f:
        return {"steps": {k: f["steps"][k][()] for k in f["steps"]}, "events": f["events"][()],
                "attrs": dict(f.attrs)}


def predicted_events(tr: dict) -> tuple[list, float] | None:
    """The cost model's events for the traced run (when it ran from a plan), and its s/token."""
    from .config import ModelConfig
    from .planner.costmodel import Mode, predict
    from .planner.devices import Device

    plan = tr["attrs"].get("plan")
    if not plan:
        return None
    plan = json.loads(plan)
    cfg = ModelConfig.from_dict(plan["config"])
    devs = [Device.from_dict(d, "plan") for d in plan["device_figures"]]
    pos = tr["steps"]["positions"]
    prompt = int(pos[pos > 1].sum()) if (pos > 1).any() else 1
    events: list = []
    pred = predict(cfg, devs, [r["ratio"] for r in plan["ranks"]], [Mode.from_dict(r["mode"]) for r in plan["ranks"]],
                   plan["dtype"], plan["allreduce"], prompt_tokens=prompt, new_tokens=int((pos == 1).sum()) + 1,
                   max_seq=plan["max_seq"], chunk=plan["chunk"], io=plan.get("io", "cache"), events=events)
    return events, pred.s_per_token


COLORS = {"compute": "#4c72b0", "io_wait": "#c44e52", "allreduce": "#dd8452", "read": "#999999",
          "master": "#55a868"}


def _draw(ax, rows: dict, ranks: int, t0: float, title: str) -> None:
    """rows: kind -> list of (rank, start s, end s)."""
    for kind, spans in rows.items():
        for r, a, b in spans:
            y, h = (r - 0.38, 0.14) if kind == "read" else (r - 0.2, 0.55)
            ax.broken_barh([((a - t0) * 1e3, max((b - a) * 1e3, 1e-3))], (y, h), color=COLORS[kind], linewidth=0)
    ax.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)


def measured_rows(tr: dict, steps: list[int]) -> tuple[dict, float]:
    """kind -> (rank, start, end) spans of the chosen steps, and the first step's start."""
    st, ev = tr["steps"], tr["events"]
    kinds = tr["attrs"]["kinds"].split(",")
    rows: dict = {k: [] for k in COLORS}
    ranks = st["start"].shape[1]
    for r in range(ranks):
        for i in steps:
            rows["compute"].append((r, st["start"][i, r], st["end"][i, r]))
            if r == 0 and i + 1 < len(st["start"]):
                rows["master"].append((0, st["end"][i, 0], st["start"][i + 1, 0]))
    for rank, step, kind, a, b, _ in ev:
        if step in steps:
            name = kinds[kind]
            if name in rows:
                rows[name].append((int(rank), a / 1e9, b / 1e9))
    return rows, float(st["start"][steps[0]].min())


def draw_timeline(path: str, out: str, last: int = 2) -> str:
    """A PNG of the trace's last `last` steps, one row per rank, and the prediction below it when the
    run had a plan. Returns a one-paragraph text summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tr = read(path)
    st = tr["steps"]
    n, ranks = st["start"].shape
    steps = list(range(max(0, n - last), n))
    pred = predicted_events(tr)
    fig, axes = plt.subplots(2 if pred else 1, 1, figsize=(11, 1.2 + 0.9 * ranks * (2 if pred else 1)),
                             squeeze=False, sharex=True)
    rows, t0 = measured_rows(tr, steps)
    decode = st["positions"] == 1
    per_tok = float(np.mean(np.diff(st["start"][:, 0][decode]))) if decode.sum() > 1 else float("nan")
    _draw(axes[0][0], rows, ranks, t0, f"measured: steps {steps[0]}-{steps[-1]}, {per_tok:.4f} s/token")
    text = [f"{path}: {n} steps, {ranks} ranks, measured {per_tok:.4f} s/token"]
    if pred:
        events, s_tok = pred
        first = n - len(steps)
        prow: dict = {k: [] for k in COLORS}
        starts = [a for s, r, k, a, b in events if s == first]
        for s, r, k, a, b in events:
            if s >= first:
                prow[k].append((r, a, b))
        _draw(axes[1][0], prow, ranks, min(starts) if starts else 0.0,
              f"predicted by the cost model: {s_tok:.4f} s/token")
        text.append(f"predicted {s_tok:.4f} s/token")
    axes[-1][0].set_xlabel("ms")
    labels = {"compute": "compute", "io_wait": "waiting for a read", "allreduce": "allreduce (and waiting for the "
              "slowest rank)", "read": "reader thread reading", "master": "rank 0: head, sampling"}
    fig.legend(handles=[Patch(color=COLORS[k], label=v) for k, v in labels.items()], loc="lower center", ncol=5,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return "; ".join(text)
