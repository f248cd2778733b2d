"""The lock a run folder holds while its run lives (``RunLock``: ``<out>/run.lock``); ``vopd sweep`` locks
its folder with the same class (``sweep.lock``), and ``vopd probe`` its outputs (``OUT/<name>.lock``)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from .errors import InputError

try:
    import fcntl
except ImportError:   # pragma: no cover - not on Windows: the lock falls back to the recorded pid
    fcntl = None

LOCK = "run.lock"


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


class RunLock:
    """The run folder's lock, held while its run lives: ``<out>/run.lock`` holds the holder's pid,
    host, start time and command line, under an exclusive ``fcntl.flock`` that the kernel drops when
    the process dies.

    A lock file left by a process that is gone (killed) is stale: taken over with a warning. A
    lock held by a live process is an ``InputError`` naming the folder and the pid; so is one
    recorded by another host (its pid cannot be checked from here).

    Args:
      out_dir: the folder locked.
      name: the lock file's name in it (``vopd sweep`` locks its folder with ``sweep.lock``).
      holder: what holds it, in messages ("vopd distill run").
    """

    def __init__(self, out_dir: Path, name: str = LOCK, holder: str = "vopd distill run"):
        self.out_dir, self.path, self.fd, self.holder = Path(out_dir), Path(out_dir) / name, None, holder

    def acquire(self) -> Optional[str]:
        """Take the lock.

        Returns:
          A warning line when a stale lock was taken over, else None.
        """
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flocked = self._flock(fd)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise InputError(self._busy(holder)) from None
            if not self._same_file(fd):     # removed or replaced while we waited: take the new one
                os.close(fd)
                continue
            try:
                stale = self._previous(self._holder(fd), flocked)
            except InputError:
                os.close(fd)
                raise
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            self.fd = fd
            return stale
        raise InputError(f"could not lock {self.out_dir}: {self.path} keeps changing")

    def __enter__(self) -> "RunLock":
        """``with RunLock(...):`` takes the lock for the block, printing a stale lock's takeover as a
        ``warning:`` line on stderr, and drops it at the end (also on an error)."""
        stale = self.acquire()
        if stale:
            print(f"warning: {stale}", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the lock; a no-op if not held."""
        if self.fd is None:
            return
        if self._same_file(self.fd):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    @staticmethod
    def _flock(fd) -> bool:
        """``flock`` the file, non-blocking: True if locked, False where unsupported; raises
        ``BlockingIOError`` if another process holds it."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise
        except OSError:   # a filesystem without flock: the recorded pid decides
            return False
        return True

    def _same_file(self, fd) -> bool:
        """Whether ``fd`` is still the file at ``self.path`` (not removed or replaced by another process)."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _holder(fd) -> Optional[dict]:
        """The record in the lock file ({"pid", "host", ...}), None if empty or unreadable."""
        try:
            holder = json.loads(os.pread(fd, 65536, 0).decode() or "null")
        except (ValueError, UnicodeDecodeError):
            return None
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None

    def _busy(self, holder: Optional[dict]) -> str:
        """The one-line refusal naming the folder and the holder's pid and host."""
        who = (f"pid {holder['pid']} on {holder.get('host')}, started {holder.get('started')}" if holder
               else "a process that has not written its pid yet")
        return (f"{self.out_dir} is in use by another {self.holder} ({who}); wait for it to end or stop it, "
                "or choose another --out")

    def _previous(self, holder: Optional[dict], flocked: bool) -> Optional[str]:
        """Judge a lock file left behind: None if there is none, a warning if it is stale, else ``InputError``."""
        if holder is None:
            return None
        host, pid = holder.get("host"), holder["pid"]
        if host != socket.gethostname():
            raise InputError(f"{self.out_dir} is locked by pid {pid} on host {host} ({self.path}); if no run is "
                             "going there, delete that file")
        if not flocked and _pid_alive(pid):
            raise InputError(self._busy(holder))
        state = "is no longer running" if not _pid_alive(pid) else "is running but does not hold the lock"
        return f"stale lock {self.path} taken over: pid {pid} ({holder.get('started')}) {state}"
