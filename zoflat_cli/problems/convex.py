"""Over-parameterised linear models on random features (paper Section 5, Figures 2 and 5).

Features, as in the paper's public code: standardise the raw features A (fitted on train),
map them with a Gaussian W in R^{d x D}, standardise the D random features again (fitted on
train) and prepend a bias: X = [1, (Z0 W - μ)/σ] with Z0 = (A - m)/s, D + 1 parameters.

X has rank <= d + 1, so it is never built (unless --dense): with G = W diag(1/σ) and μ̃ = μ/σ,
    X (b, v)  = b + A (q/s) - (m/s)·q - μ̃·v,          q = G v          O(nnz(A) + dD)
    Xᵀ r      = (1ᵀr, Gᵀ (Aᵀr / s - (m/s) 1ᵀr) - μ̃ 1ᵀr)                 O(nnz(A) + dD)
and ‖x_i‖² = 1 + z_i G Gᵀ z_iᵀ - 2 z_i G μ̃ + ‖μ̃‖², computed once per seed for the trace.
"""

import warnings

import numpy as np
import torch

from zoflat_cli.problems.names import CONVEX_MODELS
from zoflat_cli.streams import generator

CPU = torch.device("cpu")


# ---------------------------------------------------------------- models on margins t = y·(Xw)

def _svm(t):
    slack = torch.clamp(1 - t, min=0)
    return slack.square(), -2 * slack, 2 * (slack > 0).to(t.dtype)  # φ, φ', φ'' (a.e.)


def _logreg(t):
    p_wrong = torch.sigmoid(-t)
    return torch.nn.functional.softplus(-t), -p_wrong, p_wrong * (1 - p_wrong)


MODELS = dict(zip(CONVEX_MODELS, (_svm, _logreg)))  # logistic = cross-entropy on {0,1}


def _to_torch_csr(matrix, dtype, device):
    m = matrix.tocsr()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul is all we use
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(m.indptr), torch.from_numpy(m.indices),
                                       torch.from_numpy(m.data), size=m.shape, dtype=dtype, device=device,
                                       check_invariants=False)


class SparseMatmul(torch.autograd.Function):
    """A @ q for the constant sparse CSR A of a split, differentiable in q by forward mode
    (fwd-grad's torch.func.jvp) and reverse mode: torch's sparse matmul has no forward-mode rule.
    The split goes in as a plain object, since torch.func cannot wrap sparse tensors."""

    @staticmethod
    def forward(q, split):
        return split.A @ q

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.split = inputs[1]

    @staticmethod
    def jvp(ctx, q_dot, _):
        return ctx.split.A @ q_dot

    @staticmethod
    def backward(ctx, grad):
        return ctx.split.A_T @ grad, None


class Standardised:
    """A split's raw features A with the train mean m and scale s (zero-variance columns: s = 1)."""

    def __init__(self, split, mean, scale, dtype, device):
        self.A = _to_torch_csr(split.X, dtype, device)
        self.A_T = _to_torch_csr(split.X.T, dtype, device)
        self.y = torch.as_tensor(split.y, dtype=dtype, device=device)
        self.n = split.X.shape[0]
        self.inv_s = 1 / scale
        self.shift = mean / scale
        self._dense = None
        self._moments = None

    def dense(self) -> torch.Tensor:
        """Z0 = (A - m)/s as a dense (n, d) tensor (n x d is small: d is the raw feature count)."""
        if self._dense is None:
            self._dense = self.A.to_dense() * self.inv_s - self.shift
        return self._dense

    def moments(self):
        """Row mean and second-moment matrix Z0ᵀZ0/n of Z0, shared by every seed's features."""
        if self._moments is None:
            z = self.dense()
            self._moments = (z.mean(0), z.T @ z / self.n)
        return self._moments

    def matmul(self, q: torch.Tensor) -> torch.Tensor:
        """Z0 q for q (d, k): (n, k)."""
        return SparseMatmul.apply(q * self.inv_s[:, None], self) - self.shift @ q

    def rmatmul(self, r: torch.Tensor) -> torch.Tensor:
        """Z0ᵀ r for r (n, k): (d, k)."""
        return (self.A_T @ r) * self.inv_s[:, None] - self.shift[:, None] * r.sum(0)


