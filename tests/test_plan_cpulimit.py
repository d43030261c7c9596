"""tpimpi.cpulimit: a command runs under the CPU quota asked for, and the cgroup goes afterwards."""

import os
import subprocess
import sys

import pytest

from test_lowmem import SHOW_CGROUP, launcher_cgroup
from tpimpi.cpulimit import own_cpu_cgroup, parse_cores, quota_period

BURN = ("import time\nt, c = time.time(), time.process_time()\nwhile time.time() - t < 0.6: pass\n"
        "print((time.process_time() - c) / (time.time() - t))")


def test_parse_cores():
    assert parse_cores("0.5", 3) == 0.5 and parse_cores("1,0.6,0.2", 2) == 0.2
    for bad in ("0", "-1", "x"):
        with pytest.raises(ValueError):
            parse_cores(bad, 0)
    with pytest.raises(IndexError):
        parse_cores("1,1", 2)


def test_small_quotas_take_a_longer_period():
    assert quota_period(0.9) == (9000, 10_000) and quota_period(0.2) == (2000, 10_000)
    # the kernel's smallest quota is 1 ms: 0.03 cores is 1 ms every 33.4 ms (a 10 ms period would give 0.1)
    q, p = quota_period(0.03)
    assert q == 1000 and p == 33_334 and q / p == pytest.approx(0.03, rel=1e-3)
    assert quota_period(1e-4) == (1000, 1_000_000)  # the longest period: as little as the kernel allows
    assert quota_period(2.0) == (20_000, 10_000)


def test_a_command_gets_its_quota_and_the_cgroup_is_removed():
    cg = own_cpu_cgroup()
    if cg is None or os.geteuid() != 0 or not os.access(cg[1], os.W_OK):
        pytest.skip("needs root and a writable cpu cgroup controller")
    env = dict(os.environ, OMPI_COMM_WORLD_RANK="0")
    out = subprocess.run([sys.executable, "-m", "tpimpi.cpulimit", "--cpu", "0.2", "--", sys.executable, "-c", BURN],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 0.35  # a busy loop held to a fifth of a core (some slack for the period)
    # the command ran in a cgroup of its own, gone after (by name: tests beside this one make their own)
    out = subprocess.run([sys.executable, "-m", "tpimpi.cpulimit", "--cpu", "0.2", "--", *SHOW_CGROUP],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert not (cg[1] / launcher_cgroup(out.stdout, "tpimpi-cpu")).exists()
    out = subprocess.run([sys.executable, "-m", "tpimpi.cpulimit", "--cpu", "0.03", "--", sys.executable, "-c", BURN],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 0.06  # not the 0.1 a 1 ms quota every 10 ms would give


def test_bad_quota_is_one_message_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "tpimpi.cpulimit", "--cpu", "0", "--", "true"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("tpimpi.cpulimit: --cpu '0'")
