"""Starting `tpimpi.serve` under mpirun for the tests, and stopping it whatever happened."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

READY = re.compile(r"tpimpi: serving \S+ on (http://[^/\s]+)/")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str = ""
    pid_file: Path | None = None
    lines: list[str] = field(default_factory=list)  # standard error so far

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def rank0_pid(self) -> int:
        return int(self.pid_file.read_text())

    def terminate(self) -> None:
        """SIGTERM to rank 0 (the server drains and every rank exits 0)."""
        os.kill(self.rank0_pid(), signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """End mpirun and its ranks (for cleanup after a failure)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # mpirun forwards it and ends every rank
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(env: dict, model, np: int, *args, tmp: Path, script: Path | None = None, timeout: float = 120) -> Server:
    """mpirun -np N python -m tpimpi.serve --model M --port 0 ARGS; returns once it listens."""
    pid_file = tmp / "rank0.pid"
    cmd = [sys.executable] + ([str(script), str(tmp)] if script else ["-m", "tpimpi.serve"])
    cmd += ["--model", str(model), "--port", "0", "--pid-file", str(pid_file), *map(str, args)]
    if np > 1:
        cmd = ["mpirun", "-np", str(np)] + cmd
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    srv = Server(p, pid_file=pid_file)
    found = threading.Event()

    def read():
        for line in p.stderr:
            srv.lines.append(line)
            m = READY.search(line)
            if m:
                srv.url = m.group(1)
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.1):
        if p.poll() is not None or time.monotonic() > deadline:
            srv.kill()
            raise AssertionError(f"the server did not start: {srv.stderr}")
    while not pid_file.exists():
        time.sleep(0.01)
    return srv
