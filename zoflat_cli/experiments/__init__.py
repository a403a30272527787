"""The experiments: one module per `zoflat` experiment command, each defining EXPERIMENT
(experiment.py). They are found by looking: a new module here with an EXPERIMENT is a new command,
with its options, recipes, sweeps, tables and figures, and no other file changes."""

import importlib
import pkgutil


def registry() -> dict:
    """{name: Experiment} of every module of this package that defines EXPERIMENT, in help order."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "EXPERIMENT"):
            found.append(module.EXPERIMENT)
    return {e.name: e for e in sorted(found, key=lambda e: (e.position, e.name))}
