"""Direction laws and the one seed convention that both training paths draw them by.

A direction is named by (base, step): `streams.direction_base(run seed, sample)` names the
sample's stream and `step` the direction in it. Its numbers come from torch generators, one
seeding per unit, so any direction can be regenerated alone:
  dim > UNIT    direction s is cut into units of CHUNK numbers, unit k seeded with mix(base, s·units + k)
                (a model's parameters, taken in order as one flat vector: a chunk spans many small tensors);
  dim <= UNIT   P = UNIT // dim consecutive directions share one unit of P·dim numbers, seeded with
                mix(base, s // P): a small problem draws P steps with one seeding (the toy: P = 81).
The batched path (a (runs, dim) tensor per step, blocks of steps on a background thread) and the
in-place path (chunk by chunk, z never stored) draw the very same numbers for the same run, step
and sample.

In place, a perturbed point x + Σ aᵢzᵢ is never written into the stored weights: inside
`ParameterDirections.perturbed(terms)`, every module that owns parameters forms its perturbed
weights on the fly for the length of its own forward (one module's scratch at a time) and gives
the stored ones back after it. So probing cannot drift the weights in any precision: only
`add` (the update) writes them, rounding x + Σ aᵢzᵢ once into the stored dtype.

Laws (each with E[u] = 0 and E[uuᵀ] = I):
  gaussian    u ~ N(0, I)
  rademacher  u_j = ±1 with probability 1/2 each
  sphere      u uniform on the sphere of radius √d: a Gaussian draw times √d/‖g‖; in place the norm
              needs every chunk, so it is one extra draw-only pass per direction, computed once and cached.
"""

import contextlib
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from zoflat_cli.streams import direction_base, mix, mix_array

LAWS = ("gaussian", "rademacher", "sphere")
UNIT = 1 << 14  # vectors up to this length are packed several to a seeding
CHUNK = 1 << 19  # numbers per seeding of longer ones: 2 MiB of float32 scratch per thread in place
# Bumped whenever the numbers drawn for a direction change: run folders record it, --resume checks it.
FORMAT_VERSION = 3


