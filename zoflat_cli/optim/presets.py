"""The optimizer table: named optimizers as users know them, each an estimator plus an update rule.

Any other combination is a preset with flags: `--directions rademacher` (the direction law),
`--update adam` (the update rule), per optimizer (`--update zo=momentum`) and as sweeps. Adding an
optimizer is one row here (and, for a new rule or estimator, one entry in updates.py or
estimators.py).
"""

from typing import NamedTuple

from zoflat_cli.errors import ZoflatError, suggestion
from zoflat_cli.optim.estimators import ESTIMATORS, Estimator, n_evals
from zoflat_cli.optim.updates import UPDATES


class Preset(NamedTuple):
    name: str
    estimator: str
    update: str
    description: str
    samples: int = 1  # directions per step by default (`--samples`; ZEST's `--pairs`)
    law: str = "gaussian"  # its direction law by default (`--directions`)

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
        Preset("hizoo", "hessian", "sgd", "HiZOO: probes along z/√D, D a diagonal Hessian estimate from the same "
               "probes and f(x)"),
        Preset("lozo", "two-point", "sgd", "LOZO: a low-rank U Vᵀ per matrix, V kept --period steps", law="lowrank"),
        Preset("subzero", "two-point", "sgd", "SubZero: U S Vᵀ per matrix in a random subspace refreshed every "
               "--period steps", law="subspace"),
        Preset("sparse-mezo", "masked", "sgd", "Sparse MeZO: only the weights with |x| ≤ h perturbed and moved"),
        Preset("mezo-svrg", "svrg", "sgd", "MeZO-SVRG: the minibatch estimate corrected at an anchor refreshed "
               "every --period steps"),
        Preset("fzoo", "normalised", "sgd", "FZOO: n one-sided Rademacher probes, step normalised by their "
               "losses' spread", 8, "rademacher"),
    )
}
STRUCTURED = ("lowrank", "subspace")  # direction laws over matrices (structured.py)
LAWS = ("gaussian", "rademacher", "sphere", *STRUCTURED)  # directions.py draws them
# the direction laws' hyperparameters (the estimators' and rules' are theirs)
LAW_HYPER = {"lowrank": ("rank", "period"), "subspace": ("rank", "period")}

class Hyper(NamedTuple):
    """A per-run hyperparameter: every command gets a sweepable --flag for it from this table."""
    tag: str  # in run ids: lam0.1
    symbol: str  # in plot legends: λ=0.1
    help: str
    zero_ok: bool = False  # 0 is a valid value (else it must be > 0)
    below_one: bool = False  # it must be < 1
    optional: bool = False  # 0 means off: left out of run ids and legends
    default: float = None  # every command's default (None: each experiment gives its own)
    integer: bool = False  # a whole number >= 1
    structural: bool = False  # it shapes the directions or the anchor's schedule: runs that share it step together


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
    # the 2024–26 methods' own
    "rank": Hyper("r", "r", "Rank r of the lowrank and subspace laws (LOZO, SubZero; 2).", default=2, integer=True,
                  structural=True),
    "period": Hyper("T", "T", "Steps between refreshes: LOZO's V, SubZero's subspace, MeZO-SVRG's anchor (50).",
                    default=50, integer=True, structural=True),
    "sparsity": Hyper("sp", "s", "Sparse MeZO: the share of each tensor (its largest weights) never perturbed (0.75).",
                      zero_ok=True, below_one=True, default=0.75),
    "hessian_smooth": Hyper("a", "α", "HiZOO's curvature averaging α (1e-4; 0: D stays 1).", zero_ok=True,
                            below_one=True, default=1e-4),
}
# Flags that set several hyperparameters at once: --betas 0.9,0.999 (or zo-adam=0.9,0.99).
FLAG_GROUPS = {"betas": (("beta1", "beta2"), "Adam's β₁,β₂ (0.9,0.999), or zo-adam=0.9,0.99.")}
# The update rules' hyperparameters' defaults.
UPDATE_DEFAULTS = {name: HYPERPARAMETERS[name].default for name in ("momentum", "beta1", "beta2", "weight_decay")}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ZoflatError(f"unknown optimizer {name!r}{suggestion(str(name), PRESETS)}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def estimator_of(name: str) -> Estimator:
    return ESTIMATORS[get_preset(name).estimator]


def hyper_names(preset: str, update: str, law: str = "gaussian") -> tuple:
    """The hyperparameters a run of this preset with this update rule and direction law reads, in table order."""
    used = set(estimator_of(preset).hyper) | set(UPDATES[update].hyper) | set(LAW_HYPER.get(law, ())) | {"weight_decay"}
    return tuple(h for h in HYPERPARAMETERS if h in used)


SAMPLES = {p.name: p.samples for p in PRESETS.values() if p.uses_directions}
DIRECTIONS = {p.name: p.law for p in PRESETS.values() if p.uses_directions}


def evals_until(run, step: int, fraction: float = 1):
    """Oracle calls of a run's first `step` steps: its estimator's, plus f(x) and f(x_new) per step for a
    conservative rule, those on a batch counted as `fraction` of one on the whole training set (an
    anchored estimator's anchor steps are 2 per direction on the whole set, its other steps 4 on the batch)."""
    estimator = estimator_of(run.optimizer)
    per_step = n_evals(estimator, run.samples) + (2 if UPDATES[run.rule].conservative else 0)
    if not estimator.anchored:
        return step * per_step * fraction
    anchors = -(-step // int(run.value("period")))
    return anchors * 2 * run.samples + (step - anchors) * per_step * fraction


def default_lrs(gradient: float, zo: float, per_coordinate: float) -> dict:
    """Every preset's default step size from a command's three base values: gd and sam take
    `gradient`; ZO-type estimates with SGD take `zo`; momentum takes zo·(1 - μ) at the default
    μ, the same long-run step; sign, Adam and FZOO move each coordinate by about lr: `per_coordinate`."""
    def lr(preset: Preset) -> float:
        if preset.update == "momentum":
            return zo * (1 - UPDATE_DEFAULTS["momentum"])
        if preset.update in ("sign", "adam") or preset.estimator == "normalised":  # FZOO's step is normalised
            return per_coordinate
        return gradient if not preset.uses_directions else zo
    return {name: lr(p) for name, p in PRESETS.items()}
