"""A private, throw-away Slurm cluster on this machine, for testing run.slurm and eval.slurm.

munged, slurmctld and slurmd (Debian's slurm-wlm packages) run in the foreground as children
of this process, with every file (configuration, key, state, spool, logs) in one folder and
their own ports: one node, ``localhost``, with this machine's CPUs, no GPUs, no accounting.
Jobs are submitted with ``sbatch`` and polled with ``scontrol`` until they have ended for
good, so a job that requeues itself is followed through its restarts. A requeued job may start
again after REQUEUE_DELAY seconds (Slurm's default is 120 s) and the scheduler looks at pending
jobs every second (default: 30 to 60 s), so requeues cost the tests seconds, not minutes.
``stop()`` cancels what is left, waits for the jobs' step daemons to finish and ends the
three daemons by pid; the daemons are also told to exit if this process dies first, so
nothing outlives a test session.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
PACKAGES = "slurmctld slurmd slurm-client munge"
TORCH_LAUNCH = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"}
NODE = "localhost"  # the node's name is also the rendezvous host of its jobs: it must resolve
REQUEUE_DELAY = 5  # seconds; Slurm's cred_expire, which also sets how long a requeued job waits
# the states of a job that has ended and will not run again (a requeued job passes through
# PENDING, not through these)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "DEADLINE"}


def unavailable_reason() -> str | None:
    """Why a local Slurm cannot run here, or None when it can."""
    if os.environ.get("SLURM_TESTS") == "skip":
        return "SLURM_TESTS=skip is set"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs; the Slurm tests run as root (bash tests/run.sh in CI)"
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        return (
            f"Slurm is not installed (no {', '.join(missing)}): bash tests/run.sh installs it as root, "
            f"or apt-get install {PACKAGES}"
        )
    return None


@dataclass
class Job:
    """A finished batch job: Slurm's final state, the script's exit status, how often it was
    requeued and its log file."""

    job_id: int
    state: str
    exit_code: int
    restarts: int
    log: Path

    def output(self) -> str:
        return self.log.read_text() if self.log.is_file() else f"(no log at {self.log})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_with_parent() -> None:
    """Runs in the daemon before exec: SIGTERM it when the process that started it dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def env_without_slurm(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without the variables of any Slurm job or torch launcher it runs in
    (a rendezvous set outside would override the one the scripts derive), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "TORCHELASTIC_")) and k not in TORCH_LAUNCH
    }
    return {**env, **(extra or {})}


