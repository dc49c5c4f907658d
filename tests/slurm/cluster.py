"""A real Slurm cluster on this machine for the tests: munged, slurmctld and two slurmd daemons (nodes n1 and
n2, both at 127.0.0.1 on their own ports), configured in a folder of its own (SLURM_CONF), stopped at the end.

Debian's slurm-wlm and munge must be installed (`.ci/run` installs them); the daemons run as root, as CI does.
`python -m tests.slurm.cluster DIR` starts one by hand and prints the SLURM_CONF to export.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

NODES = ("n1", "n2")
CPUS = 2  # each node offers the machine's 2 cores: the two share them, as two GPUs' worth of CPU work would

CONF = """\
ClusterName=lmforge-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MinJobAge=86400
KillWait=10
SlurmdTimeout=60
InactiveLimit=0
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
NodeName=n1 NodeAddr=127.0.0.1 Port={node_ports[0]} CPUs={cpus} RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port={node_ports[1]} CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class SlurmMissing(RuntimeError):
    pass


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ensure_munge() -> None:
    """munged with Debian's key (made now if the package left none), unless one already answers."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)
    for _ in range(50):
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("munged started but `munge -n` fails")


def ensure_hosts() -> None:
    """n1 and n2 resolve to 127.0.0.1: scripts use node names as hosts (torchrun's rendezvous, MASTER_ADDR)."""
    hosts = Path("/etc/hosts")
    names = set(hosts.read_text().split())
    if not set(NODES) <= names:
        with hosts.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(NODES)}  # lmforge tests: the Slurm nodes\n")


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.dir = Path(folder)
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> Cluster:
        missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(c)
                   and not Path(f"/usr/sbin/{c}").exists()]
        if missing:
            raise SlurmMissing(f"{', '.join(missing)} not found: install Debian's slurm-wlm and munge "
                               "(`apt-get install -y slurm-wlm munge`; .ci/run does) or deselect with -m 'not slurm'")
        ensure_munge()
        ensure_hosts()
        ctld, *nodes = free_ports(3)
        for sub in ("state", *(f"spool/{n}" for n in NODES)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(dir=self.dir, ctld_port=ctld, node_ports=nodes, cpus=CPUS))
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for node in NODES:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", node], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T %D", check=False).stdout.split()
            if out[:2] == ["idle", str(len(NODES))]:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster's nodes never became idle: {out}; see {self.dir}/*.log")

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=60, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as Key=Value fields."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(t.partition("=")[::2] for t in out.split("\n")[0].split() if "=" in t)

    def wait(self, job_id: str, until, timeout: float = 300, poll: float = 0.5) -> dict[str, str]:
        """Poll the job until `until(fields)` holds; its fields then."""
        deadline = time.time() + timeout
        while True:
            fields = self.job(job_id)
            if until(fields):
                return fields
            if time.time() > deadline:
                raise AssertionError(f"job {job_id} never reached the expected state: {fields.get('JobState')} "
                                     f"({fields.get('Reason')}); see {fields.get('StdOut')}")
            time.sleep(poll)

    def release(self, job_id: str, *updates: str) -> None:
        """Start a requeued job 2 s from now rather than after Slurm's hold (the credential lifetime, 121 s). Not
        "now": the node refuses a relaunch within the second of the requeue (the old run's credential is revoked
        with a one-second timestamp: "Killing non-startable batch JobId=N: Job credential revoked", FAILED 1:0)."""
        self.run("scontrol", "update", f"JobId={job_id}", *updates, "StartTime=now+2")

    @staticmethod
    def held(fields: dict[str, str]) -> bool:
        """Requeued and held by Slurm itself (its start time still far off), not yet released by `release`."""
        if fields.get("JobState") != "PENDING" or fields.get("Reason") != "BeginTime":
            return False
        try:  # "Unknown" while the requeue is still completing
            return datetime.fromisoformat(fields["StartTime"]).timestamp() > time.time() + 10
        except (KeyError, ValueError):
            return False

    def cancel_all(self) -> None:
        self.run("scancel", "--full", "--user=root", check=False)

    def stop(self) -> None:
        self.cancel_all()
        time.sleep(1)
        for pid_file in self.dir.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lmforge-slurm").resolve()
    Cluster(folder).start()
    print(f"export SLURM_CONF={folder / 'slurm.conf'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