class RandomFeatures:
    """The feature map of one seed, for train and test, factored (or dense when asked)."""

    def __init__(self, seed, n_features, train: Standardised, test: Standardised, dense: bool, dtype, device):
        gen = generator(seed, "features", CPU)
        W = torch.randn(train.inv_s.shape[0], n_features, generator=gen, dtype=torch.float64).to(dtype).to(device)
        mean_z, second_moment = train.moments()
        mu = mean_z @ W
        second = (second_moment @ W * W).sum(0)  # E_i[(z_i W)_j²] = W_jᵀ C W_j
        sigma = (second - mu.square()).clamp(min=0).sqrt()
        sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        self.G, self.mu = W / sigma, mu / sigma
        self.splits = {"train": train, "test": test}
        self.dense_X = {k: self._build_dense(k) for k in self.splits} if dense else None
        self.row_norms = {k: self._row_norms(k) for k in self.splits}
        self._root_gram = None

    def root_gram(self) -> tuple:
        """([1, Z0], S) with S = (Ĝ Ĝᵀ)^½ for X = [1, Z0] Ĝ, Ĝ = [[1, -μᵀ], [0, G]]: built once."""
        if self._root_gram is None:
            z = self.splits["train"].dense()
            d = self.G.shape[0]
            top = torch.cat((torch.ones(1, 1, dtype=self.G.dtype, device=self.G.device), -self.mu[None]), 1)
            rest = torch.cat((torch.zeros(d, 1, dtype=self.G.dtype, device=self.G.device), self.G), 1)
            g_hat = torch.cat((top, rest), 0)
            vals, vecs = torch.linalg.eigh(g_hat @ g_hat.T)
            self._root_gram = (torch.cat((torch.ones_like(z[:, :1]), z), 1),
                               (vecs * vals.clamp(min=0).sqrt()) @ vecs.T)
        return self._root_gram

    def lambda_max(self, curvature: torch.Tensor) -> torch.Tensor:
        """Top eigenvalue of the train Hessian (1/n) Xᵀ diag(c) X for each column c of curvature
        (n, k), without X: its nonzero eigenvalues are those of S C S with C = [1, Z0]ᵀ diag(c)
        [1, Z0] / n, a (d + 1)-square matrix (d = raw features)."""
        z1, root = self.root_gram()
        tops = []
        for c in curvature.T:
            small = root @ ((z1 * c[:, None]).T @ z1 / z1.shape[0]) @ root
            tops.append(torch.linalg.eigvalsh((small + small.T) / 2)[-1])
        return torch.stack(tops)

    def _build_dense(self, split: str) -> torch.Tensor:
        features = self.splits[split].dense() @ self.G - self.mu
        return torch.cat((torch.ones_like(features[:, :1]), features), dim=1)

    def _row_norms(self, split: str) -> torch.Tensor:
        """‖x_i‖² for every row: the Hessian trace is a weighted mean of these."""
        if self.dense_X is not None:
            return self.dense_X[split].square().sum(1)
        z = self.splits[split].dense()
        gram, pull = self.G @ self.G.T, self.G @ self.mu
        return 1 + ((z @ gram) * z).sum(1) - 2 * (z @ pull) + self.mu.square().sum()

    def margins_raw(self, w: torch.Tensor, split: str, q: torch.Tensor = None) -> torch.Tensor:
        """X w for w (k, D + 1): (n, k). q = G vᵀ may be passed in when already known."""
        if self.dense_X is not None:
            return self.dense_X[split] @ w.T
        b, v = w[:, 0], w[:, 1:]
        q = self.G @ v.T if q is None else q
        return self.splits[split].matmul(q) + b - v @ self.mu

    def backprop(self, r: torch.Tensor, split: str) -> torch.Tensor:
        """Xᵀ r for r (n, k): (k, D + 1)."""
        if self.dense_X is not None:
            return (self.dense_X[split].T @ r).T
        total = r.sum(0)
        v = self.G.T @ self.splits[split].rmatmul(r) - self.mu[:, None] * total
        return torch.cat((total[:, None], v.T), dim=1)


class ConvexProblem:
    """Squared-hinge SVM or logistic regression on random features, batched over runs (a
    BatchedProblem, protocols.py)."""

    best = {"loss": "min", "hessian_trace": "min", "test_accuracy": "max"}
    references = {}
    panels = None

    def __init__(self, train, test, model: str, n_features: int, dense: bool, dtype, device, data: str = "",
                 eig_every: int = 1000):
        self.description = {"data": data, "model": model, "train_rows": train.X.shape[0],
                            "test_rows": test.X.shape[0], "raw_features": train.X.shape[1],
                            "parameters": n_features + 1, "features": "dense" if dense else "factored"}
        X = train.X
        mean = np.asarray(X.mean(0)).ravel()
        scale = np.sqrt(np.asarray(X.multiply(X).mean(0)).ravel() - mean**2)
        scale = np.where(scale > 0, scale, 1.0)
        mean, scale = (torch.as_tensor(a, dtype=dtype, device=device) for a in (mean, scale))
        self.train = Standardised(train, mean, scale, dtype, device)
        self.test = Standardised(test, mean, scale, dtype, device)
        self.model, self.phi = model, MODELS[model]
        self.n_features, self.dense, self.dtype, self.device = n_features, dense, dtype, device
        self.n_params = n_features + 1
        self.blocks = {"bias": slice(0, 1), "weights": slice(1, n_features + 1)}
        self.eig_every = eig_every
        self._features = {}

    def features(self, seed: int) -> RandomFeatures:
        if seed not in self._features:
            self._features[seed] = RandomFeatures(seed, self.n_features, self.train, self.test,
                                                  self.dense, self.dtype, self.device)
        return self._features[seed]

    def memory_bytes(self, runs, itemsize: int) -> int:
        """About what training `runs` holds: the dense standardised rows and their moments, per
        seed the feature map (and the dense features when asked), per run w, its directions and
        rule state, and its margins on every row."""
        rows, raw = self.train.n + self.test.n, self.train.inv_s.shape[0]
        per_seed = 2 * raw * self.n_features + (rows * (self.n_features + 1) if self.dense else 0)
        per_run = sum((self.n_params) * (r.samples + 8) + 4 * rows for r in runs)
        return (rows * raw + 3 * (raw + 1) ** 2 + len({r.seed for r in runs}) * per_seed + per_run) * itemsize

    def init(self, gen: torch.Generator, dtype, device) -> torch.Tensor:
        """w = 0.1 · N(0, I), as in the paper's code."""
        return (0.1 * torch.randn(self.n_params, generator=gen, dtype=torch.float64)).to(dtype).to(device)

    def bind(self, runs) -> "BoundConvex":
        return BoundConvex(self, [r.seed for r in runs])


