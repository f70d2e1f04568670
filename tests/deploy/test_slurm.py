"""deploy/slurm/sweep.sbatch on a real single-node SLURM cluster: an array task requeued mid-trial resumes it.

The module's fixture brings up SLURM (Debian's packages, installed with apt-get when missing and possible)
on loopback, with its own munged, config, ports, state and logs in a temporary folder, and stops every
daemon it started afterwards; it skips with the reason where SLURM cannot be installed or started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from sweep_helpers import POSTGRES, SMALL, drop_postgres_study, postgres_reachable, runs_of, trials_of

from tinyopt.core import record

SBATCH = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "sweep.sbatch"
PACKAGES = {"slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd", "slurm-client": "/usr/bin/sbatch",
            "munge": "/usr/sbin/munged"}
EPOCHS = 6  # ~1-3 s each on 2 cores: long enough to requeue a task mid-trial
# Two trials: the cap is only reached when the retry of the interrupted one is not counted twice.
MAX_TRIALS = 2
# A tiny scratch trial that trains every epoch (no pruner, no early stop) and checkpoints after each.
OVERRIDES = (*(item for item in SMALL["scratch"] if not item.startswith("space.epochs=")), f"space.epochs={EPOCHS}",
             "study.pruner=none", "train.early_stopping_patience=100", "train.checkpoint=epoch")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"--- {path}: {error}"


def _install_slurm() -> None:
    """Install the missing SLURM packages with apt-get, or skip saying why not."""
    missing = [package for package, program in PACKAGES.items() if not os.path.exists(program)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"SLURM is not installed ({' '.join(missing)}) and apt-get cannot install it here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`{' '.join(command)}` did not finish within 600 s")
        if done.returncode:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"could not install SLURM (`{' '.join(command)}` exited {done.returncode}: {last[0]})")


def _config(root: Path, munge_socket: Path) -> str:
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    host = socket.gethostname().split(".")[0]
    return f"""\
ClusterName=tinyopt-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our own munged; credentials expire in 5 s so that a requeued job may start again at once (else 2 min)
AuthInfo=socket={munge_socket},cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
KillWait=30
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
{node} NodeAddr=127.0.0.1
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Processes (other than this one) whose command line or environment names ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:  # gone, or a kernel thread
            continue
        if text in cmdline or text in environ:
            found.append((int(entry.name), cmdline.strip()))
    return found


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]

    def run(self, *command: str, check: bool = True) -> str:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}: {done.stderr}{done.stdout}")
        return done.stdout

    def jobs(self) -> list[str]:
        """``JOBID STATE`` of each job squeue still shows."""
        return self.run("squeue", "-h", "-o", "%i %T", check=False).splitlines()

    def logs(self) -> str:
        return "\n".join(_tail(self.root / name) for name in ("slurmctld.log", "slurmd.log"))


