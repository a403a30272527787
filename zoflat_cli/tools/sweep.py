"""`zoflat sweep`: a recipe's grid as jobs on a launcher, gathered under one sweep folder.

A job is one run of the grid (one optimizer, hyperparameter setting and seed): its own run folder
under `jobs/<run_id>/`, made by the experiment command itself (`python -m zoflat_cli <command>
--config jobs/<run_id>/job.yaml`), so a job's metrics are those of the same run launched directly.
A job that finds a run folder in its place resumes it (`--resume`): that is how `sweep --resume`,
a requeued Slurm job and a relaunch after Ctrl-C continue; a completed run is never re-run.

    <out>/sweep/<UTC timestamp>-<name>/
        sweep.yaml          the command, the resolved grid, the launcher, and each job's state
                            (queued, running, done, failed with its stderr's tail, cancelled)
        jobs/<run_id>/      job.yaml (the run's config) and <command>/<timestamp>-<name>/ (its run folder)

Launchers: local (threads waiting on `--jobs N` processes), ray (one Ray task per job, a local
instance or `--address`), slurm (submitit array jobs; `--slurm-local`: submitit's local executor).
"""

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from zoflat_cli.errors import RunFailed, ZoflatError, one_line, require
from zoflat_cli.experiments.settings import runs_from
from zoflat_cli.optim.presets import get_preset
from zoflat_cli.runs.folder import atomic_write, create_run_dir, lock_folder
from zoflat_cli.signals import EXIT_INTERRUPTED, stopping_at_once

LAUNCHERS = ("local", "ray", "slurm")
STATES = ("queued", "running", "done", "failed", "cancelled")
SWEEP_FILE = "sweep.yaml"
STDERR_TAIL = 2000  # characters of a failed job's stderr kept in sweep.yaml


# ---------------------------------------------------------------- the grid as jobs

def job_config(config: dict, run) -> dict:
    """The config of one run of the grid: every swept key fixed to the run's value."""
    job = {**config, "optimizer": [run.optimizer], "lr": run.lr, "seeds": [run.seed], "update": run.update,
           **dict(run.hyper)}
    if get_preset(run.optimizer).uses_directions:
        job.update(samples=run.samples, directions=run.directions)
    job.pop("out", None)
    return job


def expand(config: dict) -> dict:
    """{run_id: job config} of a resolved config, each checked to be exactly its run."""
    jobs = {}
    for run in runs_from(config):
        job = job_config(config, run)
        again = runs_from({**job, "optimizer": list(job["optimizer"])})
        if [r.run_id for r in again] != [run.run_id]:
            raise ZoflatError(f"internal: run {run.run_id} does not stand alone as a job ({[r.run_id for r in again]})")
        jobs[run.run_id] = job
    return jobs


# ---------------------------------------------------------------- one job, wherever it runs

def job_run_folder(job_dir: Path, command: str):
    """The run folder a job has made, if any."""
    found = sorted((job_dir / command).glob("*/config.yaml")) if (job_dir / command).is_dir() else []
    return found[-1].parent if found else None


STOP_WAIT_S = 30  # a job stopped by the sweep gets this long to finish its step and save
JOB_PID = "job.pid"  # in a job's folder while its process runs
_CHILDREN = set()  # the job processes this process waits on
_CHILDREN_LOCK = threading.Lock()


