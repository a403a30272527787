"""LIBSVM data: bundled files, parsing errors, re-splits, download (local server), cache, import."""

import functools
import http.server
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from zoflat_cli.data import libsvm_sets as datasets
from zoflat_cli.cli import app
from zoflat_cli.errors import ZoflatError

TINY_TRAIN = b"+1 1:1 3:0.5\n-1 2:1\n-1 1:1 4:2\n"
TINY_TEST = b"-1 3:1\n+1 1:1 2:1\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOFLAT_DATA", str(tmp_path / "cache"))
    monkeypatch.setitem(datasets.REGISTRY, "t1a", datasets.LibsvmSet("t1a", 4, 3, 2))
    return tmp_path / "cache"


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A LIBSVM look-alike on 127.0.0.1 serving tmp_path/site."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(datasets, "LIBSVM_URL", f"http://127.0.0.1:{httpd.server_address[1]}")
    yield site
    httpd.shutdown()


@pytest.mark.parametrize("name, rows, features, positives", [("a8a", 22_696, 123, 5_506), ("w8a", 49_749, 300, 1_479)])
def test_bundled_training_files_have_the_documented_counts(name, rows, features, positives):
    split = datasets.load_registered(name, "train")
    assert split.X.shape == (rows, features)
    assert set(np.unique(split.y)) == {-1.0, 1.0} and int((split.y > 0).sum()) == positives


def test_resplit_reproduces_w5a_sizes_and_follows_its_seed():
    pool = datasets.load_registered("w8a", "train")
    train, test = datasets.resplit(pool, 9_888, 0, "w8a")
    assert (train.X.shape[0], test.X.shape[0]) == (9_888, 39_861)
    again, _ = datasets.resplit(pool, 9_888, 0, "w8a")
    other, _ = datasets.resplit(pool, 9_888, 1, "w8a")
    assert (train.X != again.X).nnz == 0 and (train.X != other.X).nnz > 0
    with pytest.raises(ZoflatError, match="between 1 and"):
        datasets.resplit(pool, 49_749, 0, "w8a")


@pytest.mark.parametrize("content, message", [
    (b"+1 1:1\n-1 2:1\n+1 3:x\n", "line 3"),
    (b"+1 1:1\n-1 2\n", "line 2"),
    (b"+1 1:1\n-1 0:1\n", "line 2"),
    (b"+1 1:1\n-1 9:1\n", "beyond the 4 features"),
    (b"+1 1:1\n-1 2:1\n2 3:1\n", "exactly two labels"),
    (b"", "no rows"),
])
def test_bad_files_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.svm"
    path.write_bytes(content)
    with pytest.raises(ZoflatError, match=message):
        datasets.load_file(path, n_features=4)


def test_unknown_names_get_suggestions():
    with pytest.raises(ZoflatError, match="did you mean w5a"):
        datasets.lookup("w5b")


def test_download_verifies_and_caches(cache, server):
    (server / "t1a.t").write_bytes(TINY_TEST)
    test = datasets.load_registered("t1a", "test")
    assert test.X.shape == (2, 4) and list(test.y) == [-1.0, 1.0]
    assert (cache / "libsvm" / "t1a.t").read_bytes() == TINY_TEST
    (server / "t1a.t").unlink()  # now served from the cache
    assert datasets.load_registered("t1a", "test").X.shape == (2, 4)
    assert datasets.availability("t1a", "test") == "cached"


def test_a_download_of_the_wrong_size_is_not_cached(cache, server):
    (server / "t1a").write_bytes(TINY_TEST)  # 2 rows where the registry says 3
    with pytest.raises(ZoflatError, match="2 rows, but t1a train has 3"):
        datasets.load_registered("t1a", "train")
    assert not (cache / "libsvm").exists() or not list((cache / "libsvm").iterdir())


def test_offline_failure_says_how_to_import(cache, monkeypatch):
    monkeypatch.setattr(datasets, "LIBSVM_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ZoflatError, match="zoflat data import FILE --name t1a --split train") as err:
        datasets.load_registered("t1a", "train")
    assert "\n" not in str(err.value)


def test_import_round_trip_through_the_cli(cache, tmp_path):
    source = tmp_path / "downloaded"
    source.write_bytes(TINY_TRAIN)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "import", str(source), "--name", "t1a"])
    assert result.exit_code == 0, result.output
    assert datasets.load_registered("t1a", "train").X.shape == (3, 4)
    listing = runner.invoke(app, ["data", "list"], env={"COLUMNS": "200"})
    assert "t1a" in listing.output and "cached" in listing.output and "bundled" in listing.output
    wrong = runner.invoke(app, ["data", "import", str(source), "--name", "t1a", "--split", "test"])
    assert wrong.exit_code == 2 and "3 rows, but t1a test has 2" in wrong.output


def test_own_files_and_their_test_file(tmp_path):
    train, test = tmp_path / "train.svm", tmp_path / "test.svm"
    train.write_bytes(TINY_TRAIN)
    test.write_bytes(b"-1 3:1\n+1 1:1 6:1\n")  # names a higher feature index than the training file
    config = {"data_file": str(train), "test_file": str(test), "train_size": None, "dataset": None, "split_seed": 0}
    tr, te, description = datasets.load_splits(**config)
    assert tr.X.shape[1] == te.X.shape[1] == 6 and "3 train / 2 test" in description
    with pytest.raises(ZoflatError, match="exactly one of --test-file and --train-size"):
        datasets.load_splits(**{**config, "train_size": 2})
