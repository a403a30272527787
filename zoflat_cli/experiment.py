"""Run one resolved config: run folder, batched trainer and live view, joined."""

from rich.console import Console

from zoflat_cli.config import DTYPES, resolve_device, runs_from
from zoflat_cli.live import LiveView
from zoflat_cli.runfolder import RunFolder, create_run_dir
from zoflat_cli.trainer import Trainer, make_groups


def run_experiment(config: dict, make_problem, quiet: bool = False, console: Console = None):
    """make_problem(device, dtype) builds the problem. Returns (run folder path, overall status)."""
    runs = runs_from(config)
    device, dtype = resolve_device(config["device"]), DTYPES[config["dtype"]]
    problem = make_problem(device, dtype)
    groups = make_groups(problem, runs, dtype, device)
    path = create_run_dir(config["out"], config["command"], config["name"])
    folder = RunFolder(path, config, problem, str(device))
    view = LiveView(f"zoflat {config['command']} · {path}", config["steps"], quiet, console)
    trainer = Trainer(problem, groups, config["steps"], config["log_every"], [folder.on_log, view.on_log])
    try:
        with view:
            trainer.run()
    finally:  # whatever happens, the summary says how each run ended
        status = folder.finish(trainer.states)
    return path, status
