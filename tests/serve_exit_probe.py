"""Runs tpimpi.serve and records how each rank's process ends: OUT_DIR/exit-RANK holds the exit code,
whether main() returned or the process ended itself with os._exit (as the server does when mpirun ends the
job). A rank that was killed leaves no file.

    mpirun -np N python tests/serve_exit_probe.py OUT_DIR [serve args...]
"""

import os
import sys

from tpimpi.serve.__main__ import main

out_dir = sys.argv[1]
rank = os.environ.get("OMPI_COMM_WORLD_RANK", "0")
real_exit = os._exit


def record(code: int) -> None:
    with open(os.path.join(out_dir, f"exit-{rank}"), "w") as f:
        f.write(str(code))


def recording_exit(code: int) -> None:
    record(code)
    real_exit(code)


os._exit = recording_exit
code = main(sys.argv[2:])
record(code)
sys.exit(code)
