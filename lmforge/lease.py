"""One run folder, one run: an exclusive lease on RUN_DIR that holds on NFS and Lustre.

Two launches on one run folder (a requeued Slurm job while a manual resubmission starts; workers left
training after their launcher was `kill -9`ed) would load, prune and commit each other's checkpoints.
`flock`/`fcntl` locks are not reliably coherent across nodes on parallel filesystems, so the lease is
made of small files in `RUN_DIR/lease/`, one per holder, numbered: `00000001.json`, `00000002.json`,
... The highest number is the current state: a holder's record (host, pid, Slurm job, a random
launch id, when it started, its ttl), or a release record written when a run ends cleanly.

- **Taking it** means creating the next number, with one exclusive filesystem operation: the record
  is written in full to a temporary file, then `link()`ed to `N+1.json`, which fails with EEXIST if
  the name exists, on every filesystem and NFS version (open(2) gives it as the NFS-safe lock recipe:
  if the reply is lost and a retransmission says EEXIST, the temporary's link count of 2 says it
  worked). Unlike `O_CREAT|O_EXCL` the file appears complete, so nobody reads a half-written record;
  `O_EXCL` is the fallback where hard links are not supported. Writing a temporary and renaming it
  into place would not do: rename replaces. A fresh folder starts at 1, a free or stale lease is
  taken by creating the next number, so two launches racing for one stale lease race for one name
  and exactly one wins. Nothing is ever moved or deleted: POSIX has no compare-and-swap, and the
  brief's "rename the stale file aside, then create" lets a slow racer move the winner's new lease
  aside (its rename succeeds too), so that two launches hold it.
- **The heartbeat is the file's mtime**, touched by rank 0's daemon thread every `ttl_s / 4`. The
  thread also checks that no higher number exists: one does once another launch took over, and then
  `lease.lost` becomes true and the run must stop without saving. `verify()` does the same check
  synchronously, for just before a commit. The record itself is never rewritten.
- **Stale** means no heartbeat for `ttl_s` seconds (the holder's own `ttl_s`, from its record).
  Clock skew between nodes is avoided by reading both ends of that interval from the file server:
  the record's mtime against the mtime of a file the observer has just touched in the same folder.
  On NFS both are the server's clock (a touch with the current time is sent as SET_TO_SERVER_TIME);
  filesystems that stamp with the client's clock (Lustre) need node clocks that agree to well within
  `ttl_s`, which NTP gives by orders of magnitude. NFS clients cache lookups for up to `acdirmax`
  (60 s by default), so a holder may notice a takeover that much later; that is why `ttl_s` is
  120 s by default and `verify()` guards commits.
- **Taken over at once**, without waiting for `ttl_s`, when the holder is provably dead: the same
  Slurm job with a higher `SLURM_RESTART_COUNT` (Slurm ends a job's previous run before requeueing
  it), or a process on this host (same boot, same pid namespace) that no longer runs (gone, a
  zombie, or its pid reused by a process that started later). Were such a holder still alive, it
  would find its lease lost at its next renewal or `verify()` and stop.

The folder grows by two files of ~0.5 KB per launch (its record and its release). Deleting the
folder resets it; do that only when no launch on this run folder is alive.

Call order for a run (rank 0 only; the run broadcasts the outcome to the other ranks):

    lease = Lease.acquire(run_dir, ttl_s=..., info={"command": ...})  # raises LeaseHeld
    ...                  only now clean up leftovers, choose the checkpoint to resume, ...
    every step:          stop (without saving) if lease.lost; fold it into the step's stop agreement
    before each commit:  if not lease.verify(): stop without committing or pruning
    on a clean exit:     lease.release()        (or `with Lease.acquire(...) as lease:`)
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

LEASE_DIR = "lease"
DEFAULT_TTL_S = 120.0  # seconds without a heartbeat after which a lease is stale
_NAME = re.compile(r"(\d+)\.json")
_MAX_STEPS = 10_000  # records an acquire may walk past before giving up (each is a launch)


class LeaseError(RuntimeError):
    """The run folder's lease could not be taken or kept; the message says why and what to do."""


