"""The flatness measures by name: each takes a Subject (subject.py) and returns tidy rows.

A row is {measure, method, index, module, x, y, value, stderr} (flatness.csv's columns after
run_id and step; README, "Run folders"):
    trace        method hutchinson | hutchpp | fd | slq: Tr ∇²f ± its standard error
    eigenvalues  method lanczos: the k largest eigenvalues, index 0 the largest
    density      method slq: the quadrature's nodes x (eigenvalues) and weights value (mass 1 in
                 all): the spectral density, drawn broadened (spectrum.density)
    modules      method hutchinson: the trace of each module's diagonal block (module), summing
                 probe by probe to the hutchinson trace (the same probes)
    sharpness    method plain | adaptive | plain-m<m> | adaptive-m<m>: the worst-case loss rise
                 in the ρ-ball (sharpness.py); index: 0
    landscape    method 1d | 2d | plane: the training loss (value) at coefficients x (, y)
Every measure draws from its own generator (the run's seed, step and the measure), so a measure's
numbers do not depend on which others are taken beside it.
"""

import time
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from zoflat_cli.measures import hessian, landscape, sharpness, spectrum
from zoflat_cli.measures.catalog import ABOUT, Settings
from zoflat_cli.measures.subject import gaussian, module_of, shifted
from zoflat_cli.streams import generator


def row(measure, method, value, stderr=None, index=0, module="", x=None, y=None) -> dict:
    return {"measure": measure, "method": method, "index": index, "module": module, "x": x, "y": y,
            "value": value, "stderr": stderr}


def trace(subject, settings: Settings, generators, start=None) -> list:
    rows = []
    for method in settings.trace_methods:
        gen = generators(f"trace-{method}")
        if method == "hutchinson":
            value = hessian.hutchinson(subject.params, subject.hvp, settings.probes, gen)
        elif method == "hutchpp":
            value = hessian.hutchpp(subject.params, subject.hvp, settings.hutchpp, gen)
        elif method == "fd":
            value = forward_difference_trace(subject, settings.probes, settings.fd_delta, gen)
        else:
            quadratures = spectrum.slq(subject.params, subject.hvp, settings.slq_vectors, settings.slq_steps, gen)
            value = hessian.mean_stderr(spectrum.moment(quadratures, n_params(subject), 1))
        rows.append(row("trace", method, *value))
    return rows


def forward_difference_trace(subject, probes: int, delta: float, generator) -> tuple:
    """The forward-only estimator (hessian.second_differences) on any subject, u ~ N(0, I), each
    probe drawn when it is taken."""
    def moves():
        for _ in range(probes):
            u = gaussian(subject.params, generator)
            yield lambda scale, u=u: shifted(subject.params, [scale * x for x in u])

    return hessian.second_differences(subject.loss, moves(), delta)


def eigenvalues(subject, settings: Settings, generators, start=None) -> list:
    values = spectrum.top_eigenvalues(subject.params, subject.hvp, settings.top_k, generators("eigenvalues"))
    return [row("eigenvalues", "lanczos", v, index=i) for i, v in enumerate(values)]


def density(subject, settings: Settings, generators, start=None) -> list:
    quadratures = spectrum.slq(subject.params, subject.hvp, settings.slq_vectors, settings.slq_steps,
                               generators("density"))
    nodes = np.concatenate([q[0] for q in quadratures])
    weights = np.concatenate([q[1] for q in quadratures]) / len(quadratures)
    return [row("density", "slq", float(w), index=i, x=float(t)) for i, (t, w) in enumerate(zip(nodes, weights))]


def modules(subject, settings: Settings, generators, start=None) -> list:
    terms = hessian.hutchinson_terms(subject.params, subject.hvp, settings.probes, generators("trace-hutchinson"))
    names = [module_of(n) for n in subject.names]
    rows = []
    for module in dict.fromkeys(names):
        members = [i for i, n in enumerate(names) if n == module]
        value = hessian.mean_stderr([sum(t[i] for i in members) for t in terms])
        rows.append(row("modules", "hutchinson", *value, module=module))
    return rows


def sharpness_rows(subject, settings: Settings, generators, start=None) -> list:
    rows = []
    for adaptive, rho in ((False, settings.rho), (True, settings.adaptive_rho)):
        name = "adaptive" if adaptive else "plain"
        value = sharpness.ascent_sharpness(subject, rho, settings.ascent_steps, generators(f"sharpness-{name}"),
                                           adaptive, settings.eta)
        rows.append(row("sharpness", name, value))
        if settings.m and subject.examples():
            value = sharpness.m_sharpness(subject, settings.m, rho, settings.ascent_steps,
                                          generators(f"sharpness-{name}-m"), adaptive, settings.eta)
            rows.append(row("sharpness", f"{name}-m{settings.m}", *value))
    return rows


def landscape_rows(subject, settings: Settings, generators, start=None) -> list:
    coarse = settings.points // 2 + 1
    slices = {"1d": landscape.slice_1d(subject, settings.points, settings.span, generators("landscape-1d")),
              "2d": landscape.slice_2d(subject, coarse, settings.span, generators("landscape-2d"))}
    if start is not None and any(((p.detach() - s.to(p.device, p.dtype)) != 0).any()
                                 for p, s in zip(subject.params, start)):
        slices["plane"] = landscape.plane(subject, start, coarse, generators("landscape-plane"))
    return [row("landscape", method, f, index=i, x=a, y=b)
            for method, points in slices.items() for i, (a, b, f) in enumerate(points)]


def n_params(subject) -> int:
    return sum(p.numel() for p in subject.params)


@dataclass(frozen=True)
class Measure:
    name: str
    help: str
    compute: Callable  # compute(subject, settings, generators, start) -> rows; generators(name) -> a Generator
    cost: str


COMPUTE = {"trace": trace, "eigenvalues": eigenvalues, "density": density, "modules": modules,
           "sharpness": sharpness_rows, "landscape": landscape_rows}
MEASURES = {name: Measure(name, about.help, COMPUTE[name], about.cost) for name, about in ABOUT.items()}


def take(subject, names: list, settings: Settings, run, step: int, start=None, report=None) -> list:
    """The rows of measures `names` of `run` at `step` (flatness.csv's, run_id and step first);
    each measure draws from the run's "flatness" stream at this step, keyed by its name.
    start: the run's step-0 tensors (the landscape's plane; None: no plane). report(text) hears
    of each measure taken, with its time."""
    device = subject.params[0].device

    def generators(name):
        return generator(run.seed, "flatness", device, step, zlib.crc32(name.encode()))

    rows = []
    for name in names:
        began = time.perf_counter()
        rows += [{"run_id": run.run_id, "step": step, **r}
                 for r in MEASURES[name].compute(subject, settings, generators, start)]
        if report:
            report(f"{run.run_id} step {step}: {name} ({time.perf_counter() - began:.1f} s)")
    return rows
