"""One build at a time in an OUTPUT: exclusive lock files that name their holders.

Two builds writing into one OUTPUT would race on the same temporary shards, done records and
manifest. Every worker of a build holds exactly one lock file in OUTPUT, created exclusively
before it reads OUTPUT or loads an encoder and deleted when it ends (normally, on an error, on
Ctrl-C or SIGTERM); each lock holds the worker's host, pid, start time and its launch:

- a lone process: ``build.lock``, a launch of its own;
- rank r of a torchrun or Slurm launch: ``build.rankRRR.lock``; the ranks of one launch share a
  launch id (the rendezvous address and run id, or the Slurm job and step), so they never
  contend, whatever their number;
- a Ray build: the driver holds ``build.lock`` and each encoder actor ``build.actorNNN.lock``,
  all of the driver's launch; the driver deletes its actors' locks when it stops them.

A worker refuses, in one line naming the holder, a lock under its own name held by anyone but
an earlier run of itself (a restarted Ray actor or torchrun worker), and any live lock of
another launch. Whoever plans also holds ``plan.lock`` while it reads, makes and writes
OUTPUT/plan.json and the empty caption: workers of one launch that plan alone wait for each
other there, so the plan is made once.

- Stale locks: a lock whose holder ran on this host (same pid namespace) and whose process is
  gone (kill -9, a crash, a reused pid) is taken over, or deleted when it is another worker's. A
  lock from another host cannot be judged from here; the message names it, to be deleted by
  hand once that build is known to be gone.
- Object storage: a lock object is created with a conditional PUT (``If-None-Match: *``),
  which AWS S3 and the S3-compatible stores that honour it make exclusive. fsspec stores without
  conditional writes only check before writing: exclusion there is best effort.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping

from .distributed import RankInfo
from .errors import ShardkitError
from .sourcefiles import SourceFileSkip, read_source_file
from .storage import Storage, storage_error

log = logging.getLogger(__name__)

LOCK_FILE = re.compile(r"^\.?(build(\.(rank|actor)\d{3,})?|plan)\.lock(\.[0-9a-f]+\.tmp)?$")  # locks, their temp files
PLAN_LOCK = "plan.lock"
_MAX_LOCK_BYTES = 4096
_ATTEMPTS = 5  # creations tried while stale locks are taken over
_PLAN_WAIT_S = 0.2  # how often a planner waiting for another of its launch looks again
_UNNAMED = "unnamed "  # a launch without a shared id: its workers are told apart by their lock names only
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def worker_lock_name(ranks: RankInfo) -> str:
    return f"build.rank{ranks.rank:03d}.lock" if ranks.distributed else "build.lock"


def actor_lock_name(index: int) -> str:
    return f"build.actor{index:03d}.lock"


def launch_of(ranks: RankInfo, env: Mapping[str, str] | None = None) -> str:
    """What the workers of one launch share and two launches do not."""
    env = os.environ if env is None else env
    if not ranks.distributed:
        return f"{socket.gethostname()} pid {os.getpid()} {secrets.token_hex(4)}"  # a lone process is a launch
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        address = env["MASTER_ADDR"]
        if address in _LOOPBACK:  # one-host launches on two hosts may use the same loopback address
            address = f"{socket.gethostname()}/{address}"
        return f"rendezvous {address}:{env['MASTER_PORT']} run {env.get('TORCHELASTIC_RUN_ID', '')}"
    if "SLURM_JOB_ID" in env:
        return f"slurm job {env['SLURM_JOB_ID']} step {env.get('SLURM_STEP_ID', '')}"
    # RANK/WORLD_SIZE set by hand: launches of one size meet on the rank names, of two sizes here.
    return f"{_UNNAMED}launch of {ranks.world_size} ranks"


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: enough to tell the user, and to tell a dead holder on this host."""

    host: str
    pid: int
    started: str  # UTC, for the message
    launch: str  # shared by the workers of one launch (launch_of)
    worker: str  # which worker of the launch ("rank 1 of 4", "Ray actor 2"), empty for a lone process
    pid_namespace: str | None  # pids compare only within one namespace (containers share hosts)
    process_start: str | None  # the process's start time in clock ticks: a reused pid differs

    @classmethod
    def this_process(cls, launch: str, worker: str = "") -> "LockHolder":
        return cls(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   launch=launch, worker=worker, pid_namespace=_pid_namespace(),
                   process_start=_process_start(os.getpid()))

    def as_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def parse(cls, payload: bytes) -> "LockHolder | None":
        """The holder a lock file names, or None when it names none (not ours, or damaged)."""
        try:
            data = json.loads(payload.decode("utf-8"))
            holder = cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError, RecursionError):
            return None
        if not (isinstance(holder.pid, int) and all(isinstance(text, str) for text in
                                                    (holder.host, holder.launch, holder.worker, holder.started))):
            return None
        return holder

    def describe(self) -> str:
        worker = f" ({self.worker})" if self.worker else ""
        return f"pid {self.pid} on host {self.host}{worker}, since {self.started}"

    def is_gone(self) -> bool:
        """True only when the holder is known dead: same host and pid namespace, no such process."""
        if self.host != socket.gethostname() or self.pid_namespace != _pid_namespace():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
        state, start = _process_stat(self.pid)
        if state == "Z":
            return True  # killed, not yet reaped (where no init reaps orphans, for good)
        return self.process_start is not None and start not in (None, self.process_start)

    def earlier_run_of(self, me: "LockHolder") -> bool:
        """Whether this holder is an earlier run of the same worker of the same launch (restarted)."""
        return self.launch == me.launch and not me.launch.startswith(_UNNAMED) and self.worker == me.worker


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    return _process_stat(pid)[1]


