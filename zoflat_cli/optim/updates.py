"""Update rules: how an estimate ĝ moves the parameters, optax-style.

A transform is a pair of pure functions over tensors of one shape, with explicit state:
    init(x) -> state                                   (a tuple of tensors shaped like x)
    update(g, state, x, hyper, count) -> (d, state)    d: the direction of the step
and the step is x - lr·d. The same functions serve the batched path (x: (runs, dim), hyper values
(runs, 1)) and the in-place path (x: one flat chunk of a model's parameters, hyper values python
floats), so a rule is written once. `count` is the number of this update, from 1 (Adam's bias
correction). `chain(a, b)` feeds a's direction to b as its gradient. Tensor methods only: no torch
import (the command line's start-up).
"""

from typing import Callable, NamedTuple

from zoflat_cli.errors import ZoflatError


class Transform(NamedTuple):
    init: Callable
    update: Callable


def chain(*transforms: Transform) -> Transform:
    def init(x):
        return tuple(t.init(x) for t in transforms)

    def update(g, state, x, hyper, count):
        new_state = []
        for t, s in zip(transforms, state):
            g, s = t.update(g, s, x, hyper, count)
            new_state.append(s)
        return g, tuple(new_state)

    return Transform(init, update)


def identity() -> Transform:
    return Transform(lambda x: (), lambda g, state, x, hyper, count: (g, state))


def trace() -> Transform:
    """Heavy-ball momentum as in torch.optim.SGD (no dampening): m ← μ·m + g, d = m."""
    def update(g, state, x, hyper, count):
        m = state[0] * hyper["momentum"] + g
        return m, (m,)
    return Transform(lambda x: (x.new_zeros(x.shape),), update)


def scale_by_adam(eps: float = 1e-8) -> Transform:
    """Adam (Kingma & Ba): m ← β₁m + (1-β₁)g, v ← β₂v + (1-β₂)g², d = m̂ / (√v̂ + ε) with the
    bias corrections m̂ = m/(1-β₁ᵗ), v̂ = v/(1-β₂ᵗ)."""
    def update(g, state, x, hyper, count):
        b1, b2 = hyper["beta1"], hyper["beta2"]
        m = state[0] * b1 + g * (1 - b1)
        v = state[1] * b2 + g * g * (1 - b2)
        d = (m / (1 - b1**count)) / ((v / (1 - b2**count)).sqrt() + eps)
        return d, (m, v)
    return Transform(lambda x: (x.new_zeros(x.shape), x.new_zeros(x.shape)), update)


def scale_by_sign() -> Transform:
    """signSGD: d = sign(g) (ZO-Bench's ZO-SGD-Sign)."""
    return Transform(lambda x: (), lambda g, state, x, hyper, count: (g.sign(), state))


def add_decayed_weights() -> Transform:
    """d ← d + wd·x. Chained last, it is decoupled weight decay (after Adam: AdamW; after SGD the
    same as an L2 penalty)."""
    return Transform(lambda x: (), lambda g, state, x, hyper, count: (g + x * hyper["weight_decay"], state))


class UpdateRule(NamedTuple):
    name: str
    description: str
    transform: Callable  # () -> Transform
    hyper: tuple  # hyperparameters it reads (besides lr and weight_decay)
    conservative: bool = False  # a step is kept only if it lowers the loss (2 more evaluations)

    def build(self, weight_decay: bool) -> Transform:
        return chain(self.transform(), add_decayed_weights()) if weight_decay else self.transform()


UPDATES = {
    u.name: u
    for u in (
        UpdateRule("sgd", "x ← x - lr·ĝ", identity, ()),
        UpdateRule("momentum", "heavy-ball momentum (--momentum μ)", trace, ("momentum",)),
        UpdateRule("adam", "Adam with bias correction (--betas β₁,β₂; ε = 1e-8)", scale_by_adam, ("beta1", "beta2")),
        UpdateRule("sign", "x ← x - lr·sign(ĝ)", scale_by_sign, ()),
        UpdateRule("conservative", "SGD step kept only where it lowers the loss (ZO-SGD-Cons)", identity, (),
                   conservative=True),
    )
}


def get_update(name: str) -> UpdateRule:
    if name not in UPDATES:
        raise ZoflatError(f"unknown update {name!r}; choose from {', '.join(UPDATES)}")
    return UPDATES[name]


def state_to(state, device):
    """A rule's state (nested tuples of tensors) on another device (checkpoints: the CPU)."""
    return tuple(state_to(s, device) if isinstance(s, tuple) else s.to(device) for s in state)


def apply(transform: Transform, x, g, state, hyper, count):
    """One step: (x - lr·d, new state)."""
    d, state = transform.update(g, state, x, hyper, count)
    return x - hyper["lr"] * d, state
