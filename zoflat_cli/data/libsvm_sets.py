"""The LIBSVM binary data sets: registry, bundled files, cache, download, import, re-splits.

Files are svmlight text (labels +1/-1). Training files of a8a and w8a ship with zoflat
(xz-compressed, see zoflat_cli/data/libsvm/SOURCES.md); any other file is looked up in the cache
folder ($ZOFLAT_DATA, else $XDG_CACHE_HOME/zoflat or ~/.cache/zoflat), then downloaded from the
LIBSVM site, or imported by hand with `zoflat data import`.
"""

import difflib
import io
import lzma
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from zoflat_cli.env import cache_dir
from zoflat_cli.errors import ZoflatError

LIBSVM_URL = os.environ.get("ZOFLAT_LIBSVM_URL", "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary")
DOWNLOAD_TIMEOUT_S = 30
MAX_RAW_FEATURES = 1_000_000  # the random-features map holds a dense (rows x raw features) matrix
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")  # a plain file name: no separators


@dataclass(frozen=True)
class LibsvmSet:
    name: str
    n_features: int
    n_train: int
    n_test: int

    def file_name(self, split: str) -> str:
        return self.name if split == "train" else f"{self.name}.t"

    def rows(self, split: str) -> int:
        return self.n_train if split == "train" else self.n_test


# Sizes from the LIBSVM binary page (Platt's preprocessing). a1a-a8a split the 32,561 Adult
# training rows (= a9a); w1a-w7a split the 49,749 rows of w8a's training file.
REGISTRY = {
    s.name: s
    for s in [
        LibsvmSet("a1a", 123, 1_605, 30_956),
        LibsvmSet("a2a", 123, 2_265, 30_296),
        LibsvmSet("a3a", 123, 3_185, 29_376),
        LibsvmSet("a4a", 123, 4_781, 27_780),
        LibsvmSet("a5a", 123, 6_414, 26_147),
        LibsvmSet("a6a", 123, 11_220, 21_341),
        LibsvmSet("a7a", 123, 16_100, 16_461),
        LibsvmSet("a8a", 123, 22_696, 9_865),
        LibsvmSet("a9a", 123, 32_561, 16_281),
        LibsvmSet("w1a", 300, 2_477, 47_272),
        LibsvmSet("w2a", 300, 3_470, 46_279),
        LibsvmSet("w3a", 300, 4_912, 44_837),
        LibsvmSet("w4a", 300, 7_366, 42_383),
        LibsvmSet("w5a", 300, 9_888, 39_861),
        LibsvmSet("w6a", 300, 17_188, 32_561),
        LibsvmSet("w7a", 300, 24_692, 25_057),
        LibsvmSet("w8a", 300, 49_749, 14_951),
    ]
}
BUNDLED = {"a8a": "a8a.xz", "w8a": "w8a.xz"}  # training files only


@dataclass
class LabelledRows:
    """One split as a sparse matrix (scipy CSR, float64) and labels in {-1, +1}."""

    X: object
    y: np.ndarray
    source: str


def cached_path(name: str, split: str) -> Path:
    return cache_dir() / "libsvm" / (name if split == "train" else f"{name}.t")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ZoflatError(f"data set name {name!r}: use 1 to 100 letters, digits, '.', '_' and '-' (no path "
                          f"separators, not starting with '.')")
    return name


def imported(name: str) -> bool:
    """A name outside the registry whose training file was imported into the cache."""
    return name not in REGISTRY and NAME_PATTERN.match(name) is not None and cached_path(name, "train").is_file()


def imported_names() -> list:
    folder = cache_dir() / "libsvm"
    names = [p.name for p in folder.glob("*")] if folder.is_dir() else []
    return sorted(n for n in names if imported(n))


def lookup(name: str) -> LibsvmSet:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ZoflatError(f"unknown data set {name!r}{hint}; `zoflat data list` shows them, "
                          f"--data-file runs on any svmlight file")
    return REGISTRY[name]


# ---------------------------------------------------------------- parsing

