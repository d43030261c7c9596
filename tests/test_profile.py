"""tpimpi.profile under mpirun: every rank measures its device and rank 0 writes a complete, valid profile."""

import json
import math
import tempfile

import pytest

from tpimpi import comm as comm_mod
from tpimpi.planner.devices import load_profile

pytestmark = pytest.mark.mpi(min_size=2)


def test_profile_is_complete_and_valid():
    from tpimpi import profile

    comm = comm_mod.world()
    if comm.size != 2:  # every rank times products on the shared cores: at 8 ranks that is tens of seconds
        pytest.skip("the profile test runs at 2 ranks (tests/run.sh also runs 3, 4 and 8)")
    root = tempfile.mkdtemp(prefix="tpimpi-profile-test-") if comm.rank == 0 else None
    root = comm.bcast_bytes(root.encode() if root else None).decode()
    out = f"{root}/cluster.json"
    # a shape name: no model file to read; one storage format and a small disk file keep it to seconds
    assert profile.run(comm, ["--model", "smollm2-135m", "--out", out, "--dtypes", "float32,bfloat16",
                              "--disk-mib", "8", "--disk-dir", root, "--link-latency-ms", "2"]) == 0
    comm.barrier()
    if comm.rank == 0:
        prof = load_profile(out)
        raw = json.load(open(out))
        assert len(prof.devices) == comm.size
        assert sum(raw["ranks_per_host"].values()) == comm.size
        assert raw["config"]["hidden"] == 576 and set(raw["allreduce_s"]) == set(comm_mod.CONCRETE_ALGOS)
        for i, d in enumerate(prof.devices):
            assert set(d.matvec_Bps) == set(d.gemm_flops) == {"float32", "bfloat16"}
            assert d.mem_bytes > 0 and d.disk_direct_Bps > 0 and d.disk_cache_Bps > 0
            assert 0 < d.attn_overhead_s < 1 and 0 < d.mlp_overhead_s < 1
            if i == 0:
                assert d.link_latency_s == 0 and math.isinf(d.link_Bps)
            else:  # the emulated 2 ms per message shows in the ping-pong
                assert 2e-3 <= d.link_latency_s < 0.5 and d.link_Bps > 0
        import shutil

        shutil.rmtree(root)
