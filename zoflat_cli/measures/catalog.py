"""What the flatness measures are, by name: their help, their cost and the settings they are taken
with (registry.py computes them). No torch here: the command line's options and a config's check
read this at start-up."""

from dataclasses import dataclass, field, fields
from typing import NamedTuple

from zoflat_cli.errors import ZoflatError

TRACE_METHODS = ("hutchinson", "hutchpp", "fd", "slq")


def option(default, help: str, low=None, above=None):
    """A setting of the measures, with its bounds: at least `low`, or above `above`."""
    return field(default=default, metadata={"help": help, "low": low, "above": above})


@dataclass(frozen=True)
class Settings:
    """How the measures are taken: `zoflat flatness`'s options, generated from these fields."""

    trace_methods: tuple = option(("hutchinson", "hutchpp"), f"Trace estimators: {', '.join(TRACE_METHODS)}.")
    probes: int = option(10, "Hutchinson and fd probes (also the per-module breakdown's).", low=1)
    hutchpp: int = option(30, "Hutch++'s Hessian-vector products.", low=3)
    fd_delta: float = option(1e-3, "The fd trace's δ.", above=0)
    top_k: int = option(3, "Top eigenvalues (Lanczos).", low=1)
    slq_vectors: int = option(2, "SLQ start vectors (density; the slq trace).", low=1)
    slq_steps: int = option(30, "Lanczos steps per SLQ vector.", low=2)
    rho: float = option(0.05, "Plain sharpness: the ball's radius ρ.", above=0)
    adaptive_rho: float = option(0.5, "Adaptive sharpness: ρ of the ball scaled by |w| + η.", above=0)
    eta: float = option(0.01, "Adaptive sharpness: η.", low=0)
    ascent_steps: int = option(5, "Sharpness: projected gradient-ascent steps.", low=0)
    m: int = option(0, "m-sharpness: batch size m (0: off; model runs only).", low=0)
    points: int = option(21, "Landscape: points of the 1d slice (2d and plane: points // 2 + 1 per axis).", low=2)
    span: float = option(1.0, "Landscape: 1d and 2d coefficients in [-span, span].", above=0)

    def check(self):
        """Each setting within its bounds, else a ZoflatError naming its option."""
        for f in fields(self):
            value, low, above = getattr(self, f.name), f.metadata["low"], f.metadata["above"]
            flag = "--" + f.name.replace("_", "-")
            if (low is not None and value < low) or (above is not None and not value > above):
                bound = f"at least {low}" if low is not None else f"above {above}"
                raise ZoflatError(f"{flag} must be {bound}, got {value}")
        unknown = [m for m in self.trace_methods if m not in TRACE_METHODS]
        if unknown or not self.trace_methods:
            raise ZoflatError(f"--trace-methods: unknown {', '.join(unknown) or 'empty'}; choose from "
                              f"{', '.join(TRACE_METHODS)}")


class About(NamedTuple):
    help: str
    cost: str  # in Hessian-vector products (≈ 2–3 gradients each) or losses


ABOUT = {
    "trace": About("Hessian trace: Hutchinson, Hutch++, forward-only fd or SLQ (--trace-methods), ± stderr",
                   "probes HVPs (hutchinson), hutchpp HVPs, 2·probes losses (fd), vectors·steps HVPs (slq)"),
    "eigenvalues": About("the top-k Hessian eigenvalues by Lanczos (scipy eigsh)", "≈ 20–60 HVPs (ARPACK's restarts)"),
    "density": About("the Hessian's spectral density by stochastic Lanczos quadrature", "vectors·steps HVPs"),
    "modules": About("the Hessian trace per module (transformer layer, or tensor block)", "probes HVPs"),
    "sharpness": About("worst-case loss rise in a ρ-ball: plain and adaptive (and m-sharpness with --m)",
                       "ascent_steps gradients + ascent_steps + 2 losses per kind"),
    "landscape": About("loss slices: 1d and 2d filter-normalised directions, and the plane through start and point",
                       "points + 2·(points//2+1)² losses"),
}


def measure_names(text: str, flag: str = "--measures") -> list:
    """`trace,eigenvalues` or `all` as the measures' names, each checked."""
    names = list(ABOUT) if text == "all" else [t.strip() for t in str(text).split(",") if t.strip()]
    unknown = [m for m in names if m not in ABOUT]
    if unknown or not names:
        raise ZoflatError(f"{flag}: unknown {', '.join(unknown) or 'empty'}; choose from {', '.join(ABOUT)} or all")
    return names
