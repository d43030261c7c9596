"""One side of jobs/arm64_check.sh: the same stores and prompt on every configuration, written to a folder.

Run under mpirun at the rank count the stores were split for, once on the x86_64 host and once in the
emulated arm64 root; jobs/arm64/compare.py then compares the two folders. Writes, from rank 0:
  kernels.json          the machine and the kernels that ran (OpenBLAS's core type, torch's CPU capability)
  NAME.npy              the prompt's last-position logits of configuration NAME
  results.json          {NAME: {"token_ids": [...], "text": ...}} greedy tokens of each configuration
Rank 0 prints each configuration's seconds (load, prompt logits, generation): the check's own durations, to
see where its time goes; under emulation neither they nor any memory figure are a board's.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # harness.prompt_logits: the prefill the tests compare with transformers

from harness import prompt_logits  # noqa: E402
from tpimpi import comm as comm_mod  # noqa: E402
from tpimpi.engine import Engine, MemoryOptions  # noqa: E402
from tpimpi.resources import set_threads  # noqa: E402
from tpimpi.sampling import SamplingConfig  # noqa: E402


def configurations(stores: Path, world: int) -> dict[str, tuple[Path, MemoryOptions]]:
    """NAME -> (store, memory options): every store in `stores` split for `world` ranks, resident; the float32
    one also through a window of 2, and every half-precision one also with bfloat16 products."""
    out = {}
    for store in sorted(stores.glob(f"*-n{world}")):
        dtype = json.loads((store / "manifest.json").read_text())["dtype"]
        out[f"{store.name}"] = (store, MemoryOptions(resident=True))
        if dtype == "float32":
            out[f"{store.name}-window2"] = (store, MemoryOptions(window=2))
        if dtype in ("bfloat16", "float16"):
            out[f"{store.name}-compute-bf16"] = (store, MemoryOptions(resident=True, compute="bfloat16"))
    return out


def kernels() -> dict:
    """What ran: the CPU the process sees, the BLAS numpy calls (threadpoolctl), torch's kernels, MPI."""
    import torch
    from threadpoolctl import threadpool_info

    blas = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "threading_layer", "num_threads")}
            for p in threadpool_info() if p["user_api"] == "blas"]
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": blas,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_cuda_built": torch.version.cuda,
        "torch_mkldnn": torch.backends.mkldnn.is_available(),
        **comm_mod.versions(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stores", type=Path, required=True, help="folder of stores named DTYPE-nRANKS")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prompt", required=True, help="fed raw, without the chat template (tpimpi.generate --raw)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    args = p.parse_args()

    comm = comm_mod.world()
    set_threads(None)
    configs = configurations(args.stores, comm.size)
    if not configs:
        raise SystemExit(f"no store split for {comm.size} ranks in {args.stores}")
    results = {}
    if comm.rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
    for name, (store, mem) in configs.items():
        t0 = time.perf_counter()
        eng = Engine(comm, str(store), max_seq=256, mem=mem).load()
        set_threads(None, "torch" if mem.compute == "bfloat16" else "blas")
        # every rank runs the prefill's passes, so every rank needs the prompt's length: rank 0 sends the ids
        mine = json.dumps(eng.encode_prompt(args.prompt, raw=True)).encode() if comm.rank == 0 else None
        ids = json.loads(comm.bcast_bytes(mine))
        t1 = time.perf_counter()
        logits = prompt_logits(eng.model, eng.head, comm, ids)
        t2 = time.perf_counter()
        res = eng.generate(ids, SamplingConfig(), args.max_new_tokens)
        eng.close()
        if comm.rank == 0:
            print(f"   {name}: load {t1 - t0:.0f} s, prompt logits {t2 - t1:.0f} s, "
                  f"generation {time.perf_counter() - t2:.0f} s", flush=True)
            np.save(args.out / f"{name}.npy", logits)
            results[name] = {"token_ids": res["token_ids"], "text": res["text"], "prompt_ids": ids}
    if comm.rank == 0:
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "kernels.json").write_text(json.dumps(kernels(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
