"""Zeroth-order steps for models too large to copy: parameters are perturbed in place.

A direction z ~ N(0, I) over all trainable parameters is never stored. It is a function of a
64-bit seed: the parameters, taken in order as one vector, are cut into fixed chunks of CHUNK
elements, and chunk c of direction `seed` is drawn from a generator seeded with mix(seed, c). So
z can be regenerated chunk by chunk, in any order and on several threads, and `add(terms)`
computes params += Σ scale·z(seed) in one pass over the parameters with one chunk of scratch
memory per thread. A chunk spans many small tensors (biases, norms), so one draw and one fused
multi-tensor add serve them all: on a GPU the pass costs a few kernel launches per chunk, not
per tensor.

A two-point step makes three passes (MeZO makes four): +λz, evaluate f+; -2λz, evaluate f-;
then restore and update together, +(λ - lr·c)z with c = (f+ - f-)/(2λ). Replaying the same
passes from the logged (seed, c) pairs gives bit-identical parameters (`in_place_step`).
"""

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from zoflat_cli.estimators import tilted_coefficients

CHUNK = 1 << 21  # elements per chunk: 8 MiB of float32 scratch per thread
_MASK64 = (1 << 64) - 1


def mix(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): a well-spread 63-bit generator seed per chunk."""
    z = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


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


class Directions:
    """Seeded Gaussian directions over a fixed list of parameter tensors."""

    def __init__(self, params):
        self.params = [p for p in params]
        device = self.params[0].device
        self.device = device
        # chunk = [(parameter slice, start, stop in the chunk)]: the same cut for every seed
        self.chunks, pieces, filled = [], [], 0
        for p in self.params:
            flat = p.detach().view(-1)
            start = 0
            while start < flat.numel():
                take = min(CHUNK - filled, flat.numel() - start)
                pieces.append((flat[start:start + take], filled, filled + take))
                start, filled = start + take, filled + take
                if filled == CHUNK:
                    self.chunks.append(pieces)
                    pieces, filled = [], 0
        if pieces:
            self.chunks.append(pieces)
        # CPU: threads share the chunks (torch releases the GIL while it draws); CUDA: one stream
        self.workers = torch.get_num_threads() if device.type == "cpu" else 1
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        self._local = threading.local()

    def _scratch(self):
        if not hasattr(self._local, "buffer"):
            self._local.buffer = torch.empty(CHUNK, dtype=torch.float32, device=self.device)
            self._local.generator = torch.Generator(device=self.device)
        return self._local.buffer, self._local.generator

    def _add_chunk(self, index: int, terms):
        pieces = self.chunks[index]
        buffer, gen = self._scratch()
        z = buffer[: pieces[-1][2]]
        targets = [target for target, _, _ in pieces]
        for seed, scale in terms:
            gen.manual_seed(mix(seed, index))
            z.normal_(generator=gen)
            parts = [z[start:stop].to(target.dtype) for target, start, stop in pieces]  # .to: a no-op when equal
            torch._foreach_add_(targets, parts, alpha=scale)

    @torch.no_grad()
    def add(self, terms):
        """params += Σ scale · z(seed) for (seed, scale) in terms, in one pass."""
        terms = [(int(s), float(a)) for s, a in terms]
        if self._pool is None:
            for i in range(len(self.chunks)):
                self._add_chunk(i, terms)
        else:
            list(self._pool.map(lambda i: self._add_chunk(i, terms), range(len(self.chunks))))

    def draw(self, seed: int) -> list:
        """z(seed) materialised, shaped like the parameters (tests and small models only)."""
        with preserved(self.params), torch.no_grad():
            for p in self.params:
                p.zero_()
            self.add([(seed, 1.0)])
            return [p.detach().clone() for p in self.params]


def two_point_coefficients(lam: float):
    """Plain ZO (n-SPSA): ĝ = Σ c_i z_i with c_i = (f_i⁺ - f_i⁻) / (2λn)."""
    def coefficients(f_plus, f_minus):
        return [(p - m) / (2 * lam * len(f_plus)) for p, m in zip(f_plus, f_minus)]
    return coefficients


def tilted_coefficients_for(lam: float, tilt: float):
    """ZEST: the tilted weights of estimators.tilted_coefficients, on python floats (float64)."""
    def coefficients(f_plus, f_minus):
        losses = torch.tensor([f_plus, f_minus], dtype=torch.float64)
        return tilted_coefficients(losses, lam, torch.tensor(tilt, dtype=torch.float64)).tolist()
    return coefficients


def in_place_step(directions: Directions, loss, seeds, lam: float, lr: float, coefficients, coefs=None) -> list:
    """One step over n = len(seeds) directions: for each, +λz, f⁺; -2λz, f⁻; +λz (restore), where
    the last restore is fused with the update params -= lr Σ c_i z_i; so 3n passes (n = 1: 3).
    `coefficients(f⁺ list, f⁻ list) -> c list` is the estimator. With `coefs` given (a replay),
    no loss is evaluated and the same passes are made: the parameters come out bit-identical."""
    f_plus, f_minus = [], []
    for i, seed in enumerate(seeds):
        directions.add([(seed, lam)])
        if coefs is None:
            f_plus.append(loss())
        directions.add([(seed, -2 * lam)])
        if coefs is None:
            f_minus.append(loss())
        if i < len(seeds) - 1:
            directions.add([(seed, lam)])
    if coefs is None:
        coefs = coefficients(f_plus, f_minus)
    *others, last = list(zip(seeds, coefs))
    directions.add([(last[0], lam - lr * last[1])] + [(s, -lr * c) for s, c in others])
    return coefs
