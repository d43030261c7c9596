"""What compressed partial sums do to the logits: the default model reads an English text one token at a
time (teacher forcing) with --wire float32, bfloat16 and q8 in turn; rank 0 compares each wire's
next-token distributions with float32's: mean and largest KL divergence, and top-1 agreement.

    mpirun -np 4 python jobs/cluster/wire_quality.py --tokens 256 --out data/results/cluster.jsonl

The wire changes only the numbers, not the timing, so this runs on one host. The text is the Apache
License 2.0 as Debian ships it (/usr/share/common-licenses/Apache-2.0), or --text FILE.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

from tpimpi import comm as comm_mod
from tpimpi.engine import Engine, MemoryOptions, collective, prepare_store, set_threads
from tpimpi.shard import parse_ratios
from tpimpi.wire import WIRES

DEFAULT_TEXT = "/usr/share/common-licenses/Apache-2.0"


def logprobs_over(eng, comm, ids: list[int]) -> np.ndarray | None:
    """Rank 0: [len(ids) - 1, V] log-probabilities of each next token given the text so far."""
    model, head = eng.model, eng.head
    out = []
    for pos in range(len(ids) - 1):
        if comm.rank == 0:
            head.embed_into(ids[pos : pos + 1], model.x[:1])
        comm.bcast_(model.x_np[:1])
        x = model.forward(1, pos)
        if comm.rank == 0:
            out.append(torch.log_softmax(head.logits(x[0])[: head.n_tokens].double(), -1).float().numpy().copy())
    return np.stack(out) if comm.rank == 0 else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="store or model (default: the default model)")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out", default="data/results/cluster.jsonl")
    p.add_argument("--run", help="a run label to record")
    args = p.parse_args(argv)
    comm = comm_mod.world()
    set_threads(1)
    path = prepare_store(comm, args.model, parse_ratios(None, comm.size), "float32")
    eng = Engine(comm, path, max_seq=args.tokens + 1, mem=MemoryOptions(resident=True)).load()
    text = Path(args.text)
    ids = collective(comm, lambda: eng.tok.encode(text.read_text())[: args.tokens] if comm.rank == 0 else None)
    n = comm.bcast_bytes(np.array(ids or [], dtype=np.int64).tobytes())
    ids = np.frombuffer(n, dtype=np.int64).tolist()
    ref, rows = None, []
    for wire in WIRES:
        comm.setup(eng.model.chunk * eng.cfg.hidden, "star", wire)
        lp = logprobs_over(eng, comm, ids)
        if comm.rank:
            continue
        if ref is None:
            ref = lp
        kl = (np.exp(ref) * (ref - lp)).sum(-1)  # KL(float32 wire || this wire) per position
        rows.append({"system": "wire_quality", "wire": wire, "ranks": comm.size, "tokens": len(ids) - 1,
                     "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                     "top1_agreement": float((ref.argmax(-1) == lp.argmax(-1)).mean()),
                     "text": args.text, "store": path, **({"run": args.run} if args.run else {})})
    eng.close()
    if comm.rank == 0:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, time=stamp)) + "\n")
                print(f"{r['wire']:>9}: KL mean {r['kl_mean']:.2e}, max {r['kl_max']:.2e}, top-1 agreement "
                      f"{r['top1_agreement']:.4f} over {r['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
