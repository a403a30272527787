"""Decoder-LM tasks: prompts, the rows rebuilt from the official files, MeZO's sampling, data commands."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from zoflat_cli.data import mezo_tasks as llm_tasks
from zoflat_cli.cli import app
from zoflat_cli.errors import ZoflatError

runner = CliRunner()


def example(task, row):
    return llm_tasks.TASKS[task].example(row)


# ---------------------------------------------------------------- prompts, by hand

PREMISE = {"premise": "The cat sat.", "hypothesis": "A cat exists.", "label": 1}
PROMPTS = [
    ("sst2", {"sentence": " a fine film ", "label": 1},
     "a fine film It was", (" terrible", " great"), 1),
    ("rte", PREMISE, 'The cat sat.\nDoes this mean that "A cat exists." is true? Yes or No?\n', ("Yes", "No"), 1),
    ("cb", {**PREMISE, "label": 2}, 'Suppose The cat sat. Can we infer that "A cat exists."? Yes, No, or Maybe?\n',
     ("Yes", "No", "Maybe"), 2),
    ("boolq", {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
     "The sky is blue. Is the sky blue?\n", ("Yes", "No"), 0),
    ("wsc", {"text": "Mark lied to Pete. He was sorry.", "span1_text": "Mark", "span2_text": "He", "label": 1},
     'Mark lied to Pete. He was sorry.\nIn the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n',
     ("No", "Yes"), 1),
    ("wic", {"word": "bank", "sentence1": "A river bank.", "sentence2": "A savings bank.", "label": 0},
     'Does the word "bank" have the same meaning in these two sentences? Yes, No?\nA river bank.\nA savings bank.\n',
     ("No", "Yes"), 0),
    ("multirc", {"paragraph": "Sam ran.", "question": "Who ran?", "answer": "Sam", "label": 1},
     'Sam ran.\nQuestion: Who ran?\nI found this answer "Sam". Is that correct? Yes or No?\n', ("No", "Yes"), 1),
    ("copa", {"premise": "My body cast a shadow.", "choice1": "The sun was rising.", "choice2": "I cut the grass.",
              "question": "cause", "label": 0},
     "My body cast a shadow because", (" the sun was rising.", " I cut the grass."), 0),
    ("copa", {"premise": "It rained", "choice1": "We stayed in.", "choice2": "We swam.", "question": "effect",
              "label": 1},
     "It rained so", (" we stayed in.", " we swam."), 1),
    ("record", {"passage": "Obama met Merkel.\n@highlight\nTalks in Berlin", "query": "@placeholder spoke first",
                "entities": ["Merkel", "Obama"], "answers": ["Obama"]},
     "Obama met Merkel.\n- Talks in Berlin\n-", (" Merkel spoke first", " Obama spoke first"), 1),
    ("piqa", {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
     "Question: Open a jar\nAnswer:", (" Twist the lid.", " Eat the lid."), 0),
    ("arc-easy", {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
                  "answerKey": "B"},
     "Question: Which is a gas?\nAnswer:", (" ice", " steam"), 1),
    ("openbookqa", {"question_stem": "The sun is", "choices": {"text": ["hot", "cold", "wet", "blue"],
                                                               "label": list("ABCD")}, "answerKey": "A"},
     "Question: The sun is\nAnswer:", (" hot", " cold", " wet", " blue"), 0),
]


@pytest.mark.parametrize("task,row,context,options,gold", PROMPTS, ids=[p[0] for p in PROMPTS])
def test_prompts_render_as_mezo_templates(task, row, context, options, gold):
    ex = example(task, row)
    assert (ex.context, ex.options, ex.gold) == (context, options, gold)


def test_generation_prompts_and_targets():
    squad = example("squad", {"title": "Denver", "context": "Denver won.", "question": " Who won? ",
                              "answers": ["Denver", "the Broncos"]})
    assert squad.context == "Title: Denver\nContext: Denver won.\nQuestion: Who won?\nAnswer:"
    assert squad.target == " Denver\n" and squad.answers == ("Denver", "the Broncos")
    assert squad.demonstration() == "Title: Denver\nContext: Denver won.\nQuestion: Who won?\nAnswer: Denver"
    drop = example("drop", {"passage": "It was 3-1.", "question": "How many?", "answers": ["3"]})
    assert drop.context == "Passage: It was 3-1.\nQuestion: How many?\nAnswer:" and drop.target == " 3\n"


def test_record_counts_every_answer_entity_correct():
    ex = example("record", {"passage": "p", "query": "@placeholder", "entities": ["A", "B", "C"],
                            "answers": ["A", "C"]})
    assert ex.gold == 0 and ex.correct == (0, 2)


# ---------------------------------------------------------------- the official files, rebuilt as MeZO sees them

def pool(task, name):
    return llm_tasks.read_pool(llm_tasks.TASKS[task], name)


def test_bundled_pools_have_the_official_row_counts():
    sizes = {("rte", "train"): 2490, ("rte", "eval"): 277, ("cb", "train"): 250, ("cb", "eval"): 56,
             ("copa", "train"): 400, ("copa", "eval"): 100, ("wsc", "train"): 554, ("wsc", "eval"): 104,
             ("multirc", "train"): 27243, ("multirc", "eval"): 4848, ("boolq", "eval"): 3270,
             ("squad", "eval"): 10570, ("piqa", "eval"): 1838, ("arc-easy", "eval"): 2376,
             ("arc-challenge", "eval"): 1172, ("openbookqa", "train"): 4957, ("openbookqa", "eval"): 500,
             ("sst2", "eval"): 872}
    assert {key: len(pool(*key)) for key in sizes} == sizes


def test_rows_are_in_the_hf_schema():
    assert pool("cb", "train")[0]["label"] in (0, 1, 2)
    assert {r["label"] for r in pool("rte", "eval")} == {0, 1}
    boolq = pool("boolq", "eval")
    assert " -- " not in boolq[0]["passage"][:60] and isinstance(boolq[0]["answer"], bool)
    assert sum(r["answer"] for r in boolq) == 2033  # the file's 2,033 true labels
    multirc = pool("multirc", "eval")
    assert sum(r["label"] for r in multirc) == 2075 and set(multirc[0]) == {"paragraph", "question", "answer", "label"}
    squad = pool("squad", "eval")
    assert sum(len(r["answers"]) for r in squad) == 34726
    obqa = pool("openbookqa", "train")
    assert all(len(r["choices"]["text"]) == 4 and all(r["choices"]["text"]) for r in obqa)
    assert [r["label"] for r in pool("piqa", "eval")].count(1) == 928


def test_wsc_fixed_spans_match_hf():
    """HF's wsc.fixed changes span1_text in 88 train and 8 validation rows (e.g. "The lawyer" -> "the lawyer")."""
    import lzma

    for name, file, changed in (("train", "WSC/train.jsonl.xz", 88), ("eval", "WSC/val.jsonl.xz", 8)):
        raw = [json.loads(line) for line in lzma.decompress((llm_tasks.BUNDLED_DIR / file).read_bytes()).splitlines()]
        fixed = pool("wsc", name)
        assert sum(r["target"]["span1_text"] != f["span1_text"] for r, f in zip(raw, fixed)) == changed


