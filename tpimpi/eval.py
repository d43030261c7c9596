"""Perplexity of a model on real text, and how far its next-token distributions are from a reference.

    python -m tpimpi.eval [--model STORE|GGUF|HF] [--text builtin|FILE] [--max-tokens N] [--ctx N]
    mpirun -np 4 python -m tpimpi.eval --model q4.n4 --reference f32.n4 --window 2

The text is tokenized once by rank 0 and cut into windows of --ctx tokens; every window is a fresh
sequence (the KV cache starts over), and every position of it but the first is scored, as
transformers scores a sequence given as one input. Every rank runs its slice of every layer as it
does when generating (any rank count, any memory mode); rank 0 turns the head's logits into
log-probabilities. With --reference, a second store (float32 when it has to be converted) runs the
same token ids beside it: the mean KL divergence KL(reference || model) of the next-token
distributions and the fraction of positions whose most likely next token is the same.

"--text builtin" is real English prose that every Python installation has offline: the help topics of
the standard library's pydoc_data (the text `help("if")` shows), in the order of their names. Evaluation
reads it from the start; tpimpi.quantize calibrates on its second half (`builtin_text("calibration")`),
so the two never share text.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import comm as comm_mod
from .engine import Engine, collective, prepare_store
from .resources import MemoryOptions, set_threads
from .errors import TpimpiError, UsageError
from .generate import add_memory_args
from .shard import parse_ratios

CHARS_PER_TOKEN = 8  # more characters than a token of English prose ever takes: enough text to tokenize


def builtin_text(part: str = "eval") -> str:
    """The standard library's pydoc help topics as one text; "eval" is its first half, "calibration" its
    second (tpimpi.quantize's), so evaluation never scores text the quantizer calibrated on."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    half = len(text) // 2
    return text[:half] if part == "eval" else text[half:]


def read_text(spec: str, part: str = "eval") -> str:
    if spec == "builtin":
        return builtin_text(part)
    try:
        with open(spec, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--text {spec!r}: cannot read it as UTF-8 text ({e})") from None


def text_ids(tok, text: str, max_tokens: int) -> list[int]:
    """The first max_tokens token ids of text (only as much of the text as needs tokenizing is)."""
    n = max_tokens * CHARS_PER_TOKEN
    ids = tok.encode(text[:n]) if n < len(text) else tok.encode(text)
    return ids[:max_tokens]


def windows(n: int, ctx: int) -> list[tuple[int, int]]:
    """[start, stop) of each window of at most ctx tokens over n tokens; a last window of one token
    scores nothing and is dropped."""
    return [(a, min(a + ctx, n)) for a in range(0, n, ctx) if min(a + ctx, n) - a >= 2]


def window_logprobs(eng: Engine, ids: list[int] | None, n: int) -> torch.Tensor | None:
    """Collective: a fresh pass over one window of n tokens (ids on rank 0); rank 0 gets the
    log-probabilities [n, V'] of the next token at every position (V' = the tokenizer's vocabulary)."""
    model, comm = eng.model, eng.comm
    out = [] if comm.rank == 0 else None
    for pos in range(0, n, model.chunk):
        T = min(model.chunk, n - pos)
        if comm.rank == 0:
            eng.head.embed_into(ids[pos : pos + T], model.x[:T])
        comm.bcast_(model.x_np[:T])
        x = model.forward(T, pos)
        if comm.rank == 0:
            out.append(torch.log_softmax(eng.head.logits_rows(x[:T])[:, : eng.head.n_tokens], dim=-1))
    return torch.cat(out) if comm.rank == 0 else None


class Scores:
    """Running sums over scored positions: negative log-likelihood, KL divergence, top-1 agreement."""

    def __init__(self):
        self.n = 0
        self.nll = self.ref_nll = self.kl = 0.0
        self.agree = 0

    def add(self, lp: torch.Tensor, targets: torch.Tensor, ref: torch.Tensor | None) -> None:
        """lp [T, V] log-probabilities predicting targets [T]; ref [T, V] the reference's, or None."""
        lp, ref = lp.double(), None if ref is None else ref.double()
        self.n += len(targets)
        self.nll -= float(lp.gather(1, targets[:, None]).sum())
        if ref is not None:
            self.ref_nll -= float(ref.gather(1, targets[:, None]).sum())
            p = ref.exp()
            self.kl += float(torch.where(p > 0, p * (ref - lp), 0.0).sum())
            self.agree += int((lp.argmax(1) == ref.argmax(1)).sum())

    def result(self, reference: bool) -> dict:
        out = {"tokens_scored": self.n, "nll": self.nll / self.n, "perplexity": math.exp(self.nll / self.n)}
        if reference:
            out.update(reference_perplexity=math.exp(self.ref_nll / self.n), kl_divergence=max(0.0, self.kl / self.n),  # rounding can leave -1e-9
                       top1_agreement=self.agree / self.n)
        return out


def evaluate(eng: Engine, ids: list[int] | None, ctx: int, ref: Engine | None = None, baseline=None) -> dict | None:
    """Collective over loaded engines: perplexity of eng on ids (given on rank 0) in windows of ctx, and
    with ref the divergence from ref's distributions. baseline (rank 0): a function of a window's ids
    giving another system's log-probabilities [n, V'] (llama.cpp), scored beside. Rank 0 gets the
    figures, the others None."""
    comm = eng.comm
    count = np.array([len(ids) if comm.rank == 0 else 0], dtype=np.int64)
    comm.bcast_(count)
    scores, base = Scores(), Scores()
    t0 = time.perf_counter()
    for a, b in windows(int(count[0]), ctx):
        part = ids[a:b] if comm.rank == 0 else None
        lp = window_logprobs(eng, part, b - a)
        rlp = window_logprobs(ref, part, b - a) if ref is not None else None
        if comm.rank == 0:
            targets = torch.tensor(part[1:], dtype=torch.long)
            scores.add(lp[:-1], targets, None if rlp is None else rlp[:-1])
            if baseline is not None:
                base.add(lp[:-1], targets, baseline(part)[:-1])
    if comm.rank != 0:
        return None
    if scores.n == 0:
        raise UsageError("the text gives fewer than 2 tokens: nothing to score")
    out = {**scores.result(ref is not None), "windows": len(windows(int(count[0]), ctx)), "ctx": ctx,
           "seconds": time.perf_counter() - t0}
    if baseline is not None:  # the baseline as the reference: its perplexity, KL(baseline || tpimpi), agreement
        b = base.result(True)
        out["baseline"] = {"perplexity": b["reference_perplexity"], "kl_divergence": b["kl_divergence"],
                           "top1_agreement": b["top1_agreement"]}
    return out


def llama_cpp_logprobs(path, ctx: int, threads: int, n_tokens: int):
    """A function of a window's ids giving llama.cpp's log-probabilities [n, n_tokens] of the same GGUF,
    every position's logits kept (logits_all), the window a fresh sequence as in tpimpi's scoring."""
    from .bench import load_llama_cpp

    llm = load_llama_cpp(path, ctx, threads, logits_all=True)

    def logprobs(part: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(part)
        logits = torch.from_numpy(np.array(llm.scores[: len(part), :n_tokens], dtype=np.float32))  # [n, V']
        return torch.log_softmax(logits, -1)

    return logprobs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpimpi.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="store, .gguf or Hugging Face directory (default: the default model)")
    p.add_argument("--reference", help="a second model to compare next-token distributions with (KL divergence, "
                   "top-1 agreement); converted to float32 for the launched ranks if it is not a store")
    p.add_argument("--baseline", choices=["llama.cpp"], help="score llama.cpp (llama-cpp-python, an optional "
                   "install) on the same GGUF (--model, or the default model) and token ids beside tpimpi")
    p.add_argument("--text", default="builtin", help="UTF-8 text file, or 'builtin': the standard library's "
                   "pydoc help topics (default)")
    p.add_argument("--max-tokens", type=int, default=4096, help="score at most this many tokens of the text")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (each window starts a fresh sequence)")
    p.add_argument("--dtype", help="storage format when --model has to be converted (default float32)")
    p.add_argument("--ratios", help="relative share of each rank, e.g. 2,1,1 (when converting)")
    p.add_argument("--threads", type=int, help="threads per rank (default: cores / local ranks)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    add_memory_args(p)
    return p


def run(comm, argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 2 or args.ctx < 2:
        raise UsageError("--max-tokens and --ctx must be at least 2")
    mem = MemoryOptions.from_args(args)
    threads = set_threads(args.threads, "blas" if mem.compute == "float32" else "torch")
    if args.baseline and args.model is not None and not args.model.endswith(".gguf"):
        raise UsageError("--baseline llama.cpp runs a .gguf: give --model FILE.gguf (or no --model: the default model)")
    ratios = parse_ratios(args.ratios, comm.size)
    given = ratios if args.ratios else None  # a ready store refuses conversion options that differ from its own
    path = prepare_store(comm, args.model, given, args.dtype)
    ref_path = prepare_store(comm, args.reference, given) if args.reference else None  # a source: float32
    text = collective(comm, lambda: read_text(args.text) if comm.rank == 0 else None)
    eng = Engine(comm, path, max_seq=args.ctx, mem=mem).load()
    ref = Engine(comm, ref_path, max_seq=args.ctx, mem=mem).load() if ref_path else None
    try:
        if ref is not None and ref.cfg.vocab != eng.cfg.vocab:
            raise UsageError(f"--reference has {ref.cfg.vocab} vocabulary rows, the model {eng.cfg.vocab}: "
                             f"they do not share token ids")
        ids = collective(comm, lambda: text_ids(eng.tok, text, args.max_tokens) if comm.rank == 0 else None)
        base = None
        if args.baseline:
            from .models import default_model_path

            gguf = Path(args.model) if args.model else default_model_path()
            base = collective(comm, lambda: llama_cpp_logprobs(gguf, args.ctx, threads, eng.head.n_tokens)
                              if comm.rank == 0 else None)
        res = evaluate(eng, ids, args.ctx, ref, base)
    finally:
        eng.close()
        if ref is not None:
            ref.close()
    if comm.rank == 0:
        res.update(model=str(path), reference=ref_path, text=args.text, python=platform.python_version(),
                   ranks=comm.size, dtype=eng.store.dtype, memory=eng.plan.describe())
    return res


def report(res: dict) -> str:
    line = (f"perplexity {res['perplexity']:.4f} over {res['tokens_scored']} tokens "
            f"({res['windows']} windows of {res['ctx']}) in {res['seconds']:.1f} s")
    if "kl_divergence" in res:
        line += (f"; reference perplexity {res['reference_perplexity']:.4f}, KL divergence "
                 f"{res['kl_divergence']:.5f} nats/token, top-1 agreement {100 * res['top1_agreement']:.2f}%")
    b = res.get("baseline")
    if b:
        line += (f"\nllama.cpp on the same GGUF and ids: perplexity {b['perplexity']:.4f}, KL(llama.cpp || tpimpi) "
                 f"{b['kl_divergence']:.5f}, top-1 agreement {100 * b['top1_agreement']:.2f}%")
    return line


def main(argv=None) -> int:
    comm = comm_mod.world()
    try:
        res = run(comm, argv)
    except TpimpiError as e:
        if comm.rank == 0:
            print(f"tpimpi: error: {e}", file=sys.stderr)
        return 2
    if comm.rank == 0:
        print(json.dumps(res) if "--json" in (argv if argv is not None else sys.argv[1:]) else report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
