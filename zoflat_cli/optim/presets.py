"""The optimizer table: named optimizers as users know them, each an estimator plus an update rule.

Any other combination is a preset with flags: `--directions rademacher` (the direction law),
`--update adam` (the update rule), per optimizer (`--update zo=momentum`) and as sweeps. Adding an
optimizer is one row here (and, for a new rule or estimator, one entry in updates.py or
estimators.py).
"""

from typing import NamedTuple

from zoflat_cli.errors import ZoflatError
from zoflat_cli.optim.estimators import ESTIMATORS, Estimator, n_evals
from zoflat_cli.optim.updates import UPDATES


class Preset(NamedTuple):
    name: str
    estimator: str
    update: str
    description: str
    samples: int = 1  # directions per step by default (`--samples`; ZEST's `--pairs`)

    @property
    def uses_directions(self) -> bool:
        return ESTIMATORS[self.estimator].uses_directions


PRESETS = {
    p.name: p
    for p in (
        Preset("gd", "gd", "sgd", "gradient descent (exact gradient)"),
        Preset("sam", "sam", "sgd", "sharpness-aware minimisation (--rho)"),
        Preset("zo", "two-point", "sgd", "two-point ZO-SGD (the paper's Algorithm 1; MeZO)"),
        Preset("zo-one-sided", "one-sided", "sgd", "ZO-SGD with the forward difference (f(x+λu) - f(x))/λ"),
        Preset("dd", "directional", "sgd", "directional derivative (uᵀ∇f)u, the λ → 0 limit of zo"),
        Preset("zest", "tilted", "sgd", "ZEST: tilted two-point ZO over n antithetic pairs (--pairs, --tilt)", 4),
        Preset("zo-sign", "two-point", "sign", "ZO-SGD-Sign: the sign of the two-point estimate"),
        Preset("zo-momentum", "two-point", "momentum", "ZO-SGD-MMT: two-point ZO with heavy-ball momentum"),
        Preset("zo-cons", "two-point", "conservative", "ZO-SGD-Cons: a step is kept only if it lowers the loss"),
        Preset("fwd-grad", "jvp", "sgd", "forward gradient: (uᵀ∇f)u by forward-mode AD"),
        Preset("zo-adam", "two-point", "adam", "ZO-Adam: Adam on the two-point estimate"),
    )
}

class Hyper(NamedTuple):
    """A per-run hyperparameter: every command gets a sweepable --flag for it from this table."""
    tag: str  # in run ids: lam0.1
    symbol: str  # in plot legends: λ=0.1
    help: str
    zero_ok: bool = False  # 0 is a valid value (else it must be > 0)
    below_one: bool = False  # it must be < 1
    optional: bool = False  # 0 means off: left out of run ids and legends
    default: float = None  # every command's default (None: each experiment gives its own)


HYPERPARAMETERS = {
    "lambda": Hyper("lam", "λ", "Smoothing radius λ of the ZO estimators: 0.1, a sweep 0.1,0.05,0.01, or zo=0.1."),
    "rho": Hyper("rho", "ρ", "SAM's ascent radius ρ: 0.05, a sweep, or sam=0.05.", default=0.05),
    "tilt": Hyper("t", "t", "ZEST's tilt t >= 0 (0: plain smoothed loss; large: toward SAM), or a sweep 0.1,1,10.",
                  zero_ok=True, default=1.0),
    # the update rules' hyperparameters: torch's and optax's defaults
    "momentum": Hyper("mom", "μ", "μ of the momentum rule (0.9).", zero_ok=True, below_one=True, default=0.9),
    "beta1": Hyper("b1", "β₁", "Adam's β₁ (0.9).", zero_ok=True, below_one=True, default=0.9),
    "beta2": Hyper("b2", "β₂", "Adam's β₂ (0.999).", zero_ok=True, below_one=True, default=0.999),
    "weight_decay": Hyper("wd", "wd", "Decoupled weight decay (0: none), a sweep, or per optimizer.", zero_ok=True,
                          optional=True, default=0.0),
}
# Flags that set several hyperparameters at once: --betas 0.9,0.999 (or zo-adam=0.9,0.99).
FLAG_GROUPS = {"betas": (("beta1", "beta2"), "Adam's β₁,β₂ (0.9,0.999), or zo-adam=0.9,0.99.")}
# The update rules' hyperparameters' defaults.
UPDATE_DEFAULTS = {name: HYPERPARAMETERS[name].default for name in ("momentum", "beta1", "beta2", "weight_decay")}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ZoflatError(f"unknown optimizer {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def estimator_of(name: str) -> Estimator:
    return ESTIMATORS[get_preset(name).estimator]


def hyper_names(preset: str, update: str) -> tuple:
    """The hyperparameters a run of this preset with this update rule reads, in table order."""
    used = set(estimator_of(preset).hyper) | set(UPDATES[update].hyper) | {"weight_decay"}
    return tuple(h for h in HYPERPARAMETERS if h in used)


SAMPLES = {p.name: p.samples for p in PRESETS.values() if p.uses_directions}


def evals_per_step(preset: str, update: str, samples: int) -> int:
    """Oracle calls per step of a run: its estimator's, plus f(x) and f(x_new) for a conservative rule."""
    return n_evals(estimator_of(preset), samples) + (2 if UPDATES[update].conservative else 0)


def default_lrs(gradient: float, zo: float, per_coordinate: float) -> dict:
    """Every preset's default step size from a command's three base values: gd and sam take
    `gradient`; ZO-type estimates with SGD take `zo`; momentum takes zo·(1 - μ) at the default
    μ, the same long-run step; sign and Adam move each coordinate by about lr: `per_coordinate`."""
    def lr(preset: Preset) -> float:
        if preset.update == "momentum":
            return zo * (1 - UPDATE_DEFAULTS["momentum"])
        if preset.update in ("sign", "adam"):
            return per_coordinate
        return gradient if not preset.uses_directions else zo
    return {name: lr(p) for name, p in PRESETS.items()}
