"""Update rules: how an estimated gradient moves the parameters.

An update rule is `init(x) -> state` plus `apply(x, g, lr, state)` that updates x (runs, dim)
in place; `lr` is (runs, 1). SGD keeps no state; momentum or Adam would keep theirs in `state`.
"""

from typing import Callable, NamedTuple


class UpdateRule(NamedTuple):
    name: str
    init: Callable
    apply: Callable


def _sgd_apply(x, g, lr, state):
    x.addcmul_(lr, g, value=-1.0)


SGD = UpdateRule("sgd", lambda x: None, _sgd_apply)
