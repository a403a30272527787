"""The in-place path: any estimator and update rule on a model too large to copy.

Parameters are perturbed in place and directions are regenerated from their keys
(directions.ParameterDirections), so memory stays at inference level plus the rule's state.
A step queries the oracle as the estimator asks, turns the answers into coefficients with the
estimator's own rule (the batched path's function), and moves the parameters with the update
rule's transform, chunk by chunk. For two-point ZO with SGD that is three passes (MeZO: four):
+λz, f⁺; -2λz, f⁻; then restore and update together, +(λ - lr·c)z. Replaying a step from its
logged (keys, coefficients, accepted) repeats the very same floating-point passes, so the
parameters and the rule's state come out bit-identical.
"""

import contextlib

import torch

from zoflat_cli.optim.estimators import Estimator, ascent_scale
from zoflat_cli.optim.updates import UpdateRule, apply, state_to


@contextlib.contextmanager
def preserved(params):
    """Whatever happens to params inside, they come out bit for bit as they went in (from one
    copy). Yields restore(), which puts them back early, e.g. between probes."""
    saved = [p.detach().clone() for p in params]

    @torch.no_grad()
    def restore():
        for p, s in zip(params, saved):
            p.copy_(s)

    try:
        yield restore
    finally:
        restore()


def dot(a, b) -> float:
    """Σ aᵢ·bᵢ over lists of tensors, in float64."""
    return sum((x.double() * y.double()).sum().item() for x, y in zip(a, b))


class InPlaceOptimizer:
    """One run's estimator + update rule over a model's parameters (the oracle: `model`, with
    loss() on the current batch, gradient() -> list, jvp(tangents) -> float)."""

    def __init__(self, directions, estimator: Estimator, rule: UpdateRule, hyper: dict):
        self.directions, self.estimator, self.rule, self.hyper = directions, estimator, rule, hyper
        self.params = directions.params
        self.transform = rule.build(weight_decay=bool(hyper.get("weight_decay")))
        self.fused = rule.name in ("sgd", "conservative") and not hyper.get("weight_decay")
        dtype = self.params[0].dtype
        self.work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.state = None if self.fused else [
            self.transform.init(torch.zeros(pieces[-1][3], dtype=self.work_dtype, device=directions.device))
            for pieces in directions.chunks]
        self._coef_hyper = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in hyper.items()}

    # -- one step

    @torch.no_grad()
    def step(self, model, keys, count: int, logged=None):
        """One update (the count-th, from 1). Returns (coefficients or None, accepted). With
        `logged` = (coefficients, accepted) from an update log, nothing is evaluated and the same
        passes are made (a replay)."""
        est, lam = self.estimator, self.hyper.get("lambda")
        replay = logged is not None
        before = None
        if self.rule.conservative and not replay:
            before = model.loss()
        restore, grads, coefs = None, None, None
        if est.query == "loss":
            center = (before if before is not None else model.loss()) if est.center and not replay else None
            values = [[None] * len(keys) for _ in est.offsets]
            for i, key in enumerate(keys):
                position = 0
                for k, offset in enumerate(est.offsets):
                    self.directions.add([(key, (offset - position) * lam)])
                    position = offset
                    if not replay:
                        values[k][i] = model.loss()
                if i < len(keys) - 1:
                    self.directions.add([(key, -position * lam)])
                else:
                    restore = (key, -position * lam)
            coefs = logged[0] if replay else self._coefficients(values, center)
        elif est.query == "directional":
            if replay:
                coefs = logged[0]
            else:
                with torch.enable_grad():
                    gradient = None if est.jvp else [g.detach() for g in model.gradient()]
                values = [model.jvp(self.directions.draw(key)) if est.jvp else self.directions.dot(key, gradient)
                          for key in keys]
                coefs = self._coefficients([values], None)
        else:
            with torch.enable_grad():
                grads = self._gradient(model)
        self._update(keys, coefs, restore, grads, count)
        accepted = True
        if self.rule.conservative:
            accepted = logged[1] if replay else model.loss() < before
            if not accepted:  # undo the move (the same passes again on replay)
                self._move(keys, coefs, grads, self.hyper["lr"])
        return coefs, accepted

    def _coefficients(self, values, center) -> list:
        v = torch.tensor(values, dtype=torch.float64)
        c = None if center is None else torch.tensor(center, dtype=torch.float64)
        return self.estimator.coefficients(v, c, self._coef_hyper).tolist()

    def _gradient(self, model) -> list:
        grads = model.gradient()
        if self.estimator.name == "sam":
            scale = ascent_scale(dot(grads, grads) ** 0.5, self.hyper["rho"])
            with torch.no_grad():
                torch._foreach_add_(self.params, grads, alpha=scale)
            ascent = model.gradient()
            with torch.no_grad():
                torch._foreach_add_(self.params, grads, alpha=-scale)
            grads = ascent
        return grads

    def _move(self, keys, coefs, grads, alpha: float):
        """params += alpha · ĝ (the plain SGD move, or its undoing)."""
        if grads is not None:
            torch._foreach_add_(self.params, grads, alpha=alpha)
        else:
            self.directions.add([(k, alpha * c) for k, c in zip(keys, coefs)])

    def _update(self, keys, coefs, restore, grads, count: int):
        lr = self.hyper["lr"]
        if self.fused:  # SGD: the last restore and the update in one pass
            if grads is not None:
                torch._foreach_add_(self.params, grads, alpha=-lr)
                return
            terms = [(k, -lr * c) for k, c in zip(keys, coefs)]
            if restore is not None:
                terms[-1] = (restore[0], restore[1] + terms[-1][1])
            self.directions.add(terms)
            return
        directions = self.directions
        scaled = [] if grads is not None else [(k, c * directions.scale(k)) for k, c in zip(keys, coefs)]

        def update_chunk(index):
            targets = directions.param_views[index]
            x = torch.cat([t.to(self.work_dtype) for t in targets])
            if grads is not None:
                g = torch.cat([t.to(self.work_dtype) for t in directions.views(grads, index)])
            else:
                g = torch.zeros_like(x)
                for key, c in scaled:
                    z = directions.chunk(key, index).to(self.work_dtype)
                    if restore is not None and key == restore[0]:
                        x.add_(z, alpha=restore[1] * directions.scale(key))
                    g.add_(z, alpha=c)
            x, new_state = apply(self.transform, x, g, self.state[index], self.hyper, count)
            self.state[index] = new_state
            torch._foreach_copy_(targets, list(x.split([t.numel() for t in targets])))

        directions.map_chunks(update_chunk)

    # -- checkpoints

    def state_dict(self):
        return None if self.state is None else [state_to(s, "cpu") for s in self.state]

    def load_state_dict(self, state):
        if state is not None:
            self.state = [state_to(s, self.directions.device) for s in state]
