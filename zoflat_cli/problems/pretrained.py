"""Pretrained models as optimisation problems: the pieces every model problem shares (encoder.py:
encoders; decoder.py: decoder LMs); models/loading.py loads them.

A problem holds its splits as micro-batches (`self.splits[name].batches`, each `.weight` the
split's loss denominator) and says how a micro-batch enters the model (`_inputs`) and what its
summed loss is (`_batch_loss`); from those come the loss, its gradient, uᵀ∇f by forward-mode AD
and the Hessian-vector products. The model always runs in eval mode (no dropout), so the
full-batch loss is a deterministic function of the parameters, as the theory assumes.
`--objective` (ZO only) swaps the loss the optimizer sees for 1 − a metric of the batch; the
gradient, the Hessian trace and λ_max stay those of the cross-entropy.
"""

import contextlib

import torch

from zoflat_cli.devices import peak_memory_mib
from zoflat_cli.errors import ZoflatError, require
from zoflat_cli.measures.hessian import finite_difference, hutchinson, hvp, top_eigenvalue
from zoflat_cli.models.loading import from_pretrained
from zoflat_cli.optim.parameters import ParameterDirections, dot
from zoflat_cli.process_group import ProcessGroup
from zoflat_cli.runs.spec import due
from zoflat_cli.signals import StopRequested, stop_requested
from zoflat_cli.streams import generator, step_key

