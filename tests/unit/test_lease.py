"""The run folder's lease (lmforge/lease.py): one launch holds it, others refuse naming the holder,
a dead or stale holder is taken over (by exactly one of several racing launches), and a holder whose
lease was taken over notices. Holders and racers are real processes on the real filesystem."""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmforge.lease import LEASE_DIR, Lease, LeaseHeld

ROOT = Path(__file__).resolve().parents[2]

# A launch: takes the lease, prints one JSON line saying how that went, then holds it until its stdin
# closes (prints {"released": ...}) or it is lost (prints {"lost": ..., "released": ...}).
DRIVER = r"""
import json, os, select, socket, sys, time
args = json.loads(sys.argv[1])
if args.get("host"):
    socket.gethostname = lambda: args["host"]  # as if this launch ran on another node
from lmforge.lease import Lease, LeaseHeld
if args.get("latency"):  # a few ms per metadata operation, as on NFS: races interleave as they would there
    import random
    def slow(op):
        def call(*a, **kw):
            time.sleep(random.uniform(0, args["latency"]))
            return op(*a, **kw)
        return call
    for name in ("open", "link", "rename", "unlink", "stat", "utime"):
        setattr(os, name, slow(getattr(os, name)))
if args.get("go"):
    print(json.dumps({"ready": True}), flush=True)
    while not os.path.exists(args["go"]):  # spin, so that the racers start within microseconds
        pass
try:
    lease = Lease.acquire(args["run_dir"], ttl_s=args["ttl"], info={"command": "driver"})
except LeaseHeld as e:
    print(json.dumps({"held": str(e), "holder": e.holder}), flush=True)
    sys.exit(3)
print(json.dumps({"acquired": lease.launch_id, "took_over": lease.took_over}), flush=True)
while not lease.lost and not select.select([sys.stdin], [], [], 0.01)[0]:
    pass
out = {"lost": lease.lost_reason} if lease.lost else {}
print(json.dumps({**out, "released": lease.release()}), flush=True)
"""


class Launch:
    def __init__(self, run_dir: Path, ttl: float, host: str | None = None, env: dict | None = None,
                 go: Path | None = None, latency: float = 0.0):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        args = {"run_dir": str(run_dir), "ttl": ttl, "host": host, "go": str(go) if go else None,
                "latency": latency}
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**clean, **(env or {})})

        self.lines: queue.Queue = queue.Queue()  # read by a thread, so that a silent launch fails, not hangs
        threading.Thread(target=lambda: [self.lines.put(t) for t in self.proc.stdout], daemon=True).start()

    def line(self, timeout_s: float = 20.0) -> dict:
        try:
            return json.loads(self.lines.get(timeout=timeout_s))
        except queue.Empty:
            said = f"the launch said nothing for {timeout_s} s (exit code {self.proc.poll()})"
            raise AssertionError(said) from None

    def finish(self) -> dict:
        """Close its stdin (it releases and exits) and return its last line."""
        self.proc.stdin.close()
        assert self.proc.wait(timeout=20) == 0
        return self.line()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()  # reaped: not even a zombie is left


def records(run_dir: Path) -> list[dict]:
    """The lease's records, oldest first; asserts that nothing else (no temporary) is left in its folder."""
    names = sorted(p.name for p in (run_dir / LEASE_DIR).iterdir())
    assert names == [f"{i:08d}.json" for i in range(1, len(names) + 1)], names
    return [json.loads((run_dir / LEASE_DIR / n).read_text()) for n in names]


def current(run_dir: Path) -> dict:
    return records(run_dir)[-1]


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)


def test_a_second_launch_refuses_naming_the_holder_while_renewals_keep_it_fresh(tmp_path):
    run = tmp_path / "run"
    holder = Launch(run, ttl=1.5, env={"SLURM_JOB_ID": "4242"})
    try:
        assert "acquired" in holder.line()
        time.sleep(2.0)  # more than its ttl: only the renewals keep it from going stale
        other = Launch(run, ttl=1.5)
        refused = other.line()
        assert other.proc.wait(timeout=20) == 3
        message = refused["held"]
        for fact in (f"pid {holder.proc.pid}", "Slurm job 4242", "last heartbeat", "command: driver",
                     "`scancel 4242`", f"{run} is in use by another launch"):
            assert fact in message, (fact, message)
        assert f"delete the folder {run / LEASE_DIR}" in message and "00000001.json" in message
        assert refused["holder"]["pid"] == holder.proc.pid
        with pytest.raises(LeaseHeld, match=f"pid {holder.proc.pid}") as e:
            Lease.acquire(run, ttl_s=1.5)
        assert e.value.holder["slurm_job_id"] == "4242"
        assert holder.finish() == {"released": True}
        assert [r.get("released", False) for r in records(run)] == [False, True]
        with Lease.acquire(run, ttl_s=1.5) as lease:  # free again
            assert lease.took_over is None and lease.path.name == "00000003.json"
    finally:
        holder.kill()


