"""Keeping `manage.py up`'s processes from outliving it, and `make stop`.

`up` starts Daphne and each qcluster in sessions of their own (so a Ctrl-C
reaches only `up`, which stops them in order). Killed itself (SIGKILL, the OOM
killer), `up` can stop nothing, so two things do it instead:

- the lifeline: a small watcher process (`python -m config.supervisor watch`,
  in a session of its own) reads a pipe only `up` writes to. `up` tells it the
  process groups it started and the data directory of its Postgres; when the
  pipe ends without `up` having said "done", `up` is dead: the watcher sends
  SIGTERM to each group (a qcluster's sentinel, workers, monitor and pusher are
  in its group), SIGKILL after TERM_SECONDS, then stops the embedded Postgres
  unless another live process has it open. It also keeps `up`'s instance lock
  until it is done, so a new `up` cannot start into the leftovers.
- PR_SET_PDEATHSIG (SIGTERM) on each direct child, should the watcher be gone too.

The instance lock is an flock on `<data dir>/up.lock`, holding `up`'s pid.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from config import embedded_db

LOCK_NAME = "up.lock"
# Within the 10 s a supervisor's leftovers may live: SIGTERM, then SIGKILL.
TERM_SECONDS = 5
KILL_SECONDS = 2
PR_SET_PDEATHSIG = 1


class AlreadyRunning(Exception):
    pass


def lock_instance(data_dir: Path) -> int:
    """Take the data directory's instance lock; the open descriptor holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(
            f"Conveyor is already running on {data_dir} (manage.py up, pid {holder}); stop it first (make stop)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        # As Twisted binds: a closed listener's TIME_WAIT connections do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A Popen preexec_fn: the child gets `sig` when its parent dies."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


class Lifeline:
    """The watcher process of one `up` (see the module docstring)."""

    def __init__(self, lock_fd: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "config.supervisor", "watch", str(os.getpid())],
            cwd=Path(__file__).resolve().parent.parent,
            stdin=subprocess.PIPE,
            pass_fds=(lock_fd,),
            start_new_session=True,
            text=True,
        )

    def _say(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def watch_group(self, pgid: int) -> None:
        self._say(f"group {pgid}")

    def watch_postgres(self, pgdata: Path) -> None:
        self._say(f"postgres {pgdata}")

    def release(self) -> None:
        """`up` stopped everything itself: the watcher exits doing nothing."""
        self._say("done")
        self.process.stdin.close()
        self.process.wait(timeout=30)


def watch(up_pid: int) -> int:
    """The lifeline's watcher: wait for `up` to go, then stop what it left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    groups: list[int] = []
    pgdata: Path | None = None
    for line in sys.stdin:
        word, _, arg = line.strip().partition(" ")
        if word == "done":
            return 0
        if word == "group":
            groups.append(int(arg))
        elif word == "postgres":
            pgdata = Path(arg)
    # The pipe ended without "done": `up` is dead.
    _note(f"manage.py up (pid {up_pid}) is gone; stopping the processes it started")
    _signal_groups(groups, signal.SIGTERM)
    if not _wait_groups(groups, TERM_SECONDS):
        _signal_groups(groups, signal.SIGKILL)
        _wait_groups(groups, KILL_SECONDS)
    if pgdata is not None:
        users = embedded_db.stop_unless_used(pgdata, exclude=[up_pid])
        if users:
            _note(f"embedded Postgres left running: in use by pid {', '.join(map(str, users))}")
    return 0


def _note(message: str) -> None:
    try:
        print(f"conveyor: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass  # the terminal is gone with `up`


def _signal_groups(groups: list[int], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_groups(groups: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _live_members(groups):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _live_members(groups: list[int]) -> list[int]:
    # Zombies count as gone: their reaper (init) may be slow to collect them.
    members = []
    wanted = set(groups)
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) in wanted and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (psutil.Error, ProcessLookupError):
            pass
    return members


def data_dir_from_env() -> Path:
    # As config/settings.py resolves it, without importing Django (which would
    # start the server).
    return Path(os.environ.get("CONVEYOR_DATA_DIR") or Path(__file__).resolve().parent.parent / ".data")


def stop_all(data_dir: Path, timeout: float = 60) -> int:
    """`make stop`: the `up` running on `data_dir` (SIGTERM: it stops its
    children and its Postgres), then the embedded Postgres if still running."""
    lock = data_dir / LOCK_NAME
    if lock.exists():
        fd = os.open(lock, os.O_RDWR)
        try:
            deadline = time.monotonic() + timeout
            signalled = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                if not signalled:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    if holder.isdigit():
                        try:
                            os.kill(int(holder), signal.SIGTERM)
                            print(f"stopping manage.py up (pid {holder})")
                        except ProcessLookupError:
                            pass  # its watcher is cleaning up after it
                    signalled = True
                if time.monotonic() > deadline:
                    print(f"manage.py up on {data_dir} did not stop in {timeout:.0f} s", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        finally:
            os.close(fd)
    pgdata = data_dir / "pg"
    if embedded_db.is_running(pgdata):
        embedded_db.stop(pgdata)
        if embedded_db.is_running(pgdata):
            print(f"the embedded Postgres on {pgdata} did not stop", file=sys.stderr)
            return 1
        print(f"embedded Postgres on {pgdata} stopped")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["watch"] and len(argv) == 2:
        return watch(int(argv[1]))
    if argv == ["stop"]:
        return stop_all(data_dir_from_env())
    print("usage: python -m config.supervisor stop | watch UP_PID", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