def _process_stat(pid: int) -> tuple[str | None, str | None]:
    """The process's state letter and start time in clock ticks (proc(5)); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), fields[19].decode()  # state, starttime: the 3rd and 22nd fields
    except (OSError, IndexError):
        return None, None


class OutputLock:
    """A held lock on OUTPUT; ``release()`` deletes it (only while it is still this holder's)."""

    def __init__(self, storage: Storage, name: str, holder: LockHolder):
        self.storage = storage
        self.name = name
        self.payload = holder.as_bytes()
        self.launch = holder.launch
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if _read(self.storage, self.name) == self.payload:
                _remove(self.storage, self.name)
        except Exception as exc:  # never hide the build's own outcome behind a failed cleanup
            log.warning("could not remove the lock %s: %s", self.storage.url_of(self.name), exc)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def lock_output(storage: Storage, name: str, launch: str, worker: str = "") -> OutputLock:
    """Take this worker's lock ``name`` on OUTPUT, or say in one line which build holds OUTPUT."""
    me = LockHolder.this_process(launch, worker)
    for _ in range(_ATTEMPTS):
        if _create(storage, name, me.as_bytes()):
            break
        payload = _read(storage, name)
        if payload is None:
            continue  # released meanwhile
        holder = LockHolder.parse(payload)
        if holder is None or not (holder.is_gone() or holder.earlier_run_of(me)):
            raise ShardkitError(_held_message(storage, name, holder))
        log.warning("taking over the lock %s of a build that is gone (%s)", storage.url_of(name), holder.describe())
        _take_over(storage, name, payload)
    else:
        raise ShardkitError(f"could not take the lock {storage.url_of(name)}: it changed hands {_ATTEMPTS} times; "
                            f"run the build again")
    lock = OutputLock(storage, name, me)
    try:
        _refuse_other_launches(storage, name, me)
    except BaseException:
        lock.release()
        raise
    return lock


def lock_worker(storage: Storage, ranks: RankInfo) -> OutputLock:
    """The lock of a lone process or of one rank of a launch."""
    return lock_output(storage, worker_lock_name(ranks), launch_of(ranks), ranks.describe() if ranks.distributed else "")


@contextlib.contextmanager
def planning(storage: Storage, launch: str) -> Iterator[None]:
    """Hold ``plan.lock`` while plan.json is read, made and written: one planner at a time.

    Another planner of the same launch (ranks that plan alone) is waited for, and the plan it
    wrote is then checked instead of made again; a planner of another launch is refused.
    """
    me = LockHolder.this_process(launch, "planner")
    while not _create(storage, PLAN_LOCK, me.as_bytes()):
        payload = _read(storage, PLAN_LOCK)
        if payload is None:
            continue  # released meanwhile
        holder = LockHolder.parse(payload)
        if holder is not None and holder.is_gone():
            log.warning("taking over the lock %s of a planner that is gone (%s)", storage.url_of(PLAN_LOCK),
                        holder.describe())
            _take_over(storage, PLAN_LOCK, payload)
        elif holder is not None and holder.launch == launch:
            time.sleep(_PLAN_WAIT_S)
        else:
            raise ShardkitError(_held_message(storage, PLAN_LOCK, holder))
    with OutputLock(storage, PLAN_LOCK, me):
        yield


def release_launch(storage: Storage, launch: str, keep: str) -> None:
    """Delete every lock of ``launch`` in OUTPUT but ``keep`` (the caller's own): its other workers are
    known stopped (Ray actors killed). Best effort, as ``OutputLock.release``."""
    try:
        for name in storage.listdir(""):
            if name == keep or not LOCK_FILE.match(name) or name.endswith(".tmp"):
                continue
            payload = _read(storage, name)
            holder = LockHolder.parse(payload) if payload else None
            if holder is not None and holder.launch == launch:
                _take_over(storage, name, payload)
    except Exception as exc:
        log.warning("could not remove the locks of stopped workers in %s: %s", storage.url, exc)


def _held_message(storage: Storage, name: str, holder: LockHolder | None) -> str:
    who = holder.describe() if holder is not None else "a lock file that names no build"
    return (f"another build holds OUTPUT {storage.url}: {who} ({storage.url_of(name)}); wait for it to finish, "
            f"or delete that file if no build is running there")


def _refuse_other_launches(storage: Storage, name: str, me: LockHolder) -> None:
    """Workers of one launch lock different names: a live lock of another launch is a conflict;
    a dead one is deleted."""
    for other in storage.listdir(""):
        if other == name or not LOCK_FILE.match(other) or other.endswith(".tmp"):
            continue
        payload = _read(storage, other)
        holder = LockHolder.parse(payload) if payload else None
        if holder is None or holder.launch == me.launch:
            continue
        if not holder.is_gone():
            raise ShardkitError(_held_message(storage, other, holder))
        log.warning("deleting the lock %s of a build that is gone (%s)", storage.url_of(other), holder.describe())
        _take_over(storage, other, payload)


def _take_over(storage: Storage, name: str, stale: bytes) -> None:
    """Delete a dead holder's lock, unless it changed meanwhile. Stale locks are judged on this host
    only, so a host-wide guard keeps two builds here from taking over the same lock at once."""
    with _host_guard(storage.url_of(name)):
        if _read(storage, name) == stale:
            _remove(storage, name)


@contextlib.contextmanager
def _host_guard(url: str):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): a narrower race, still refused by the exclusive create
        yield
        return
    guard = Path(tempfile.gettempdir()) / f"shardkit-lock-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    with open(guard, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- the three operations, on a local folder or in object storage ---------------------------

