"""Tiny random models with tokenizers trained on the fly: offline stand-ins for the hub's models.
RoBERTa layouts serve the tests and benchmarks; the decoder layouts are also `--model tiny-gpt2 |
tiny-opt | tiny-llama`, built once into zoflat's cache."""

from pathlib import Path

import torch

from zoflat_cli.data import lmbff_tasks, mezo_tasks
from zoflat_cli.models.cache import cached_folder

LABEL_WORDS = ["terrible", "great", "bad", "okay", "good", "Description", "Entity", "Expression", "Human",
               "Location", "Number", "It was"]


def _corpus(n: int = 3000) -> list:
    sentences = [s for s, _ in lmbff_tasks.read_original(lmbff_tasks.TASKS["sst2"]).examples()[:n]]
    return sentences + [" " + " ".join(LABEL_WORDS)] * 200  # every " word" becomes one token


def train_tokenizer(folder: Path, vocab_size: int = 600):
    """A byte-level BPE (RoBERTa-style) tokenizer, trained on SST-2 sentences and saved."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=vocab_size, min_frequency=2, show_progress=False,
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


# ---------------------------------------------------------------- tiny random decoder LMs

CAUSAL_ARCHS = ("gpt2", "opt", "llama")
TINY_VERSION = 1  # bump when the builder changes: cached folders are named by it


def _causal_corpus() -> list:
    """SST-2 sentences and rendered prompts of the bundled decoder tasks (newlines, Yes/No, answers)."""
    texts = _corpus(1500)
    for name in ("rte", "copa", "boolq", "squad", "cb", "piqa"):
        task = mezo_tasks.TASKS[name]
        for example in mezo_tasks.examples(task, mezo_tasks.read_pool(task, "eval")[:150]):
            texts.append(example.demonstration())
    return texts


def train_causal_tokenizer(folder: Path, bos: bool, vocab_size: int = 1000):
    """A byte-level BPE with <s> </s> <pad> <unk>; `bos`: <s> is put before every text (OPT, LLaMA)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_causal_corpus(), vocab_size=vocab_size, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "</s>", "<pad>", "<unk>"])
    if bos:
        bpe._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(folder)
    return tok


def save_tiny_causal(folder: Path, arch: str = "gpt2", hidden: int = 32, layers: int = 2, positions: int = 512) -> str:
    """A random decoder LM of one of CAUSAL_ARCHS' layouts and its tokenizer, saved to folder."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig,
                              OPTForCausalLM)
    from transformers.utils import logging

    logging.set_verbosity_error()  # no warnings about the random weights
    torch.manual_seed(0)
    tok = train_causal_tokenizer(folder, bos=arch != "gpt2")
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_positions=positions, **ids))
    elif arch == "opt":
        model = OPTForCausalLM(OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                         ffn_dim=2 * hidden, max_position_embeddings=positions,
                                         word_embed_proj_dim=hidden, **ids))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                             num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=positions, tie_word_embeddings=False, **ids))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; one of {', '.join(CAUSAL_ARCHS)}")
    model.save_pretrained(folder)
    return str(folder)


def cached_tiny_causal(arch: str) -> Path:
    """--model tiny-<arch>: built once (seconds) into zoflat's cache, then reused."""
    return cached_folder(f"tiny-{arch}-v{TINY_VERSION}", lambda scratch: save_tiny_causal(scratch, arch))
