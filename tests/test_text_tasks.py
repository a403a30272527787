"""LM-BFF K-shot splits: byte-equal to published splits, and the protocol checked by hand."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from zoflat_cli.cli import app
from zoflat_cli.errors import ZoflatError
from zoflat_cli.data.lmbff_tasks import TASKS, kshot, read_original

REFERENCE = Path(__file__).parent / "data" / "kshot-reference"
runner = CliRunner()


@pytest.mark.parametrize("task, folder, seed, files", [
    ("trec", "trec", 13, ("train.csv", "dev.csv")),
    ("trec", "trec", 42, ("train.csv", "dev.csv")),
    ("sst5", "sst-5", 13, ("train.csv", "dev.csv")),
    ("sst5", "sst-5", 42, ("train.csv", "dev.csv")),
    ("sst2", "SST-2", 0, ("train.tsv",)),
])
def test_kshot_cli_matches_published_splits_byte_for_byte(tmp_path, task, folder, seed, files):
    result = runner.invoke(app, ["data", "kshot", "--task", task, "--k", "16", "--seed", str(seed),
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = tmp_path / folder / f"16-{seed}"
    for name in files:
        assert (written / name).read_bytes() == (REFERENCE / folder / f"16-{seed}" / name).read_bytes()


def _write_csv_task(root: Path, labels, n_test=0):
    folder = root / "trec"
    folder.mkdir(parents=True)
    pd.DataFrame([[y, f"row {i}, with a comma"] for i, y in enumerate(labels)]).to_csv(
        folder / "train.csv", header=False, index=False)
    pd.DataFrame([[i % 6, f"test {i}"] for i in range(n_test)]).to_csv(folder / "test.csv", header=False, index=False)


def test_kshot_protocol_by_hand(tmp_path):
    labels = [5, 3, 5, 3, 5, 3, 5, 3, 3, 5]
    _write_csv_task(tmp_path, labels, n_test=4)
    train, dev, test = kshot(TASKS["trec"], 2, 7, tmp_path)
    # the hand computation: numpy's legacy RNG seeded with 7 shuffles the row order
    np.random.seed(7)
    order = list(range(len(labels)))
    np.random.shuffle(order)
    first = labels[order[0]]
    groups = {first: [i for i in order if labels[i] == first], 8 - first: [i for i in order if labels[i] != first]}
    expect_train = [i for members in groups.values() for i in members[:2]]
    expect_dev = [i for members in groups.values() for i in members[2:4]]
    assert [int(s.split()[1].rstrip(",")) for s, _ in train.examples()] == expect_train
    assert [int(s.split()[1].rstrip(",")) for s, _ in dev.examples()] == expect_dev
    assert [y for _, y in train.examples()] == [labels[i] for i in expect_train]
    assert len(test.rows) == 4  # small test sets are kept whole


def test_kshot_1k_test_mode_samples_like_pandas(tmp_path):
    _write_csv_task(tmp_path, [0, 1] * 4, n_test=1500)
    _, _, cut = kshot(TASKS["trec"], 2, 13, tmp_path, "1k")
    _, _, full = kshot(TASKS["trec"], 2, 13, tmp_path, "full")
    assert len(full.rows) == 1500
    expected = pd.read_csv(tmp_path / "trec" / "test.csv", header=None, dtype=str).sample(n=1000, random_state=42)
    assert cut.rows == expected.values.tolist()


def test_kshot_glue_keeps_header_and_uses_dev_as_test(tmp_path):
    train, dev, test = kshot(TASKS["sst2"], 4, 13)
    assert train.header == ["sentence\tlabel\n"]
    assert [y for _, y in train.examples()].count(0) == 4 and len(dev.rows) == 8
    assert len(test.rows) == 872  # the GLUE dev file: under 1,000 rows, kept whole
    path = tmp_path / "train.tsv"
    train.write(path)
    assert path.read_text().startswith("sentence\tlabel\n") and len(path.read_text().splitlines()) == 9


def test_kshot_errors(tmp_path):
    with pytest.raises(ZoflatError, match="label 2 has 86 training rows"):
        kshot(TASKS["trec"], 50, 13)  # ABBR has 86 rows: 2K = 100 is too many
    with pytest.raises(ZoflatError, match="is not a directory"):
        kshot(TASKS["trec"], 4, 13, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZoflatError, match="LM-BFF layout"):
        read_original(TASKS["trec"], tmp_path / "empty")
    result = runner.invoke(app, ["data", "kshot", "--task", "mnli", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown task 'mnli'" in result.output