def test_a_killed_holder_on_another_node_is_taken_over_once_its_ttl_passes(tmp_path):
    run = tmp_path / "run"
    holder = Launch(run, ttl=1.5, host="other-node")
    assert "acquired" in holder.line()
    holder.kill()
    killed = time.monotonic()
    # another node's pid says nothing here: only the missing heartbeat can tell that it is dead
    with pytest.raises(LeaseHeld, match="host other-node"):
        Lease.acquire(run, ttl_s=1.5)
    with Lease.acquire(run, ttl_s=1.5, wait_s=10) as lease:
        # its last heartbeat was at most ttl/4 = 0.375 s before the kill, the lease stale 1.5 s after it
        assert time.monotonic() - killed > 1.1
        assert "host other-node" in lease.took_over and "no heartbeat for" in lease.took_over
        assert current(run)["launch_id"] == lease.launch_id
    assert current(run) == {**current(run), "released": True, "launch_id": lease.launch_id}


@pytest.mark.parametrize("reaped", [True, False])
def test_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, reaped):
    run = tmp_path / "run"
    holder = Launch(run, ttl=600.0)
    assert "acquired" in holder.line()
    if reaped:
        holder.kill()
    else:  # a zombie: its parent has not collected it yet, yet it trains nothing
        holder.proc.send_signal(signal.SIGKILL)
        stat = Path(f"/proc/{holder.proc.pid}/stat")
        while stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z":
            time.sleep(0.01)
    try:
        with Lease.acquire(run, ttl_s=600.0) as lease:  # wait_s=0: not the 600 s of its ttl
            assert f"process {holder.proc.pid} on this host is no longer running" in lease.took_over
    finally:
        holder.kill()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    run = tmp_path / "run"
    with Lease.acquire(run, ttl_s=600.0, renew=False) as mine:
        record = {**current(run), "launch_id": "an-earlier-launch"}
    # an earlier launch whose pid is now ours, a process that started at another time
    record["pid_start"] += 1
    (run / LEASE_DIR / "00000003.json").write_text(json.dumps(record))
    with Lease.acquire(run, ttl_s=600.0, renew=False) as lease:
        assert f"process {os.getpid()} on this host is no longer running" in lease.took_over
    assert mine.launch_id != lease.launch_id


def test_a_requeued_slurm_job_takes_over_at_once_another_step_of_it_does_not(tmp_path, monkeypatch):
    run = tmp_path / "run"
    holder = Launch(run, ttl=2.0, host="node-a", env={"SLURM_JOB_ID": "77"})  # renews every 0.5 s
    try:
        assert "acquired" in holder.line()
        monkeypatch.setenv("SLURM_JOB_ID", "77")  # a second step of the same allocation: both alive
        with pytest.raises(LeaseHeld, match="Slurm job 77"):
            Lease.acquire(run, ttl_s=600.0)
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job's next incarnation
        with Lease.acquire(run, ttl_s=600.0) as lease:
            assert "Slurm requeued job 77 (restart 0 -> 1)" in lease.took_over
            # were its previous run still alive, it would find out at its next renewal and stop
            assert f"taken over by host {socket.gethostname()}, pid {os.getpid()}" in holder.line()["lost"]
    finally:
        holder.kill()


@pytest.mark.parametrize("stale", ["ttl", "dead pid"])
def test_launches_racing_for_one_stale_lease_exactly_one_wins(tmp_path, stale):
    for attempt in range(3):
        run, go = tmp_path / f"run{attempt}", tmp_path / f"go{attempt}"
        dead = Launch(run, ttl=0.3, host="other-node" if stale == "ttl" else None)
        assert "acquired" in dead.line()
        dead.kill()
        if stale == "ttl":
            time.sleep(0.5)
        racers = [Launch(run, ttl=600.0, go=go, latency=0.005) for _ in range(3)]
        try:
            assert all(r.line() == {"ready": True} for r in racers)
            go.touch()
            results = [r.line() for r in racers]
            winners = [r for r, res in zip(racers, results, strict=True) if "acquired" in res]
            assert len(winners) == 1, results
            winner = winners[0]
            assert all(f"pid {winner.proc.pid}" in res["held"] for res in results if "held" in res)
            assert winner.finish() == {"released": True}
        finally:
            for r in racers:
                r.kill()
        dead_one, won, released = records(run)  # and no temporary left behind
        assert [dead_one["pid"], won["pid"], released["pid"]] == [dead.proc.pid, *[winner.proc.pid] * 2]


