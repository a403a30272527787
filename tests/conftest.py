"""Shared fixtures: tiny random language models with a tokenizer trained on the fly (offline)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub

LABEL_WORDS = ["terrible", "great", "bad", "okay", "good", "Description", "Entity", "Expression", "Human",
               "Location", "Number", "It was"]


def _corpus(n=3000):
    from zoflat_cli.text_tasks import TASKS, read_original

    sentences = [s for s, _ in read_original(TASKS["sst2"]).examples()[:n]]
    return sentences + [" " + " ".join(LABEL_WORDS)] * 200  # every " word" becomes one token


def _tokenizer(folder):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=600, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                               sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                               mask_token="<mask>")
    tok.save_pretrained(folder)
    return tok


def _save_tiny(folder, model_class, **config):
    import torch
    from transformers import RobertaConfig

    torch.manual_seed(0)
    tok = _tokenizer(folder)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=140, pad_token_id=tok.pad_token_id,
                        **config)
    model_class(cfg).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_mlm(tmp_path_factory):
    """A tiny random RoBERTa with an MLM head (17k parameters)."""
    from transformers import RobertaForMaskedLM

    return _save_tiny(tmp_path_factory.mktemp("tiny-roberta-mlm"), RobertaForMaskedLM)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """The same without an MLM head (like MiniLM): needs --head linear."""
    from transformers import RobertaModel

    return _save_tiny(tmp_path_factory.mktemp("tiny-roberta-encoder"), RobertaModel, add_pooling_layer=False)
