"""The job scripts on a real Slurm: a one-node cluster started on this machine (see slurm_cluster.py),
jobs/generate.sbatch submitted with `sbatch --wait`, the job's state read back from slurmctld.

Installs Debian's Slurm and munge when missing; skips where it cannot (not root, no apt-get), except
under CI (the CI environment variable set), where a missing Slurm fails. Runs in plain pytest, not under
mpirun: it starts its own MPI jobs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import slurm_cluster

ROOT = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 300  # the first job may also convert the default model for its rank count

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK")),
                       reason="starts its own cluster and MPI jobs: run it in plain pytest, not under mpirun"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.install()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the Slurm test must run: {why}")
        pytest.skip(why)
    with slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def job_env(cluster, model_cache):
    """What the jobs inherit (sbatch exports the submitter's environment): this interpreter first on
    PATH, the session's model cache (its store for 2 ranks is made by the first test that needs it)."""
    path = os.path.dirname(sys.executable) + os.pathsep + cluster.env["PATH"]
    return dict(cluster.env, PATH=path, PYTHON=sys.executable, TPIMPI_CACHE=str(model_cache))


def sbatch_wait(cluster, env, script: str, *args: str, log: Path) -> tuple[dict, str]:
    """Submits `script` from the checkout's root, waits for it to end, returns its `scontrol show job`
    fields and its log. A job that outlives JOB_TIMEOUT_S fails the test (the fixture cancels it)."""
    cmd = ["sbatch", "--wait", "--parsable", f"--output={log}", *args, script]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        stdout = p.stdout
    except subprocess.TimeoutExpired as e:
        stdout = (e.stdout or b"").decode()
        p = None
    job_id = stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch printed no job id: {stdout!r} {p.stderr if p else ''}"
    job = cluster.show_job(job_id)
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    assert p is not None, f"job {job_id} still {job['JobState']} after {JOB_TIMEOUT_S} s; its log:\n{text}"
    return job, text


def test_generate_job_runs_two_ranks_and_writes_its_json(cluster, job_env, tmp_path):
    out = tmp_path / "generate.json"
    env = dict(job_env, MAX_NEW_TOKENS="4", OUT=str(out))
    job, log = sbatch_wait(cluster, env, "jobs/generate.sbatch", "--ntasks=2", log=tmp_path / "job.log")
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert job["NumTasks"] == "2" and job["WorkDir"] == str(ROOT)
    result = json.loads(out.read_text())
    assert len(result["token_ids"]) == 4 and result["ranks"] == 2 and len(result["peak_rss_bytes"]) == 2
    assert not out.with_name(out.name + ".tmp").exists()


def test_failed_run_shows_as_failed_job(cluster, job_env, tmp_path):
    """A run that errors ends the job FAILED with the run's exit code, and leaves no results file."""
    out = tmp_path / "generate.json"
    env = dict(job_env, MODEL=str(tmp_path / "no-such-model.gguf"), OUT=str(out))
    job, log = sbatch_wait(cluster, env, "jobs/generate.sbatch", "--ntasks=2", log=tmp_path / "job.log")
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", log
    assert "tpimpi: error:" in log and not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_bench_job_appends_one_result_line(cluster, job_env, tmp_path):
    out = tmp_path / "bench.jsonl"
    env = dict(job_env, NEW_TOKENS="2", REPEAT="1", WINDOW="2", OUT=str(out))
    job, log = sbatch_wait(cluster, env, "jobs/bench.sbatch", "--ntasks=2", "--job-name=bench-test",
                           log=tmp_path / "job.log")
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (result["system"], result["ranks"], result["new_tokens"]) == ("tpimpi", 2, 2)
    assert result["label"] == f"bench-test-{job['JobId']}" and "window" in result["memory"]


def test_sweep_submits_one_chained_job_per_point(cluster, job_env, tmp_path):
    """Submitted held, so nothing runs: the jobs' names, task counts and dependency chain."""
    env = dict(job_env, RANKS="1 2", WINDOWS="resident 2", BASELINE="transformers",
               SBATCH_ARGS=f"--hold --output={tmp_path}/%x-%j.out")
    p = subprocess.run(["bash", "jobs/sweep.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    ids = [line.split()[0] for line in p.stdout.splitlines()[:-1]]
    try:
        jobs = [cluster.show_job(i) for i in ids]
    finally:
        subprocess.run(["scancel", *ids], env=cluster.env, check=True)
    assert [(j["JobName"], j["NumTasks"]) for j in jobs] == [
        ("tpimpi-bench-transformers", "1"), ("tpimpi-bench-n1-wresident", "1"), ("tpimpi-bench-n1-w2", "1"),
        ("tpimpi-bench-n2-wresident", "2"), ("tpimpi-bench-n2-w2", "2")]
    assert jobs[0]["Dependency"] == "(null)"
    assert all(j["Dependency"].startswith(f"afterany:{prev}") for prev, j in zip(ids, jobs[1:]))
