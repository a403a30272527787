"""Chunked passes over a model's parameters: a direction z(key) regenerated chunk by chunk (the
numbers of directions.py), never stored, and the passes that use it: the update x += Σ aᵢzᵢ
(rounded once into the stored dtype), zᵀt, and z materialised for tests and forward-mode AD.
Evaluating the model at x + Σ aᵢzᵢ without writing it is probes.py's."""

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from zoflat_cli.optim import directions as laws  # laws.UNIT and laws.CHUNK read at use (tests shrink them)
from zoflat_cli.optim.directions import check_law, fill, layout, sphere_scale, work_dtype
from zoflat_cli.optim.presets import STRUCTURED
from zoflat_cli.optim.probes import ForwardProbes
from zoflat_cli.optim.structured import KeyFactors, Structure, matrix_view
from zoflat_cli.streams import mix


class ParameterDirections:
    """Directions over a model's parameter tensors, regenerated chunk by chunk, never stored.

    A direction's key is (base, step). `add(terms)` computes params += Σ scale·z(key) in one pass
    with one chunk of scratch per thread; `perturbed(terms)` evaluates `module` at that point
    without writing it (module: the nn.Module whose forward uses the parameters).
    A chunk spans many small tensors (biases, norms), so one draw and one fused multi-tensor add
    serve them all: on a GPU the pass costs a few kernel launches per chunk, not per tensor."""

    def __init__(self, params, law: str = "gaussian", module=None, rank: int = 1, period: int = 1, cache_mib: int = 0):
        self.params = list(params)
        self.law = check_law(law)
        # lowrank, subspace: each matrix's numbers assembled from its factors (structured.py), kept per key
        views = tuple(matrix_view(p.shape) for p in self.params)
        self.factors = None if law not in STRUCTURED else KeyFactors(
            Structure(law, views, int(rank), int(period)), self.params[0].device)
        # optional: (chunk index, start, stop) -> the factors d of u = d ⊙ z over those positions of the chunk
        # (a mask, a preconditioner), in the work dtype; the probes and add() apply it, set by the optimizer
        # (inplace.py)
        self.multiplier = None
        self.device = self.params[0].device
        self.numel = sum(p.numel() for p in self.params)
        # chunk = [(parameter index, start in the parameter, start, stop in the chunk)]: one cut for every
        # key; a small model is one chunk (its direction is a slice of a shared unit)
        size = laws.CHUNK if self.numel > laws.UNIT else self.numel
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
        # The step's cache: the first `keep` chunks of one direction (cache_mib MiB of float32 numbers), drawn
        # once for a step's probes (x + λz, x − λz: the same z) and its update pass instead of once for each
        # and, in a probe, for each micro-batch. Each kept chunk has its own buffer, reused by the next direction.
        self.keep = (cache_mib << 20) // (4 * (laws.CHUNK if self.numel > laws.UNIT else laws.UNIT))
        self._cache_key, self._cached, self._cache_buffers = None, {}, {}
        self.probes = None if module is None else ForwardProbes(self, module)

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
            return torch.empty(laws.UNIT if self.numel <= laws.UNIT else laws.CHUNK, dtype=torch.float32, device=device)

    def chunk(self, key: tuple, index: int, out: torch.Tensor = None) -> torch.Tensor:
        """Chunk `index` of direction key = (base, step) before the sphere's scaling, in `out` or this
        thread's scratch (float32)."""
        (base, step), (units, per) = key, self.layout
        buffer, gen = self._scratch(self.chunk_devices[index])
        buffer = buffer if out is None else out
        if self.factors is not None:
            for i, start, offset, stop in self.chunks[index]:
                buffer[offset:stop] = self.factors.numbers(key, i, start, start + stop - offset)
            return buffer[:self.chunks[index][-1][3]]
        if self.numel <= laws.UNIT:  # a small model: the whole unit its step shares with others, then its slice
            gen.manual_seed(mix(base, step // per))
            offset = (step % per) * self.numel
            return fill(buffer[: per * self.numel], self.law, gen)[offset:offset + self.numel]
        gen.manual_seed(mix(base, step * units + index))
        return fill(buffer[: self.chunks[index][-1][3]], self.law, gen)

    def cache_for(self, key: tuple):
        """Make the cache z(key)'s (before a pass draws from it: on the calling thread, not the pool's)."""
        if self.keep and key != self._cache_key:
            self._cache_key, self._cached = key, {}

    def drawn(self, key: tuple, index: int, out: torch.Tensor = None) -> torch.Tensor:
        """chunk(key, index, out), from the cache when it is z(key)'s and index < keep (drawn into it the
        first time). Callers only read it."""
        if key != self._cache_key or index >= self.keep:
            return self.chunk(key, index, out)
        if index not in self._cached:  # a pass draws each chunk on one thread
            if index not in self._cache_buffers:
                self._cache_buffers[index] = self._buffer(self.chunk_devices[index])
            self._cached[index] = self.chunk(key, index, self._cache_buffers[index])
        return self._cached[index]

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
            multiplier = None if self.multiplier is None else self.multiplier(  # of the weights before the move
                index, 0, self.chunks[index][-1][3])
            for key, alpha in terms:
                z = self.drawn(key, index)
                if multiplier is not None:
                    z = z.to(multiplier.dtype) * multiplier
                torch._foreach_add_(sums, self.pieces(z, index, targets), alpha=alpha)
            if not exact:
                copy_into(targets, sums)

        self.map_chunks(add_chunk)

    @contextlib.contextmanager
    def perturbed(self, terms, base=None):
        """Inside, `module`'s forward sees params (or `base`) + Σ scale · z(key) (rounded once to their
        dtype); the stored parameters are never written (probes.py)."""
        if self.probes is None:
            raise RuntimeError("ParameterDirections.perturbed needs the module that uses the parameters")
        with self.probes.perturbed([(k, float(a) * self.scale(k)) for k, a in terms], base):
            yield

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


def dot(a, b) -> float:
    """Σ aᵢ·bᵢ over lists of tensors, in float64."""
    return sum((x.double() * y.double()).sum().item() for x, y in zip(a, b))
