"""Tiny random RoBERTa models with a tokenizer trained on the fly: offline stand-ins for the
hub's models, used by the tests and the benchmarks (no downloads)."""

from pathlib import Path

import torch

LABEL_WORDS = ["terrible", "great", "bad", "okay", "good", "Description", "Entity", "Expression", "Human",
               "Location", "Number", "It was"]


def _corpus(n: int = 3000) -> list:
    from zoflat_cli.text_tasks import TASKS, read_original

    sentences = [s for s, _ in read_original(TASKS["sst2"]).examples()[:n]]
    return sentences + [" " + " ".join(LABEL_WORDS)] * 200  # every " word" becomes one token


def train_tokenizer(folder: Path, vocab_size: int = 600):
    """A byte-level BPE (RoBERTa-style) tokenizer, trained on SST-2 sentences and saved."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                               sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                               mask_token="<mask>")
    tok.save_pretrained(folder)
    return tok


def save_tiny_roberta(folder: Path, mlm_head: bool = True, hidden: int = 16, layers: int = 2,
                      vocab_size: int = 600) -> str:
    """A random RoBERTa (with or without its MLM head) and its tokenizer, saved to folder."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaModel

    torch.manual_seed(0)
    tok = train_tokenizer(folder, vocab_size)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(2, hidden // 64), intermediate_size=2 * hidden,
                        max_position_embeddings=140, pad_token_id=tok.pad_token_id)
    model = RobertaForMaskedLM(cfg) if mlm_head else RobertaModel(cfg, add_pooling_layer=False)
    model.save_pretrained(folder)
    return str(folder)


class BatchedAsModel:
    """A batched problem (toy, convex) bound to one run, seen as a model for the in-place path:
    one parameter vector x, loss() and gradient() at x, jvp(u) = uᵀ∇f by forward-mode AD. The
    tests drive both paths with it to show that they share one optimizer core."""

    def __init__(self, problem, x):
        self.problem = problem
        self.x = torch.nn.Parameter(x.detach().clone())
        self.params = [self.x]
        self.device = x.device

    def loss(self) -> float:
        with torch.no_grad():
            return float(self.problem.loss(self.x[None])[0])

    def gradient(self) -> list:
        with torch.no_grad():
            return [self.problem.grad(self.x.detach()[None])[0]]

    def jvp(self, tangents) -> float:
        return float(torch.func.jvp(lambda v: self.problem.loss(v[None])[0], (self.x.detach(),), (tangents[0],))[1])