class LocalSlurm:
    """One-node Slurm whose files all live under ``folder`` (which must be empty or absent).

    Use as a context manager: ``with LocalSlurm(tmp) as slurm: job = slurm.submit(...)``.
    """

    def __init__(self, folder: Path, cpus: int | None = None):
        self.folder = Path(folder)
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.folder / "slurm.conf"
        self.spool = self.folder / "spool"
        self.logs = self.folder / "log"
        self._daemons: dict[str, subprocess.Popen] = {}

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for Slurm commands (and the jobs, which inherit it): points at this cluster."""
        return env_without_slurm({"SLURM_CONF": str(self.conf), **(extra or {})})

    def start(self, timeout: float = 60) -> None:
        for sub in ("state", "spool", "log"):
            (self.folder / sub).mkdir(parents=True, exist_ok=False)
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = self.folder / "munge.socket"
        self.conf.write_text(self._config(socket_path))
        try:
            self._launch(
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={self.folder / 'munged.pid'}",
                f"--seed-file={self.folder / 'munged.seed'}",
                f"--log-file={self.logs / 'munged.log'}",
            )
            self._wait_for(socket_path.exists, timeout, "munged to open its socket")
            self._launch("slurmctld", "-D", "-f", str(self.conf))
            self._launch("slurmd", "-D", "-f", str(self.conf), "-N", NODE)
            self._wait_for(self._node_idle, timeout, f"node {NODE} to become idle")
        except BaseException:
            self.stop()
            raise

    def start_job(
        self,
        script: Path,
        args: list[str] | tuple[str, ...] = (),
        options: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> int:
        """``sbatch [options] script [args]`` from ``cwd`` with ``env`` added to this environment.

        Returns the job id at once; raises if sbatch itself fails.
        """
        cmd = ["sbatch", "--parsable", *options, str(script), *args]
        done = subprocess.run(cmd, cwd=cwd, env=self.env(env), capture_output=True, text=True, timeout=60)
        match = re.match(r"(\d+)", done.stdout)
        if match is None:
            raise RuntimeError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
        return int(match.group(1))

    def job_state(self, job_id: int) -> str:
        """PENDING, RUNNING, COMPLETING, or one of ENDED."""
        return re.search(r"JobState=(\S+)", self.command("scontrol", "show", "job", str(job_id))).group(1)

    def wait_for_job(self, job_id: int, timeout: float = 600) -> Job:
        """Wait until the job has ended for good (a requeued job runs again first)."""
        self._wait_for(lambda: self.job_state(job_id) in ENDED, timeout, f"job {job_id} to end")
        info = self.command("scontrol", "show", "job", str(job_id))
        return Job(
            job_id=job_id,
            state=re.search(r"JobState=(\S+)", info).group(1),
            exit_code=int(re.search(r"ExitCode=(\d+):", info).group(1)),
            restarts=int(re.search(r"Restarts=(\d+)", info).group(1)),
            log=Path(re.search(r"StdOut=(\S+)", info).group(1)),
        )

    def submit(
        self,
        script: Path,
        args: list[str] | tuple[str, ...] = (),
        options: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 600,
    ) -> Job:
        """``start_job``, then ``wait_for_job``: returns once the job has ended, whatever its outcome."""
        return self.wait_for_job(self.start_job(script, args, options, env, cwd), timeout)

    def stop(self, timeout: float = 60) -> None:
        """Cancel every job, wait for their step daemons to exit, then end the daemons."""
        controller = self._daemons.get("slurmctld")
        if controller is not None and controller.poll() is None:
            try:
                jobs = self.command("squeue", "--noheader", "--format=%i").split()
                if jobs:
                    self.command("scancel", *jobs)
            except subprocess.SubprocessError:
                pass  # the jobs' step daemons end with the jobs' time limits
        # each running job step holds a socket <node>_<job>.<step> in the spool folder
        self._wait_for(lambda: not list(self.spool.glob(f"{NODE}_*")), timeout, "job steps to end", fail=False)
        for daemon in reversed(self._daemons.values()):
            if daemon.poll() is None:
                daemon.terminate()
        for daemon in self._daemons.values():
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self._daemons.clear()

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _config(self, munge_socket: Path) -> str:
        f = self.folder
        return f"""\
ClusterName=test
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={REQUEUE_DELAY}
StateSaveLocation={f / "state"}
SlurmdSpoolDir={self.spool}
SlurmctldPidFile={f / "slurmctld.pid"}
SlurmdPidFile={f / "slurmd.pid"}
SlurmctldLogFile={self.logs / "slurmctld.log"}
SlurmdLogFile={self.logs / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""

    def _launch(self, *cmd: str) -> None:
        with open(self.logs / f"{cmd[0]}.out", "w") as out:
            self._daemons[cmd[0]] = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
                preexec_fn=_exit_with_parent,
            )

    def _node_idle(self) -> bool:
        try:
            return "State=IDLE" in self.command("scontrol", "show", "node", NODE)
        except subprocess.SubprocessError:
            return False  # slurmctld not answering yet

    def command(self, *cmd: str) -> str:
        """Run a Slurm command (``scontrol``, ``scancel``, ...) against this cluster; its output."""
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, check=True, timeout=30).stdout

    def daemon_logs(self) -> str:
        """The last lines of every daemon's log, for a failure message."""
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-15:]) for p in sorted(self.logs.iterdir())
        )

    def _wait_for(self, ready, timeout: float, what: str, fail: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, daemon in self._daemons.items():
                if fail and daemon.poll() is not None:
                    raise RuntimeError(f"{name} exited ({daemon.returncode}):\n{self.daemon_logs()}")
            if time.monotonic() > deadline:
                if fail:
                    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.daemon_logs()}")
                return
            time.sleep(0.2)
