"""The queue's files hold user data (events: ids, traits, IPs): readable by nobody else.

Directories segproxy creates (``data_dir``, the queue's directory) are made ``0700``; the queue
file is created ``0600`` before SQLite opens it, and SQLite gives its ``-wal`` and ``-shm``
files the mode of the database file, so they are ``0600`` too, whatever the umask. A directory
or file that already exists is the operator's: its mode is left as it is, with a warning when
others may read it.

One process owns a queue file at a time: :func:`lock_exclusively` takes an exclusive ``flock``
on ``<path>.lock`` for as long as the process runs (invariant 3 in ``queue/__init__.py``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import time
from pathlib import Path

from segproxy.queue.base import QueueError

log = logging.getLogger("segproxy.queue")


def private_dir(path: str | os.PathLike[str]) -> None:
    """Make ``path`` and its missing parents, each ``0700`` (an existing one is left alone)."""
    missing: list[Path] = []
    p = Path(path).absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:  # made meanwhile by another process: theirs
            continue
        os.chmod(d, 0o700)  # the umask may have taken bits away, never added: exact anyway


def private_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` ``0600`` if it does not exist; warn if an existing one is readable by
    others than its owner."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warning(
                "%s is readable by others than its owner (mode %o): it holds events;"
                " chmod 600 it (and its -wal and -shm files) unless that is intended",
                path,
                mode,
            )
        return
    os.close(fd)


def lock_exclusively(path: str) -> int:
    """Lock the queue file ``path`` for this process (its lock file's descriptor: closing it
    lets go); QueueError if another process holds it."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise QueueError(
            f"another segproxy process is using the queue {path}; "
            "give each process its own [queue] path"
        ) from exc
    return fd


class DiskRoom:
    """Whether the queue's disk has ``min_free`` bytes free (invariant 4), looked at once a
    second at most, and held as full for a second once SQLite found it full."""

    __slots__ = ("checked", "directory", "min_free", "ok")

    def __init__(self, path: str, min_free: int) -> None:
        self.directory = os.path.dirname(os.path.abspath(path))
        self.min_free = min_free
        self.checked = 0.0
        self.ok = True

    def check(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self.checked > 1.0:
            self.checked = now
            try:
                free = shutil.disk_usage(self.directory).free
            except OSError:
                free = 0
            self.ok = free >= self.min_free
        return self.ok

    def found_full(self) -> None:
        self.ok = False
        self.checked = time.monotonic()
