"""One live run per output directory: a lock file that names its process and host.

``RunLock(directory).acquire()`` creates ``directory/.cskd.lock`` atomically (``O_EXCL``) with
the holder's process id, host name, process start time and the time it was taken; a thread
refreshes the file's modification time every :data:`HEARTBEAT_S` seconds while the run lives.
A second run on the same directory is refused with :class:`~cskd.errors.ConfigError` naming the
holder. A lock whose holder is gone (killed, crashed, a node lost) is stale: on the same host
when its process no longer runs, on another host when its heartbeat is older than
:data:`STALE_S`; a stale lock is reported and taken over. ``release()`` (also at interpreter
exit) removes the file if it is still this process's.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger("cskd")

LOCK_NAME = ".cskd.lock"
HEARTBEAT_S = 30.0  # how often a live run touches its lock
STALE_S = 300.0  # a lock of another host untouched this long belongs to a dead run


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def _running(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    now = _start_ticks(pid)
    return start is None or now is None or now == start


class RunLock:
    """The lock of one output directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.held = False
        self.taken_over = ""  # the warning given when a dead run's lock was taken over
        self._stop = threading.Event()
        self._identity = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _start_ticks(os.getpid()),
        }

    def acquire(self) -> None:
        """Take the lock; ConfigError naming the live holder if another run has it."""
        for _ in range(3):  # a stale lock removed by a racing run: try again
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(handle, "w") as file:
                json.dump({**self._identity, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, file)
            self.held = True
            atexit.register(self.release)
            threading.Thread(target=self._heartbeat, name="cskd-run-lock", daemon=True).start()
            return
        raise ConfigError(f"could not take the lock {self.path}: remove it if no run uses it")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError):
            holder, age = {}, float("inf")  # unreadable: a write cut short
        pid, host = holder.get("pid"), holder.get("host")
        who = f"process {pid} on {host} (since {holder.get('since', '?')})"
        if host == self._identity["host"] and isinstance(pid, int):
            alive = _running(pid, holder.get("start"))
            dead_because = "which is no longer running"
        else:
            alive = age < STALE_S
            dead_because = f"whose lock was last refreshed {age:.0f} s ago"
        if alive:
            raise ConfigError(
                f"train.output_dir {self.path.parent} is in use by a live run ({who}): wait for "
                "it to end, or choose another train.output_dir (if that run is in fact dead, "
                f"delete {self.path})"
            )
        self.taken_over = f"taking over the lock of a dead run: {who}, {dead_because}"
        log.warning(self.taken_over)
        self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Remove the lock file if this process holds it (safe to call more than once)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == self._identity["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