def _create(storage: Storage, name: str, payload: bytes) -> bool:
    """Create the lock with its whole content, only if there is none; False when one exists."""
    if storage.is_local:
        final = storage.root / name
        # Written aside, then linked: the lock appears with its content, never empty.
        temp = storage.root / f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            temp.write_bytes(payload)
        except OSError as exc:
            raise ShardkitError(f"cannot write the lock {final} ({exc.strerror or exc}); OUTPUT must be a "
                                f"writable folder") from None
        try:
            os.link(temp, final)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: create exclusively, then write
            try:
                with open(final, "xb") as handle:
                    handle.write(payload)
                return True
            except FileExistsError:
                return False
        finally:
            temp.unlink(missing_ok=True)
    path = f"{storage.root}/{name}"
    try:
        storage.fs.pipe_file(path, payload, mode="create")
    except FileExistsError:
        return False
    except Exception as exc:
        raise storage_error(storage.url_of(name), exc) from None
    finally:
        storage.fs.invalidate_cache(path)
    return True


def _read(storage: Storage, name: str) -> bytes | None:
    """The lock's first bytes (a lock is small; what is planted there is not trusted), None if absent."""
    if storage.is_local:
        try:
            return read_source_file(storage.root / name, _MAX_LOCK_BYTES, None, length=_MAX_LOCK_BYTES)[0]
        except FileNotFoundError:
            return None
        except (SourceFileSkip, IsADirectoryError):
            return b""  # a FIFO, a folder, a huge file: names no build
    path = f"{storage.root}/{name}"
    storage.fs.invalidate_cache(path)
    try:
        return storage.fs.cat_file(path, start=0, end=_MAX_LOCK_BYTES)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise storage_error(storage.url_of(name), exc) from None


def _remove(storage: Storage, name: str) -> None:
    storage.remove(name)
