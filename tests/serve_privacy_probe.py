"""Runs tpimpi.serve while recording, on every rank, the files it opens (Python's audit hooks) and, on the
workers, every byte they receive from other ranks (the broadcasts and allreduces of the comm object).

    mpirun -np N python tests/serve_privacy_probe.py OUT_DIR [serve args...]

Each rank writes OUT_DIR/opened-RANK.json (paths opened, modules imported) and OUT_DIR/received-RANK.bin.
"""

import json
import os
import sys

opened = []
sys.addaudithook(lambda event, args: opened.append(os.fspath(args[0])) if event == "open" and isinstance(
    args[0], (str, bytes, os.PathLike)) else None)

from tpimpi import comm as comm_mod  # noqa: E402
from tpimpi.serve.__main__ import main  # noqa: E402

received = bytearray()
LIMIT = 256 << 20


def recording(fn):
    def wrapper(self, buf, *rest):
        fn(self, buf, *rest)
        if self.rank != 0 and len(received) < LIMIT:
            received.extend(buf.tobytes())
    return wrapper


for name in ("bcast_", "bcast_idle_", "allreduce_", "bcast_bytes"):
    original = getattr(comm_mod.MPIComm, name)
    if name == "bcast_bytes":
        def bcast_bytes(self, data, _f=original):
            out = _f(self, data)
            if self.rank != 0:
                received.extend(out)
            return out
        comm_mod.MPIComm.bcast_bytes = bcast_bytes
    else:
        setattr(comm_mod.MPIComm, name, recording(original))

out_dir = sys.argv[1]
code = main(sys.argv[2:])
rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
with open(os.path.join(out_dir, f"opened-{rank}.json"), "w") as f:
    json.dump({"opened": [p if isinstance(p, str) else p.decode() for p in opened],
               "modules": sorted(sys.modules)}, f)
with open(os.path.join(out_dir, f"received-{rank}.bin"), "wb") as f:
    f.write(received)
sys.exit(code)