def check_max_length(max_length: int, model_config, name: str):
    """--max-length within the model's positions (RoBERTa's first two are its padding offset)."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is None:
        return
    offset = (getattr(model_config, "pad_token_id", None) or 1) + 1  # RoBERTa counts positions from pad + 1
    usable = positions - (offset if model_config.model_type in ("roberta", "xlm-roberta") else 0)
    if max_length > usable:
        raise ZoflatError(f"--max-length {max_length} is beyond the {usable} positions of {name!r}; give at most "
                          f"{usable}")


# ---------------------------------------------------------------- the shared problem


class PretrainedProblem:
    """What encoder and decoder problems share; subclasses set `model`, `hf_model`, `params`,
    `encoded` ({split: [example encodings]}) and `splits`, and define `_batches`, `_inputs`,
    `_batch_loss` and `metric`.

    --trainable picks the parameters the optimizer moves (and the Hessian trace, λ_max, directions,
    update logs and checkpoints cover): all; lora (peft's LoRA adapters on peft's default target
    modules, e.g. q_proj and v_proj, only those); prefix (peft's prefix tuning, decoder LMs); bias
    (BitFit); head (the output head's weights, tied ones included: for OPT or GPT-2 the LM head is
    the input embedding)."""

    truncated = {}  # {split: prompts cut to --max-length} (decoders say it before the run)
    doing = None  # what metrics() is computing now (None: not evaluating)

    @staticmethod
    def progress(text):
        """Hears what a logged step's evaluation is doing (`evaluating test 3/20`; None: done); the
        model runner points it at the live view."""

    def read_options(self, config, device, dtype, group):
        """config: finetune's typed config (experiments/finetune.py); group: the data-parallel
        process group (each rank takes its share of every split), None for a single process."""
        self.config, self.name, self.device, self.dtype = config, config.model, device, dtype
        self.group = group or ProcessGroup(device=device)
        self.objective, self.trainable, self.device_map = config.objective, config.trainable, config.device_map
        self.lora = {"r": config.lora_rank, "lora_alpha": config.lora_alpha}
        self.prefix_tokens = config.prefix_tokens
        # the paper's three panels, and the sharpness measures when λ_max is being computed
        sharpness = ["lambda_max", "grad_norm"] if config.eig_every else []
        self.panels = ["loss", f"test_{self.metric_name}", "hessian_trace", *sharpness]

    def described(self, **fields) -> dict:
        """summary.json's description of the problem: `fields`, then what is trained, and where."""
        return {**fields, "trainable": self.trainable, "parameters": self.n_params,
                "total_parameters": self.n_total, "processes": self.group.world}

    def load_pretrained(self, loader, **kwargs):
        if self.device_map:
            require("accelerate", f"--device-map {self.device_map}")
            kwargs["device_map"] = self.device_map
        model = from_pretrained(loader, self.name, dtype=self.dtype, **kwargs)
        if self.trainable == "lora":
            peft = require("peft", "--trainable lora")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the adapters' initial values: the same in every run and on resume
                try:
                    peft.inject_adapter_in_model(peft.LoraConfig(**self.lora), model)
                except ValueError as err:
                    raise ZoflatError(f"--trainable lora on {self.name!r}: {str(err).splitlines()[0]}") from None
        return model

    def track_parameters(self, head):
        """Mark the --trainable parameters (head: the output head's parameters) and keep them as `params`."""
        if not self.device_map:
            self.model.to(self.device)
        self.model.eval()
        heads = {id(p) for p in head}
        chosen = {"all": lambda n, p: True, "lora": lambda n, p: "lora_" in n,
                  "prefix": lambda n, p: "prompt_encoder" in n, "bias": lambda n, p: n.endswith("bias"),
                  "head": lambda n, p: id(p) in heads}[self.trainable]
        for n, p in self.model.named_parameters():
            p.requires_grad_(chosen(n, p))
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # shared weights once
        if not self.params:
            raise ZoflatError(f"--trainable {self.trainable} leaves no parameter of {self.name!r} to train")
        if any(p.device.type == "meta" for p in self.params):
            raise ZoflatError("--device-map offloaded some weights to disk or CPU hooks; in-place training needs "
                              "every trained weight resident on a device: add GPUs or use --trainable lora")
        self.n_params = sum(p.numel() for p in self.params)
        self.n_total = sum(p.numel() for p in self.model.parameters())

    @contextlib.contextmanager
    def double_backward(self):
        """Hessian-vector products need attention that is twice differentiable (eager)."""
        previous = self.hf_model.config._attn_implementation
        self.hf_model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.hf_model.set_attn_implementation(previous)

    def batch_fraction(self, batch_size: int) -> float:
        return min(batch_size, self.splits["train"].size) / self.splits["train"].size if batch_size else 1.0

    def draw_batch(self, batch_size: int, seed: int, step: int):
        """The "batch" split of a step: the whole training set, or batch_size examples drawn
        without replacement from the run's "batches" stream (a function of seed and step)."""
        n = self.splits["train"].size
        if not batch_size or batch_size >= n:
            return
        gen = generator(seed, "batches", torch.device("cpu"), step)  # the per-step key of streams.py
        picked = torch.randperm(n, generator=gen)[:batch_size].tolist()
        self.splits["batch"] = self._batches([self.encoded["train"][i] for i in picked])

    def _count(self, split: str, rows: int):
        if split in ("train", "batch"):  # forward passes over the training split, in full-batch units
            self.forward_passes += rows / self.splits["train"].size * self.group.counts_for

    def my_batches(self, split: str):
        """This rank's micro-batches of a split (all of them in a single process), counting the split's
        forward passes. While a step is evaluated (one process), each is announced to `progress`, and
        a stop request ends the evaluation here (StopRequested: it is discarded)."""
        for batch in self.splits[split].batches:
            self._count(split, batch.examples)
        mine = self.group.mine(self.splits[split].batches)
        for k, batch in enumerate(mine, 1):
            if self.doing and self.group.world == 1:
                if stop_requested():
                    raise StopRequested
                self.progress(f"{self.doing}: {split} {k}/{len(mine)}")
            yield batch

    def loss_terms(self, split: str = "train"):
        """Per micro-batch of this rank: its share of the split's loss (with autograd if enabled)."""
        for batch in self.my_batches(split):
            yield self._batch_loss(self.model(*self._inputs(batch)), batch) / self.splits[split].weight

    @torch.inference_mode()
    def cross_entropy(self, split: str = "batch") -> float:
        return self.group.sum([sum(float(term) for term in self.loss_terms(split))])[0]

    def loss(self, split: str = "batch") -> float:
        """What the optimizer minimises: the cross-entropy, or 1 − the --objective metric."""
        if self.objective == "loss":
            return self.cross_entropy(split)
        return 1.0 - self.metric(split)

    def gradient(self, split: str = "batch") -> list:
        """∇ of the split's loss, one tensor per parameter (zeros where one is unused)."""
        for p in self.params:
            p.grad = None
        for term in self.loss_terms(split):
            term.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        return self.group.sum_tensors(grads)

    def hvp(self, v) -> list:
        """∇²f · v of the training loss, by double backward (eager attention)."""
        with self.double_backward():
            return self.group.sum_tensors(hvp(self.params, lambda: self.loss_terms("train"), v))

    def jvp(self, tangents) -> float:
        """uᵀ∇f of the batch's loss by forward-mode AD (torch.func.jvp: one forward pass with
        dual numbers, no backward), for u given shaped like the parameters."""
        from torch.func import functional_call, jvp

        names = [n for n, p in self.model.named_parameters() if p.requires_grad]  # the order of self.params
        primals = tuple(p.detach() for p in self.params)
        split, total = self.splits["batch"], 0.0
        with self.double_backward():  # eager attention: forward-mode AD covers every op in it
            for batch in self.my_batches("batch"):
                def loss(*values):
                    output = functional_call(self.model, dict(zip(names, values)), self._inputs(batch))
                    return self._batch_loss(output, batch) / split.weight

                total += float(jvp(loss, primals, tuple(tangents))[1])
        return self.group.sum([total])[0]

    def state(self) -> dict:
        """The trained parameters by name (the frozen ones come from the pretrained weights)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_state(self, state: dict):
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if p.requires_grad:
                    p.copy_(state[n])

    # -- the metrics of a logged step

    def metrics(self, seed: int, step: int) -> dict:
        """Train loss (and accuracy); test and dev metrics (and ‖∇f‖ when λ_max is on) every
        --eval-every steps; λ_max every --eig-every steps; the Hessian trace every --trace-every
        steps; peak memory. What it is doing goes to `progress`; a stop request ends it (StopRequested)."""
        self.doing = f"step {step}: evaluating"
        try:
            return self._metrics(seed, step)
        finally:
            self.doing = None
            self.progress(None)

    def counted(self, what: str, total: int, function):
        """function, each call announced as `what k/total` (a trace's probes, λ_max's iterations)."""
        calls = iter(range(1, total + 1))

        def call(*args):
            self.doing = f"{what} {next(calls, total)}/{total}"
            return function(*args)
        return call

    def _metrics(self, seed: int, step: int) -> dict:
        cfg = self.config
        names = ("f1", "em") if self.metric_name == "f1" else ("accuracy",)
        train = self.evaluate("train", decode=False)
        row = {"loss": train["loss"], **({"accuracy": train["accuracy"]} if "accuracy" in train else {})}
        if self.objective != "loss":  # what the optimizer minimises
            row["objective"] = 1 - train["accuracy"] if "accuracy" in train else self.loss("train")
        evaluated = [s for s in ("test", "dev") if s in self.splits]
        for split in evaluated:
            row.update({f"{split}_loss": None, **{f"{split}_{n}": None for n in names}})
        row.update(hessian_trace=None, hessian_trace_stderr=None, lambda_max=None, grad_norm=None)
        if due(step, cfg.eval_every, cfg.steps):
            for split in evaluated:
                row.update({f"{split}_{k}": v for k, v in self.evaluate(split).items()})
            if cfg.eig_every:  # with λ_max, the sharpness measures: a backward pass over the training set
                grads = self.gradient("train")
                row["grad_norm"] = dot(grads, grads) ** 0.5
        if cfg.eig_every and due(step, cfg.eig_every, cfg.steps):
            gen = generator(seed, "probes", self.device, step, 1)  # not the trace probes
            hvp_ = self.counted(f"step {step}: λ_max, Hessian-vector product", cfg.eig_iters, self.hvp)
            row["lambda_max"] = top_eigenvalue(self.params, hvp_, cfg.eig_iters, gen)
        if cfg.trace != "none" and due(step, cfg.trace_every, cfg.steps):
            row["hessian_trace"], row["hessian_trace_stderr"] = self.trace(seed, step)
        row["peak_memory_mib"] = round(peak_memory_mib(self.device), 1)
        return row

    def trace(self, seed: int, step: int) -> tuple:
        """Tr ∇² of the training cross-entropy (whatever --objective the optimizer sees)."""
        cfg = self.config
        if cfg.trace == "fd":  # Gaussian probes, whatever law the run draws its directions from
            keys = [(step_key(seed, "probes", step, i), 0) for i in range(cfg.trace_probes)]
            directions = ParameterDirections(self.params, module=self.model, cache_mib=cfg.probe_cache)
            loss = self.counted(f"step {step}: Hessian trace (fd), loss", 2 * cfg.trace_probes + 1,
                                lambda: self.cross_entropy("train"))
            return finite_difference(directions, loss, keys, cfg.trace_delta)
        hvp_ = self.counted(f"step {step}: Hessian trace, probe", cfg.trace_probes, self.hvp)
        return hutchinson(self.params, hvp_, cfg.trace_probes, generator(seed, "probes", self.device, step))



def at_least_float32(logits):
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


