"""One run per folder: the run lock (``.rasa-run.lock``), held by the process that writes a run's results (a training
run's process 0, a detection run's rank 0). Below every room: training's output folder and detection's progress both
hold it. Only the standard library."""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import sys
import weakref
from typing import Any

logger = logging.getLogger(__name__)

LOCK_FILE = ".rasa-run.lock"


class OutputFolderError(ValueError):
    """The output folder cannot be used as asked: another run holds it, it holds another run's checkpoints, or it
    holds symbolic links a save would write through. The message says what to change."""


class _Held:
    """The lock file this process holds for an output folder, and how many holds share it."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd, self.holders = path, fd, 0


_HELD: dict[str, _Held] = {}  # lock path -> lock held by this process


class RunLock:
    """A hold on an output folder's run lock (see :func:`hold_run_lock`); ``release()`` is idempotent and runs when
    the hold is garbage-collected or the interpreter exits."""

    def __init__(self, path: str):
        self.path = path
        _HELD[path].holders += 1
        self._finalizer = weakref.finalize(self, _drop_hold, path)

    @property
    def held(self) -> bool:
        return self._finalizer.alive

    def release(self) -> None:
        self._finalizer()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _drop_hold(path: str) -> None:
    held = _HELD.get(path)
    if held is None:
        return
    held.holders -= 1
    if held.holders > 0:
        return
    del _HELD[path]
    try:
        with contextlib.suppress(OSError):  # remove the file only while it is still the one this process locked
            if os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(held.fd)):
                os.unlink(path)
    finally:
        os.close(held.fd)


def _lock_record(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _describe_holder(record: dict[str, Any]) -> str:
    if not record:
        return "a run that wrote no details"
    command = f": {record['command']}" if record.get("command") else ""
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}{command}"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    except (TypeError, ValueError):
        return False
    return True


def hold_run_lock(output_dir: str) -> RunLock:
    """Hold ``output_dir/.rasa-run.lock`` for a run: one run per output folder.

    The file is created without following links and locked with ``flock`` (released by the kernel when the process
    dies, however it dies); it records the holder's pid, host, start time and command. Another process holding it is
    refused with :class:`OutputFolderError` naming the holder; a lock file left by a process that is gone is taken
    over with a warning (one of another host is refused, since this host cannot tell whether that run still goes).
    Holds within one process share the lock (``rasa-trainer train`` holds it for the whole command and the trainer
    inside joins), and the file is removed when the last hold is released."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(os.path.realpath(output_dir), LOCK_FILE)
    if path in _HELD:
        return RunLock(path)
    host, pid = socket.gethostname(), os.getpid()
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                         0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise OutputFolderError(f"{path} is a symbolic link; remove it (RASATrainer creates its run lock "
                                        f"there and never writes through a link)") from None
            raise
        locked = _flock(fd)
        if locked is False:
            record = _lock_record(fd)
            os.close(fd)
            raise OutputFolderError(
                f"output_dir {output_dir} is in use by another run ({_describe_holder(record)}). One run per output "
                f"folder: wait for that run to finish, or use another output_dir")
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and our lock: try the new one
            os.close(fd)
            continue
        record = _lock_record(fd)
        if record and record.get("pid") != pid:
            stale = locked is True or not _pid_alive(record.get("pid"))
            if record.get("host") != host or not stale:
                os.close(fd)
                raise OutputFolderError(
                    f"output_dir {output_dir} is locked by another run ({_describe_holder(record)}), which this host "
                    f"cannot check. One run per output folder: if that run has ended, delete {path}; otherwise wait "
                    f"for it, or use another output_dir")
            logger.warning("RASA: taking over the lock of output_dir %s from a run that is no longer running (%s)",
                           output_dir, _describe_holder(record))
        mine = {"pid": pid, "host": host, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode("utf-8"), 0)
        with contextlib.suppress(OSError):
            os.fsync(fd)
        _HELD[path] = _Held(path, fd)
        return RunLock(path)
    raise OutputFolderError(f"could not take the run lock {path}: it keeps being replaced by another process")


def launch_rank() -> int:
    """This process's global rank as launchers set it (torchrun, ``accelerate launch`` and the DeepSpeed launcher set
    ``RANK`` and ``WORLD_SIZE``), before any process group exists; 0 without a launcher or with one process."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def run_lock_holder(output_dir: str) -> str | None:
    """Who holds ``output_dir``'s run lock in another process (a description), or None: a check that takes nothing,
    for refusing early; :func:`hold_run_lock` is what holds the folder.

    Only the launch's process 0 looks: it is the one that will hold the lock, and the other processes of the same
    launch would otherwise see their own process 0's fresh lock as another run's and refuse themselves (a race: rank 0
    can take the lock before rank 1 has finished its checks). Process 0 refuses for the whole launch."""
    if launch_rank() != 0:
        return None
    path = os.path.join(os.path.realpath(output_dir), LOCK_FILE)
    if path in _HELD or not os.path.lexists(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # a link or unreadable: hold_run_lock says what is wrong
    try:
        record = _lock_record(fd)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except (ImportError, OSError) as err:
            if isinstance(err, BlockingIOError) or getattr(err, "errno", None) in (errno.EAGAIN, errno.EACCES):
                return _describe_holder(record)
            live = record.get("host") == socket.gethostname() and _pid_alive(record.get("pid"))
            return _describe_holder(record) if live and record.get("pid") != os.getpid() else None
        return None
    finally:
        os.close(fd)  # (closing gives back the shared lock taken to look)


def _flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no locks (the pid decides)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, EINVAL: no flock here
    return True
