"""Runs tpimpi.generate's command line on this rank while recording what the rank sees.

    mpirun -np N python tests/privacy_probe.py OUT_DIR [generate args...]

Each rank writes, in OUT_DIR:
  pid-RANK              its process id, at start (the test watches /proc/PID while it runs)
  comm-RANK.bin / .idx  every buffer passed to or returned by an MPI call of the communication layer
                        (send and receive buffers, snapshot when the tpimpi.comm method that made the
                        call returns, so non-blocking receives are complete), one index line per buffer:
                        "method nbytes" (and "method 0" for the call itself)
  opened-RANK.json      the paths Python opened (audit hooks) and the modules imported

The recording wraps the real MPI communicator; every message still goes through MPI as in a normal run.

TPIMPI_PROBE_LEAK (comma-separated) makes this a deliberately leaking variant, for the negative
controls: "comm" broadcasts the prompt's text and token ids from rank 0 to every rank through the
communication layer; "file" makes every rank open and read --system-file.
"""

import json
import os
import sys

opened = []
sys.addaudithook(lambda event, args: opened.append(os.fspath(args[0])) if event == "open" and isinstance(
    args[0], (str, bytes, os.PathLike)) else None)

import numpy as np  # noqa: E402

from tpimpi import comm as comm_mod  # noqa: E402
from tpimpi import engine, generate  # noqa: E402

OUT = sys.argv[1]
RANK = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
LEAK = set(filter(None, os.environ.get("TPIMPI_PROBE_LEAK", "").split(",")))
METHODS = ("setup", "allreduce_", "bcast_", "agree", "bcast_bytes", "gather_ints", "barrier", "measure_auto",
           "time_allreduce", "abort")

with open(os.path.join(OUT, f"pid-{RANK}"), "w") as f:
    f.write(str(os.getpid()))
_bin = open(os.path.join(OUT, f"comm-{RANK}.bin"), "wb")
_idx = open(os.path.join(OUT, f"comm-{RANK}.idx"), "w")
_pending = []  # buffers of MPI calls made since the current comm method started


def _as_bytes(obj):
    if isinstance(obj, np.ndarray):
        return obj.tobytes()
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    return None


class RecordingMPIComm:
    """MPI.COMM_WORLD, with every buffer argument and every return value of its calls kept for the record."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            out = attr(*args, **kwargs)
            for a in list(args) + list(kwargs.values()) + [out]:
                for item in (a if isinstance(a, (list, tuple)) else [a]):
                    if _as_bytes(item) is not None:
                        _pending.append(item)
                    elif item is not None and not hasattr(item, "Wait"):  # lowercase calls: python objects
                        _pending.append(repr(item).encode())
            return out

        return call


def _flush(method):
    _idx.write(f"{method} 0\n")  # the call itself, with or without buffers
    for buf in _pending:
        data = _as_bytes(buf)
        _bin.write(data)
        _idx.write(f"{method} {len(data)}\n")
    _pending.clear()
    _bin.flush()
    _idx.flush()


def _recorded(method, fn):
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        finally:
            _flush(method)

    return wrapper


_init = comm_mod.MPIComm.__init__


def _init_recording(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.comm = RecordingMPIComm(self.comm)


comm_mod.MPIComm.__init__ = _init_recording
for _m in METHODS:
    setattr(comm_mod.MPIComm, _m, _recorded(_m, getattr(comm_mod.MPIComm, _m)))

if "comm" in LEAK or "file" in LEAK:
    _texts, _generate = generate._texts_on_rank0, engine.Engine.generate

    def _leaky_texts(comm, args, *rest):
        texts = _texts(comm, args, *rest)
        if "comm" in LEAK:  # a buggy version that sends the prompt to every rank
            comm.bcast_bytes(texts[0].encode() if comm.rank == 0 else None)
        if "file" in LEAK and comm.rank != 0 and args.system_file:  # ... or lets workers read it
            with open(args.system_file, "rb") as f:
                f.read()
        return texts

    def _leaky_generate(self, prompt_ids, *args, **kwargs):
        if "comm" in LEAK:
            self.comm.bcast_bytes(np.array(prompt_ids, dtype=np.int64).tobytes() if self.comm.rank == 0 else None)
        return _generate(self, prompt_ids, *args, **kwargs)

    generate._texts_on_rank0, engine.Engine.generate = _leaky_texts, _leaky_generate

code = generate.main(sys.argv[2:])
with open(os.path.join(OUT, f"opened-{RANK}.json"), "w") as f:
    json.dump({"opened": [p if isinstance(p, str) else p.decode() for p in opened],
               "modules": sorted(sys.modules)}, f)
sys.exit(code)
