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
from zoflat_cli.optim.estimators import (Estimator, anchor_step, ascent_scale, curvature_weights, hessian_informed,
                                         mask_thresholds, sparse_mask)
from zoflat_cli.optim.parameters import copy_into, dot
from zoflat_cli.optim.updates import UpdateRule, apply, state_to


class InPlaceOptimizer:
    """One run's estimator + update rule over a model's parameters (the oracle: `model`, with
    loss() on the current batch, gradient() -> list, jvp(tangents) -> float)."""

    def __init__(self, directions, estimator: Estimator, rule: UpdateRule, hyper: dict):
        self.directions, self.estimator, self.rule, self.hyper = directions, estimator, rule, hyper
        self.params = directions.params
        self.transform = rule.build(weight_decay=bool(hyper.get("weight_decay")))
        self.fused = (rule.name in ("sgd", "conservative") and not hyper.get("weight_decay")
                      and estimator.scaling != "curvature")
        self.work_dtype = work_dtype(self.params[0].dtype)
        self.state = None if self.fused else [
            self.transform.init(torch.zeros(pieces[-1][3], dtype=self.work_dtype, device=device))
            for pieces, device in zip(directions.chunks, directions.chunk_devices)]
        self._coef_hyper = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in hyper.items()}
        # what a stateful estimator keeps (optim/estimators.py): Sparse MeZO's thresholds (per tensor, from the
        # starting weights), HiZOO's curvature D (per chunk), MeZO-SVRG's anchor (a copy of the weights)
        self.period = int(hyper.get("period") or 1)
        self.curvature, self.anchor, self.anchor_coefs = None, None, None
        if estimator.scaling == "mask":
            self.thresholds = [mask_thresholds(p, hyper["sparsity"]) for p in self.params]
            directions.multiplier = self._mask
        elif estimator.scaling == "curvature":
            self.curvature = [torch.ones(pieces[-1][3], dtype=self.work_dtype, device=device)
                              for pieces, device in zip(directions.chunks, directions.chunk_devices)]
            directions.multiplier = lambda index, start, stop: self.curvature[index][start:stop].rsqrt()

    # -- one step

    @torch.no_grad()
    def step(self, model, keys, count: int, logged=None):
        """One update (the count-th, from 1). Returns (coefficients or None, accepted). With
        `logged` = (coefficients, accepted) from an update log, nothing is evaluated and the same
        update pass is made (a replay)."""
        est, lr = self.estimator, self.hyper["lr"]
        replay = logged is not None
        before = model.loss() if self.rule.conservative and not replay else None
        grads, coefs = None, None
        if est.anchored and keys[0][1] % self.period == 0:  # a new anchor x̄ = x (also when replaying)
            self.anchor = [p.detach().clone() for p in self.params]
        if replay:
            coefs = logged[0]
        elif est.anchored:
            coefs = self._anchored(model, keys)
        elif est.query == "loss":
            center = (before if before is not None else model.loss()) if est.center else None
            values = self._values(model, keys, est.offsets)
            coefs = self._coefficients(values, center)
            if est.scaling == "curvature":  # then each direction's curvature weight
                coefs += curvature_weights(torch.tensor(values, dtype=torch.float64),
                                           torch.tensor(center, dtype=torch.float64), self._coef_hyper).tolist()
        elif est.query == "directional":
            with torch.enable_grad():
                gradient = None if est.jvp else [g.detach() for g in model.gradient()]
            values = [model.jvp(self.directions.draw(key)) if est.jvp else self.directions.dot(key, gradient)
                      for key in keys]
            coefs = self._coefficients([values], None)
        if est.query == "gradient":
            with torch.enable_grad():
                grads = self._gradient(model)
        terms = []
        if coefs is not None:
            if est.anchored:
                self.anchor_coefs = coefs[len(keys):]
            self._weights = coefs[len(keys):]  # HiZOO's curvature weights
            terms = self._terms(keys, coefs)
        virtual = grads is None and self.fused  # a candidate x − lr·ĝ can be judged without writing it
        if self.rule.conservative and not virtual:  # move, judge, and undo a rejected move
            self._update(terms, grads, count)
            accepted = logged[1] if replay else model.loss() < before
            if not accepted:
                self._move(terms, grads, lr)
            return coefs, accepted
        accepted = True
        if self.rule.conservative:  # the move is kept only if it lowers the loss
            accepted = logged[1] if replay else self._loss_at(model, [(k, -lr * c) for k, c in terms]) < before
        if accepted:
            self._update(terms, grads, count)
        return coefs, accepted

    def _mask(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Sparse MeZO's 1{|x| ≤ h} over positions start..stop-1 of a chunk, from the stored weights."""
        parts = [sparse_mask(v[max(start, offset) - offset:min(stop, end) - offset].to(self.work_dtype),
                             self.thresholds[i])
                 for v, (i, _, offset, end) in zip(self.directions.param_views[index], self.directions.chunks[index])
                 if offset < stop and end > start]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _terms(self, keys, coefs) -> list:
        """[(key, c)]: the move is x − lr·Σ c·z(key) (before a rule's transform). An anchored step's also
        holds the anchor's directions with their coefficients, kept after the step's own."""
        n = len(keys)
        if not self.estimator.anchored:
            return list(zip(keys, coefs[:n]))
        at = anchor_step(keys[0][1], self.period)
        own = [] if keys[0][1] == at else list(zip(keys, coefs[:n]))
        return own + [((base, at), c) for (base, _), c in zip(keys, coefs[n:])]

    def _anchored(self, model, keys) -> list:
        """MeZO-SVRG's coefficients: at an anchor step (0, c̃) with c̃ the two-point estimate on the whole
        training set; after it (c - c̄, c̃) with c and c̄ two-point estimates at x and at the anchor x̄
        on the step's batch, same directions."""
        offsets, n = self.estimator.offsets, len(keys)
        if keys[0][1] % self.period == 0:
            self.anchor_coefs = self._coefficients(self._values(model, keys, offsets, split="train"), None)
            return [0.0] * n + self.anchor_coefs
        c = self._coefficients(self._values(model, keys, offsets), None)
        c_anchor = self._coefficients(self._values(model, keys, offsets, base=self.anchor), None)
        return [a - b for a, b in zip(c, c_anchor)] + self.anchor_coefs

    def _values(self, model, keys, offsets, split: str = "batch", base=None) -> list:
        """The losses at x + o·λ·z(key) (or at base + ...), [offsets][keys]. Data-parallel with a whole
        number of these evaluations per rank (`model.group`: process_group.py), each rank makes its share
        of them on the whole batch and one sum gathers them: the values are the single process's bit for
        bit, a rank draws a direction only for its own probes, and a step makes one collective."""
        lam, group = self.hyper["lambda"], getattr(model, "group", None)
        wanted = [(key, o * lam) for key in keys for o in offsets]  # in the order a single process takes them
        if group is None or group.world == 1 or len(wanted) % group.world:
            flat = [self._loss_at(model, [term], split, base) for term in wanted]
        else:  # consecutive shares: a rank's probes of one direction follow each other (the step cache's)
            share = len(wanted) // group.world
            with group.alone():
                own = {j: self._loss_at(model, [wanted[j]], split, base)
                       for j in range(group.rank * share, (group.rank + 1) * share)}
            flat = group.sum([own.get(j, 0.0) for j in range(len(wanted))])
        return [flat[k::len(offsets)] for k in range(len(offsets))]

    def _loss_at(self, model, terms, split: str = "batch", base=None) -> float:
        with self.directions.perturbed(terms, base):
            return model.loss() if split == "batch" else model.loss(split)

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

    def _move(self, terms, grads, alpha: float):
        """params += alpha · ĝ (the plain SGD move, or its undoing)."""
        if grads is not None:
            torch._foreach_add_(self.params, grads, alpha=alpha)
        else:
            self.directions.add([(k, alpha * c) for k, c in terms])

    def _update(self, terms, grads, count: int):
        lr = self.hyper["lr"]
        if self.fused:  # SGD: one pass
            self._move(terms, grads, -lr)
            return
        directions = self.directions
        scaled = [] if grads is not None else [(k, c * directions.scale(k)) for k, c in terms]

        def update_chunk(index):
            targets, device = directions.param_views[index], directions.chunk_devices[index]
            x = torch.cat([t.to(device, self.work_dtype) for t in targets])
            if grads is not None:
                g = torch.cat([t.to(device, self.work_dtype) for t in directions.views(grads, index)])
            elif self.curvature is not None:  # HiZOO: D and the step together, from the drawn z
                g, self.curvature[index] = hessian_informed(
                    self.curvature[index], (directions.drawn(k, index).to(self.work_dtype) * directions.scale(k)
                                            for k, _ in terms), [c for _, c in terms], self._weights,
                    self.hyper["hessian_smooth"])
            else:
                g = torch.zeros_like(x)
                for key, c in scaled:
                    g.add_(directions.drawn(key, index), alpha=c)
                if directions.multiplier is not None:
                    g *= directions.multiplier(index, 0, len(g))
            x, new_state = apply(self.transform, x, g, self.state[index], self.hyper, count)
            self.state[index] = new_state
            copy_into(targets, list(x.split([t.numel() for t in targets])))

        directions.map_chunks(update_chunk)

    # -- checkpoints

    def state_dict(self):
        rule = None if self.state is None else [state_to(s, "cpu") for s in self.state]
        if self.curvature is None and self.anchor is None:
            return rule  # as before stateful estimators
        return {"rule": rule, "curvature": None if self.curvature is None else state_to(tuple(self.curvature), "cpu"),
                "anchor": None if self.anchor is None else state_to(tuple(self.anchor), "cpu"),
                "anchor_coefs": self.anchor_coefs}

    def load_state_dict(self, state):
        if isinstance(state, dict):
            devices = self.directions.chunk_devices
            if state["curvature"] is not None:
                self.curvature = [c.to(device) for c, device in zip(state["curvature"], devices)]
            if state["anchor"] is not None:
                self.anchor = [a.to(p.device) for a, p in zip(state["anchor"], self.params)]
            self.anchor_coefs = state["anchor_coefs"]
            state = state["rule"]
        if state is not None:
            self.state = [state_to(s, device) for s, device in zip(state, self.directions.chunk_devices)]