class LeaseHeld(LeaseError):
    """Another launch holds the run folder. `holder` is its record (None if it is unreadable)."""

    def __init__(self, message: str, holder: dict | None):
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class _Seen:
    """One record as read: its mtime (the heartbeat) and its content."""

    mtime_ns: int
    raw: bytes

    @property
    def record(self) -> dict | None:
        try:
            record = json.loads(self.raw)
        except ValueError:  # empty or partial: an O_EXCL creator (no hard links) mid-write
            return None
        return record if isinstance(record, dict) else None


class Lease:
    """An exclusive lease on a run folder; see the module docstring. Create it with `acquire`."""

    def __init__(self, folder: Path, number: int, record: dict, ttl_s: float, took_over: str | None):
        self.folder = folder
        self.number = number  # ours is folder / _name(number)
        self.path = folder / _name(number)
        self.record = record
        self.launch_id: str = record["launch_id"]
        self.ttl_s = ttl_s
        self.took_over = took_over  # whose stale lease this launch took over, and why; None if it was free
        self._lost_reason: str | None = None
        self._renewed = time.monotonic()  # our clock at the last heartbeat that reached the file
        self._lock = threading.Lock()  # verify() runs in the renewer and in the training loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._released = False

    # -- taking it -------------------------------------------------------------------------------
    @classmethod
    def acquire(cls, run_dir: str | os.PathLike, ttl_s: float = DEFAULT_TTL_S, info: dict | None = None,
                wait_s: float = 0.0, renew: bool = True) -> Lease:
        """Take the lease on `run_dir` (created if missing), or raise `LeaseHeld` naming the holder.

        ttl_s: seconds without a heartbeat after which others may take it over; renewed every ttl_s / 4.
        info: JSON-serialisable facts shown to a refused launch (e.g. {"command": ..., "stage": ...}).
        wait_s: seconds to keep trying while another launch holds it (0: refuse at once).
        renew: start the daemon thread that renews it (False: the caller calls `verify()` often enough).
        """
        if not ttl_s > 0:
            raise ValueError(f"lease ttl_s must be > 0 seconds, got {ttl_s}")
        folder = Path(run_dir) / LEASE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        me = _identity(ttl_s, info)
        data = _encode(me)
        tmp = _write_temporary(folder, data)
        deadline = time.monotonic() + wait_s
        try:
            number = _highest(folder)  # a hint (a directory listing may lag on NFS): creation decides
            walked = 0  # numbers walked past: each one is a launch that got there first
            while walked <= _MAX_STEPS:
                current = _read(folder / _name(number)) if number else None
                holder = current.record if current else None
                took_over = None
                if current is not None and not (holder or {}).get("released"):
                    age_s = (_server_now_ns(tmp) - current.mtime_ns) / 1e9
                    holder_ttl = _positive(holder.get("ttl_s") if holder else None) or ttl_s
                    why = _dead(holder, me)
                    if why is None and age_s > holder_ttl:
                        why = f"no heartbeat for {age_s:.1f} s (stale after {holder_ttl:g} s)"
                    if why is None:  # held, unless a higher number exists
                        if _read(folder / _name(number + 1)) is not None:
                            number, walked = number + 1, walked + 1
                        elif time.monotonic() < deadline:
                            time.sleep(min(1.0, holder_ttl / 8))
                        else:
                            raise LeaseHeld(_held_message(folder, number, holder, age_s, holder_ttl), holder)
                        continue
                    took_over = f"took over the lease of {_describe(holder)}: {why}"
                if _create(tmp, folder / _name(number + 1), data):
                    lease = cls(folder, number + 1, me, ttl_s, took_over)
                    if renew:
                        lease._thread = threading.Thread(target=lease._renew_loop, name="lmforge-lease",
                                                         daemon=True)
                        lease._thread.start()
                    return lease
                number, walked = number + 1, walked + 1  # another launch created it first: judge that one
            raise LeaseError(f"{folder} has over {_MAX_STEPS} records past the highest one listed; delete "
                             "the folder once no launch on this run folder is alive")
        finally:
            tmp.unlink(missing_ok=True)

    # -- keeping it ------------------------------------------------------------------------------
    @property
    def lost(self) -> bool:
        """True once another launch took the lease over (or it was deleted): stop without saving."""
        return self._lost_reason is not None

    @property
    def lost_reason(self) -> str | None:
        return self._lost_reason

    def verify(self) -> bool:
        """Renew the lease and check that it is still ours; False (and `lost` set) if it is not.
        Synchronous (an open, a touch and a lookup of small files): call it just before a commit."""
        with self._lock:
            if self._lost_reason is not None or self._released:
                return False
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return self._lose(f"{self.path} was deleted while this run held it")
            except OSError as e:
                return self._renewal_failed(e)
            try:
                mine = _read_fd(fd).record
                if (mine or {}).get("launch_id") != self.launch_id:  # the folder was deleted and restarted
                    return self._lose(f"{self.path} now belongs to {_describe(mine)}")
                os.utime(fd)  # the heartbeat: the current time, from the file server on NFS
                after = _read(self.folder / _name(self.number + 1))
            except OSError as e:
                return self._renewal_failed(e)
            finally:
                os.close(fd)
            if after is not None:
                return self._lose(f"the lease on {self.folder.parent} was taken over by "
                                  f"{_describe(after.record)}")
            self._renewed = time.monotonic()
            return True

    def release(self) -> bool:
        """Stop renewing and mark the lease free, if it is still ours; True if it was."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._released:
                return False
            self._released = True
            mine = _read(self.path)
            ours = mine is not None and (mine.record or {}).get("launch_id") == self.launch_id
            if self._lost_reason is not None or not ours:
                return False
            # the release is the next number, created exclusively: if another launch took over, it fails
            record = {"released": True, "launch_id": self.launch_id, "host": self.record["host"],
                      "pid": self.record["pid"], "released_at": _utc_now()}
            data = _encode(record)
            tmp = _write_temporary(self.folder, data)
            try:
                return _create(tmp, self.folder / _name(self.number + 1), data)
            finally:
                tmp.unlink(missing_ok=True)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            if not self.verify():
                return

    def _lose(self, reason: str) -> bool:
        self._lost_reason = reason
        return False

    def _renewal_failed(self, error: OSError) -> bool:
        """A transient error (an NFS hiccup) is tolerated until others may consider the lease stale."""
        silent_s = time.monotonic() - self._renewed
        if silent_s > self.ttl_s:
            return self._lose(f"could not renew {self.path} for {silent_s:.0f} s ({error}); after "
                              f"{self.ttl_s:g} s without a heartbeat another launch may take it over")
        return True


# -- the file operations -------------------------------------------------------------------------
def _name(number: int) -> str:
    return f"{number:08d}.json"


def _highest(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return max(numbers, default=0)


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _write_temporary(folder: Path, data: bytes) -> Path:
    # not `.*.tmp`: atomic.remove_leftovers, run by the holder's rank 0, would delete it mid-acquire
    fd, name = tempfile.mkstemp(dir=folder, prefix="tmp-", suffix=".part")
    try:
        os.write(fd, data)
        os.fsync(fd)  # the record is on disk before any name says it is the lease
        os.fchmod(fd, 0o666 & ~_umask())  # readable by the team, so a refused launch can say who holds it
    finally:
        os.close(fd)
    return Path(name)


def _create(tmp: Path, path: Path, data: bytes) -> bool:
    """Put the complete record at `path` if nothing is there; False if something is."""
    try:
        os.link(tmp, path)
        return True
    except OSError as e:
        if os.stat(tmp).st_nlink == 2:  # NFS: the link was made but its reply was lost
            return True
        if isinstance(e, FileExistsError):
            return False
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
    try:  # no hard links here: O_EXCL, exclusive on local filesystems, NFSv3+ and Lustre
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _read(path: Path) -> _Seen | None:
    try:
        fd = os.open(path, os.O_RDONLY)  # an open revalidates NFS's cached attributes (close-to-open)
    except FileNotFoundError:
        return None
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _read_fd(fd: int) -> _Seen:
    st = os.fstat(fd)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return _Seen(st.st_mtime_ns, b"".join(chunks))


def _server_now_ns(tmp: Path) -> int:
    """The file server's current time: touch a file of ours beside the records and read its mtime."""
    os.utime(tmp)
    return os.stat(tmp).st_mtime_ns