def layout(dim: int) -> tuple:
    """(units per direction, directions per unit) for vectors of length dim."""
    return (1, UNIT // dim) if dim <= UNIT else (-(-dim // CHUNK), 1)


def check_law(law: str) -> str:
    from zoflat_cli.errors import ZoflatError

    if law not in LAWS:
        raise ZoflatError(f"unknown directions {law!r}; choose from {', '.join(LAWS)}")
    return law


def fill(out: torch.Tensor, law: str, gen: torch.Generator) -> torch.Tensor:
    """Numbers from a seeded generator, before the sphere's scaling (float32)."""
    if law == "rademacher":  # 32 signs per random int32 word: about half the cost of a Gaussian draw
        n = out.numel()
        words = torch.randint(-2**31, 2**31, (-(-n // 32),), dtype=torch.int32, generator=gen, device=out.device)
        bits = (words[:, None] >> _bit_positions(out.device)) & 1
        return out.copy_(bits.view(-1)[:n]).mul_(2).sub_(1)
    return out.normal_(generator=gen)


@functools.lru_cache(maxsize=8)
def _bit_positions(device) -> torch.Tensor:
    return torch.arange(32, dtype=torch.int32, device=device)


def sphere_scale(square_norm: float, dim: int) -> float:
    """√d/‖g‖ from ‖g‖², in float64, so that ‖u‖ = √d."""
    return math.sqrt(dim / square_norm)


# The batched path draws blocks of steps on a background thread while the trainer steps (torch
# drops the GIL inside a draw), so drawing overlaps with training on a second core.
_DRAWER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoflat-directions")
BLOCK_ELEMENTS = 1 << 16  # numbers per background block (at least MIN_BLOCK_STEPS steps, whole units)
MIN_BLOCK_STEPS = 8


class DirectionStream:
    """Directions for a group of runs, step after step: `next()` gives (samples, runs, dim) for
    the current step, drawn by the seed convention above. Runs with the same seed get the same
    directions (common random numbers), whatever else is in the group."""

    def __init__(self, seeds, samples: int, dim: int, law: str, dtype, device, start_step: int = 0):
        self.unique = list(dict.fromkeys(seeds))
        self.rows = torch.tensor([self.unique.index(s) for s in seeds], device=device)
        self.shared = len(self.unique) == len(seeds)  # no index_select needed
        self.bases = [[direction_base(s, i) for s in self.unique] for i in range(samples)]
        self.samples, self.dim, self.law, self.dtype, self.device = samples, dim, law, dtype, device
        self.units, self.per_unit = layout(dim)
        steps = max(MIN_BLOCK_STEPS, BLOCK_ELEMENTS // (samples * dim * len(self.unique)))
        self.block = -(-steps // self.per_unit) * self.per_unit  # whole units
        self.gen = torch.Generator(device=device)
        self.step, self.chunk, self.position = start_step, None, 0
        self.pending = _DRAWER.submit(self._draw, self.step)

    def _draw(self, first: int) -> torch.Tensor:
        """Steps first .. first + block - 1 as (steps, samples, runs, dim) in the run's dtype."""
        count, per = self.block, self.per_unit
        g = torch.empty(count, self.samples, len(self.unique), self.dim, dtype=torch.float32, device=self.device)
        if self.dim <= UNIT:  # whole units of `per` steps, sliced to [first, first + count)
            u0, u1 = first // per, (first + count - 1) // per
            scratch = torch.empty(u1 - u0 + 1, per * self.dim, dtype=torch.float32, device=self.device)
            skip = first - u0 * per
            for i, bases in enumerate(self.bases):
                for r, base in enumerate(bases):
                    seeds = mix_array(np.uint64(base), np.arange(u0, u1 + 1, dtype=np.uint64)).tolist()
                    for unit, seed in zip(scratch, seeds):
                        self.gen.manual_seed(seed)
                        fill(unit, self.law, self.gen)
                    g[:, i, r] = scratch.view(-1, self.dim)[skip:skip + count]
        else:  # each step its own units
            units = np.arange(first * self.units, (first + count) * self.units, dtype=np.uint64)
            for i, bases in enumerate(self.bases):
                for r, base in enumerate(bases):
                    for k, seed in enumerate(mix_array(np.uint64(base), units).tolist()):
                        step, part = divmod(k, self.units)
                        self.gen.manual_seed(seed)
                        fill(g[step, i, r, part * CHUNK:(part + 1) * CHUNK], self.law, self.gen)
        u = g.to(self.dtype)  # (steps, samples, runs, dim): one contiguous block per step
        if self.law == "sphere":  # √d/‖g‖ per direction, from the float32 draw's norm in float64
            u *= (self.dim / g.double().square().sum(-1, keepdim=True)).sqrt().to(self.dtype)
        return u if self.shared else u.index_select(2, self.rows)

    def next(self) -> torch.Tensor:
        if self.chunk is None or self.position == self.chunk.shape[0]:
            self.chunk, self.position = self.pending.result(), 0
            self.pending = _DRAWER.submit(self._draw, self.step + self.block)
        u = self.chunk[self.position]
        self.position += 1
        self.step += 1
        return u


def work_dtype(dtype) -> torch.dtype:
    """The dtype a perturbed or updated weight is computed in before its one rounding to `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ParameterDirections:
    """Directions over a model's parameter tensors, regenerated chunk by chunk, never stored.

    A direction's key is (base, step). `add(terms)` computes params += Σ scale·z(key) in one pass
    with one chunk of scratch per thread; `perturbed(terms)` evaluates `module` at that point
    without writing it (module: the nn.Module whose forward uses the parameters).
    A chunk spans many small tensors (biases, norms), so one draw and one fused multi-tensor add
    serve them all: on a GPU the pass costs a few kernel launches per chunk, not per tensor."""

    def __init__(self, params, law: str = "gaussian", module=None):
        self.params = list(params)
        self.law = check_law(law)
        self.device = self.params[0].device
        self.numel = sum(p.numel() for p in self.params)
        # chunk = [(parameter index, start in the parameter, start, stop in the chunk)]: one cut for every
        # key; a small model is one chunk (its direction is a slice of a shared unit)
        size = CHUNK if self.numel > UNIT else self.numel
        self.chunks, pieces, filled = [], [], 0
        for index, p in enumerate(self.params):
            start = 0
            while start < p.numel():
                take = min(size - filled, p.numel() - start)
                pieces.append((index, start, filled, filled + take))
                start, filled = start + take, filled + take
                if filled == size:
                    self.chunks.append(pieces)
                    pieces, filled = [], 0
        if pieces:
            self.chunks.append(pieces)
        self.param_views = [self.views(self.params, i) for i in range(len(self.chunks))]  # cut once, used every pass
        # a chunk is drawn on its first tensor's device (a model across GPUs: --device-map); a piece on
        # another device is moved there, so the numbers do not depend on the placement
        self.chunk_devices = [self.params[pieces[0][0]].device for pieces in self.chunks]
        # per parameter, the chunk pieces that cover it: [(chunk, start in the parameter, start, stop in the chunk)]
        self.pieces_of = [[] for _ in self.params]
        for chunk, pieces in enumerate(self.chunks):
            for index, start, offset, stop in pieces:
                self.pieces_of[index].append((chunk, start, offset, stop))
        # CPU: threads share the chunks (torch releases the GIL while it draws); CUDA: one stream
        self.workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        self._local = threading.local()
        self._scales = {}  # the sphere's √d/‖g‖ per key, computed once
        self.layout = layout(self.numel)
        self.owners = [] if module is None else owners(module, self.params)
        self._terms, self._drawn = None, {}

    def views(self, tensors, index: int) -> list:
        """The flat slices of `tensors` (shaped like the parameters) that chunk `index` covers."""
        # detached: the pool's threads do not inherit the caller's no_grad mode
        return [tensors[i].detach().view(-1)[start:start + stop - offset] for i, start, offset, stop in self.chunks[index]]

    def pieces(self, z: torch.Tensor, index: int, targets) -> list:
        """Chunk `index` of a direction cut into the pieces of `targets`, each on its tensor's device."""
        return [z[offset:stop].to(t.device) for t, (_, _, offset, stop) in zip(targets, self.chunks[index])]

    def _scratch(self, device):
        """This thread's scratch buffer and generator on `device`."""
        if not hasattr(self._local, "scratch"):
            self._local.scratch = {}
        if device not in self._local.scratch:
            self._local.scratch[device] = (self._buffer(device), torch.Generator(device=device))
        return self._local.scratch[device]

    def _buffer(self, device) -> torch.Tensor:
        with torch.inference_mode(False):  # the pool's threads write it outside the caller's inference mode
            return torch.empty(UNIT if self.numel <= UNIT else CHUNK, dtype=torch.float32, device=device)

    def chunk(self, key: tuple, index: int, out: torch.Tensor = None) -> torch.Tensor:
        """Chunk `index` of direction key = (base, step) before the sphere's scaling, in `out` or this
        thread's scratch (float32)."""
        (base, step), (units, per) = key, self.layout
        buffer, gen = self._scratch(self.chunk_devices[index])
        buffer = buffer if out is None else out
        if self.numel <= UNIT:  # a small model: the whole unit its step shares with others, then its slice
            gen.manual_seed(mix(base, step // per))
            offset = (step % per) * self.numel
            return fill(buffer[: per * self.numel], self.law, gen)[offset:offset + self.numel]
        gen.manual_seed(mix(base, step * units + index))
        return fill(buffer[: self.chunks[index][-1][3]], self.law, gen)

    def scale(self, key: tuple) -> float:
        """The factor that turns the drawn numbers into z(key): 1, or √d/‖g‖ for the sphere."""
        if self.law != "sphere":
            return 1.0
        if key not in self._scales:
            if len(self._scales) > 64:
                self._scales.clear()
            square = sum(self.map_chunks(lambda i: float(self.chunk(key, i).double().square().sum())))
            self._scales[key] = sphere_scale(square, self.numel)
        return self._scales[key]

    def map_chunks(self, fn, indices=None) -> list:
        """fn(chunk index) for every chunk (or those in `indices`), on all CPU threads; the results in order."""
        indices = range(len(self.chunks)) if indices is None else indices
        if self._pool is None:
            return [fn(i) for i in indices]
        return list(self._pool.map(fn, indices))

    @torch.no_grad()
    def add(self, terms):
        """params += Σ scale · z(key) for (key, scale) in terms, in one pass; half-precision parameters
        take the sum in float32 and are rounded once."""
        terms = [(k, float(a) * self.scale(k)) for k, a in terms]

        def add_chunk(index):
            targets = self.param_views[index]
            exact = work_dtype(targets[0].dtype) == targets[0].dtype
            sums = targets if exact else [t.float() for t in targets]
            for key, alpha in terms:
                z = self.chunk(key, index)
                torch._foreach_add_(sums, self.pieces(z, index, targets), alpha=alpha)
            if not exact:
                copy_into(targets, sums)

        self.map_chunks(add_chunk)

    # -- evaluating at a perturbed point without writing it

    @contextlib.contextmanager
    def perturbed(self, terms):
        """Inside, `module`'s forward sees params + Σ scale · z(key) (rounded once to their dtype);
        the stored parameters are never written."""
        if not self.owners:
            raise RuntimeError("ParameterDirections.perturbed needs the module that uses the parameters")
        self._terms = [(k, float(a) * self.scale(k)) for k, a in terms]
        handles = []
        for module, own in self.owners:
            if is_lookup(module, own):  # only the rows looked up are perturbed: no table-sized scratch
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
            self._terms, self._drawn = None, {}

    def _swap_in(self, own, module, *_):
        for name, index in own:
            module._parameters[name] = self._perturbed(index)

    def _swap_out(self, own, module, *_):
        for name, index in own:
            module._parameters[name] = self.params[index]

    @torch.no_grad()
    def _perturbed(self, index: int) -> torch.Tensor:
        p = self.params[index]
        stored = p.detach().view(-1)
        x = torch.empty(p.numel(), dtype=work_dtype(p.dtype), device=p.device)
        for chunk, start, offset, stop in self.pieces_of[index]:
            into, source = x[start:start + stop - offset], stored[start:start + stop - offset]
            for k, (key, alpha) in enumerate(self._terms):
                z = self._drawn_chunk(key, chunk)[offset:stop].to(p.device)
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
            for key, alpha in self._terms:
                z = self._drawn_chunk(key, chunk)[offset:stop].to(p.device, out.dtype)
                out.index_add_(0, whole, z[rows][inverse], alpha=alpha)
                for r, at in cut:
                    lo, hi = max(start, r * width), min(end, (r + 1) * width)
                    out[at, lo - r * width:hi - r * width] += alpha * z[lo - start:hi - start]
        return out.to(output.dtype).view_as(output)

    def _drawn_chunk(self, key: tuple, index: int) -> torch.Tensor:
        """Chunk `index` of z(key), drawn with the next workers - 1 chunks on the pool's threads (the forward
        goes through the parameters in about their order) and kept while the forward uses them."""
        if (key, index) not in self._drawn:
            wanted = range(index, min(index + self.workers, len(self.chunks)))
            free = [buffer for _, buffer in self._drawn.values()]
            free += [self._buffer(self.chunk_devices[i]) for i in wanted[len(free):]]
            drawn = self.map_chunks(lambda i: self.chunk(key, i, free[i - index]), wanted)
            self._drawn = {(key, i): (z, free[i - index]) for i, z in zip(wanted, drawn)}
        return self._drawn[(key, index)][0]

    @torch.no_grad()
    def dot(self, key: tuple, tensors) -> float:
        """z(key)ᵀ t for t shaped like the parameters, in float64 (dd's uᵀ∇f)."""
        def chunk_dot(index):
            targets = self.views(tensors, index)
            return sum(float(torch.dot(z.double(), t.double())) for t, z in zip(targets, self.pieces(
                self.chunk(key, index), index, targets)))
        return sum(self.map_chunks(chunk_dot)) * self.scale(key)

    def draw(self, key: tuple, dtype=None) -> list:
        """z(key) materialised, shaped like the parameters (forward-gradient tangents, tests)."""
        out = [torch.zeros_like(p, dtype=dtype or p.dtype) for p in self.params]
        scale = self.scale(key)
        for index in range(len(self.chunks)):
            targets = self.views(out, index)
            for t, z in zip(targets, self.pieces(self.chunk(key, index), index, targets)):
                t.copy_(z).mul_(scale)  # scaled in the output's dtype, as the batched draw
        return out


def copy_into(targets, values):
    """targets[i] ← values[i] (rounding to the targets' dtype), in one fused call where they share a device."""
    if len({t.device for t in targets}) == 1:
        torch._foreach_copy_(targets, values)
    else:
        for t, v in zip(targets, values):
            t.copy_(v)


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
