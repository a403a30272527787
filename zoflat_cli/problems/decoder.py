"""Decoder language models (any AutoModelForCausalLM: OPT, GPT-2, LLaMA, Qwen, Mistral, ...) on
MeZO's tasks (data/mezo_tasks.py).

Every example is a context and either options or a target answer:
  classification, choice  each option's score is the sum of its tokens' log-probabilities after the
                          context (`--scoring mean`: per token); the loss is the cross-entropy over
                          the options' scores (MeZO's "train as classification"); accuracy is the
                          argmax's. All options of a micro-batch's examples go in one forward pass.
  generation              the loss is the answer tokens' negative log-likelihood (teacher forcing),
                          per token of the split; evaluation decodes greedily up to a newline and
                          scores the answer by exact match and F1 (data/answers.py).
Texts are tokenized whole, as MeZO does: an option's tokens are the full text's beyond the
context's. A prompt longer than --max-length loses its beginning (the passage or the
demonstrations), never its answer. The LM head runs only on the positions that predict an
option or answer token, so memory does not grow with vocabulary × sequence.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from zoflat_cli.data.answers import SCORERS
from zoflat_cli.errors import ZoflatError, require
from zoflat_cli.models.loading import from_pretrained, quiet_transformers
from zoflat_cli.problems.pretrained import PretrainedProblem, at_least_float32, check_max_length

DEMO_SEPARATOR = "\n\n"  # MeZO's train_sep between in-context demonstrations


def is_causal(model_config) -> bool:
    """A decoder LM by its architectures (GPT2LMHeadModel, OPTForCausalLM, ...), else by its type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED

    archs = model_config.architectures or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return model_config.model_type in CAUSAL and model_config.model_type not in MASKED


class TokenScorer(torch.nn.Module):
    """Per row, the summed log-probability of the tokens marked in `target`, each predicted from
    the tokens before it; the LM head is applied to those positions only."""

    def __init__(self, lm, prefix=None):
        super().__init__()
        self.lm, self.prefix = lm, prefix  # prefix: peft's prefix-tuning model around lm (--trainable prefix)

    def forward(self, ids, mask, target):
        extra = {}
        if self.prefix is not None:  # the virtual tokens' keys and values come first, in every layer
            extra["cache"] = self.prefix.get_prompt(batch_size=len(ids))
            mask = torch.cat([mask.new_ones(len(ids), self.prefix.peft_config["default"].num_virtual_tokens), mask], 1)
        hidden = self.lm.base_model(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
        picked = target[:, 1:]  # position t predicts token t + 1
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][picked])
        logp = torch.log_softmax(at_least_float32(logits), -1)
        token_logp = logp.gather(1, ids[:, 1:][picked].unsqueeze(1)).squeeze(1)
        rows = torch.arange(len(ids), device=ids.device).unsqueeze(1).expand_as(picked)[picked]
        return torch.zeros(len(ids), dtype=token_logp.dtype, device=ids.device).index_add(0, rows, token_logp)


class Encoded(NamedTuple):
    rows: list  # [(token ids, number of option/answer tokens at the end)], one per option
    gold: int
    correct: tuple
    prompt: list  # generation: the context's ids, to decode from
    answers: tuple


class OptionBatch(NamedTuple):
    ids: torch.Tensor  # [rows, width], right-padded
    mask: torch.Tensor
    target: torch.Tensor  # bool [rows, width]: the option/answer tokens
    row_example: torch.Tensor  # [rows]: the example (in this batch) a row belongs to
    row_slot: torch.Tensor  # [rows]: its option index
    lengths: torch.Tensor  # [rows]: option tokens
    gold: torch.Tensor  # [examples]
    correct: torch.Tensor  # bool [examples, options]
    prompts: list  # generation: each example's context ids
    answers: list

    @property
    def examples(self) -> int:
        return len(self.gold)


