"""Few-shot text classification tasks: the LM-BFF "original" files and LM-BFF's K-shot splits.

The registry below is the one place for each task's files, labels, prompt and label words. The
K-shot sampler follows LM-BFF's `generate_k_shot_data.py` protocol exactly (so splits match the
ones MeZO, LM-BFF and FlatZero trained on): seed numpy's legacy global RNG with the split seed,
shuffle the training rows in place, group them by label in order of first appearance, take the
first K of each label as train and the next K as dev.
"""

import io
import lzma
from dataclasses import dataclass
from pathlib import Path

from zoflat_cli.data.files import write_new_folder
from zoflat_cli.errors import ZoflatError, one_line

BUNDLED_DIR = Path(__file__).parent / "text"
SPLIT_SEEDS = (13, 21, 42, 87, 100)  # LM-BFF's default split seeds
TEST_LIMIT = 1000  # LM-BFF's `k-shot-1k-test` mode cuts larger test sets to this many rows
TEST_MODES = ("1k", "full")


@dataclass(frozen=True)
class Task:
    name: str  # the CLI name
    folder: str  # LM-BFF's folder name
    glue: bool  # GLUE tsv with a header (train.tsv, dev.tsv as test) vs headerless csv label,sentence
    label_words: tuple  # verbalizer, indexed by label; each becomes " word" (leading space)
    template: tuple  # LM-BFF template as parts tokenized one by one: "{mask}", or text with "{sentence}"

    @property
    def test_file(self) -> str:
        return "dev.tsv" if self.glue else "test.csv"

    @property
    def train_file(self) -> str:
        return "train.tsv" if self.glue else "train.csv"

    @property
    def n_labels(self) -> int:
        return len(self.label_words)