def _stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A single-node SLURM cluster on loopback, its own munged and config in a temporary folder."""
    if sys.platform != "linux":
        pytest.skip("the SLURM cluster fixture runs on Linux only")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs")
    started = time.monotonic()
    _install_slurm()
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    daemons: list[subprocess.Popen] = []
    conf = root / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf)}  # for the commands, and to know the daemons' processes by

    def start(*command: str, log: str) -> subprocess.Popen:
        with open(root / log, "ab") as out:
            daemons.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True))
        return daemons[-1]

    # munged of our own (socket, key and seed in root), so the system's munged is neither needed nor touched;
    # -f: munged otherwise refuses a socket below pytest's private (0700) folders.
    munge_socket = root / "munge.socket"
    cluster = Cluster(root, env)
    try:
        key = subprocess.run(["mungekey", "-c", "-k", str(root / "munge.key")], capture_output=True, text=True)
        if key.returncode:
            pytest.skip(f"mungekey could not create a key: {key.stderr.strip()}")
        start("munged", "-F", "-f", f"--socket={munge_socket}", f"--key-file={root / 'munge.key'}",
              f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}",
              f"--log-file={root / 'munged.log'}", log="munged.out")
        conf.write_text(_config(root, munge_socket))
        deadline = time.monotonic() + 20
        while subprocess.run(f"munge -S {munge_socket} -n | unmunge -S {munge_socket}", shell=True,
                             capture_output=True).returncode:
            if time.monotonic() > deadline or daemons[0].poll() is not None:
                pytest.skip(f"munged did not start\n{_tail(root / 'munged.out')}")
            time.sleep(0.2)
        start("slurmctld", "-D", "-f", str(conf), log="slurmctld.out")
        start("slurmd", "-D", "-f", str(conf), log="slurmd.out")
        deadline = time.monotonic() + 60
        while cluster.run("sinfo", "-h", "-o", "%t", check=False).strip() != "idle":
            if time.monotonic() > deadline or any(daemon.poll() is not None for daemon in daemons):
                pytest.skip(f"the SLURM cluster did not come up within 60 s\n{cluster.logs()}\n"
                            f"{_tail(root / 'slurmctld.out')}\n{_tail(root / 'slurmd.out')}")
            time.sleep(0.5)
        print(f"SLURM cluster up in {time.monotonic() - started:.1f} s (config {conf})")
        yield cluster
    finally:
        # Jobs first (their processes outlive slurmd), then slurmd, slurmctld and munged, newest first.
        if len(daemons) == 3:
            for line in cluster.jobs():
                cluster.run("scancel", line.split()[0], check=False)
            deadline = time.monotonic() + 60
            while cluster.jobs() and time.monotonic() < deadline:
                time.sleep(1)
        for daemon in reversed(daemons):
            _stop(daemon)
        for pid, cmdline in _processes_mentioning(str(root)):
            print(f"killing {pid} left behind by the SLURM cluster: {cmdline}")
            os.kill(pid, signal.SIGKILL)


def _wait(condition, timeout: float, what: str, diagnostics):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"{what} within {timeout:.0f} s\n{diagnostics()}")


def _task_of(trial) -> str:
    """The array task (``SLURM_ARRAY_TASK_ID``) whose process runs ``trial``, read from the process."""
    environ = Path(f"/proc/{trial.user_attrs[record.WORKER]['pid']}/environ").read_bytes().split(b"\0")
    return next(item.split(b"=", 1)[1].decode() for item in environ if item.startswith(b"SLURM_ARRAY_TASK_ID="))


@pytest.mark.slow
def test_a_requeued_array_task_resumes_its_trial_from_its_checkpoint(slurm, tiny_folder, tmp_path):
    from tinyopt.data import build

    started = time.monotonic()
    study = f"slurm-{uuid.uuid4().hex[:8]}"
    storage = POSTGRES if postgres_reachable() else f"journal:{tmp_path}/studies/journal.log"
    tracking = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    checkpoints, logs = tmp_path / "checkpoints", tmp_path / "logs"
    logs.mkdir()
    build.prepare(str(tiny_folder), str(tmp_path / "cache"), progress=False)  # prepared once, as a cluster would
    env = {**slurm.env, "TINYOPT_STORAGE": storage, "TINYOPT_TRACKING_URI": tracking,
           "TINYOPT_CHECKPOINT_DIR": str(checkpoints),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    overrides = [arg for item in OVERRIDES for arg in ("--set", item)]
    # --trials-per-process 1: each task supervises worker processes, as a long sweep's tasks do (both get SIGTERM).
    submit = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", "--time=10", f"--chdir={tmp_path}",
         f"--output={logs}/%A_%a.out", str(SBATCH), "scratch", str(MAX_TRIALS), "--study", study,
         "--data", str(tiny_folder), "--cache", str(tmp_path / "cache"), "--trials-per-process", "1", *overrides],
        env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]

    def diagnostics() -> str:
        outputs = "\n".join(_tail(path, 200) for path in sorted(logs.glob("*.out")))
        return (f"squeue: {slurm.jobs()}\n{slurm.run('scontrol', 'show', 'job', job, check=False)}\n"
                f"{outputs}\n{slurm.logs()}")

    try:
        # A trial that reported its second epoch has checkpointed its first: requeue the task running it.
        def training():
            if not slurm.jobs():
                pytest.fail(f"the array ended before a trial trained two epochs\n{diagnostics()}")
            return next((t for t in trials_of(storage, study) if t.state.name == "RUNNING"
                         and 2 <= len(t.intermediate_values) <= EPOCHS - 2), None)

        trial = _wait(training, 180, "no trial trained two epochs", diagnostics)
        task = _task_of(trial)
        assert any(path.is_file() for path in checkpoints.rglob("*")), "no checkpoint in TINYOPT_CHECKPOINT_DIR"
        slurm.run("scontrol", "requeue", f"{job}_{task}")
        print(f"requeued task {task} during trial {trial.number} after epoch {max(trial.intermediate_values)}")
        _wait(lambda: not slurm.jobs(), 300, "the array's tasks did not all end", diagnostics)
        wall = time.monotonic() - started

        # Every task ended well, the requeued one after a second run.
        shown = slurm.run("scontrol", "-o", "show", "job", job)
        states = {line.split("ArrayTaskId=")[1].split()[0]: line for line in shown.splitlines()}
        assert sorted(states) == ["0", "1"], diagnostics()
        for number, line in states.items():
            assert "JobState=COMPLETED" in line and "ExitCode=0:0" in line, diagnostics()
            assert ("Restarts=1" in line) == (number == task), line
        output = (logs / f"{job}_{task}.out").read_text()
        assert "run 1," in output and "run 2," in output and "interrupted by SIGTERM" in output, output

        # The interrupted trial failed, was queued again and resumed from its checkpoint, not from epoch 0.
        trials = trials_of(storage, study)
        by_number = {t.number: t for t in trials}
        assert [t.number for t in trials if t.state.name in ("RUNNING", "WAITING")] == [], diagnostics()
        assert by_number[trial.number].state.name == "FAIL"
        assert by_number[trial.number].user_attrs[record.FAIL_REASON].startswith("interrupted by SIGTERM")
        retries = [t for t in trials if trial.number in t.system_attrs.get("retry_history", [])]
        assert len(retries) == 1 and retries[0].state.name == "COMPLETE", diagnostics()
        retry = retries[0]
        assert retry.params == trial.params
        interrupted_at = max(by_number[trial.number].intermediate_values)
        assert 1 <= retry.user_attrs["resumed_from_epoch"] <= interrupted_at, (interrupted_at, retry.user_attrs)
        assert max(retry.intermediate_values) == EPOCHS  # and trained to the end

        # The study holds exactly the trials asked for, a failed trial counted through its retry.
        superseded = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
        kept = [t for t in trials if not (t.state.name == "FAIL" and t.number in superseded)]
        assert len(kept) == MAX_TRIALS, [(t.number, t.state.name, t.system_attrs) for t in trials]

        # MLflow: no run left RUNNING; the interrupted trial's run KILLED, its retry's tagged as resumed.
        _, parents, children = runs_of({"tracking_uri": tracking}, study)
        assert [r.info.status for r in (*parents, *children.values()) if r.info.status == "RUNNING"] == []
        assert children[trial.number].info.status == "KILLED"
        assert int(children[retry.number].data.tags["resumed_from_epoch"]) == retry.user_attrs["resumed_from_epoch"]

        # No tinyopt process of this test is left behind.
        _wait(lambda: not _processes_mentioning(str(tmp_path)), 15, "processes of the test were left behind",
              lambda: "\n".join(f"{pid}: {cmdline}" for pid, cmdline in _processes_mentioning(str(tmp_path))))
        print(f"trial {trial.number} retried as trial {retry.number}, resumed from epoch "
              f"{retry.user_attrs['resumed_from_epoch']} (interrupted after epoch {interrupted_at})")
        print(f"SLURM array test: wall time {wall:.0f} s (submit to every task ended), "
              f"{time.monotonic() - started:.0f} s in all")
    finally:
        for line in slurm.jobs():
            slurm.run("scancel", line.split()[0], check=False)
        if storage == POSTGRES:
            drop_postgres_study(study)
