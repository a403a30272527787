"""Probes formed on the fly: the model evaluated at x + Σ aᵢzᵢ without writing it.

Inside `ForwardProbes.perturbed(terms)`, every module that owns trained parameters forms its
perturbed weights for the length of its own forward (one module's scratch at a time: a forward
pre-hook swaps them in, a forward hook swaps the stored ones back, even if the forward raises).
A plain embedding lookup perturbs only the rows it reads. So probing cannot drift the weights in
any precision: only the update (parameters.py's `add`) writes them.
"""

import contextlib
import functools

import torch

from zoflat_cli.optim.directions import work_dtype


class ForwardProbes:
    """The forward hooks of one module over a ParameterDirections' parameters (`directions`
    supplies the chunk layout and draws the chunks)."""

    def __init__(self, directions, module):
        self.directions, self.params = directions, directions.params
        self.pieces_of, self.chunks = directions.pieces_of, directions.chunks
        self.owners = owners(module, self.params)
        self._terms, self._drawn, self._base = None, {}, None

    @contextlib.contextmanager
    def perturbed(self, terms, base=None):
        """Inside, the module's forward sees params + Σ alpha · z(key) for the scaled (key, alpha)
        in terms (each weight rounded once to its dtype); the stored parameters are never written.
        With `base` (tensors shaped like the parameters: MeZO-SVRG's anchor), base + Σ alpha · z."""
        self._terms, self._base = terms, base
        handles = []
        for module, own in self.owners:
            if base is None and is_lookup(module, own):  # only the rows looked up are perturbed: no table-sized scratch
                handles.append(module.register_forward_hook(functools.partial(self._perturb_rows, own[0][1])))
                continue
            handles.append(module.register_forward_pre_hook(functools.partial(self._swap_in, own)))
            handles.append(module.register_forward_hook(functools.partial(self._swap_out, own), always_call=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, own in self.owners:  # even if a forward failed half-way
                self._swap_out(own, module)
            self._terms, self._drawn, self._base = None, {}, None

    def _swap_in(self, own, module, *_):
        for name, index in own:
            module._parameters[name] = self._perturbed(index)

    def _swap_out(self, own, module, *_):
        for name, index in own:
            module._parameters[name] = self.params[index]

    @torch.no_grad()
    def _perturbed(self, index: int) -> torch.Tensor:
        p = self.params[index]
        stored = (p if self._base is None else self._base[index]).detach().view(-1)
        x = torch.empty(p.numel(), dtype=work_dtype(p.dtype), device=p.device)
        for chunk, start, offset, stop in self.pieces_of[index]:
            into, source = x[start:start + stop - offset], stored[start:start + stop - offset]
            multiplier = self._multiplier(chunk, offset, stop)
            for k, (key, alpha) in enumerate(self._terms):
                z = self._drawn_chunk(key, chunk)[offset:stop].to(p.device)
                if multiplier is not None:
                    z = z * multiplier.to(p.device)
                torch.add(source if k == 0 else into, z, alpha=alpha, out=into)  # one pass: no copy first
        return x.to(p.dtype).view_as(p)

    @torch.no_grad()
    def _perturb_rows(self, index: int, module, args, output):
        """An embedding lookup at the perturbed table: output rows + Σ scale · z's rows for the ids,
        chunk piece by piece (a row cut by a chunk's edge is added in its two parts)."""
        p = self.params[index]
        width = p.shape[1]
        ids = args[0].reshape(-1)
        out = output.reshape(-1, width).to(work_dtype(p.dtype), copy=True)
        for chunk, start, offset, stop in self.pieces_of[index]:
            end = start + stop - offset
            first, last = -(-start // width), end // width  # rows wholly inside the piece: [first, last)
            whole = ((ids >= first) & (ids < last)).nonzero().squeeze(1)
            cut = [(r, (ids == r).nonzero().squeeze(1)) for r in {start // width, last}
                   if r * width < end and (r + 1) * width > start and not first <= r < last]
            used, inverse = torch.unique(ids[whole], return_inverse=True)  # each table row gathered once
            rows = (used * width - start).unsqueeze(1) + torch.arange(width, device=p.device)
            multiplier = self._multiplier(chunk, offset, stop)
            for key, alpha in self._terms:
                z = self._drawn_chunk(key, chunk)[offset:stop].to(p.device, out.dtype)
                if multiplier is not None:
                    z = z * multiplier.to(p.device, out.dtype)
                out.index_add_(0, whole, z[rows][inverse], alpha=alpha)
                for r, at in cut:
                    lo, hi = max(start, r * width), min(end, (r + 1) * width)
                    out[at, lo - r * width:hi - r * width] += alpha * z[lo - start:hi - start]
        return out.to(output.dtype).view_as(output)

    def _multiplier(self, chunk: int, offset: int, stop: int):
        """The directions' multiplier over positions offset..stop-1 of a chunk (one tensor's piece: no
        chunk-sized scratch), or None."""
        return None if self.directions.multiplier is None else self.directions.multiplier(chunk, offset, stop)

    def _drawn_chunk(self, key: tuple, index: int) -> torch.Tensor:
        """Chunk `index` of z(key), drawn with the next workers - 1 chunks on the pool's threads (the forward
        goes through the parameters in about their order) and kept while the forward uses them (or from the
        step's cache: ParameterDirections.drawn)."""
        if (key, index) not in self._drawn:
            self.directions.cache_for(key)
            wanted = range(index, min(index + self.directions.workers, len(self.chunks)))
            free = [buffer for _, buffer in self._drawn.values()]
            free += [self.directions._buffer(self.directions.chunk_devices[i]) for i in wanted[len(free):]]
            drawn = self.directions.map_chunks(lambda i: self.directions.drawn(key, i, free[i - index]), wanted)
            self._drawn = {(key, i): (z, free[i - index]) for i, z in zip(wanted, drawn)}
        return self._drawn[(key, index)][0]


def is_lookup(module, own) -> bool:
    """A plain embedding table (F.embedding of its weight, no max_norm renormalisation)."""
    return (type(module) is torch.nn.Embedding and module.max_norm is None and len(own) == 1
            and own[0][0] == "weight")


def owners(module, params) -> list:
    """[(module, [(name, index in params)])] for every submodule that holds some of params itself (a
    tied weight: each module that holds it)."""
    index = {id(p): i for i, p in enumerate(params)}
    out = []
    for m in module.modules():
        own = [(name, index[id(p)]) for name, p in m._parameters.items() if p is not None and id(p) in index]
        if own:
            out.append((m, own))
    return out