# -- who holds it --------------------------------------------------------------------------------
def _identity(ttl_s: float, info: dict | None) -> dict:
    record = {
        "launch_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "ppid": os.getppid(),
        "started_at": _utc_now(), "ttl_s": ttl_s, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": _int(os.environ.get("SLURM_RESTART_COUNT")) or 0,
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_namespace(),
        "pid_start": _process_start(os.getpid()),
    }
    if info:
        record["info"] = info
    return record


def _dead(holder: dict | None, me: dict) -> str | None:
    """Why `holder` is certainly no longer running, or None if it may be."""
    if not holder:
        return None
    job = holder.get("slurm_job_id")
    restarts = _int(holder.get("slurm_restart_count")) or 0
    if job and job == me["slurm_job_id"] and me["slurm_restart_count"] > restarts:
        return (f"Slurm requeued job {job} (restart {restarts} -> {me['slurm_restart_count']}), "
                "which ends the job's previous run")
    same_machine = all(holder.get(k) == me[k] for k in ("host", "boot_id", "pid_ns"))
    pid = holder.get("pid")
    if same_machine and isinstance(pid, int) and not _running(pid, holder.get("pid_start")):
        return f"its process {pid} on this host is no longer running"
    return None


def _running(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:  # no /proc (or it just exited): trust the signal
        return True
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)", which may contain spaces
    if fields[0] in ("Z", "X"):  # a zombie trains nothing
        return False
    return started is None or int(fields[19]) == started  # field 22 of proc(5): start time in clock ticks