def test_data_dir_supplies_unbundled_tasks_and_checks_labels(tmp_path):
    rows = [{"word": "bank", "sentence1": "a", "sentence2": "b", "idx": i, "label": i % 2 == 0,
             "start1": 0, "start2": 0, "end1": 1, "end2": 1, "version": 1.1} for i in range(3)]
    (tmp_path / "WiC").mkdir()
    (tmp_path / "WiC" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["label"] for r in llm_tasks.read_pool(llm_tasks.TASKS["wic"], "eval", tmp_path)] == [1, 0, 1]
    rows[1]["label"] = "maybe"
    (tmp_path / "WiC" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ZoflatError, match="label 'maybe' is not one of False, True"):
        llm_tasks.read_pool(llm_tasks.TASKS["wic"], "eval", tmp_path)


def test_drop_and_record_official_files_are_flattened(tmp_path):
    (tmp_path / "drop").mkdir()
    document = {"p1": {"passage": "Two and 3.", "qa_pairs": [
        {"question": "How many?", "answer": {"number": "3", "date": {}, "spans": []}},
        {"question": "Which?", "answer": {"number": "", "date": {}, "spans": ["Two", "3"]}},
        {"question": "When?", "answer": {"number": "", "date": {"day": "1", "month": "May", "year": "2001"},
                                         "spans": []}}]}}
    (tmp_path / "drop" / "drop_dataset_dev.json").write_text(json.dumps(document))
    rows = llm_tasks.read_pool(llm_tasks.TASKS["drop"], "eval", tmp_path)
    assert [r["answers"] for r in rows] == [["3"], ["Two", "3"], ["1 May 2001"]]
    (tmp_path / "ReCoRD").mkdir()
    record = {"passage": {"text": "Obama met Merkel.", "entities": [{"start": 10, "end": 15}, {"start": 0, "end": 4}]},
              "qas": [{"query": "@placeholder spoke", "answers": [{"start": 0, "end": 4, "text": "Obama"}]}]}
    (tmp_path / "ReCoRD" / "val.jsonl").write_text(json.dumps(record) + "\n")
    row, = llm_tasks.read_pool(llm_tasks.TASKS["record"], "eval", tmp_path)
    assert row["entities"] == ["Merkel", "Obama"] and row["answers"] == ["Obama"]


