"""The in-place path: any estimator and update rule on a model too large to copy.

Directions are regenerated from their keys (parameters.ParameterDirections), so memory stays at
inference level plus the rule's state. A step queries the oracle as the estimator asks, at points
x + λz that the model's modules form on the fly (probes.py: the stored weights are never written
while probing), turns the answers into coefficients with the estimator's own rule
(the batched path's function), and moves the parameters with the update rule's transform, chunk by
chunk. So a two-point ZO-SGD step is two perturbed forwards and one update pass (MeZO: four
in-place passes), and in any dtype the weights after a step are x − lr·Σ cᵢzᵢ rounded once, never an
accumulation of ±λz round trips (lr = 0 leaves them bit-identical). Replaying a step from its
logged (keys, coefficients, accepted) repeats the very same update pass, so the parameters and
the rule's state come out bit-identical.
"""

import torch

from zoflat_cli.optim.directions import work_dtype
from zoflat_cli.optim.estimators import Estimator, ascent_scale
from zoflat_cli.optim.parameters import copy_into, dot
from zoflat_cli.optim.updates import UpdateRule, apply, state_to


class InPlaceOptimizer:
    """One run's estimator + update rule over a model's parameters (the oracle: `model`, with
    loss() on the current batch, gradient() -> list, jvp(tangents) -> float)."""

    def __init__(self, directions, estimator: Estimator, rule: UpdateRule, hyper: dict):
        self.directions, self.estimator, self.rule, self.hyper = directions, estimator, rule, hyper
        self.params = directions.params
        self.transform = rule.build(weight_decay=bool(hyper.get("weight_decay")))
        self.fused = rule.name in ("sgd", "conservative") and not hyper.get("weight_decay")
        self.work_dtype = work_dtype(self.params[0].dtype)
        self.state = None if self.fused else [
            self.transform.init(torch.zeros(pieces[-1][3], dtype=self.work_dtype, device=device))
            for pieces, device in zip(directions.chunks, directions.chunk_devices)]
        self._coef_hyper = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in hyper.items()}

    # -- one step

    @torch.no_grad()
    def step(self, model, keys, count: int, logged=None):
        """One update (the count-th, from 1). Returns (coefficients or None, accepted). With
        `logged` = (coefficients, accepted) from an update log, nothing is evaluated and the same
        update pass is made (a replay)."""
        est, lam, lr = self.estimator, self.hyper.get("lambda"), self.hyper["lr"]
        replay = logged is not None
        before = model.loss() if self.rule.conservative and not replay else None
        grads, coefs = None, None
        if replay:
            coefs = logged[0]
        elif est.query == "loss":
            center = (before if before is not None else model.loss()) if est.center else None
            at = [[self._loss_at(model, [(key, offset * lam)]) for offset in est.offsets] for key in keys]
            coefs = self._coefficients([list(v) for v in zip(*at)], center)  # [offsets][keys]
        elif est.query == "directional":
            with torch.enable_grad():
                gradient = None if est.jvp else [g.detach() for g in model.gradient()]
            values = [model.jvp(self.directions.draw(key)) if est.jvp else self.directions.dot(key, gradient)
                      for key in keys]
            coefs = self._coefficients([values], None)
        if est.query == "gradient":
            with torch.enable_grad():
                grads = self._gradient(model)
        virtual = grads is None and self.fused  # a candidate x − lr·ĝ can be judged without writing it
        if self.rule.conservative and not virtual:  # move, judge, and undo a rejected move
            self._update(keys, coefs, grads, count)
            accepted = logged[1] if replay else model.loss() < before
            if not accepted:
                self._move(keys, coefs, grads, lr)
            return coefs, accepted
        accepted = True
        if self.rule.conservative:  # the move is kept only if it lowers the loss
            accepted = logged[1] if replay else self._loss_at(model, [(k, -lr * c) for k, c in zip(keys, coefs)]) < before
        if accepted:
            self._update(keys, coefs, grads, count)
        return coefs, accepted

    def _loss_at(self, model, terms) -> float:
        with self.directions.perturbed(terms):
            return model.loss()

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

    def _update(self, keys, coefs, grads, count: int):
        lr = self.hyper["lr"]
        if self.fused:  # SGD: one pass
            self._move(keys, coefs, grads, -lr)
            return
        directions = self.directions
        scaled = [] if grads is not None else [(k, c * directions.scale(k)) for k, c in zip(keys, coefs)]

        def update_chunk(index):
            targets, device = directions.param_views[index], directions.chunk_devices[index]
            x = torch.cat([t.to(device, self.work_dtype) for t in targets])
            if grads is not None:
                g = torch.cat([t.to(device, self.work_dtype) for t in directions.views(grads, index)])
            else:
                g = torch.zeros_like(x)
                for key, c in scaled:
                    g.add_(directions.chunk(key, index), alpha=c)
            x, new_state = apply(self.transform, x, g, self.state[index], self.hyper, count)
            self.state[index] = new_state
            copy_into(targets, list(x.split([t.numel() for t in targets])))

        directions.map_chunks(update_chunk)

    # -- checkpoints

    def state_dict(self):
        return None if self.state is None else [state_to(s, "cpu") for s in self.state]

    def load_state_dict(self, state):
        if state is not None:
            self.state = [state_to(s, device) for s, device in zip(state, self.directions.chunk_devices)]
