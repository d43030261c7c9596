"""Stage a store onto hosts that share no file system: rank 0 sends each rank its own weight file.

    mpirun --hostfile HOSTS -np 4 python -m tpimpi.stage STORE --to /data/tpimpi/store

Rank 0 holds STORE (a store directory, or a model it converts first, as generate does). Every rank gets
the manifest and its own rank file at --to on its host (`{host}` and `{rank}` in --to are replaced by each
rank's host name and rank, for a different path per host); rank 0 also gets the tokenizer. A file arrives
in chunks over MPI, is checksummed against the manifest as it is written under a temporary name, and
is renamed into place only when complete and correct. A host that already has the right file is
skipped. Then `mpirun ... python -m tpimpi.generate --model DIR` runs without a shared file system.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

import numpy as np

from . import comm as comm_mod
from .errors import StoreError, TpimpiError, UsageError
from .models import prepare
from .shard import parse_ratios
from .store import (DTYPES, MANIFEST, _check_manifest, _parse_json, file_state, sha256_file, stamp_valid,
                    write_stamp)

CHUNK = 4 << 20  # bytes per message
_TAG = 31


def local_dir(template: str, rank: int) -> Path:
    """--to on this rank: `{host}` and `{rank}` replaced."""
    try:
        return Path(template.format(host=socket.gethostname(), rank=rank))
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--to {template!r}: only {{host}} and {{rank}} may appear in braces ({e})") from None


def staging_command(store: str, world: int) -> str:
    """What a user types to give every host its files of `store`."""
    return (f"mpirun --hostfile HOSTFILE -np {world} python -m tpimpi.stage {shlex.quote(store)} "
            f"--to {shlex.quote(store)}")


def open_rank_store(path: str, rank: int, world: int, verify: str = "auto"):
    """This rank's RankStore; if this host lacks the store or its file, say how to stage it."""
    from .store import RankStore, rank_file_name

    d = Path(path)
    missing = d / MANIFEST if not (d / MANIFEST).is_file() else d / rank_file_name(rank)
    if not missing.exists():
        raise StoreError(f"no {missing} on this host (hosts share no file system?); send every host its files "
                         f"from rank 0's with: {staging_command(path, world)}")
    return RankStore(path, rank, world, verify=verify)


def has_file(path: Path, nbytes: int, sha256: str) -> bool:
    """Whether path is already the file the manifest describes: its size, then its verification stamp
    (store.py), else its checksum (and then it is stamped, so the next run need not hash it)."""
    try:
        state = file_state(path)
    except OSError:
        return False
    if state["bytes"] != nbytes:
        return False
    if stamp_valid(path, sha256):
        return True
    if sha256_file(path) != sha256:
        return False
    write_stamp(path, sha256, state)
    return True


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


class _Receiver:
    """A file arriving in chunks: written under a temporary name, hashed, renamed when it checks out."""

    def __init__(self, path: Path, nbytes: int, sha256: str):
        self.path, self.nbytes, self.sha256 = path, nbytes, sha256
        self.tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        self.hash, self.error, self.f = hashlib.sha256(), None, None
        try:
            self.f = open(self.tmp, "wb")
        except OSError as e:
            self.error = f"cannot write {self.tmp}: {e.strerror}"

    def add(self, chunk: memoryview) -> None:
        if self.error:  # keep draining the sender, report at the end
            return
        self.hash.update(chunk)
        try:
            self.f.write(chunk)
        except OSError as e:
            self.error = f"cannot write {self.tmp}: {e.strerror}"

    def finish(self) -> str | None:
        """Rename into place if complete and matching; else remove it. Returns the error, if any."""
        try:
            if self.f is not None:
                if not self.error:
                    self.f.flush()
                    os.fsync(self.f.fileno())
                self.f.close()
            if not self.error and self.hash.hexdigest() != self.sha256:
                self.error = f"{self.path.name} arrived damaged (checksum differs from the manifest)"
            if not self.error:
                state = file_state(self.tmp)  # a rename keeps size, mtime and inode: the stamp holds
                self.tmp.rename(self.path)
                write_stamp(self.path, self.sha256, state)  # checked as it arrived: verified
        except OSError as e:
            self.error = f"cannot write {self.path}: {e.strerror}"
        if self.error:
            self.tmp.unlink(missing_ok=True)
        return self.error


def _chunks(nbytes: int):
    for off in range(0, nbytes, CHUNK):
        yield off, min(CHUNK, nbytes - off)


def send_file(comm, path: Path, nbytes: int, dest: int) -> None:
    """Rank 0: path to dest in CHUNK messages, reading the next chunk while the last one travels."""
    bufs = [np.empty(CHUNK, dtype=np.uint8) for _ in range(2)]
    pending = [None, None]
    with open(path, "rb") as f:
        for k, (off, n) in enumerate(_chunks(nbytes)):
            b = k % 2
            if pending[b] is not None:
                pending[b].Wait()
            if f.readinto(memoryview(bufs[b])[:n]) != n:
                raise StoreError(f"{path}: shorter than the manifest's {nbytes} bytes")
            pending[b] = comm.isend_(bufs[b][:n], dest, _TAG)
    for req in pending:
        if req is not None:
            req.Wait()


