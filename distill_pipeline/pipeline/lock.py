"""One `run` at a time per run dir: `<run_dir>/.lock`, an advisory lock held by a live process.

The lock is `fcntl.flock` on the file, so the kernel releases it when its holder exits or is
killed — a lock left by a dead process is simply taken over. The file also records who holds it
(pid, host, start time, command) so a second invocation can say so. `--wait` polls until free.
Run dirs on shared storage need a filesystem whose flock works across hosts (NFSv4, Lustre);
otherwise run one pipeline per run dir.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable


class RunDirBusy(RuntimeError):
    """Another live process holds the run dir's lock, or the lock cannot be taken at all."""


class RunLock:
    def __init__(self, run_dir: Path, *, wait: bool = False, poll_s: float = 1.0,
                 echo: Callable[[str], None] = print):
        self.path = Path(run_dir) / ".lock"
        self.wait, self.poll_s, self.echo = wait, poll_s, echo
        self._fh = None

    def _holder(self) -> str:
        for _ in range(20):  # the holder writes its record just after taking the lock: wait ≤ 1 s
            try:
                info = json.loads(self.path.read_text() or "{}")
            except (OSError, ValueError):
                info = {}
            if "pid" in info:
                break
            time.sleep(0.05)
        else:
            return "another process (starting)"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
        return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {started}: "
                f"{info.get('command', '?')})")

    def __enter__(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")
        except OSError as exc:
            raise RunDirBusy(f"cannot create the lock {self.path}: {exc.strerror or exc}; run_dir must be "
                             "a writable directory") from None
        try:
            self._acquire(fh)
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "command": " ".join(sys.argv)}))
            fh.flush()
        except BaseException:
            fh.close()
            raise
        self._fh = fh
        return self

    def _acquire(self, fh) -> None:
        import fcntl

        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if not self.wait:
                    raise RunDirBusy(f"run dir {self.path.parent} is in use by {self._holder()}; wait for "
                                     "it to finish, or rerun with --wait to queue behind it") from None
                if not told:
                    self.echo(f"waiting for {self._holder()} to release {self.path.parent} …")
                    told = True
                time.sleep(self.poll_s)
            except OSError as exc:  # ENOLCK / EOPNOTSUPP: a filesystem without flock
                raise RunDirBusy(f"cannot lock {self.path}: {exc.strerror or exc}; the run dir's "
                                 "filesystem does not support flock — use a local or NFSv4 directory") from None

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fh is not None:  # an empty record while free; a killed holder's record is stale
            self._fh.seek(0)
            self._fh.truncate()
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