class BoundConvex:
    """The problem for one group of runs: row r of x uses the features of runs[r]'s seed."""

    theory = None  # no prediction to draw beside the curves

    @staticmethod
    def has_theory(run) -> bool:
        return False

    def __init__(self, problem: ConvexProblem, seeds):
        self.problem = problem
        self.by_seed = {}
        for row, seed in enumerate(seeds):
            self.by_seed.setdefault(seed, []).append(row)
        self.features = {seed: problem.features(seed) for seed in self.by_seed}

    def _per_seed(self, x: torch.Tensor, fn):
        """Apply fn(features, w (k, P)) -> (k, ...) to the rows of each seed; x is (..., runs, P)."""
        run_dim = x.dim() - 2
        result = None
        for seed, rows in self.by_seed.items():
            sub = x if len(self.by_seed) == 1 else x.index_select(run_dim, torch.tensor(rows, device=x.device))
            out = fn(self.features[seed], sub.reshape(-1, x.shape[-1]))
            out = out.reshape(*sub.shape[:-1], *out.shape[1:])
            if len(self.by_seed) == 1:
                return out
            if result is None:
                result = out.new_empty(*x.shape[:-1], *out.shape[run_dim + 1:])
            result.index_copy_(run_dim, torch.tensor(rows, device=x.device), out)
        return result

    def _stats(self, feats, w, split, q=None):
        data = getattr(self.problem, split)
        t = feats.margins_raw(w, split, q) * data.y[:, None]  # (n, k): label times margin
        return (t, data, *self.problem.phi(t))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        def fn(feats, w):
            _, _, phi, _, _ = self._stats(feats, w, "train")
            return phi.mean(0)
        return self._per_seed(x, fn)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        def fn(feats, w):
            _, data, _, dphi, _ = self._stats(feats, w, "train")
            return feats.backprop(dphi * data.y[:, None] / data.n, "train")
        return self._per_seed(x, fn)

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """∇²f(x) v = Xᵀ diag(φ''(yᵢ xᵢᵀw)) X v / n (y² = 1) for x (runs, P), v (runs, P, k)."""
        out = torch.empty_like(v)
        for seed, rows in self.by_seed.items():
            feats = self.features[seed]
            for r in rows:
                _, data, _, _, ddphi = self._stats(feats, x[r:r + 1], "train")
                margins = feats.margins_raw(v[r].T, "train")  # X v: (n, k)
                out[r] = feats.backprop(margins * ddphi / data.n, "train").T
        return out

    def metrics(self, x: torch.Tensor, step: int = None) -> dict:
        """Train and test loss, accuracy, exact Hessian trace; λ_max (at steps that are multiples
        of eig_every, NaN at the others: it costs about as much as 20 gradients) and ‖∇f‖."""
        names = ("loss", "accuracy", "hessian_trace")
        every = self.problem.eig_every
        want_eig = step is None or (every > 0 and step % every == 0)

        def fn(feats, w):
            q = None if feats.dense_X is not None else feats.G @ w[:, 1:].T  # shared by both splits
            values = []
            for split in ("train", "test"):
                t, data, phi, dphi, ddphi = self._stats(feats, w, split, q)
                correct = (t > 0) | ((t == 0) & (data.y[:, None] > 0))  # predict +1 where Xw >= 0
                trace = (ddphi * feats.row_norms[split][:, None]).mean(0)
                values += [phi.mean(0), correct.to(t.dtype).mean(0), trace]
                if split == "train":
                    grad = feats.backprop(dphi * data.y[:, None] / data.n, "train")
                    top = (feats.lambda_max(torch.nan_to_num(ddphi)) if want_eig
                           else torch.full_like(phi[0], float("nan")))
                    sharp = [top, torch.linalg.vector_norm(grad, dim=-1)]
            return torch.stack(values + sharp, dim=-1)

        values = self._per_seed(x, fn)
        columns = [*names, *(f"test_{n}" for n in names), "lambda_max", "grad_norm"]
        return {name: values[..., i] for i, name in enumerate(columns)}