def _first_bad_line(lines, source: str) -> str:
    """sklearn's parser says what but not where: find the first malformed line ourselves."""
    for number, line in enumerate(lines, start=1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        try:
            float(tokens[0])
            for token in tokens[1:]:
                index, value = token.split(":")
                if int(index) < 1:
                    raise ValueError
                float(value)
        except ValueError:
            return f"{source} line {number}: not svmlight (<label> <index>:<value> ...): {line.strip()[:60]!r}"
    return f"{source}: not a valid svmlight file"


def parse_svmlight(data: bytes, source: str, n_features: int = None) -> LabelledRows:
    from sklearn.datasets import load_svmlight_file  # seconds to import: only when a file is read

    try:
        X, y = load_svmlight_file(io.BytesIO(data), n_features=n_features, dtype=np.float64, zero_based=False)
    except ValueError as err:
        if "n_features" in str(err) or "larger than" in str(err):
            raise ZoflatError(f"{source}: a feature index is beyond the {n_features} features of this data set") from None
        raise ZoflatError(_first_bad_line(data.decode("utf-8", "replace").splitlines(), source)) from None
    if X.shape[0] == 0:
        raise ZoflatError(f"{source}: no rows")
    if X.shape[1] > MAX_RAW_FEATURES:
        raise ZoflatError(f"{source}: feature index {X.shape[1]:,} is beyond the {MAX_RAW_FEATURES:,} features "
                          f"zoflat handles (the random-features map stores rows x features densely)")
    if not (np.isfinite(X.data).all() and np.isfinite(y).all()):
        bad = int(np.flatnonzero(~np.isfinite(y))[0]) if not np.isfinite(y).all() else int(
            np.searchsorted(X.indptr, np.flatnonzero(~np.isfinite(X.data))[0], side="right") - 1)
        raise ZoflatError(f"{source}: row {bad + 1} holds a value that is not finite (nan or inf)")
    labels = np.unique(y)
    if len(labels) != 2:
        raise ZoflatError(f"{source}: needs exactly two labels (binary classification), found {len(labels)}: "
                          f"{', '.join(f'{v:g}' for v in labels[:5])}")
    return LabelledRows(X.tocsr(), np.where(y == labels[1], 1.0, -1.0), source)


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise ZoflatError(f"data file not found: {path}")
    opener = lzma.open if path.suffix == ".xz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (lzma.LZMAError, EOFError):
        raise ZoflatError(f"{path}: not a whole .xz file (truncated or not xz)") from None


def load_file(path, n_features: int = None) -> LabelledRows:
    return parse_svmlight(_read(Path(path)), str(path), n_features)


def _verify(split: LabelledRows, spec: LibsvmSet, which: str):
    expected = spec.rows(which)
    if split.X.shape[0] != expected:
        raise ZoflatError(f"{split.source}: {split.X.shape[0]} rows, but {spec.name} {which} has {expected}; "
                          f"is it the right file?")


# ---------------------------------------------------------------- registry sets

def download(spec: LibsvmSet, which: str) -> Path:
    url = f"{LIBSVM_URL}/{spec.file_name(which)}"
    target = cached_path(spec.name, which)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (TextColumn(f"{spec.file_name(which)}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, transient=True) as progress:
                task = progress.add_task("download", total=total)
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    progress.advance(task, len(chunk))
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        reason = getattr(err, "reason", err)
        raise ZoflatError(
            f"{spec.name} ({which}) is not cached and could not be downloaded from {url} ({reason}); "
            f"fetch that file elsewhere and run: zoflat data import FILE --name {spec.name} --split {which}"
        ) from None
    try:
        _verify(load_file(partial, spec.n_features), spec, which)
    except ZoflatError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return target


def load_registered(name: str, which: str) -> LabelledRows:
    """A registry set's split: bundled, else cached, else downloaded; verified either way."""
    if imported(name):
        path = cached_path(name, which)
        if not path.is_file():
            raise ZoflatError(f"{name} has no imported {which} file; import one (zoflat data import FILE --name "
                              f"{name} --split {which}) or re-split its training file with --train-size")
        return load_file(path)
    spec = lookup(name)
    if which == "train" and name in BUNDLED:
        data = lzma.decompress(resources.files("zoflat_cli.data").joinpath("libsvm", BUNDLED[name]).read_bytes())
        split = parse_svmlight(data, f"bundled {name}", spec.n_features)
    else:
        path = cached_path(name, which)
        split = load_file(path if path.is_file() else download(spec, which), spec.n_features)
    _verify(split, spec, which)
    return split


def import_file(path, name: str, which: str) -> Path:
    """Copy a local svmlight file into the cache as `name` (verified against the registry)."""
    spec = REGISTRY.get(check_name(name))
    split = load_file(path, spec.n_features if spec else None)
    if spec:
        _verify(split, spec, which)
    target = cached_path(name, which)
    target.parent.mkdir(parents=True, exist_ok=True)
    if Path(path).suffix == ".xz":
        target.write_bytes(_read(Path(path)))
    else:
        shutil.copyfile(path, target)
    return target


def availability(name: str, which: str) -> str:
    if which == "train" and name in BUNDLED:
        return "bundled"
    return "cached" if cached_path(name, which).is_file() else "-"


def resplit(pool: LabelledRows, train_size: int, seed: int, source: str):
    """A seeded random split of one pool of rows into (train, test)."""
    n = pool.X.shape[0]
    if not 0 < train_size < n:
        raise ZoflatError(f"--train-size must be between 1 and {n - 1} for {source} ({n} rows), got {train_size}")
    order = np.random.default_rng(seed).permutation(n)
    train, test = np.sort(order[:train_size]), np.sort(order[train_size:])
    return (LabelledRows(pool.X[train], pool.y[train], f"{source}[split {seed}: {train_size}]"),
            LabelledRows(pool.X[test], pool.y[test], f"{source}[split {seed}: rest]"))


def load_splits(dataset=None, data_file=None, test_file=None, train_size=None, split_seed: int = 0):
    """(train, test, description): a registry set, a seeded re-split of its training file
    (train_size), or svmlight files of one's own."""
    size = train_size
    if data_file:
        if (test_file is None) == (size is None):
            raise ZoflatError("--data-file needs exactly one of --test-file and --train-size")
        source = str(data_file)
        train = load_file(data_file)
        test = load_file(test_file) if test_file else None
        if test is not None:  # the two files may name different highest feature indices
            width = max(train.X.shape[1], test.X.shape[1])
            for split in (train, test):
                split.X.resize((split.X.shape[0], width))
    elif dataset:
        source = dataset
        train = load_registered(source, "train")
        test = load_registered(source, "test") if size is None else None
    else:
        raise ZoflatError("give --dataset NAME or --data-file PATH")
    if size is None:
        return train, test, f"{source}: {train.X.shape[0]} train / {test.X.shape[0]} test rows"
    train, test = resplit(train, int(size), int(split_seed), source)
    return train, test, (f"{source} re-split with seed {split_seed}: "
                         f"{train.X.shape[0]} train / {test.X.shape[0]} test rows")
