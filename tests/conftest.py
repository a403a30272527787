"""Shared fixtures: tiny random language models with a tokenizer trained on the fly (offline)."""

import os
import resource

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub

# parametrize("device", DEVICES): the CPU always, CUDA where there is one (never in CI)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]


PEAK_LIMIT = 4 << 30  # the test process's peak resident memory (README: make test fits a 24 GiB machine beside others)
_PASSED_LIMIT = []  # the test during which it was passed


@pytest.fixture(autouse=True)
def memory_guard(request):
    """Fails the test during which this process's peak resident memory first passes PEAK_LIMIT; the
    session's peak is printed at the end (pytest_terminal_summary)."""
    yield
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if peak > PEAK_LIMIT and not _PASSED_LIMIT:
        _PASSED_LIMIT.append(request.node.nodeid)
        pytest.fail(f"the test process's peak resident memory reached {peak / 2**30:.2f} GiB here "
                    f"(limit {PEAK_LIMIT / 2**30:.0f} GiB)")


def pytest_terminal_summary(terminalreporter):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    terminalreporter.write_line(f"peak resident memory of the test process: {peak / 2**30:.2f} GiB")


@pytest.fixture
def float64():
    """Default dtype float64 for the test (statistical checks need the digits)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def tiny_mlm(tmp_path_factory):
    """A tiny random RoBERTa with an MLM head (17k parameters)."""
    from zoflat_cli.models.tiny import save_tiny_roberta

    return save_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta-mlm"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """The same without an MLM head (like MiniLM): needs --head linear."""
    from zoflat_cli.models.tiny import save_tiny_roberta

    return save_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta-encoder"), mlm_head=False)


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory):
    """tiny_causal(arch): a tiny random decoder LM (gpt2, opt or llama layout), built once per session."""
    from zoflat_cli.models.tiny import save_tiny_causal

    built = {}

    def get(arch: str = "gpt2") -> str:
        if arch not in built:
            built[arch] = save_tiny_causal(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return built[arch]
    return get