def recv_file(comm, rec: _Receiver) -> None:
    """A worker: the chunks of its file from rank 0, the next one already posted while one is written."""
    chunks = list(_chunks(rec.nbytes))
    bufs = [np.empty(CHUNK, dtype=np.uint8) for _ in range(2)]
    reqs = [comm.irecv_(bufs[k][:n], 0, _TAG) for k, (_, n) in enumerate(chunks[:2])]
    for k, (_, n) in enumerate(chunks):
        b = k % 2
        reqs[b].Wait()
        rec.add(memoryview(bufs[b])[:n])
        if k + 2 < len(chunks):
            reqs[b] = comm.irecv_(bufs[b][: chunks[k + 2][1]], 0, _TAG)


def stage(comm, store: str | None, to: str, ratios=None, dtype: str = "float32") -> dict:
    """Collective: every rank's file of `store` (rank 0's) at `to` on its host. Rank 0 returns a summary."""
    from .engine import collective  # engine opens stores through this module

    t0 = time.perf_counter()
    src = collective(comm, lambda: str(prepare(store, comm.size, parse_ratios(ratios, comm.size), dtype))
                     if comm.rank == 0 else "")
    src = comm.bcast_bytes(src.encode()).decode()
    raw = collective(comm, lambda: (Path(src) / MANIFEST).read_bytes() if comm.rank == 0 else b"")
    raw = comm.bcast_bytes(raw)
    m = collective(comm, lambda: _check_manifest(_parse_json(raw, "the manifest"), Path(src)))
    if m["world"] != comm.size:
        raise UsageError(f"store {src!r} was split for {m['world']} ranks; stage it with mpirun -np {m['world']}")
    info = m["files"][comm.rank]
    dest = collective(comm, local_dir, to, comm.rank)
    target = dest / info["name"]

    def check():
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {dest} on host {socket.gethostname()}: {e.strerror}") from None
        same = comm.rank == 0 and dest.resolve() == Path(src).resolve()
        return 0 if same or has_file(target, info["bytes"], info["sha256"]) else 1

    need = [n for (n,) in comm.gather_ints([collective(comm, check)])]
    comm.barrier()
    t1, err = time.perf_counter(), None
    try:
        if comm.rank == 0:
            for r in range(1, comm.size):
                if need[r]:
                    send_file(comm, Path(src) / m["files"][r]["name"], m["files"][r]["bytes"], r)
            if need[0]:  # rank 0's own file, copied on its disk the same way
                rec = _Receiver(target, info["bytes"], info["sha256"])
                with open(Path(src) / info["name"], "rb") as f:
                    while chunk := f.read(CHUNK):
                        rec.add(memoryview(chunk))
                err = rec.finish()
            if not err and dest.resolve() != Path(src).resolve():
                for name in m.get("tokenizer", []):
                    _write_atomic(dest / name, (Path(src) / name).read_bytes())
        elif need[comm.rank]:
            rec = _Receiver(target, info["bytes"], info["sha256"])
            recv_file(comm, rec)
            err = rec.finish()
        if not err and not (comm.rank == 0 and dest.resolve() == Path(src).resolve()):
            _write_atomic(dest / MANIFEST, raw)
    except OSError as e:
        err = f"{e.filename or dest}: {e.strerror}"
    comm.agree(f"on host {comm.hosts[comm.rank]}: {err}" if err else None)
    elapsed = time.perf_counter() - t1
    sent = sum(m["files"][r]["bytes"] for r in range(1, comm.size) if need[r])
    return {"store": src, "to": to, "ranks": comm.size, "staged_ranks": [r for r in range(comm.size) if need[r]],
            "skipped_ranks": [r for r in range(comm.size) if not need[r]],
            "hosts": comm.hosts,
            "bytes_sent": sent, "seconds": elapsed, "mbps": sent * 8 / elapsed / 1e6 if elapsed else None,
            "total_seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    comm = comm_mod.world()
    p = argparse.ArgumentParser(prog="tpimpi.stage", description=__doc__.split("\n\n")[0])
    p.add_argument("store", nargs="?", help="rank 0's store directory, or a .gguf / Hugging Face model to convert "
                   "first (default: the default model)")
    p.add_argument("--to", required=True, help="directory on every host ({host}, {rank}: that rank's host name, rank)")
    p.add_argument("--ratios", help="when converting: relative share of each rank")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="when converting: storage dtype")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        out = stage(comm, args.store, args.to, args.ratios, args.dtype)
    except TpimpiError as e:
        if comm.rank == 0:
            print(f"tpimpi: error: {e}", file=sys.stderr)
        return 2
    if comm.rank == 0:
        if args.json:
            print(json.dumps(out))
        else:
            print(f"staged {out['store']} to {args.to} on {comm.size} ranks: sent {out['bytes_sent'] / 2**20:.1f} MiB "
                  f"to ranks {out['staged_ranks'] or 'none'} in {out['seconds']:.2f} s "
                  f"({out['mbps'] or 0:.0f} Mbit/s); ranks "
                  f"{out['skipped_ranks'] or 'none'} already had their files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
