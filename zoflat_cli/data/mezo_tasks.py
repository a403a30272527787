"""Decoder-LM tasks (MeZO's `large_models` suite and multiple-choice extras): sources, prompts, sampling.

The registry below is the one place for each task's data sources, its rows as MeZO sees them
(the Hugging Face schema), its prompt and its options. Prompts follow MeZO's templates: a
context, then one option per class or choice, scored by its tokens' log-likelihood; generation
tasks have a target answer instead. Data is read with the `datasets` library from, in order:
`--data-dir` (the official files, laid out as the bundle), the bundled copies, the hub (cached).

Sampling is MeZO's exactly: a permutation of the pool by numpy's legacy RNG seeded with
--train-set-seed; the first num_train + num_dev rows of the train pool (the last num_dev are the
dev set) and, with the same seed, the first num_eval rows of the validation pool.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from zoflat_cli.data.files import write_new_folder
from zoflat_cli.errors import ZoflatError, one_line
from zoflat_cli.data.lmbff_tasks import BUNDLED_DIR as TEXT_DIR
from zoflat_cli.env import hub_reachable

BUNDLED_DIR = Path(__file__).parent / "llm"
KINDS = ("classification", "choice", "generation")
POOLS = ("train", "eval")  # MeZO: the HF train split for train+dev, the validation split for eval
TRAIN_POOLS = ("train", "eval")  # --train-pool eval: train+dev from the eval pool, disjoint from the eval sample


@dataclass(frozen=True)
class Example:
    context: str  # the prompt up to the answer
    options: tuple  # classification/choice: each option's text, appended to the context
    gold: int  # the option the loss trains toward
    correct: tuple  # every option counted right (ReCoRD: all answer entities)
    answers: tuple = ()  # generation: every reference answer (the target is " answers[0]\n")

    @property
    def target(self) -> str:
        return f" {self.answers[0]}\n"

    def demonstration(self) -> str:
        """This example answered, as an in-context demonstration (MeZO's verbalize, stripped)."""
        answer = self.target if self.answers else self.options[self.gold]
        return (self.context + answer).strip()


@dataclass(frozen=True)
class Source:
    file: str  # the official file, relative to the data root (also the --data-dir layout)
    hub: tuple  # datasets.load_dataset(path, config, split=...)
    bundled: bool = True
    bundle: Path = BUNDLED_DIR  # where the package keeps it


@dataclass(frozen=True)
class LMTask:
    name: str
    kind: str
    metric: str  # accuracy | f1
    pools: dict  # pool -> Source
    from_file: Callable  # the official file's records -> rows in the HF schema
    from_hub: Callable  # a hub row -> a row in the HF schema
    example: Callable  # a row -> Example
    licence: str
    labels: Optional[tuple] = None  # classification: the HF label names, by index
    scorer: str = "squad"  # generation: answers.SCORERS


# ---------------------------------------------------------------- prompts (MeZO's templates)

def _label_task(prompt, options):
    def example(row):
        label = int(row["label"])
        return Example(prompt(row), tuple(options), label, (label,))
    return example


def sst2_prompt(row):
    return f"{row['sentence'].strip()} It was"


def rte_prompt(row):
    return f"{row['premise']}\nDoes this mean that \"{row['hypothesis']}\" is true? Yes or No?\n"


def cb_prompt(row):
    return f"Suppose {row['premise']} Can we infer that \"{row['hypothesis']}\"? Yes, No, or Maybe?\n"


def wic_prompt(row):
    return (f"Does the word \"{row['word']}\" have the same meaning in these two sentences? Yes, No?\n"
            f"{row['sentence1']}\n{row['sentence2']}\n")


def wsc_prompt(row):
    return (f"{row['text']}\nIn the previous sentence, does the pronoun \"{row['span2_text'].lower()}\" "
            f"refer to {row['span1_text']}? Yes or No?\n")


def multirc_prompt(row):
    return (f"{row['paragraph']}\nQuestion: {row['question']}\nI found this answer \"{row['answer']}\". "
            f"Is that correct? Yes or No?\n")


def boolq_example(row):
    question = row["question"] if row["question"].endswith("?") else row["question"] + "?"
    question = question[0].upper() + question[1:]
    gold = 0 if row["answer"] else 1
    return Example(f"{row['passage']} {question}\n", ("Yes", "No"), gold, (gold,))


def copa_example(row):
    premise = row["premise"].rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise
    conjunction = {"cause": " because", "effect": " so"}[row["question"]]

    def lowered(choice):  # MeZO's "correct" capitalisation: lower the first word unless it is "I"
        words = choice.split(" ")
        words[0] = words[0] if words[0] == "I" else words[0].lower()
        return " " + " ".join(words)
    label = int(row["label"])
    return Example(premise + conjunction, (lowered(row["choice1"]), lowered(row["choice2"])), label, (label,))


def record_example(row):
    passage = row["passage"].replace("@highlight\n", "- ")
    entities = list(row["entities"])
    options = tuple(" " + row["query"].replace("@placeholder", e) for e in entities)
    correct = tuple(i for i, e in enumerate(entities) if e in row["answers"])
    if not correct:
        raise ZoflatError(f"ReCoRD row {row['query'][:40]!r}: no answer among its entities")
    return Example(f"{passage}\n-", options, correct[0], correct)


def squad_example(row):
    context = f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question'].strip()}\nAnswer:"
    return Example(context, (), 0, (0,), tuple(row["answers"]))


def drop_example(row):
    return Example(f"Passage: {row['passage']}\nQuestion: {row['question'].strip()}\nAnswer:", (), 0, (0,),
                   tuple(row["answers"]))


def _question_choices(question, texts, labels, key):
    if key not in labels:
        raise ZoflatError(f"question {question[:40]!r}: answer key {key!r} is not one of its choices {labels}")
    gold = list(labels).index(key)
    return Example(f"Question: {question}\nAnswer:", tuple(" " + t for t in texts), gold, (gold,))


def piqa_example(row):
    label = int(row["label"])
    return Example(f"Question: {row['goal']}\nAnswer:", (" " + row["sol1"], " " + row["sol2"]), label, (label,))


def arc_example(row):
    return _question_choices(row["question"], row["choices"]["text"], row["choices"]["label"], row["answerKey"])


def obqa_example(row):
    return _question_choices(row["question_stem"], row["choices"]["text"], row["choices"]["label"],
                             row["answerKey"])


# ---------------------------------------------------------------- official files -> HF rows

def _same(rows):
    return list(rows)


def _labelled(names):
    """SuperGLUE string or boolean labels -> the HF ClassLabel indices."""
    def convert(rows):
        out = []
        for row in rows:
            label = row["label"]
            text = str(label) if not isinstance(label, bool) else ("True" if label else "False")
            if text not in names:
                raise ZoflatError(f"label {label!r} is not one of {', '.join(names)}")
            out.append({**row, "label": names.index(text)})
        return out
    return convert


def _boolq_rows(rows):
    # the SuperGLUE file's passage is "<title> -- <passage>"; Google's BoolQ (MeZO's) has no title
    return [{"question": r["question"], "passage": r["passage"].split(" -- ", 1)[-1], "answer": bool(r["label"])}
            for r in rows]


def _wsc_fixed(rows):
    """HF's `wsc.fixed`: spans merged into the row; a span that is not in the text gets the case of
    the word at its index, loses a trailing "." and has newlines made spaces."""
    out = []
    for row in rows:
        row = {**row, **row.pop("target")}
        words = row["text"].split(" ")
        for k in ("span1", "span2"):
            span = row[f"{k}_text"]
            if span not in row["text"]:
                word = words[row[f"{k}_index"]]
                span = (word[0] + span[1:]) if word and span else span
                span = span[:-1] if span.endswith(".") else span
                span = span.replace("\n", " ")
            row[f"{k}_text"] = span
        row["label"] = int(bool(row["label"]))
        out.append(row)
    return out


def _multirc_rows(rows):
    return [{"paragraph": r["passage"]["text"], "question": q["question"], "answer": a["text"],
             "label": int(a["label"])}
            for r in rows for q in r["passage"]["questions"] for a in q["answers"]]


def _record_rows(rows):
    out = []
    for r in rows:
        text = r["passage"]["text"]
        entities = sorted({text[e["start"]:e["end"] + 1] for e in r["passage"]["entities"]})
        for q in r["qas"]:
            out.append({"passage": text, "query": q["query"], "entities": entities,
                        "answers": sorted({a["text"] for a in q.get("answers", [])})})
    return out


def _squad_rows(articles):
    return [{"title": a["title"], "context": p["context"], "question": q["question"],
             "answers": [x["text"] for x in q["answers"]]}
            for a in articles for p in a["paragraphs"] for q in p["qas"]]


def _drop_answers(answer) -> list:
    if answer.get("spans"):
        return list(answer["spans"])
    if str(answer.get("number", "")).strip():
        return [str(answer["number"])]
    date = answer.get("date") or {}
    text = " ".join(str(date.get(k, "")) for k in ("day", "month", "year")).strip()
    return [text] if text else []


def _drop_rows(passages):
    out = []
    for passage in passages:
        for qa in passage["qa_pairs"]:
            answers = _drop_answers(qa.get("answer", {}))
            if answers:
                out.append({"passage": passage["passage"], "question": qa["question"], "answers": answers})
    return out


def _arc_rows(rows):
    return [{"question": r["question"]["stem"], "answerKey": r["answerKey"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]


def _obqa_rows(rows):
    out = []
    for r in rows:
        packed, texts = r["Choices"], []
        # split on the four markers in order: a choice's own text may hold "(x)"
        starts = [packed.find(m) for m in ("(A) ", " (B) ", " (C) ", " (D) ")]
        if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ZoflatError(f"OpenBookQA row {r['ID']}: choices are not '(A) … (B) … (C) … (D) …'")
        for start, end in zip(starts, starts[1:] + [len(packed)]):
            texts.append(packed[start:end].strip()[4:].strip())
        out.append({"question_stem": r["Question Stem"], "choices": {"text": texts, "label": list("ABCD")},
                    "answerKey": r["Answer Key"]})
    return out


def _hub_squad(row):
    return {"title": row["title"], "context": row["context"], "question": row["question"],
            "answers": list(row["answers"]["text"])}


def _hub_drop(row):
    return {"passage": row["passage"], "question": row["question"], "answers": list(row["answers_spans"]["spans"])}


def _hub_same(row):
    return dict(row)


def _glue_rows(rows):
    return [{"sentence": r["sentence"], "label": int(r["label"])} for r in rows]


# ---------------------------------------------------------------- the registry

def _superglue(name, folder, kind, example, labels=None, from_file=None, bundled=(True, True), config=None,
               licence="see the SuperGLUE release"):
    config = config or name
    return LMTask(name, kind, "accuracy", {
        "train": Source(f"{folder}/train.jsonl", ("aps/super_glue", config, "train"), bundled[0]),
        "eval": Source(f"{folder}/val.jsonl", ("aps/super_glue", config, "validation"), bundled[1])},
        from_file or (_labelled(labels) if labels else _same), _hub_same, example, licence, labels)


YES_NO = ("Yes", "No")
NO_YES = ("No", "Yes")
BOOL_NAMES = ("False", "True")
TASKS = {t.name: t for t in (
    LMTask("sst2", "classification", "accuracy", {
        "train": Source("SST-2/train.tsv", ("nyu-mll/glue", "sst2", "train"), bundle=TEXT_DIR),
        "eval": Source("SST-2/dev.tsv", ("nyu-mll/glue", "sst2", "validation"), bundle=TEXT_DIR)},
        _glue_rows, _hub_same, _label_task(sst2_prompt, (" terrible", " great")), "GLUE SST-2 (see its release)"),
    _superglue("rte", "RTE", "classification", _label_task(rte_prompt, YES_NO), ("entailment", "not_entailment")),
    _superglue("cb", "CB", "classification", _label_task(cb_prompt, ("Yes", "No", "Maybe")),
               ("entailment", "contradiction", "neutral")),
    LMTask("boolq", "classification", "accuracy", {
        "train": Source("BoolQ/train.jsonl", ("google/boolq", None, "train"), False),
        "eval": Source("BoolQ/val.jsonl", ("google/boolq", None, "validation"))},
        _boolq_rows, _hub_same, boolq_example, "CC BY-SA 3.0"),
    _superglue("wsc", "WSC", "classification", _label_task(wsc_prompt, NO_YES), from_file=_wsc_fixed,
               config="wsc.fixed", licence="CC BY 4.0"),
    _superglue("wic", "WiC", "classification", _label_task(wic_prompt, NO_YES), BOOL_NAMES, bundled=(False, False),
               licence="CC BY-NC 4.0 (non-commercial: not bundled)"),
    _superglue("multirc", "MultiRC", "classification", _label_task(multirc_prompt, NO_YES),
               from_file=_multirc_rows),
    _superglue("copa", "COPA", "choice", copa_example, licence="BSD 2-clause"),
    _superglue("record", "ReCoRD", "choice", record_example, from_file=_record_rows, bundled=(False, False)),
    LMTask("piqa", "choice", "accuracy", {
        "train": Source("piqa/train.jsonl", ("ybisk/piqa", None, "train"), False),
        "eval": Source("piqa/valid.jsonl", ("ybisk/piqa", None, "validation"))},
        _same, _hub_same, piqa_example, "AFL 3.0"),
    *(LMTask(f"arc-{level.lower()}", "choice", "accuracy", {
        "train": Source(f"arc/ARC-{level}-Train.jsonl", ("allenai/ai2_arc", f"ARC-{level}", "train"), False),
        "eval": Source(f"arc/ARC-{level}-Test.jsonl", ("allenai/ai2_arc", f"ARC-{level}", "test"))},
        _arc_rows, _hub_same, arc_example, "CC BY-SA 4.0") for level in ("Easy", "Challenge")),
    LMTask("openbookqa", "choice", "accuracy", {
        "train": Source("openbookqa/train.tsv", ("allenai/openbookqa", "main", "train")),
        "eval": Source("openbookqa/test.tsv", ("allenai/openbookqa", "main", "test"))},
        _obqa_rows, _hub_same, obqa_example, "see the OpenBookQA release"),
    LMTask("squad", "generation", "f1", {
        "train": Source("squad/train-v1.1.json", ("rajpurkar/squad", None, "train"), False),
        "eval": Source("squad/dev-v1.1.json", ("rajpurkar/squad", None, "validation"))},
        _squad_rows, _hub_squad, squad_example, "CC BY-SA 4.0"),
    LMTask("drop", "generation", "f1", {
        "train": Source("drop/drop_dataset_train.json", ("ucinlp/drop", None, "train"), False),
        "eval": Source("drop/drop_dataset_dev.json", ("ucinlp/drop", None, "validation"), False)},
        _drop_rows, _hub_drop, drop_example, "CC BY-SA 4.0", scorer="drop"),
)}
EXTRA_FILES = {"piqa/valid.jsonl": "piqa/valid-labels.lst"}  # PIQA keeps its labels in a file of their own


def get_task(name: str) -> LMTask:
    if name not in TASKS:
        raise ZoflatError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------- reading the pools

def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _local_file(root: Path, name: str) -> Optional[Path]:
    for path in (root / name, root / f"{name}.xz"):
        if path.is_file():
            return path
    return None


def _read_file(path: Path) -> list:
    """An official file's records, read with `datasets` (jsonl, a json document, or a tsv)."""
    datasets = _quiet_datasets()
    plain = path.name[:-3] if path.name.endswith(".xz") else path.name
    try:
        if plain.endswith(".tsv"):
            data = datasets.load_dataset("csv", data_files=str(path), delimiter="\t", quoting=3, split="train",
                                         keep_default_na=False)
        elif plain.endswith(".lst"):
            data = datasets.load_dataset("text", data_files=str(path), split="train")
        elif plain.endswith(".jsonl"):
            data = datasets.load_dataset("json", data_files=str(path), split="train")
        else:  # a json document: SQuAD's {"data": [...]}, DROP's {passage_id: {...}}
            import lzma

            raw = path.read_bytes()
            document = json.loads(lzma.decompress(raw) if path.name.endswith(".xz") else raw)
            return document["data"] if "data" in document else list(document.values())
    except Exception as err:  # json, lzma, OSError, and datasets' own wrappers of its builders' parse errors
        raise ZoflatError(f"{path}: cannot read ({one_line(err)})") from None
    return data.to_list()


def hub_cached(source: Source) -> bool:
    """Whether `datasets` has this hub dataset in its cache (its folder <path with ___>/<config>)."""
    path, config, _ = source.hub
    folder = Path(_quiet_datasets().config.HF_DATASETS_CACHE) / path.replace("/", "___")
    return (folder / config).is_dir() if config else folder.is_dir()


def _read_hub(task: LMTask, pool: str, source: Source) -> list:
    datasets = _quiet_datasets()
    path, config, split = source.hub
    online = hub_reachable()
    if not online:
        datasets.config.HF_HUB_OFFLINE = True  # the cache only: no retries against an unreachable hub
    try:
        data = datasets.load_dataset(path, config, split=split)
    except Exception as err:  # hub and cache failures come in many types (ConnectionError, FileNotFoundError, ...)
        if not online:
            raise ZoflatError(
                f"task {task.name}: its {pool} pool ({path}{'/' + config if config else ''} {split}) is not bundled, "
                f"not cached, and the hub cannot be reached: run once online, pass --data-dir with "
                f"<dir>/{source.file}" + (", or use --train-pool eval" if pool == "train" else "")) from None
        raise ZoflatError(f"task {task.name}: cannot load {path} {split} from the hub ({one_line(err)})") from None
    return [task.from_hub(row) for row in data]


def read_pool(task: LMTask, pool: str, data_dir=None) -> list:
    """A pool's rows in the HF schema, from --data-dir, the bundle, or the hub, in that order."""
    source = task.pools[pool]
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ZoflatError(f"--data-dir {data_dir} is not a directory")
    roots = ([Path(data_dir)] if data_dir else []) + ([source.bundle] if source.bundled else [])
    for root in roots:
        path = _local_file(root, source.file)
        if path is not None:
            records = _read_file(path)
            if source.file in EXTRA_FILES:
                labels = _local_file(root, EXTRA_FILES[source.file])
                if labels is None:
                    raise ZoflatError(f"{path}: its labels file {EXTRA_FILES[source.file]} is missing beside it")
                records = [{**r, "label": int(line["text"])} for r, line in zip(records, _read_file(labels))]
            try:
                rows = task.from_file(records)
            except (KeyError, TypeError, AttributeError, IndexError) as err:
                raise ZoflatError(f"{path}: not in the official {task.name} layout (missing {one_line(err)})") from None
            except ZoflatError as err:
                raise ZoflatError(f"{path}: {err}") from None
            if not rows:
                raise ZoflatError(f"{path}: no rows")
            check_rows(task, rows, str(path))
            return rows
    rows = _read_hub(task, pool, source)
    path, config, split = source.hub
    check_rows(task, rows, f"hub dataset {path}{'/' + config if config else ''} {split}")
    return rows


def availability(task: LMTask, pool: str) -> str:
    source = task.pools[pool]
    if source.bundled and _local_file(source.bundle, source.file):
        return "bundled"
    return "cached" if hub_cached(source) else "hub"


# ---------------------------------------------------------------- MeZO's sampling

def permutation_head(n: int, seed: int, num: int) -> list:
    """MeZO's sample_subset: the first `num` of np.random.permutation(n) under the legacy RNG seeded
    with `seed` (a RandomState: the same stream as seeding the global one)."""
    import numpy as np  # here, not at the top: the command line reads this module's tables at start-up

    return np.random.RandomState(seed).permutation(n).tolist()[:num]


@dataclass
class Sample:
    """Indices into the pools, in sampled order."""
    train: list
    dev: list
    eval: list
    train_pool: str  # the pool train and dev index: "train", or "eval" (a re-split of the eval pool)


def sample(task: LMTask, pool_sizes: dict, num_train: int, num_dev: int, num_eval: int, seed: int,
           train_pool: str = "train") -> Sample:
    evaluation = permutation_head(pool_sizes["eval"], seed, num_eval)
    if train_pool == "eval":
        rest = sorted(set(range(pool_sizes["eval"])) - set(evaluation))
        if not rest:
            raise ZoflatError(f"task {task.name}: --train-pool eval leaves no rows: the eval pool's "
                              f"{pool_sizes['eval']} rows all go to --num-eval {num_eval}; lower it")
        draw = [rest[i] for i in permutation_head(len(rest), seed, num_train + num_dev)]
    else:
        draw = permutation_head(pool_sizes["train"], seed, num_train + num_dev)
    train, dev = (draw[:-num_dev], draw[-num_dev:]) if num_dev else (draw, [])
    if not train:
        raise ZoflatError(f"task {task.name}: the train pool has {len(draw)} rows, all taken by --num-dev "
                          f"{num_dev}; lower --num-dev")
    return Sample(train, dev, evaluation, train_pool)


def load_sample(task: LMTask, num_train: int, num_dev: int, num_eval: int, train_set_seed: int, train_pool: str,
                data_dir=None) -> tuple:
    """(Sample, {split: rows}) of a task's pools (read from data_dir, the bundle or the hub)."""
    pools = {"eval": read_pool(task, "eval", data_dir)}
    if train_pool == "train":
        pools["train"] = read_pool(task, "train", data_dir)
    drawn = sample(task, {p: len(r) for p, r in pools.items()}, num_train, num_dev, num_eval, train_set_seed,
                   train_pool)
    source = pools[drawn.train_pool]
    rows = {"train": [source[i] for i in drawn.train], "dev": [source[i] for i in drawn.dev],
            "eval": [pools["eval"][i] for i in drawn.eval]}
    return drawn, rows


def example_of(task: LMTask, row) -> Example:
    """A row's Example, checked field by field: every field present and not null, texts that are
    text, a label among the options, a non-empty list of text answers (ValueError says which)."""
    if not isinstance(row, dict):
        raise ValueError(f"a {type(row).__name__}, not a record")
    nulls = [key for key, value in row.items() if value is None]
    if nulls:
        raise ValueError(f"field {nulls[0]!r} is null")
    try:
        example = task.example(row)
    except KeyError as err:
        raise ValueError(f"no field {err}") from None
    except (TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"a field of the wrong type ({one_line(err)})") from None
    texts = [example.context, *example.options, *example.answers]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("a text field that is not text")
    if task.kind == "generation":
        if not example.answers or not all(a.strip() for a in example.answers):
            raise ValueError("no answer text (answers is empty)")
    elif not (0 <= example.gold < len(example.options) and all(0 <= c < len(example.options) for c in example.correct)):
        raise ValueError(f"label {example.gold} is not one of its {len(example.options)} options")
    return example


def check_rows(task: LMTask, rows: list, where: str):
    """Every row of a pool makes an Example, else one line naming the file (or hub set) and row."""
    for number, row in enumerate(rows, start=1):
        try:
            example_of(task, row)
        except ValueError as err:
            raise ZoflatError(f"{where} row {number}: {err} (task {task.name})") from None


def examples(task: LMTask, rows: list) -> list:
    """The Examples of rows already checked by check_rows (read_pool does)."""
    return [example_of(task, row) for row in rows]


def write_sample(task: LMTask, out: Path, force: bool = False, **sampling) -> Path:
    """The sample (load_sample's settings) as train.jsonl, dev.jsonl, eval.jsonl in
    <out>/<task>-seed<seed>/, in sampled order, each row with its source_index (0-based row of its
    pool, in the HF schema's order); a folder that holds files already is replaced only with force."""
    drawn, rows = load_sample(task, **sampling)

    def write(folder: Path):
        for split, indices in (("train", drawn.train), ("dev", drawn.dev), ("eval", drawn.eval)):
            lines = [json.dumps({"source_index": i, **row}, ensure_ascii=False) + "\n"
                     for i, row in zip(indices, rows[split])]
            (folder / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")

    return write_new_folder(Path(out) / f"{task.name}-seed{sampling['train_set_seed']}", write, force)
