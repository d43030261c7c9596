"""Runs tpimpi.generate while recording every file this process opens (Python's audit hooks).

    mpirun -np N python tests/privacy_probe.py OUT_DIR [generate args...]

Each rank writes OUT_DIR/opened-RANK.json: the paths it opened and the modules it imported.
"""

import json
import os
import sys

opened = []
sys.addaudithook(lambda event, args: opened.append(os.fspath(args[0])) if event == "open" and isinstance(
    args[0], (str, bytes, os.PathLike)) else None)

from tpimpi import generate  # noqa: E402

out_dir = sys.argv[1]
code = generate.main(sys.argv[2:])
rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
with open(os.path.join(out_dir, f"opened-{rank}.json"), "w") as f:
    json.dump({"opened": [p if isinstance(p, str) else p.decode() for p in opened],
               "modules": sorted(sys.modules)}, f)
sys.exit(code)