def test_missing_pool_offline_is_one_line_naming_the_fixes():
    with pytest.raises(ZoflatError, match=r"train pool .* not bundled, not cached.*--data-dir.*BoolQ/train.jsonl"
                                          r".*--train-pool eval"):
        pool("boolq", "train")


# ---------------------------------------------------------------- MeZO's sampling

def mezo_subset(n, seed, num):
    """MeZO's sample_subset, literally: the global legacy RNG, seeded."""
    state = np.random.get_state()
    np.random.seed(seed)
    index = np.random.permutation(n).tolist()[:num]
    np.random.set_state(state)
    return index


@pytest.mark.parametrize("task,num_dev,sizes", [
    ("cb", 100, (150, 100, 56)), ("copa", 100, (300, 100, 100)), ("wsc", 500, (54, 500, 104)),
    ("rte", 500, (1000, 500, 277)), ("multirc", 500, (1000, 500, 1000))])
def test_sample_sizes_and_order_are_mezo_s(task, num_dev, sizes):
    spec = llm_tasks.TASKS[task]
    pools = {p: len(pool(task, p)) for p in llm_tasks.POOLS}
    for seed in (0, 1):
        drawn = llm_tasks.sample(spec, pools, 1000, num_dev, 1000, seed)
        assert (len(drawn.train), len(drawn.dev), len(drawn.eval)) == sizes
        draw = mezo_subset(pools["train"], seed, 1000 + num_dev)
        assert drawn.train + drawn.dev == draw and drawn.dev == draw[-num_dev:]
        assert drawn.eval == mezo_subset(pools["eval"], seed, 1000)
    assert llm_tasks.sample(spec, pools, 1000, num_dev, 1000, 0) == llm_tasks.sample(spec, pools, 1000, num_dev, 1000, 0)
    assert llm_tasks.sample(spec, pools, 1000, num_dev, 1000, 0).train != llm_tasks.sample(
        spec, pools, 1000, num_dev, 1000, 1).train


def test_train_pool_eval_is_disjoint_from_the_eval_sample():
    drawn = llm_tasks.sample(llm_tasks.TASKS["squad"], {"eval": 500}, 100, 20, 300, 0, "eval")
    assert drawn.train_pool == "eval" and (len(drawn.train), len(drawn.dev), len(drawn.eval)) == (100, 20, 300)
    assert not set(drawn.train + drawn.dev) & set(drawn.eval)
    with pytest.raises(ZoflatError, match="leaves no rows"):
        llm_tasks.sample(llm_tasks.TASKS["squad"], {"eval": 50}, 10, 0, 50, 0, "eval")


def test_data_sample_writes_the_sample_with_source_indices(tmp_path):
    result = runner.invoke(app, ["data", "sample", "--task", "cb", "--seed", "3", "--num-dev", "100",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "cb-seed3"
    files = {s: [json.loads(line) for line in (folder / f"{s}.jsonl").read_text().splitlines()]
             for s in ("train", "dev", "eval")}
    assert [len(files[s]) for s in files] == [150, 100, 56]
    draw = mezo_subset(250, 3, 1100)
    assert [r["source_index"] for r in files["train"] + files["dev"]] == draw
    train_pool = pool("cb", "train")
    assert all({k: v for k, v in r.items() if k != "source_index"} == train_pool[r["source_index"]]
               for r in files["train"])


@pytest.mark.parametrize("args,message", [
    (["--task", "trec"], "unknown task 'trec'"),
    (["--task", "boolq"], "not bundled, not cached"),
    (["--task", "rte", "--num-eval", "0"], "--num-eval"),
])
def test_data_sample_bad_input_is_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["data", "sample", *args, "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_data_list_shows_each_task_and_where_its_pools_are():
    result = runner.invoke(app, ["data", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    line = next(row for row in result.output.splitlines() if "│ copa " in row)
    assert "choice" in line and line.count("bundled") == 2
    assert "CC BY-NC" in result.output and "│ squad " in result.output