class OptionBatches:
    """A split as micro-batches of whole examples (all their options), similar lengths together."""

    def __init__(self, encoded: list, pad_id: int, micro_batch: int, device, generation: bool):
        order = sorted(range(len(encoded)), key=lambda i: max(len(ids) for ids, _ in encoded[i].rows))
        self.size = len(encoded)
        # the loss is the mean over examples (options) or over answer tokens (generation)
        self.weight = sum(e.rows[0][1] for e in encoded) if generation else self.size
        self.batches = [self._batch([encoded[i] for i in order[s:s + micro_batch]], pad_id, device)
                        for s in range(0, len(order), micro_batch)]

    @staticmethod
    def _batch(group: list, pad_id: int, device) -> OptionBatch:
        rows = [(e, slot, ids, n) for e, ex in enumerate(group) for slot, (ids, n) in enumerate(ex.rows)]
        width = max(len(ids) for _, _, ids, _ in rows)
        ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (_, _, ids, n) in enumerate(rows):
            ids_t[r, :len(ids)] = torch.tensor(ids)
            mask[r, :len(ids)] = 1
            target[r, len(ids) - n:len(ids)] = True
        options = max(len(ex.rows) for ex in group)
        correct = torch.zeros((len(group), options), dtype=torch.bool)
        for e, ex in enumerate(group):
            correct[e, list(ex.correct)] = True
        tensors = (ids_t, mask, target, torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                   torch.tensor([float(r[3]) for r in rows]), torch.tensor([ex.gold for ex in group]), correct)
        return OptionBatch(*(t.to(device) for t in tensors), [ex.prompt for ex in group],
                           [ex.answers for ex in group])


