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

from typing import NamedTuple

import torch
import torch.nn.functional as F

from zoflat_cli.errors import ZoflatError
from zoflat_cli.models.loading import from_pretrained, quiet_transformers
from zoflat_cli.problems.pretrained import PretrainedProblem, at_least_float32, check_max_length
from zoflat_cli.data.lmbff_tasks import Task

ENCODER_MAX_LENGTH = 128  # --max-length's default for encoders
LINEAR_SCALE = 20.0  # cosine-similarity logit scale (sentence-transformers' usual 1/temperature)

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
    """A split as micro-batches of similar length, padded and on the device, built once; each
    batch is (ids, mask, mask position, label) with its number of `examples`."""

    def __init__(self, encoded, pad_id: int, micro_batch: int, device):
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        self.size = self.weight = len(encoded)  # the loss is the mean over examples
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
            y = torch.tensor([encoded[i][2] for i in rows])
            self.batches.append(Batch(*(t.to(device) for t in (ids, mask, mask_pos, y))))


class Batch(NamedTuple):
    ids: torch.Tensor
    mask: torch.Tensor
    mask_pos: torch.Tensor
    y: torch.Tensor

    @property
    def examples(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------- the problem

class EncoderProblem(PretrainedProblem):
    """An encoder + head on a K-shot split: losses, accuracies and the parameters to train."""

    best = {"loss": "min", "test_accuracy": "max"}
    references = {}
    metric_name = "accuracy"

    def __init__(self, config, task: Task, splits: dict, device, dtype, model_config=None, group=None):
        """config: finetune's typed config; splits: {split: [(sentence, label)]}; group: the
        data-parallel process group (None: a single process)."""
        quiet_transformers()
        from transformers import AutoConfig, AutoTokenizer

        self.read_options(config, device, dtype, group)
        self.task = task
        if self.trainable == "prefix":
            raise ZoflatError(f"--trainable prefix is for decoder LMs (MeZO's prefix tuning); for the encoder "
                              f"{self.name!r} use lora, bias, head or all")
        model_config = model_config or from_pretrained(AutoConfig, self.name)
        self.head = resolve_head(config.head, model_config, self.name)
        max_length = config.max_length or ENCODER_MAX_LENGTH
        check_max_length(max_length, model_config, self.name)
        self.tokenizer = from_pretrained(AutoTokenizer, self.name)
        self.label_ids = label_word_ids(task, self.tokenizer) if self.head == "prompt" else None
        self.load_base()
        self.micro_batch = config.micro_batch
        self.encoded, self.splits = {}, {}
        for split, rows in splits.items():
            self.encoded[split] = [(*self._encode(task, s, max_length), y) for s, y in rows]
            self.splits[split] = self._batches(self.encoded[split])
        self.splits["batch"] = self.splits["train"]
        self.forward_passes = 0.0  # over the training split, in full-batch units
        self.description = self.described(task=task.name, model=self.name, head=self.head,
                                          **{f"{s}_examples": b.size for s, b in self.splits.items()})

    def load_base(self):
        """(Re)load the pretrained weights and a fresh head: every run starts from here."""
        from transformers import AutoModel, AutoModelForMaskedLM

        if self.head == "prompt":
            mlm = self.load_pretrained(AutoModelForMaskedLM)
            self.model, self.hf_model = PromptClassifier(mlm, self.label_ids), mlm
        else:
            encoder = self.load_pretrained(AutoModel)
            self.model = LinearClassifier(encoder, self._label_embeddings(encoder, self.task))
            self.hf_model = encoder
        self.track_parameters(self.model.mlm_head.parameters() if self.head == "prompt" else [self.model.weight])

    def _encode(self, task, sentence, max_length):
        if self.head == "prompt":
            return encode_prompt(task, self.tokenizer, sentence, max_length)
        return self.tokenizer.encode(sentence, truncation=True, max_length=max_length), 0

    def _batches(self, encoded):
        return Batches(encoded, self.tokenizer.pad_token_id, self.micro_batch, self.device)

    def _label_embeddings(self, encoder, task):
        words = list(task.label_words)
        batch = self.tokenizer(words, padding=True, return_tensors="pt")
        probe = LinearClassifier(encoder, torch.zeros(len(words), encoder.config.hidden_size))
        with torch.no_grad():
            return probe.features(batch["input_ids"], batch["attention_mask"])

    def _inputs(self, batch):
        return batch.ids, batch.mask, batch.mask_pos

    def _batch_loss(self, logits, batch):
        return F.cross_entropy(at_least_float32(logits), batch.y, reduction="sum")

    @torch.inference_mode()
    def evaluate(self, split: str, decode: bool = True) -> dict:
        """{loss (the mean), accuracy} over a split (`decode`: for the causal problem's signature)."""
        total, correct = 0.0, 0
        for batch in self.my_batches(split):
            logits = at_least_float32(self.model(*self._inputs(batch)))
            total += float(self._batch_loss(logits, batch))
            correct += int((logits.argmax(-1) == batch.y).sum())
        total, correct = self.group.sum([total, correct])
        size = self.splits[split].size
        return {"loss": total / size, "accuracy": correct / size}

    def metric(self, split: str) -> float:
        return self.evaluate(split)["accuracy"]