def run_job(job_dir: str, command: str, cwd: str, threads: int = 1) -> dict:
    """Run (or resume) one job to its end in a child process; {returncode, folder, stderr}.
    Runs on the worker: a local thread, a Ray task, a Slurm job. `threads`: the job's CPUs, which
    its math libraries keep to (jobs side by side would otherwise each spin a thread per core).
    The child has a session of its own: only a stop forwarded by the sweep (stop_jobs) reaches
    it, once, however the sweep was stopped."""
    job_dir = Path(job_dir)
    folder = job_run_folder(job_dir, command)
    if folder is not None:
        args = [command, "--resume", str(folder), "--quiet"]
    else:
        args = [command, "--config", str(job_dir / "job.yaml"), "--out", str(job_dir), "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]),
                                                         os.environ.get("PYTHONPATH", "")]),
           **{name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    proc = subprocess.Popen([sys.executable, "-m", "zoflat_cli", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    with _CHILDREN_LOCK:
        _CHILDREN.add(proc)
    (job_dir / JOB_PID).write_text(str(proc.pid))  # for a driver on this machine whose worker is not its thread
    try:
        while True:  # in short waits: a Ray cancel is raised in this thread only between Python instructions
            try:
                _, stderr = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
    except BaseException:  # a Ray cancel or a signal in this worker: the job stops as a run does
        stop_jobs([proc])
        raise
    finally:
        (job_dir / JOB_PID).unlink(missing_ok=True)
        with _CHILDREN_LOCK:
            _CHILDREN.discard(proc)
    folder = job_run_folder(job_dir, command)
    return {"returncode": proc.returncode, "folder": str(folder) if folder else None, "stderr": stderr[-STDERR_TAIL:]}


def signal_job(job_dir: Path, signum=signal.SIGTERM) -> bool:
    """Send a job's process (found by its job.pid, checked to be that job's) a signal; whether it was running."""
    try:
        pid = int((job_dir / JOB_PID).read_text())
        if str(job_dir) not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return False  # ended, and the pid is another process's now
        os.kill(pid, signum)
        return True
    except (OSError, ValueError):
        return False


def stop_jobs(procs=None, wait_s: float = STOP_WAIT_S):
    """Stop job processes (default: every one this process runs) as a stop signal stops a run:
    SIGTERM, `wait_s` to save and exit, then once more (stop at once), then SIGKILL. Each job's
    folder stays resumable."""
    procs = list(_CHILDREN) if procs is None else procs
    for patience in (wait_s, 5.0):  # the second SIGTERM stops a job at once
        alive = [p for p in procs if p.poll() is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + patience
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
            time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class SlurmJob:
    """A submitit job that, when Slurm preempts or times it out, is requeued as itself: the
    relaunched job finds its run folder and resumes it. `slots` > 0 (submitit's local executor,
    which starts every array task at once) holds it until one of that many lock files is free:
    --jobs at a time, as Slurm's array parallelism does on a cluster."""

    def __call__(self, job_dir: str, command: str, cwd: str, threads: int, slots: int = 0) -> dict:
        with _slot(Path(job_dir).parents[1] / "submitit", slots):
            return run_job(job_dir, command, cwd, threads)

    def checkpoint(self, job_dir: str, command: str, cwd: str, threads: int, slots: int = 0):
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmJob(), job_dir, command, cwd, threads, slots)


@contextlib.contextmanager
def _slot(folder: Path, slots: int):
    if not slots:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(slots):
            handle = open(folder / f"slot-{i}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield
            finally:
                handle.close()  # closing releases the lock
            return
        time.sleep(0.2)


# ---------------------------------------------------------------- the sweep folder

class Sweep:
    """A sweep folder, locked (runs/folder.lock_folder) by the one driver that runs it; its path
    absolute, so jobs find their folders whatever the driver's working directory."""

    def __init__(self, path: Path, state: dict):
        self.path, self.state = Path(path).resolve(), state
        self.lock = lock_folder(self.path, "sweep folder")

    @classmethod
    def create(cls, out: Path, name: str, command: str, config: dict, jobs: dict, launcher: dict, cwd: str):
        """jobs: expand(config), computed before the launcher starts and any folder exists."""
        path = create_run_dir(out, "sweep", name)
        try:
            for run_id, job in jobs.items():
                (path / "jobs" / run_id).mkdir(parents=True)
                atomic_write(path / "jobs" / run_id / "job.yaml", yaml.safe_dump(job, sort_keys=False))
        except OSError as err:  # nothing ran: leave no half-made sweep folder
            shutil.rmtree(path, ignore_errors=True)
            raise ZoflatError(f"cannot write the sweep folder in {path.parent} ({err.strerror or one_line(err)})") from None
        grid = {k: v for k, v in config.items() if k != "out"}
        state = {"command": command, "cwd": cwd, "launcher": launcher, "grid": grid,
                 "jobs": {run_id: {"state": "queued", "folder": None} for run_id in jobs}}
        sweep = cls(path, state)
        sweep.save()
        return sweep

    @classmethod
    def open(cls, path: Path):
        file = Path(path) / SWEEP_FILE
        if not file.is_file():
            raise ZoflatError(f"--resume {path}: not a sweep folder (no {SWEEP_FILE})")
        try:
            state = yaml.safe_load(file.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ZoflatError(f"{file}: damaged ({one_line(err)})") from None
        problem = _damage(state, Path(path))
        if problem:
            raise ZoflatError(f"{file}: damaged ({problem}); restore it, or start a new sweep")
        return cls(Path(path), state)

    def save(self):
        """sweep.yaml, replaced atomically; a failed write (disk full) is one line, the old file kept."""
        try:
            atomic_write(self.path / SWEEP_FILE, yaml.safe_dump(self.state, sort_keys=False))
        except OSError as err:
            raise RunFailed(f"writing {self.path / SWEEP_FILE} failed ({err.strerror or one_line(err)}); the sweep "
                            f"keeps its jobs' folders: free space, then zoflat sweep --resume {self.path}") from None

    def job_dir(self, run_id: str) -> Path:
        return self.path / "jobs" / run_id

    def queue(self, run_ids: list):
        for run_id in run_ids:
            self.state["jobs"][run_id]["state"] = "queued"
        self.save()

    def set(self, run_id: str, state: str, result: dict = None):
        entry = self.state["jobs"][run_id]
        entry["state"] = state
        if result is not None:
            entry["folder"] = result["folder"]
            if state == "failed":
                entry["error"] = result["stderr"].strip() or f"exit status {result['returncode']}"
            else:
                entry.pop("error", None)
        self.save()

    def unfinished(self) -> list:
        return [r for r, e in self.state["jobs"].items() if e["state"] != "done"]

    def counts(self) -> dict:
        counts = dict.fromkeys(STATES, 0)
        for entry in self.state["jobs"].values():
            counts[entry["state"]] += 1
        return counts


def _damage(state, path: Path):
    """What makes a loaded sweep.yaml unusable (None if nothing): each key it needs, in its type."""
    if not isinstance(state, dict):
        return "not a mapping"
    from zoflat_cli.experiments import registry

    if state.get("command") not in registry():
        return f"command {state.get('command')!r} is not one of {', '.join(registry())}"
    if not isinstance(state.get("cwd"), str) or not Path(state["cwd"]).is_dir():
        return f"cwd {state.get('cwd')!r} is not a folder on this machine"
    if not isinstance(state.get("jobs"), dict) or not state["jobs"]:
        return "no jobs"
    for run_id, entry in state["jobs"].items():
        if not isinstance(entry, dict) or entry.get("state") not in STATES:
            return f"job {run_id!r} is not a mapping with a state ({', '.join(STATES)})"
        if not (path / "jobs" / str(run_id) / "job.yaml").is_file():
            return f"job {run_id!r} has no jobs/{run_id}/job.yaml"
    return None


# ---------------------------------------------------------------- launchers

def _check_ray_address(address: str):
    """Fail fast on an unreachable Ray head instead of Ray's own minutes of retries."""
    if address in (None, "", "auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if not parsed.hostname or not parsed.port:
        raise ZoflatError(f"--address {address}: give auto, or host:port / ray://host:port")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=5).close()
    except OSError as err:
        raise ZoflatError(f"--address {address}: the Ray head cannot be reached ({one_line(err)}); start it "
                          f"with `ray start --head` or check the address") from None


class LocalLauncher:
    """Threads, each waiting on one job's process: --jobs N at a time on this machine."""

    def __init__(self, options: dict):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=options["jobs"])
        self.threads = options["cpus_per_job"]

    def submit_all(self, sweep, run_ids: list) -> dict:
        command, cwd = sweep.state["command"], sweep.state["cwd"]
        return {r: self.pool.submit(run_job, str(sweep.job_dir(r)), command, cwd, self.threads) for r in run_ids}

    @staticmethod
    def done(handle) -> bool:
        return handle.done()

    @staticmethod
    def started(handle) -> bool:
        return handle.running()

    @staticmethod
    def result(handle) -> dict:
        if handle.cancelled():  # never started
            return {"returncode": EXIT_INTERRUPTED, "folder": None, "stderr": ""}
        return handle.result()

    def stop(self, handles, job_dirs):
        for handle in handles:
            handle.cancel()  # the queued ones
        stop_jobs()  # the running ones: their threads return once the processes have saved and ended
        self.pool.shutdown(wait=True, cancel_futures=True)

    def close(self):
        self.pool.shutdown(wait=True)


class RayLauncher:
    """One Ray task per job (--cpus-per-job, --gpus-per-job); a local instance without --address."""

    def __init__(self, options: dict):
        ray = require("ray", "--launcher ray")
        _check_ray_address(options["address"])
        started = time.perf_counter()
        try:
            if options["address"]:
                ray.init(address=options["address"], logging_level="ERROR", log_to_driver=False)
            else:
                ray.init(num_cpus=options["jobs"] * options["cpus_per_job"], include_dashboard=False,
                         logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ZoflatError(f"Ray would not start: {one_line(err)}") from None
        self.startup_s = time.perf_counter() - started
        self.ray = ray
        self.task = ray.remote(num_cpus=options["cpus_per_job"], num_gpus=options["gpus_per_job"])(run_job)
        self.threads = options["cpus_per_job"]

    def submit_all(self, sweep, run_ids: list) -> dict:
        command, cwd = sweep.state["command"], sweep.state["cwd"]
        return {r: self.task.remote(str(sweep.job_dir(r)), command, cwd, self.threads) for r in run_ids}

    def done(self, handle) -> bool:
        ready, _ = self.ray.wait([handle], timeout=0)
        return bool(ready)

    @staticmethod
    def started(handle) -> bool:
        return False  # known once its run folder exists

    def result(self, handle) -> dict:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.TaskCancelledError:
            return {"returncode": EXIT_INTERRUPTED, "folder": None, "stderr": ""}
        except Exception as err:  # a task that died (its worker killed, ...): the job failed
            return {"returncode": LOST, "folder": None, "stderr": one_line(err)}

    def stop(self, handles, job_dirs):
        """Each task gets a KeyboardInterrupt, on which run_job stops its job process."""
        for handle in handles:
            self.ray.cancel(handle, force=False)
        self.ray.wait(list(handles), num_returns=len(handles), timeout=STOP_WAIT_S + 15)

    def close(self):
        self.ray.shutdown()


class SlurmLauncher:
    """submitit array jobs (--partition, --time, --gpus-per-job, --cpus-per-job), requeued on
    preemption; --slurm-local runs them with submitit's local executor (no cluster)."""

    def __init__(self, options: dict):
        self.submitit = require("submitit", "--launcher slurm", "slurm")
        if not options["slurm_local"] and not any(
                (Path(p) / "sbatch").is_file() for p in os.environ.get("PATH", "").split(os.pathsep)):
            raise ZoflatError("--launcher slurm: sbatch is not on this machine's PATH (run the sweep on a Slurm "
                              "login node, or --slurm-local for submitit's local executor)")
        self.options = options

    def _executor(self, folder: Path):
        """submitit's logs and pickles go to <sweep>/submitit."""
        options = self.options
        if options["slurm_local"]:
            executor = self.submitit.LocalExecutor(folder=folder / "submitit")
            executor.update_parameters(timeout_min=options["time"])
            return executor
        executor = self.submitit.SlurmExecutor(folder=folder / "submitit")
        params = dict(time=options["time"], cpus_per_task=options["cpus_per_job"], array_parallelism=options["jobs"])
        if options["partition"]:
            params["partition"] = options["partition"]
        if options["gpus_per_job"]:
            params["gpus_per_node"] = options["gpus_per_job"]
        executor.update_parameters(**params)
        return executor

    def submit_all(self, sweep, run_ids: list) -> dict:
        """One array job of them all."""
        if not run_ids:
            return {}
        n, options = len(run_ids), self.options
        slots = options["jobs"] if options["slurm_local"] else 0  # a cluster has array_parallelism
        jobs = self._executor(sweep.path).map_array(
            SlurmJob(), [str(sweep.job_dir(r)) for r in run_ids], [sweep.state["command"]] * n,
            [sweep.state["cwd"]] * n, [options["cpus_per_job"]] * n, [slots] * n)
        return dict(zip(run_ids, jobs))

    @staticmethod
    def done(handle) -> bool:
        return handle.done()

    @staticmethod
    def started(handle) -> bool:
        return False  # known once its run folder exists

    @staticmethod
    def result(handle) -> dict:
        try:
            return handle.result()
        except Exception as err:  # submitit's FailedJobError and friends: the job failed
            return {"returncode": LOST, "folder": None, "stderr": one_line(err)}

    def stop(self, handles, job_dirs):
        """On a cluster scancel, whose SIGTERM reaches each job process too; --slurm-local: SIGTERM to
        each job process (submitit's local workers ignore it, and its controller dies noisily on the
        SIGINT its cancel sends)."""
        for handle, job_dir in zip(handles, job_dirs):
            if self.options["slurm_local"]:
                signal_job(job_dir)
            else:
                handle.cancel(check=False)
        deadline = time.monotonic() + STOP_WAIT_S + 15
        while not all(h.done() for h in handles) and time.monotonic() < deadline:
            time.sleep(0.2)

    def close(self):
        pass


def make_launcher(options: dict):
    """The launcher, started (a Ray instance connected), before any sweep folder is made."""
    if options["launcher"] == "local":
        return LocalLauncher(options)
    if options["launcher"] == "ray":
        return RayLauncher(options)
    return SlurmLauncher(options)


# ---------------------------------------------------------------- running a sweep

def run_sweep(sweep: Sweep, launcher, quiet: bool = False) -> dict:
    """Launch every unfinished job, follow them to the end (a progress view), record each state.
    Ctrl-C cancels what is queued, lets running jobs save (they get the SIGINT too), and leaves
    the folder resumable. Returns the final counts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    command = sweep.state["command"]
    todo = sweep.unfinished()
    handles = launcher.submit_all(sweep, todo)
    sweep.queue(todo)
    columns = [TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn()]
    total = len(sweep.state["jobs"])
    try:
        with stopping_at_once(), Progress(*columns, disable=quiet, transient=False) as progress:
            bar = progress.add_task("", total=total)
            while handles:
                for run_id in [r for r, h in handles.items() if launcher.done(h)]:
                    result = launcher.result(handles.pop(run_id))
                    sweep.set(run_id, finished_state(result["returncode"]), result)
                for run_id, handle in handles.items():
                    if sweep.state["jobs"][run_id]["state"] == "queued" and (
                            launcher.started(handle) or job_run_folder(sweep.job_dir(run_id), command)):
                        sweep.set(run_id, "running")
                counts = sweep.counts()
                progress.update(bar, completed=counts["done"] + counts["failed"],
                                description=" · ".join(f"{counts[s]} {s}" for s in STATES if counts[s]))
                time.sleep(0.2)
    except KeyboardInterrupt:  # a stop signal to the sweep: forwarded to its jobs, each left resumable
        launcher.stop(list(handles.values()), [sweep.job_dir(r) for r in handles])
        for run_id, handle in handles.items():
            result = launcher.result(handle) if launcher.done(handle) else None
            state = finished_state(result["returncode"], stopped=True) if result else "cancelled"
            if result is None or not result["folder"]:
                result = {**(result or {"stderr": ""}), "returncode": EXIT_INTERRUPTED,
                          "folder": _folder(sweep, run_id)}
            sweep.set(run_id, state, result)
        raise
    finally:
        launcher.close()
    return sweep.counts()


LOST = -1  # the exit status recorded for a job whose worker died (Ray, Slurm)


def finished_state(returncode: int, stopped: bool = False) -> str:
    """A job's state from its exit status: 130 (or ended by a stop signal) is an interrupted,
    resumable job; so is one the sweep stopped by force, or whose worker it lost while stopping."""
    interrupted = {EXIT_INTERRUPTED, -signal.SIGINT, -signal.SIGTERM} | ({LOST, -signal.SIGKILL} if stopped else set())
    return "done" if returncode == 0 else "cancelled" if returncode in interrupted else "failed"


def _folder(sweep: Sweep, run_id: str):
    folder = job_run_folder(sweep.job_dir(run_id), sweep.state["command"])
    return str(folder) if folder else None