class DecoderProblem(PretrainedProblem):
    """A decoder LM on a sampled task: losses, accuracy or F1, and the parameters to train."""

    references = {}

    def __init__(self, config, task, examples: dict, device, dtype, model_config, group=None):
        """config: finetune's typed config; examples: {split: [mezo_tasks.Example]} with splits
        train, test (the eval sample) and optionally dev; config.demos > 0 prefixes every prompt
        with that many training examples; group: the data-parallel process group (None: a single
        process)."""
        quiet_transformers()
        from transformers import AutoTokenizer

        self.task, self.metric_name = task, task.metric
        self.read_options(config, device, dtype, group)
        self.scoring = config.scoring
        self.generation = task.kind == "generation"
        self.max_new_tokens, self.micro_batch = config.max_new_tokens, config.micro_batch
        self.best = {"loss": "min", f"test_{task.metric}": "max"}
        positions = getattr(model_config, "max_position_embeddings", None) or 2048
        self.max_length = config.max_length or min(2048, positions)
        check_max_length(self.max_length, model_config, self.name)
        self.tokenizer = from_pretrained(AutoTokenizer, self.name)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.stop_ids = self._newline_ids() if self.generation else []
        self.load_base()
        demos = examples["train"][:config.demos]
        prefix = "".join(e.demonstration() + DEMO_SEPARATOR for e in demos)
        self.truncated, self.encoded, self.splits = {}, {}, {}
        for split, items in examples.items():
            if not items:
                continue
            encoded = [self._encode(e, prefix) for e in items]
            self.truncated[split] = sum(cut for _, cut in encoded)
            self.encoded[split] = [e for e, _ in encoded]
            self.splits[split] = self._batches(self.encoded[split])
        self.splits["batch"] = self.splits["train"]
        self.forward_passes = 0.0
        self.description = self.described(
            task=task.name, kind=task.kind, model=self.name, scoring=self.scoring, demos=len(demos),
            max_length=self.max_length, **{f"{s}_examples": b.size for s, b in self.splits.items() if s != "batch"},
            truncated_prompts=dict(self.truncated), train_pool=config.train_pool)

    def load_base(self):
        from transformers import AutoModelForCausalLM

        self.hf_model = self.load_pretrained(AutoModelForCausalLM)
        prefix = None
        if self.trainable == "prefix":
            peft = require("peft", "--trainable prefix")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the virtual tokens' initial values: the same in every run and on resume
                prefix = peft.get_peft_model(self.hf_model, peft.PrefixTuningConfig(
                    task_type="CAUSAL_LM", num_virtual_tokens=self.prefix_tokens))
        self.model = TokenScorer(self.hf_model, prefix)
        self.generator = prefix or self.hf_model  # peft's generate puts the prefix before the prompt
        self.track_parameters(self.hf_model.get_output_embeddings().parameters())

    # -- encoding

    def _ids(self, text: str) -> list:
        return self.tokenizer.encode(text)

    def _cut(self, ids: list, limit: int) -> tuple:
        """ids without their beginning (the first token kept if it is BOS) to fit limit; (ids, cut?)."""
        if len(ids) <= limit:
            return ids, False
        bos = self.tokenizer.bos_token_id
        keep = 1 if bos is not None and ids and ids[0] == bos else 0
        return ids[:keep] + ids[len(ids) - (limit - keep):], True

    def _encode(self, example, prefix: str) -> tuple:
        context = (prefix + example.context).strip(" ")
        context_ids = self._ids(context)
        answers = [example.target] if self.generation else list(example.options)
        rows, cut = [], False
        for answer in answers:
            ids = self._ids((context + answer).strip(" "))
            n = len(ids) - len(context_ids)
            if n < 1:
                raise ZoflatError(f"task {self.task.name}: option {answer!r} adds no tokens to its context")
            if n >= self.max_length - 1:
                raise ZoflatError(f"task {self.task.name}: an answer of {n} tokens does not fit --max-length "
                                  f"{self.max_length}; raise --max-length")
            ids, was_cut = self._cut(ids, self.max_length)
            rows.append((ids, n))
            cut |= was_cut
        prompt = []
        if self.generation:
            prompt, was_cut = self._cut(context_ids, max(1, self.max_length - self.max_new_tokens))
            cut |= was_cut
        return Encoded(rows, example.gold, example.correct, prompt, example.answers), cut

    def _batches(self, encoded):
        return OptionBatches(encoded, self.pad_id, self.micro_batch, self.device, self.generation)

    # -- losses and metrics

    def _inputs(self, batch):
        return batch.ids, batch.mask, batch.target

    def option_scores(self, scores, batch):
        """[examples, options] of option scores (-inf where an example has fewer options)."""
        if self.scoring == "mean":
            scores = scores / batch.lengths.to(scores.dtype)
        table = torch.full(batch.correct.shape, float("-inf"), dtype=scores.dtype, device=scores.device)
        return table.index_put((batch.row_example, batch.row_slot), scores)

    def _batch_loss(self, scores, batch):
        if self.generation:
            return -scores.sum()
        return F.cross_entropy(self.option_scores(scores, batch), batch.gold, reduction="sum")

    @torch.inference_mode()
    def evaluate(self, split: str, decode: bool = True) -> dict:
        """{loss, accuracy} (classification, choice) or {loss, f1, em} (generation; decode=False:
        the loss only) over a split."""
        total, correct = 0.0, 0
        for batch in self.my_batches(split):
            scores = self.model(*self._inputs(batch))
            total += float(self._batch_loss(scores, batch))
            if not self.generation:
                picked = self.option_scores(scores, batch).argmax(-1)
                correct += int(batch.correct[torch.arange(batch.examples, device=picked.device), picked].sum())
        total, correct = self.group.sum([total, correct])
        out = {"loss": total / self.splits[split].weight}
        if not self.generation:
            out["accuracy"] = correct / self.splits[split].size
        elif decode:
            out["em"], out["f1"] = self.answer_scores(split)
        return out

    def metric(self, split: str) -> float:
        if self.generation:  # F1 of the greedy answers: no teacher-forced pass needed
            return self.answer_scores(split)[1]
        return self.evaluate(split)["accuracy"]

    def answer_scores(self, split: str) -> tuple:
        """(exact match, F1) of greedy answers over a split, each the best over the references."""
        score = SCORERS[self.task.scorer]
        pairs = [score(prediction, answers) for prediction, answers in self.generate(split)]
        em, f1 = self.group.sum([sum(p[0] for p in pairs), sum(p[1] for p in pairs)])
        return em / self.splits[split].size, f1 / self.splits[split].size

    @torch.inference_mode()
    def generate(self, split: str) -> list:
        """[(greedy answer, references)]: decoding stops at a newline, the answer is the first line."""
        out = []
        for batch in self.my_batches(split):
            width = max(len(p) for p in batch.prompts)
            ids = torch.full((len(batch.prompts), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, prompt in enumerate(batch.prompts):  # left padding: every prompt ends where decoding starts
                ids[r, width - len(prompt):] = torch.tensor(prompt)
                mask[r, width - len(prompt):] = 1
            generated = self.generator.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False, num_beams=1,
                max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
            for row, answers in zip(generated[:, width:], batch.answers):
                text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
                out.append((text.split("\n")[0].strip(), answers))
        return out

    def _newline_ids(self) -> list:
        """Tokens that end an answer: EOS, and every token whose text holds a newline."""
        vocab = self.tokenizer.get_vocab().values()
        ids = [i for i in vocab if "\n" in self.tokenizer.decode([i])]
        return sorted(set(ids + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])))