def _process_start(pid: int) -> int | None:
    stat = _read_text(f"/proc/{pid}/stat")
    return int(stat.rsplit(")", 1)[-1].split()[19]) if stat else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")  # containers on one host share a hostname, not pids
    except OSError:
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a launch whose record is unreadable"
    job = holder.get("slurm_job_id")
    slurm = f", Slurm job {job} (restart {holder.get('slurm_restart_count', 0)})" if job else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{slurm}"


def _held_message(folder: Path, number: int, holder: dict | None, age_s: float, ttl_s: float) -> str:
    if holder is None:
        who = (f"  an unreadable record (a launch may be writing it right now), "
               f"last changed {max(age_s, 0):.0f} s ago")
        stop = ""
    else:
        extra = "".join(f"\n  {k}: {v}" for k, v in (holder.get("info") or {}).items())
        who = (f"  {_describe(holder)}, launch {holder.get('launch_id')}\n"
               f"  since {holder.get('started_at')} (its clock), "
               f"last heartbeat {max(age_s, 0):.0f} s ago{extra}")
        job = holder.get("slurm_job_id")
        stop = f" (`scancel {job}`)" if job else f" (kill pid {holder.get('pid')} on {holder.get('host')})"
    return (f"{folder.parent} is in use by another launch (lease {folder / _name(number)}):\n{who}\n"
            f"Two launches on one run folder would overwrite each other's checkpoints. Wait for it to "
            f"finish, stop it{stop}, or, if you are sure it is dead, delete the folder {folder}. Without a "
            f"heartbeat for {ttl_s:g} s it is taken over automatically (in about "
            f"{max(ttl_s - age_s, 0):.0f} s if it is dead).")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _positive(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