# LM-BFF: *cls**sent_0*_It_was*mask*.*sep+*  and, for TREC, *cls**mask*:*+sent_0**sep+*
SENTIMENT_TEMPLATE = ("{sentence}", " It was", "{mask}", ".")
TASKS = {
    "sst2": Task("sst2", "SST-2", True, ("terrible", "great"), SENTIMENT_TEMPLATE),
    "sst5": Task("sst5", "sst-5", False, ("terrible", "bad", "okay", "good", "great"),
                 SENTIMENT_TEMPLATE),
    "trec": Task("trec", "trec", False,
                 ("Description", "Entity", "Expression", "Human", "Location", "Number"),
                 ("{mask}", ":", " {sentence}")),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ZoflatError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


@dataclass
class TaskSplit:
    """Rows as LM-BFF holds them: GLUE lines (text, with newline) or csv [label, sentence] lists."""
    task: Task
    header: list
    rows: list

    def examples(self) -> list:
        """(sentence, label) pairs (rows checked by read_original)."""
        return [(sentence, int(label)) for sentence, label in map(self.fields, self.rows)]

    def fields(self, row) -> tuple:
        """(sentence, label text) of a row; the label is None when the row has no separator."""
        if self.task.glue:
            parts = row.rstrip("\n").rsplit("\t", 1)
            return (parts[0].strip(), parts[1]) if len(parts) == 2 else ("", None)
        return (str(row[1]), row[0]) if len(row) == 2 else ("", None)

    def write(self, path: Path):
        import pandas as pd  # slow to import: only when a file is read or written

        if self.task.glue:
            path.write_text("".join(self.header + self.rows))
        else:
            pd.DataFrame(self.rows).to_csv(path, header=False, index=False)


def _open_text(folder: Path, name: str) -> str:
    plain, packed = folder / name, folder / f"{name}.xz"
    try:
        if plain.is_file():
            return plain.read_bytes().decode("utf-8")
        if packed.is_file():
            return lzma.decompress(packed.read_bytes()).decode("utf-8")
    except UnicodeDecodeError:
        raise ZoflatError(f"{plain}: not UTF-8 text") from None
    except (lzma.LZMAError, EOFError):
        raise ZoflatError(f"{packed}: not a whole .xz file (truncated or not xz)") from None
    raise ZoflatError(f"missing {plain}: --data-dir must hold <task folder>/{name} in LM-BFF layout "
                      f"(e.g. {folder.parent}/SST-2/train.tsv)")


def read_original(task: Task, data_dir=None, file: str = None) -> TaskSplit:
    """One original file of a task, from --data-dir (LM-BFF `data/original` layout) or the bundle."""
    import pandas as pd  # slow to import: only when a file is read or written

    root = Path(data_dir) if data_dir else BUNDLED_DIR
    if data_dir and not root.is_dir():
        raise ZoflatError(f"--data-dir {root} is not a directory")
    name = file or task.train_file
    text = _open_text(root / task.folder, name)
    source = root / task.folder / name
    if task.glue:
        lines = text.splitlines(keepends=True)
        split = TaskSplit(task, lines[:1], lines[1:])
    else:
        try:  # empty cells stay "" (pandas would read them as NaN, then the text "nan")
            rows = pd.read_csv(io.StringIO(text), header=None, keep_default_na=False, dtype=str).values.tolist()
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
            raise ZoflatError(f"{source}: not a label,sentence csv ({one_line(err)})") from None
        split = TaskSplit(task, [], rows)
    _check_rows(split, source)
    return split


def _check_rows(split: TaskSplit, source: Path):
    """Every row: a sentence that is not empty and a label of the task, else one line naming it."""
    task, first = split.task, 2 if split.task.glue else 1  # line numbers in the file
    if not split.rows:
        raise ZoflatError(f"{source}: no rows")
    labels = {str(i) for i in range(task.n_labels)}
    for number, row in enumerate(split.rows, start=first):
        sentence, label = split.fields(row)
        if label is None:
            raise ZoflatError(f"{source} line {number}: expected " + (
                "<sentence><TAB><label>" if task.glue else "label,sentence"))
        if str(label).strip() not in labels:
            raise ZoflatError(f"{source} line {number}: label {str(label)[:20]!r} is not one of the {task.name} "
                              f"labels 0..{task.n_labels - 1}")
        if not str(sentence).strip():
            raise ZoflatError(f"{source} line {number}: empty sentence")


def _label(task: Task, row):
    return row.strip().split("\t")[-1] if task.glue else row[0]


def kshot(task: Task, k: int, seed: int, data_dir=None, test_mode: str = "1k"):
    """LM-BFF's K-shot sample: (train, dev, test) Splits for split seed `seed`."""
    import pandas as pd  # slow to import: only when a file is read or written

    if k < 1:
        raise ZoflatError(f"k must be >= 1, got {k}")
    if test_mode not in TEST_MODES:
        raise ZoflatError(f"test mode must be one of {', '.join(TEST_MODES)}, got {test_mode!r}")
    train = read_original(task, data_dir)
    test = read_original(task, data_dir, task.test_file)
    import numpy as np  # here, not at the top: the command line reads this module's tables at start-up

    rows = list(train.rows)
    np.random.seed(seed)  # LM-BFF's protocol uses numpy's legacy global RNG, on purpose
    np.random.shuffle(rows)
    if test_mode == "1k" and len(test.rows) > TEST_LIMIT:
        if task.glue:
            np.random.seed(42)
            np.random.shuffle(test.rows)
            test.rows = test.rows[:TEST_LIMIT]
        else:
            frame = pd.DataFrame(test.rows).sample(n=TEST_LIMIT, random_state=42)
            test.rows = frame.values.tolist()
    by_label = {}
    for row in rows:
        by_label.setdefault(_label(task, row), []).append(row)
    short = {label: len(members) for label, members in by_label.items() if len(members) < 2 * k}
    if short:
        label, count = min(short.items(), key=lambda kv: kv[1])
        raise ZoflatError(f"{task.name}: label {label} has {count} training rows, fewer than 2K = {2 * k} "
                          f"(K for train plus K for dev); use a smaller --k")
    picked_train = [row for members in by_label.values() for row in members[:k]]
    picked_dev = [row for members in by_label.values() for row in members[k:2 * k]]
    return TaskSplit(task, train.header, picked_train), TaskSplit(task, train.header, picked_dev), test


def write_kshot(task: Task, k: int, seed: int, out: Path, data_dir=None, test_mode: str = "1k",
                force: bool = False) -> Path:
    """Write a split as LM-BFF does: <out>/<task folder>/<k>-<seed>/{train,dev,test}.<tsv|csv>; a
    folder that holds files already is replaced only with force."""
    train, dev, test = kshot(task, k, seed, data_dir, test_mode)
    ext = "tsv" if task.glue else "csv"

    def write(folder: Path):
        for name, split in (("train", train), ("dev", dev), ("test", test)):
            split.write(folder / f"{name}.{ext}")

    return write_new_folder(Path(out) / task.folder / f"{k}-{seed}", write, force)
