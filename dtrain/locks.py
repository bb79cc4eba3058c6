"""Exclusive locks against concurrent use: one dtrain run per run dir, one writer per output (`dtrain prepare`,
`export`, `predict`). flock(2), because the kernel drops it with its holder (exit, kill -9, a lost node's client), so
a killed, requeued or lost job never leaves a stale lock behind; a lock file holds the holder's host and pid for the
refusal's message."""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dtrain.errors import DtrainError

RUN_LOCK = ".dtrain.lock"
_HELD: dict[str, _Lock] = {}  # lock file → the lock this process holds on it (a second take in-process reuses it)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class _Lock:
    def __init__(self, path: Path, fd: int | None, created: list[Path]):
        self.path, self.fd, self.created, self.depth = path, fd, created, 1

    def release(self) -> None:
        self.depth -= 1
        if self.depth > 0 or self.fd is None:
            return
        _HELD.pop(str(self.path), None)
        try:  # unlinked while still held: a process that opened this file meanwhile sees it is gone and retries
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        for folder in reversed(self.created):  # folders made only for the lock, if nothing else went into them
            try:
                folder.rmdir()
            except OSError:
                break


def _close_in_child() -> None:  # a forked worker (DataLoader, tokenizer pool) must not keep a lock alive
    for lock in list(_HELD.values()):
        if lock.fd is not None:
            os.close(lock.fd)
            lock.fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _holder(fd: int) -> str:
    for _ in range(20):  # the holder writes who it is right after taking the lock
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            return f"host {info['host']}, pid {info['pid']}"
        except (ValueError, KeyError, TypeError, OSError):
            time.sleep(0.05)
    return "host and pid unknown"


def acquire_lock(path: str | os.PathLike, refuse: str, what: str) -> _Lock:
    """An exclusive lock on the file `path` (made, with its folders, if missing), held until `release()` or until
    this process ends: the kernel drops an flock with its holder (exit, kill -9), so a killed, requeued or lost job
    never leaves a stale one (a leftover file is taken over by the next user). Host and pid go into the file; a
    second user gets DtrainError(refuse.format(holder="host H, pid P")). Forked children do not inherit it.

    On a network filesystem: NFS (v4, or v3 with lockd) carries flock between clients as a whole-file lock; Lustre
    only when mounted with `-o flock` (`localflock` locks per node only, `noflock` refuses: then a one-line warning
    and no lock); GPFS and BeeGFS (tuneUseGlobalFileLocks) lock across nodes. Where the filesystem cannot lock at
    all, the command runs with a warning instead of refusing.
    """
    path = Path(os.path.abspath(path))
    if str(path) in _HELD:
        _HELD[str(path)].depth += 1
        return _HELD[str(path)]
    created = []
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        created.insert(0, folder)
        folder = folder.parent
    try:
        for item in created:
            item.mkdir()
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise DtrainError(refuse.format(holder=holder)) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in _UNSUPPORTED:
                    raise
                print(f"dtrain: warning: {path}: the filesystem cannot lock files ({e.strerror}); concurrent use of "
                      f"{what} is not prevented", file=sys.stderr)
                return _Lock(path, None, [])
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we opened it: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                                  "command": " ".join(sys.argv)}).encode() + b"\n", 0)
    except OSError as e:
        for item in reversed(created):
            with contextlib.suppress(OSError):
                item.rmdir()
        raise DtrainError(f"{what}: cannot be created ({e.strerror} at {e.filename or path}); choose a path in a "
                          f"folder you can write") from None
    lock = _HELD[str(path)] = _Lock(path, fd, created)
    return lock


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, flag: str) -> Iterator[None]:
    """`<parent>/.<name>.lock` held while an output is built: a second dtrain writing the same output is refused."""
    out = Path(out)
    lock = acquire_lock(out.parent / f".{out.name}.lock",
                        f"{flag} {out} is being written by another dtrain process ({{holder}}); wait for it to finish "
                        f"or choose another output", f"{flag} {out}")
    try:
        yield
    finally:
        lock.release()


def lock_run_dir(run_dir: str | os.PathLike, is_main: bool) -> None:
    """Rank 0 takes `<run_dir>/.dtrain.lock` for the life of the process (released at exit; the file is removed then,
    and so is a run dir made only for it); every rank raises the same refusal when another run holds it."""
    from dtrain.distributed import broadcast_object

    error = None
    if is_main:
        run_dir = Path(run_dir)
        try:
            lock = acquire_lock(run_dir / RUN_LOCK, f"run_dir={run_dir} is in use by another dtrain run ({{holder}}); "
                                f"wait for it to finish or stop it, or choose another run_dir", f"run_dir={run_dir}")
            if lock.depth == 1:
                atexit.register(lock.release)
            else:
                lock.depth -= 1  # held for the life of the process once, however often a run starts in it
        except DtrainError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise DtrainError(error)