def test_a_holder_that_stalled_past_its_ttl_loses_the_lease_and_leaves_the_new_one(tmp_path):
    run = tmp_path / "run"
    holder = Launch(run, ttl=0.5)
    try:
        assert "acquired" in holder.line()
        os.kill(holder.proc.pid, signal.SIGSTOP)  # a hung node, an NFS stall: no heartbeats
        time.sleep(0.8)
        with Lease.acquire(run, ttl_s=60.0) as lease:
            assert "no heartbeat for" in lease.took_over  # alive, but silent for longer than its ttl
            os.kill(holder.proc.pid, signal.SIGCONT)
            report = holder.line()
            assert f"taken over by host {socket.gethostname()}, pid {os.getpid()}" in report["lost"]
            assert report["released"] is False  # it removed nothing: the lease is ours
            assert lease.verify() and not lease.lost
        assert [(r["pid"], r.get("released", False)) for r in records(run)] == [
            (holder.proc.pid, False), (os.getpid(), False), (os.getpid(), True)]
    finally:
        os.kill(holder.proc.pid, signal.SIGCONT)
        holder.kill()


def test_release_and_verify_act_only_on_our_own_lease(tmp_path):
    run = tmp_path / "run"
    lease = Lease.acquire(run, ttl_s=600.0, renew=False)
    assert lease.verify() and not lease.lost
    theirs = {"launch_id": "theirs", "host": "node-b", "pid": 7}
    (run / LEASE_DIR / "00000002.json").write_text(json.dumps(theirs))  # as after a takeover
    assert not lease.verify()
    assert lease.lost_reason == f"the lease on {run} was taken over by host node-b, pid 7"
    assert lease.release() is False and records(run)[-1] == theirs  # no release record over theirs

    shutil.rmtree(run / LEASE_DIR)
    lease = Lease.acquire(run, ttl_s=600.0, renew=False)
    lease.path.unlink()  # a user who took "delete it if you are sure" too early
    assert not lease.verify() and "was deleted" in lease.lost_reason

    shutil.rmtree(run / LEASE_DIR)  # ... and a launch that started afresh in its place
    lease = Lease.acquire(run, ttl_s=600.0, renew=False)
    shutil.rmtree(run / LEASE_DIR)
    with Lease.acquire(run, ttl_s=600.0, renew=False) as newer:
        assert not lease.verify() and f"now belongs to host {socket.gethostname()}" in lease.lost_reason
        assert lease.release() is False and newer.verify()

    lease = Lease.acquire(run, ttl_s=600.0, renew=False)
    assert lease.release() is True and current(run)["released"] is True
    assert lease.release() is False and not lease.verify()


def test_a_half_written_lease_is_held_while_fresh_and_taken_over_when_stale(tmp_path):
    run = tmp_path / "run"
    (run / LEASE_DIR).mkdir(parents=True)
    half = run / LEASE_DIR / "00000001.json"
    half.write_bytes(b"")  # an O_EXCL creator between its create and its write
    with pytest.raises(LeaseHeld, match="unreadable record"):
        Lease.acquire(run, ttl_s=60.0)
    long_ago = time.time() - 120
    os.utime(half, (long_ago, long_ago))  # ... that died there two minutes ago
    with Lease.acquire(run, ttl_s=60.0) as lease:
        assert "unreadable" in lease.took_over and lease.path.name == "00000002.json"
        assert json.loads(lease.path.read_text())["launch_id"] == lease.launch_id


def test_without_hard_links_an_exclusive_create_still_admits_one_holder(tmp_path, monkeypatch):
    def no_links(src, dst, **kw):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(dst))

    monkeypatch.setattr(os, "link", no_links)  # some FUSE and object-store mounts
    run = tmp_path / "run"
    with Lease.acquire(run, ttl_s=600.0, renew=False) as lease:
        assert current(run)["launch_id"] == lease.launch_id
        with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
            Lease.acquire(run, ttl_s=600.0, renew=False)
    assert current(run)["released"] is True
    with pytest.raises(ValueError, match="ttl_s must be > 0"):
        Lease.acquire(run, ttl_s=0)
