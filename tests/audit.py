"""The bad-input and fault audit of the zoflat CLI, as a new user would try it on a fresh clone.

Every case runs the real command in a fresh folder and is judged by the rules of README
("Errors"): a traceback, an exit status other than 0, 1, 2 or 130, an error that is not one
`error:` line, a run folder left by a refused command, bad input accepted, a summary.json that is
not strict JSON or still says `running`, or a lost row is a defect. Prints tried / handled /
defects, and each defect.

    .venv/bin/python tests/audit.py [--only flags,recipes,files,state,faults] [--subprocess --jobs 2]
"""

import argparse
import concurrent.futures
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable
ZOFLAT = [PYTHON, "-m", "zoflat_cli"]
REPO = Path(__file__).resolve().parents[1]
TOY = ["toy", "--steps", "20", "--log-every", "10", "--dim", "5", "--seeds", "1"]
CONVEX = ["convex", "--dataset", "a8a", "--train-size", "300", "--features", "20", "--steps", "4",
          "--log-every", "2", "--eig-every", "2", "--seeds", "1"]
FINETUNE = ["finetune", "--task", "sst2", "--k", "2", "--steps", "2", "--log-every", "1", "--eval-every", "2",
            "--trace-every", "2", "--trace-probes", "1", "--max-length", "32", "-o", "zo"]
DECODER = ["finetune", "--model", "{causal}", "--task", "rte", "--num-train", "4", "--num-dev", "1", "--num-eval", "4",
           "--steps", "2", "--log-every", "1", "--eval-every", "2", "--trace-every", "2", "--trace-probes", "1",
           "--max-length", "128", "-o", "zo"]
BAD_NUMBERS = ["abc", "", "-1", "0", "inf", "nan", "1e400", "99999999999999999999", "1e12", "0.5"]
BAD_NAMES = ["", "zz", "../x", "a b", "ZO", "gd,,", "=0.1"]


class Case:
    def __init__(self, label, args, expect="any", files=None, env=None, pipe_head=False, keeps=None, own=False):
        self.label, self.args, self.expect = label, args, expect
        self.files = files or {}  # relative path -> bytes, written before the command
        self.env, self.pipe_head = env or {}, pipe_head
        self.keeps = keeps  # a fixture (a run or sweep folder) that a refused command must leave as it was
        self.own = own or pipe_head  # needs a process of its own (a pipe, the terminal's encoding)


def run(args, cwd, env=None, timeout=600, pipe_head=False):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "ZOFLAT_DATA": str(Path(cwd) / "cache"),
                "PYTHONPATH": str(REPO), **(env or {})}
    if pipe_head:  # `zoflat ... | head -1`
        proc = subprocess.Popen(ZOFLAT + args, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        return proc.wait(timeout), "", err
    done = subprocess.run(ZOFLAT + args, cwd=cwd, env=full_env, capture_output=True, timeout=timeout)
    return done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")


def run_in_process(args, cwd, env=None):
    """The same command through Typer's test runner in this process (the interpreter's start-up
    is most of a refusal's time); an exception that escapes counts as a traceback."""
    from typer.testing import CliRunner

    from zoflat_cli.cli import app

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, args, env={"HF_HUB_OFFLINE": "1", "ZOFLAT_DATA": str(Path(cwd) / "cache"),
                                                    **(env or {})})
    finally:
        os.chdir(previous)
    err = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        err += f"\nTraceback (most recent call last):\n{type(result.exception).__name__}: {result.exception}"
    return result.exit_code, result.stdout, err


def run_folders(root: Path) -> set:
    return {p.parent for p in root.rglob("config.yaml") if (p.parent / ".lock").exists()}


def folder_defects(folder: Path) -> list:
    defects = []
    summary = folder / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
            if data.get("status") == "running":
                defects.append(f"{folder.name}: summary says running after the command ended")
        except ValueError as err:
            defects.append(f"{folder.name}: summary.json is not strict JSON ({err})")
    metrics = folder / "metrics.csv"
    if metrics.is_file() and metrics.stat().st_size and not metrics.read_bytes().endswith(b"\n"):
        defects.append(f"{folder.name}: metrics.csv ends in a torn row")
    return defects


def judge(case: Case, rc: int, out: str, err: str, before: set, after: set) -> list:
    defects = []
    if "Traceback (most recent call last)" in err or "Exception ignored" in err:
        defects.append("traceback: " + err.strip().splitlines()[-1][:120])
    if rc not in (0, 1, 2, 130):
        defects.append(f"exit status {rc}")
    lines = [line for line in err.splitlines() if line.strip()]
    if rc in (1, 2) and not (lines and lines[-1].startswith("error:") and
                             all(not line.startswith(("│", "╭", "Usage")) for line in lines)):
        defects.append(f"not one error line: {err.strip()[:160]!r}")
    if rc == 2 and after - before:
        defects.append("refused, yet a run folder was made")
    if case.expect == "error" and rc == 0:
        defects.append("bad input accepted")
    if case.expect == "ok" and rc != 0:
        defects.append(f"refused good input: {err.strip()[-160:]!r}")
    for folder in after:
        defects.extend(folder_defects(folder))
    return defects


def run_case(case: Case, fixtures: dict, in_process: bool = False) -> tuple:
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        for name, content in case.files.items():
            (cwd / name).parent.mkdir(parents=True, exist_ok=True)
            (cwd / name).write_bytes(content)
        args = list(case.args)
        for key, value in fixtures.items():  # "{tiny}" -> the tiny model's folder
            args = [a.replace("{" + key + "}", value) for a in args]
        before = run_folders(cwd)
        kept = snapshot(Path(fixtures[case.keeps])) if case.keeps else None
        if in_process and not case.own:
            rc, out, err = run_in_process(args, cwd, case.env)
        else:
            rc, out, err = run(args, cwd, case.env, pipe_head=case.pipe_head)
        defects = judge(case, rc, out, err, before, run_folders(cwd))
        if kept is not None and rc != 0:
            changed = sorted(str(p) for p in set(kept) | set(snapshot(Path(fixtures[case.keeps])))
                             if kept.get(p) != snapshot(Path(fixtures[case.keeps])).get(p))
            if changed:
                defects.append(f"refused, yet it changed {', '.join(changed[:3])}")
        return case, defects


def snapshot(folder: Path) -> dict:
    """Every file of a folder (but its lock), byte for byte."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------- the cases

def flag_cases() -> list:
    cases = []
    numeric = {
        "toy": (TOY, ["--steps", "--log-every", "--dim", "--seeds", "--lr", "--lambda", "--rho", "--tilt", "--samples",
                      "--momentum", "--beta1", "--beta2", "--weight-decay", "--checkpoint-every", "--pairs",
                      "--betas"]),
        "convex": (CONVEX, ["--features", "--train-size", "--split-seed", "--eig-every", "--steps", "--lr", "--lambda",
                            "--samples"]),
        "finetune": (FINETUNE + ["--model", "{tiny}"], [
            "--k", "--max-length", "--micro-batch", "--batch-size", "--eval-every", "--trace-every", "--trace-probes",
            "--trace-delta", "--eig-every", "--eig-iters", "--split-seed", "--lr", "--lambda"]),
        "finetune (decoder)": (DECODER, ["--num-train", "--num-dev", "--num-eval", "--train-set-seed", "--demos",
                                         "--max-new-tokens", "--max-length", "--micro-batch", "--batch-size"]),
    }
    refused = {"abc", "", "inf", "nan", "1e400"}  # 1e20 is finite: a run that diverges, or a bound
    for command, (base, flags) in numeric.items():
        for flag in flags:
            for value in BAD_NUMBERS:
                expect = "error" if value in refused else "any"
                cases.append(Case(f"{command} {flag} {value!r}", base + [flag, value], expect))
    named = {
        "toy": (TOY, ["--optimizer", "--directions", "--update", "--device", "--dtype", "--name", "--seeds"]),
        "convex": (CONVEX, ["--model", "--dataset", "--optimizer"]),
        "finetune": (FINETUNE + ["--model", "{tiny}"], ["--task", "--head", "--trace", "--test-mode", "--model"]),
        "finetune (decoder)": (DECODER, ["--task", "--train-pool", "--scoring", "--objective", "--head"]),
    }
    for command, (base, flags) in named.items():
        for flag in flags:
            for value in BAD_NAMES:
                valid = (flag == "--name" and value in ("zz", "ZO")) or value == "gd,,"  # trailing commas: a list
                cases.append(Case(f"{command} {flag} {value!r}", base + [flag, value], "any" if valid else "error"))
    for extra in (["-o", "gd", "--objective", "accuracy"], ["--objective", "f1"], ["--demos", "2"],
                  ["--task", "trec"], ["--task", "boolq"], ["--task", "wic"], ["--task", "drop"],
                  ["--task", "squad", "--max-length", "3", "--train-pool", "eval"], ["--steps", "0", "--demos", "9"]):
        cases.append(Case(f"finetune (decoder) {' '.join(extra)}", DECODER + extra, "error"))
    for ok in (["--steps", "0", "--demos", "2"], ["--task", "copa", "--objective", "accuracy", "-o", "zest"],
               ["--task", "squad", "--train-pool", "eval", "--max-new-tokens", "3"]):
        cases.append(Case(f"finetune (decoder) {' '.join(ok)}", DECODER + ok, "ok"))
    cases.append(Case("finetune encoder --task rte", FINETUNE + ["--model", "{tiny}", "--task", "rte"], "error"))
    for flag in ("--num-train", "--num-dev", "--num-eval", "--seed"):
        for value in BAD_NUMBERS:
            expect = "error" if value in {"abc", "", "inf", "nan", "1e400", "-1", "0.5"} else "any"
            cases.append(Case(f"data sample {flag} {value!r}", ["data", "sample", "--task", "cb", "--out", "s", flag,
                                                                 value], expect))
    for per_opt in ("--lr zoo=0.5", "--lambda gdd=0.1", "--samples zo=0", "--update zo=adamw", "--lr zo=1,zo=2", "--lr =1",
                    "--directions zo=normal", "--betas 0.9", "--betas 0.9,1.5", "--momentum zo-momentum=1"):
        cases.append(Case(f"toy {per_opt}", TOY + per_opt.split(), "error"))
    cases.append(Case("toy --lr zo=1e-3,gd=1e-2", TOY + ["--lr", "zo=1e-3,gd=1e-2"], "ok"))
    for usage in (["--steps"], ["--bogus"], ["-z"], ["--dim", "5", "extra"], ["--quiet=3"]):
        cases.append(Case(f"toy {' '.join(usage)}", TOY + usage, "error"))
    cases.append(Case("no command", ["nosuch"], "error"))
    cases.append(Case("toy | head -1", TOY[:1] + ["--seeds", "40", "--steps", "3000", "--dim", "5", "--log-every", "10"],
                      "ok", pipe_head=True))
    cases.append(Case("toy gd lr 0.3 diverges", ["toy", "-o", "gd,zo", "--lr", "gd=0.3", "--steps", "2000", "--seeds", "2"],
                      "ok"))
    cases.append(Case("toy gd lr 0.3 float32", ["toy", "-o", "gd", "--lr", "0.3", "--dtype", "float32", "--steps", "2000"],
                      "ok"))
    cases.append(Case("convex gd lr 1e6 diverges", CONVEX + ["--lr", "1e6"], "ok"))
    cases.append(Case("toy --dim 1e9 memory", ["toy", "--dim", "1000000000", "--steps", "2"], "error"))
    cases.append(Case("toy --samples 10000 --dim 1e6", ["toy", "--dim", "1000000", "--samples", "10000"], "error"))
    cases.append(Case("convex --features 1e8", CONVEX + ["--features", "100000000"], "error"))
    return cases


def recipe_cases() -> list:
    from zoflat_cli.experiments import toy

    cases = []
    wrong = ["[1]", "{a: 1}", "x", "null", "true", "-1", ".inf", "[]", "''"]
    for key in toy.EXPERIMENT.defaults():
        if key == "command":
            continue
        for value in wrong:
            cases.append(Case(f"toy recipe {key}: {value}", ["toy", "-c", "r.yaml", "--steps", "20", "--dim", "5"],
                              "any", {"r.yaml": f"{key}: {value}\n".encode()}))
    for label, text in {"binary": b"\x00\x01\x02\xff", "latin-1": "name: caf\xe9\n".encode("latin-1"),
                        "int key": b"1: 2\n", "dtype list": b"dtype: [float32]\n", "out 5": b"out: 5\n",
                        "list": b"- a\n- b\n", "tabs": b"steps:\t- 3\n", "unclosed": b"lr: [0.1\n",
                        "name null": b"name: null\n", "empty": b"", "command convex": b"command: convex\n",
                        "lr map typo": b"lr: {zoo: 0.5}\n", "unknown key": b"stepz: 3\n"}.items():
        cases.append(Case(f"toy recipe {label}", ["toy", "-c", "r.yaml", "--steps", "20", "--dim", "5"],
                          "ok" if label == "empty" else "error", {"r.yaml": text}))
    cases.append(Case("convex recipe model: [svm]", CONVEX + ["-c", "r.yaml"], "error", {"r.yaml": b"model: [svm]\n"}))
    cases.append(Case("recipe missing", ["toy", "-c", "nope.yaml"], "error"))
    cases.append(Case("recipe is a folder", ["toy", "-c", "."], "error"))
    return cases


SVM = b"+1 1:0.5 3:1\n-1 2:1\n+1 1:1 2:0.25\n-1 3:0.5\n" * 30


def file_cases() -> list:
    cases = []
    files = {"ok.svm": SVM, "nan.svm": SVM + b"+1 1:nan\n", "inf.svm": b"+1 1:inf\n" + SVM,
             "huge.svm": SVM + b"+1 2000000000:1\n", "zero.svm": SVM + b"+1 0:1\n", "text.svm": b"hello world\n",
             "one.svm": b"+1 1:1\n+1 2:1\n", "empty.svm": b"", "bin.svm": bytes(range(256)),
             "trunc.xz": b"\xfd7zXZ\x00\x00\x04\xe6\xd6\xb4F", "fake.xz": SVM, "labels.svm": SVM + b"3 1:1\n"}
    for name in files:
        cases.append(Case(f"convex --data-file {name}", CONVEX[:1] + ["--data-file", name, "--train-size", "60",
                                                                    "--features", "10", "--steps", "2"],
                          "ok" if name == "ok.svm" else "error", files))
    cases.append(Case("convex --test-file alone", CONVEX + ["--test-file", "ok.svm"], "error", files))
    cases.append(Case("convex --eig-every 3 --log-every 5", CONVEX + ["--eig-every", "3", "--log-every", "5"], "error"))
    cases.append(Case("convex --data-file missing", CONVEX[:1] + ["--data-file", "nope", "--train-size", "5"], "error"))
    cases.append(Case("convex --dataset a5a offline", ["convex", "--dataset", "a5a", "--steps", "2"], "error",
                      env={"ZOFLAT_LIBSVM_URL": "http://127.0.0.1:9"}))
    for name in ("../../x", "", "a/b", ".hidden", "x" * 300):
        cases.append(Case(f"data import --name {name[:20]!r}", ["data", "import", "ok.svm", "--name", name], "error",
                          files))
    cases.append(Case("data import then --dataset", ["data", "import", "ok.svm", "--name", "mydata"], "ok", files))
    cases.append(Case("data import bad split", ["data", "import", "ok.svm", "--name", "m", "--split", "dev"], "error",
                      files))
    cases.append(Case("data import a8a wrong size", ["data", "import", "ok.svm", "--name", "a8a"], "error", files))
    cases.append(Case("data list, ZOFLAT_DATA a file", ["data", "list"], "any", {"f": b"x"}, env={"ZOFLAT_DATA": "f"}))
    cases.append(Case("data import, ZOFLAT_DATA a file", ["data", "import", "ok.svm", "--name", "m"], "error",
                      {**files, "f": b"x"}, env={"ZOFLAT_DATA": "f"}))
    for seed in ("-1", "1099511627776", "abc"):
        cases.append(Case(f"data kshot --seed {seed}", ["data", "kshot", "--task", "trec", "--out", "k", "--seed", seed],
                          "error"))
    cases.append(Case("data kshot --k 0", ["data", "kshot", "--task", "trec", "--out", "k", "--k", "0"], "error"))
    cases.append(Case("data kshot --k 10000", ["data", "kshot", "--task", "trec", "--out", "k", "--k", "10000"], "error"))
    cases.append(Case("data kshot --task zz", ["data", "kshot", "--task", "zz", "--out", "k"], "error"))
    cases.append(Case("data kshot --out a file", ["data", "kshot", "--task", "trec", "--out", "f"], "error", {"f": b"x"}))
    # --data-dir text files
    ok_train = b"".join(b"%d,sentence number %d\n" % (i % 6, i) for i in range(120))
    ok_test = b"".join(b"%d,test %d\n" % (i % 6, i) for i in range(30))
    bad = {"labels": ok_train + b"9,bad label\n", "empty sentence": ok_train + b"1,\n", "non-utf8": ok_train + b"1,\xff\xfe\n",
           "header only": b"", "no comma": b"just text\n" * 5, "three columns": ok_train + b"1,a,b\n"}
    for label, train in bad.items():
        cases.append(Case(f"finetune --data-dir {label}", FINETUNE + ["--model", "{tiny}", "--task", "trec",
                                                                      "--data-dir", "d"], "error",
                          {"d/trec/train.csv": train, "d/trec/test.csv": ok_test}))
    cases.append(Case("finetune --data-dir empty test", FINETUNE + ["--model", "{tiny}", "--task", "trec", "--data-dir",
                                                                    "d"], "error",
                      {"d/trec/train.csv": ok_train, "d/trec/test.csv": b""}))
    cases.append(Case("finetune --data-dir ok", FINETUNE + ["--model", "{tiny}", "--task", "trec", "--data-dir", "d"],
                      "ok", {"d/trec/train.csv": ok_train, "d/trec/test.csv": ok_test}))
    cases.append(Case("finetune --data-dir glue line without tab", FINETUNE + ["--model", "{tiny}", "--data-dir", "d"],
                      "error", {"d/SST-2/train.tsv": b"sentence\tlabel\n" + b"good\t1\nbad\t0\n" * 10 + b"no tab\n",
                                "d/SST-2/dev.tsv": b"sentence\tlabel\ngood\t1\n"}))
    cases.append(Case("finetune --max-length 100000", FINETUNE + ["--model", "{tiny}", "--max-length", "100000"],
                      "error"))
    cases.append(Case("finetune --model missing folder", FINETUNE + ["--model", "./nope"], "error"))
    cases.append(Case("finetune --model hub offline", FINETUNE + ["--model", "nobody/nothing"], "error"))
    # --out
    for label, out, extra in (("a file", "f", {"f": b"x"}), ("under a file", "f/sub", {"f": b"x"}),
                              ("not writable", "/proc/zoflat", {})):
        cases.append(Case(f"toy --out {label}", TOY + ["--out", out], "error", extra))
    cases.append(Case("toy --name of 240 characters", TOY + ["--name", "n" * 240], "error"))
    cases.append(Case("toy --out '' (the current folder)", TOY + ["--out", ""], "any"))
    # plot and resume on damaged folders (made by `toy`, then damaged)
    for label, damage in DAMAGE.items():
        cases.append(Case(f"plot: {label}", ["plot", "{damaged_" + label + "}", "--out", "figs"], "any"))
        cases.append(Case(f"resume: {label}", ["toy", "--resume", "{damaged_" + label + "}"],
                          "error" if label in REFUSED_DAMAGE else "any", keeps="damaged_" + label))
    cases.append(Case("plot: no such folder", ["plot", "nope"], "error"))
    cases.append(Case("plot: no runs", ["plot", "."], "error"))
    cases.append(Case("resume: not a run folder", ["toy", "--resume", "."], "error"))
    cases.append(Case("resume: other flags", ["toy", "--resume", "{damaged_none}", "--lr", "0.1"], "error"))
    cases.append(Case("resume: --steps below done", ["toy", "--resume", "{damaged_none}", "--steps", "5"], "error"))
    cases.append(Case("resume: other command", ["convex", "--resume", "{damaged_none}"], "error"))
    return cases


RTE_ROW = {"premise": "A cat sat.", "hypothesis": "A cat exists.", "label": "entailment", "idx": 0}
COPA_ROW = {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause",
            "label": 0, "idx": 0}


def _squad(answers) -> bytes:
    qa = {"id": "1", "question": "Where is Paris?", "answers": answers}
    return json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [qa]}]}]}).encode()


def _jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def state_cases() -> list:
    """Reliability II (issue 28): decoder-task files per field (12), trackers before the folder (13),
    a terminal that cannot encode (14), data folders not overwritten (4), sweep.yaml checked (10)."""
    cases = []
    pool = ["--data-dir", "d", "--train-pool", "eval", "--num-dev", "0", "--num-train", "1", "--num-eval", "1"]
    for label, task, file, content in (
            ("RTE null field", "rte", "RTE/val.jsonl", _jsonl({**RTE_ROW, "hypothesis": None})),
            ("RTE missing field", "rte", "RTE/val.jsonl", _jsonl({k: v for k, v in RTE_ROW.items() if k != "premise"})),
            ("RTE JSON array line", "rte", "RTE/val.jsonl", _jsonl([1, 2])),
            ("COPA label 2", "copa", "COPA/val.jsonl", _jsonl(COPA_ROW, {**COPA_ROW, "label": 2})),
            ("SQuAD empty answers", "squad", "squad/dev-v1.1.json", _squad([])),
            ("SQuAD numeric answer", "squad", "squad/dev-v1.1.json", _squad([{"text": 5, "answer_start": 0}]))):
        cases.append(Case(f"finetune (decoder) --data-dir {label}", DECODER + ["--task", task, *pool], "error",
                          {f"d/{file}": content}))
    for label, logger, env in (("WANDB_MODE=bogus", "wandb", {"WANDB_MODE": "bogus"}),
                               ("wandb online, no server", "wandb",
                                {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9"}),
                               ("mlflow server unreachable", "mlflow", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})):
        cases.append(Case(f"toy --logger {logger}: {label}", TOY + ["--logger", logger], "error", env=env))
    ascii = {"PYTHONIOENCODING": "ascii"}
    for args in (["toy", "--help"], ["data", "list"], TOY + ["--out", "runs-\u03bb"]):
        cases.append(Case(f"ascii terminal: {' '.join(args[:2])}", args, "ok", env=ascii, own=True))
    sample = ["data", "sample", "--task", "cb", "--out", "s", "--num-train", "4", "--num-dev", "2", "--num-eval", "4"]
    cases.append(Case("data sample over hand-edited files", sample, "error", {"s/cb-seed0/train.jsonl": b"edited\n"}))
    cases.append(Case("data sample --force", sample + ["--force"], "ok", {"s/cb-seed0/train.jsonl": b"edited\n"}))
    cases.append(Case("data kshot over hand-edited files", ["data", "kshot", "--task", "trec", "--out", "k", "--k", "2",
                                                            "--seed", "13"], "error",
                      {"k/trec/2-13/train.csv": b"edited\n"}))
    for label in SWEEP_DAMAGE:
        cases.append(Case(f"sweep --resume: sweep.yaml {label}", ["sweep", "--resume", "{sweep_" + label + "}"],
                          "error", keeps="sweep_" + label))
    return cases


def _sweep_yaml(change):
    def damage(folder: Path):
        import yaml

        state = yaml.safe_load((folder / "sweep.yaml").read_text())
        (folder / "sweep.yaml").write_text(yaml.safe_dump(change(state)))
    return damage


SWEEP_DAMAGE = {"without command": _sweep_yaml(lambda s: {k: v for k, v in s.items() if k != "command"}),
                "without cwd": _sweep_yaml(lambda s: {k: v for k, v in s.items() if k != "cwd"}),
                "a job not a mapping": _sweep_yaml(lambda s: {**s, "jobs": {"x": 3}}),
                "a list": _sweep_yaml(lambda s: [s])}


def _append(folder, text):
    with open(folder / "metrics.csv", "a") as f:
        f.write(text)


def _torn(folder):
    with open(folder / "metrics.csv", "ab") as f:
        f.write(b"zo-lr0.001-s13,zo,sgd,gaus")


def _rewrite(name, content):
    return lambda folder: (folder / name).write_bytes(content)


def _cell(folder):
    text = (folder / "metrics.csv").read_text().splitlines(keepends=True)
    cells = text[1].split(",")
    cells[-1] = "oops\n"
    text[1] = ",".join(cells)
    (folder / "metrics.csv").write_text("".join(text))


def _checkpoint_folder(folder):
    (folder / "checkpoints" / "batched.pt").unlink()
    (folder / "checkpoints" / "batched.pt").mkdir()


def _edit_lr(folder):
    import yaml

    config = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "lr": 0.5}, sort_keys=False))


def _edit_steps_done(folder):
    summary = json.loads((folder / "summary.json").read_text())
    next(iter(summary["runs"].values()))["steps_done"] = "abc"
    (folder / "summary.json").write_text(json.dumps(summary))


def _reorder(folder):
    header, *rows = (folder / "metrics.csv").read_text().splitlines(keepends=True)
    (folder / "metrics.csv").write_text(header + "".join(reversed(rows)))


def _foreign_checkpoint(folder):
    donor = folder.parent / "donor"
    run(FIXTURE_TOY + ["--dim", "6", "--out", str(donor), "--quiet"], folder.parent)
    (folder / "checkpoints" / "batched.pt").write_bytes(next(donor.rglob("batched.pt")).read_bytes())


DAMAGE = {"none": lambda folder: None, "torn last row": _torn,
          "binary metrics": _rewrite("metrics.csv", bytes(range(256)) * 4),
          "non-numeric cell": _cell, "summary []": _rewrite("summary.json", b"[]"),
          "summary damaged": _rewrite("summary.json", b"{\"runs\": "),
          "row without step": lambda folder: _append(folder, "zo,zo\n"),
          "garbage checkpoint": _rewrite("checkpoints/batched.pt", b"not a checkpoint"),
          "config damaged": _rewrite("config.yaml", b"steps: [\n"),
          # reliability II (issue 28): foreign, changed or damaged state (3, 9), a checkpoint that cannot be read (1)
          "checkpoint is a folder": _checkpoint_folder, "lr edited in config.yaml": _edit_lr,
          "summary steps_done edited": _edit_steps_done, "metrics deleted": lambda folder: (folder / "metrics.csv").unlink(),
          "metrics reordered": _reorder, "checkpoint of another --dim": _foreign_checkpoint}
REFUSED_DAMAGE = {"checkpoint is a folder", "lr edited in config.yaml", "summary steps_done edited", "metrics deleted",
                  "metrics reordered", "checkpoint of another --dim", "binary metrics", "summary []", "summary damaged",
                  "garbage checkpoint", "config damaged"}


FIXTURE_TOY = ["toy", "--steps", "40", "--log-every", "10", "--dim", "5", "--seeds", "1", "-o", "zo"]


def make_fixtures(root: Path) -> dict:
    """A tiny model, and one toy run folder per kind of damage (all interrupted halfway)."""
    sys.path.insert(0, str(REPO))
    from zoflat_cli.models.tiny import save_tiny_causal, save_tiny_roberta

    fixtures = {"tiny": save_tiny_roberta(root / "tiny"), "causal": save_tiny_causal(root / "causal")}
    for label, damage in DAMAGE.items():
        folder = root / f"damaged-{len(fixtures)}"
        rc, out, err = run(FIXTURE_TOY + ["--out", str(folder), "--quiet"], root)
        path = Path(out.strip())
        path = path if path.is_absolute() else root / path
        damage(path)
        fixtures["damaged_" + label] = str(path)
    for label, damage in SWEEP_DAMAGE.items():
        rc, out, err = run(["sweep", str(REPO / "recipes/toy/fig4.yaml"), "-o", "zo", "--lambda", "0.1", "--seeds", "1",
                            "--steps", "20", "--dim", "5", "--out", str(root / f"sweep-{len(fixtures)}"), "-q"], root)
        path = Path(out.strip())
        damage(path)
        fixtures["sweep_" + label] = str(path)
    return fixtures


# ---------------------------------------------------------------- faults

def fault_kill(command_args, cwd: Path, seed: int) -> list:
    """kill -9 at a random point, then plot and --resume: every whole row survives, and the
    resumed metrics equal an uninterrupted run's (but wall_s and peak memory)."""
    import pandas as pd

    ignore = ["wall_s", "peak_memory_mib"]
    straight = cwd / "straight"
    rc, out, err = run(command_args + ["--out", str(straight), "-q"], cwd)
    if rc != 0:
        return [f"uninterrupted run failed: {err.strip()[-160:]}"]
    reference = pd.read_csv(next(straight.rglob("metrics.csv"))).drop(columns=ignore, errors="ignore")
    killed = cwd / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "ZOFLAT_DATA": str(cwd / "cache")}
    proc = subprocess.Popen(ZOFLAT + command_args + ["--out", str(killed), "-q"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(2.0, 6.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folders = sorted({p.parent for p in killed.rglob("config.yaml")})
    if not folders:
        return []  # killed before the folder was made: nothing to lose
    folder = folders[0]
    before = (folder / "metrics.csv").read_bytes() if (folder / "metrics.csv").is_file() else b""
    whole = before[: before.rfind(b"\n") + 1]
    defects = []
    rc, out, err = run(["plot", str(folder)], cwd)
    if rc != 0 and whole.count(b"\n") > 1:
        defects.append(f"plot after kill -9: {err.strip()[-160:]}")
    rc, out, err = run([command_args[0], "--resume", str(folder), "-q"], cwd)
    if rc != 0:
        return defects + [f"resume after kill -9 failed: {err.strip()[-160:]}"]
    after = (folder / "metrics.csv").read_bytes()
    kept = set(_without_clock(after))  # rows after the checkpoint are recomputed: the same values, a new clock
    lost = [row for row in _without_clock(whole) if row not in kept]
    resumed = pd.read_csv(folder / "metrics.csv").drop(columns=ignore, errors="ignore")
    if lost:
        defects.append(f"{len(lost)} whole rows lost by resume")
    try:
        pd.testing.assert_frame_equal(resumed.sort_values(["run_id", "step"]).reset_index(drop=True),
                                      reference.sort_values(["run_id", "step"]).reset_index(drop=True))
    except AssertionError as err:
        defects.append(f"resumed metrics differ from the uninterrupted run: {str(err).splitlines()[0]}")
    return defects


def _without_clock(csv_bytes: bytes) -> list:
    """The rows of metrics.csv text without wall_s and peak_memory_mib (properties of a process)."""
    lines = csv_bytes.decode().splitlines()
    header = lines[0].split(",") if lines else []
    drop = {header.index(c) for c in ("wall_s", "peak_memory_mib") if c in header}
    return [",".join(c for i, c in enumerate(line.split(",")) if i not in drop) for line in lines[1:]]


def fault_signal(sig, cwd: Path) -> list:
    """A stop signal mid-run: exit 130, no traceback, the folder interrupted, the resume command said."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(ZOFLAT + ["toy", "--steps", "2000000", "--dim", "5", "--out", "o", "-q"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    defects = [] if proc.returncode == 130 else [f"exit {proc.returncode} after {sig.name}"]
    if "Traceback" in err or "Exception ignored" in err:
        defects.append(f"{sig.name}: a traceback")
    if run_folders(cwd) and "--resume" not in err:
        defects.append(f"{sig.name}: the resume command is not said")
    for folder in run_folders(cwd):
        summary = json.loads((folder / "summary.json").read_text())
        if summary["status"] != "interrupted":
            defects.append(f"{sig.name}: summary says {summary['status']}")
        defects += folder_defects(folder)
    return defects


def fault_concurrent_resume(cwd: Path) -> list:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(ZOFLAT + ["toy", "--steps", "400000", "--dim", "5", "-o", "zo", "--out", "o", "-q"],
                             cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(4)
    folder = next(iter(run_folders(cwd)))
    rc, out, err = run(["toy", "--resume", str(folder)], cwd)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)
    if rc != 2 or "another zoflat process" not in err:
        return [f"a second writer was not refused: exit {rc} {err.strip()[-120:]!r}"]
    return []


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """A Python snippet that drives zoflat's entry point, in cwd."""
    return subprocess.run([PYTHON, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def fault_signal_at_start_up(cwd: Path) -> list:
    """SIGINT while the CLI imports torch (sent by an import hook: no race with the start-up's speed)."""
    code = ("import os, signal, sys\nclass Hook:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch':\n            os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.meta_path.insert(0, Hook())\nsys.argv = ['zoflat', 'toy', '--steps', '5', '-q', '--out', 'o']\n"
            "from zoflat_cli.__main__ import main\nmain()\n")
    done = _python(code, cwd)
    if done.returncode != 130 or done.stderr.strip().splitlines() != ["interrupted"] or (cwd / "o").exists():
        return [f"SIGINT at start-up: exit {done.returncode} {done.stderr.strip()[-120:]!r}"]
    return []


def fault_signal_at_exit(cwd: Path) -> list:
    code = ("import atexit, os, signal, sys, time\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))\n"
            "sys.argv = ['zoflat', 'toy', '--steps', '5', '--dim', '3', '-q', '--out', 'o']\n"
            "from zoflat_cli.__main__ import main\nmain()\n")
    done = _python(code, cwd)
    if done.returncode != 0 or "Exception ignored" in done.stderr or "Traceback" in done.stderr:
        return [f"a signal at exit: exit {done.returncode} {done.stderr.strip()[-120:]!r}"]
    return []


def _sweep(cwd: Path, steps: str) -> subprocess.Popen:
    return subprocess.Popen(ZOFLAT + ["sweep", str(REPO / "recipes/toy/fig4.yaml"), "-o", "zo", "--lambda", "0.1,0.05",
                                      "--seeds", "1", "--steps", steps, "--log-every", "1000", "--dim", "5", "--jobs",
                                      "2", "--out", "s", "-q"], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(predicate, timeout=120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.1)
    return predicate()


def fault_sweep_driver(cwd: Path) -> list:
    """SIGTERM to the sweep driver alone (8); while it runs, a second driver on its folder (2)."""
    import yaml

    proc = _sweep(cwd, "400000")
    if not _wait(lambda: len(list(cwd.glob("s/sweep/*/jobs/*/toy/*/metrics.csv"))) == 2):
        proc.kill()
        return ["the sweep's jobs did not start"]
    folder = next(cwd.glob("s/sweep/*"))
    defects = []
    rc, out, err = run(["sweep", "--resume", str(folder)], cwd)
    if rc != 2 or "another zoflat process" not in err:
        defects.append(f"a second sweep driver was not refused: exit {rc} {err.strip()[-120:]!r}")
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if time.monotonic() - began > 40 or proc.returncode != 130 or "Traceback" in err:
        defects.append(f"sweep driver SIGTERM: exit {proc.returncode} after {time.monotonic() - began:.0f} s")
    for run_id, job in yaml.safe_load((folder / "sweep.yaml").read_text())["jobs"].items():
        status = json.loads((Path(job["folder"]) / "summary.json").read_text())["status"] if job["folder"] else None
        if job["state"] != "cancelled" or status != "interrupted":
            defects.append(f"sweep driver SIGTERM: job {run_id} {job['state']}, its run {status}")
    return defects


def fault_checkpoint_write(cwd: Path) -> list:
    """A checkpoint written onto a full disk (/dev/full as its temporary file) (11), on resume (1)."""
    rc, out, err = run(TOY + ["--checkpoint-every", "10", "--log-every", "5", "--out", "o", "-q"], cwd)
    folder = cwd / out.strip()
    before = set((folder / "metrics.csv").read_text().splitlines())
    (folder / "checkpoints" / "batched.pt.tmp").symlink_to("/dev/full")
    rc, out, err = run(["toy", "--resume", str(folder), "--steps", "40"], cwd)
    defects = []
    if rc != 1 or "No space left on device" not in err or "Traceback" in err:
        defects.append(f"checkpoint on a full disk: exit {rc} {err.strip()[-120:]!r}")
    if not before <= set((folder / "metrics.csv").read_text().splitlines()):
        defects.append("checkpoint on a full disk: rows lost")
    return defects + folder_defects(folder)


def fault_torchrun_configs(cwd: Path) -> list:
    """Two ranks given other --steps (15): one line each, no folder, no deadlock."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank, steps in ((0, "4"), (1, "6")):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        procs.append(subprocess.Popen(ZOFLAT + ["finetune", "--model", "tiny-gpt2", "--task", "rte", "--num-train", "4",
                                                "--num-dev", "1", "--num-eval", "4", "--steps", steps, "--device", "cpu",
                                                "-q", "--out", "o"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    defects = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            return ["torchrun ranks with other configs: stuck"]
        if proc.returncode != 2 or "another config" not in err or "Traceback" in err:
            defects.append(f"torchrun ranks with other configs: exit {proc.returncode} {err.strip()[-120:]!r}")
    return defects + (["torchrun ranks with other configs: a folder was made"] if (cwd / "o").exists() else [])


def fault_seed_study(cwd: Path) -> list:
    """10,000 toy seeds at d = 6 for 20 steps: under 1 GiB and a minute (it took 3.4 GiB and 221 s).
    The peak is the command's own address space's (VmHWM; ru_maxrss keeps the parent's across exec)."""
    code = ("import sys\nsys.argv = ['zoflat', 'toy', '-o', 'zo', '--seeds', '10000', '--dim', '6', "
            "'--steps', '20', '-q', '--out', 'o']\nfrom zoflat_cli.__main__ import main\ntry:\n    main()\nfinally:\n"
            "    print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)\n")
    began = time.monotonic()
    done = _python(code, cwd)
    seconds, peak = time.monotonic() - began, int(done.stderr.split()[-1]) * 1024
    if done.returncode != 0 or peak > 1 << 30 or seconds > 60:
        return [f"10,000 seeds: exit {done.returncode}, {peak / 2**30:.2f} GiB, {seconds:.0f} s"]
    return []


def fault_symlinked_folders(cwd: Path) -> list:
    """table over a folder of symbolic links to run folders (16), with a loop among them."""
    folders = []
    for name in ("a", "b"):
        rc, out, err = run(TOY + ["-o", "zo", "--out", name, "-q"], cwd)
        folders.append(cwd / out.strip())
    (cwd / "links").mkdir()
    for i, folder in enumerate(folders):
        (cwd / "links" / f"run{i}").symlink_to(folder)
    (cwd / "links" / "loop").symlink_to(cwd / "links")
    rc, out, err = run(["table", "links", "--format", "csv"], cwd)
    import csv

    if rc != 0 or [row["loss_n"] for row in csv.DictReader(out.splitlines())] != ["2"]:
        return [f"table over symlinked run folders: exit {rc} {out.strip()[-160:]!r} {err.strip()[-120:]!r}"]
    return []


def fault_disk_full(cwd: Path, size_kib: int) -> list:
    """A run on a small tmpfs (needs root; skipped elsewhere): it must end failed, with every row
    whole and summary.json strict, and resume once there is room."""
    mount = cwd / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        return None
    try:
        rc, out, err = run(["toy", "--steps", "100000", "--log-every", "10", "--dim", "5", "--seeds", "3",
                            "--out", str(mount)], cwd)
        defects = []
        if "Traceback" in err:
            defects.append("traceback on a full disk")
        folders = run_folders(mount)
        if rc == 2 and not folders and err.startswith("error:"):
            return defects  # refused to start: no room for the folder
        if rc != 1 or not err.strip().splitlines()[-1].startswith("error:"):
            defects.append(f"disk full: exit {rc}, {err.strip()[-160:]!r}")
        for folder in folders:
            defects += folder_defects(folder)
            summary = json.loads((folder / "summary.json").read_text())
            if summary["status"] != "failed" or "error" not in summary:
                defects.append(f"disk full: summary says {summary['status']} without the reason")
        return defects
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def faults(fixtures) -> list:
    """(label, defects) for each fault scenario."""
    results = []
    commands = {"toy": ["toy", "--steps", "60000", "--log-every", "500", "--dim", "20", "--seeds", "2",
                        "--checkpoint-every", "5000"],
                "convex": ["convex", "--dataset", "a8a", "--train-size", "2000", "--features", "300", "--steps", "3000",
                           "--log-every", "100", "--eig-every", "500", "--seeds", "1", "--checkpoint-every", "200"],
                "finetune": FINETUNE[:-2] + ["--model", fixtures["tiny"], "-o", "zo,gd", "--steps", "300",
                                             "--log-every", "20", "--eval-every", "100", "--trace-every", "100",
                                             "--checkpoint-every", "50"]}
    for command, args in commands.items():
        for seed in range(3):
            with tempfile.TemporaryDirectory() as tmp:
                results.append((f"kill -9 {command} (seed {seed})", fault_kill(args, Path(tmp), seed)))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        with tempfile.TemporaryDirectory() as tmp:
            results.append((f"{sig.name} toy", fault_signal(sig, Path(tmp))))
    for label, fault in (("SIGINT at start-up", fault_signal_at_start_up),
                         ("a signal at exit", fault_signal_at_exit), ("sweep driver signals", fault_sweep_driver),
                         ("checkpoint on a full disk", fault_checkpoint_write),
                         ("torchrun ranks with other configs", fault_torchrun_configs),
                         ("a seed study of 10,000 runs", fault_seed_study),
                         ("symlinked run folders", fault_symlinked_folders)):
        with tempfile.TemporaryDirectory() as tmp:
            results.append((label, fault(Path(tmp))))
    with tempfile.TemporaryDirectory() as tmp:
        results.append(("two writers on one folder", fault_concurrent_resume(Path(tmp))))
    for size in (64, 96, 160, 400):
        with tempfile.TemporaryDirectory() as tmp:
            found = fault_disk_full(Path(tmp), size)
            if found is not None:
                results.append((f"disk full ({size} KiB tmpfs)", found))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="flags,recipes,files,state,faults")
    parser.add_argument("--subprocess", action="store_true",
                        help="every case as its own `python -m zoflat_cli` (slower: ~3 s per case)")
    options = parser.parse_args()
    parts = options.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = make_fixtures(Path(tmp))
        cases = [c for part, make in (("flags", flag_cases), ("recipes", recipe_cases), ("files", file_cases),
                                      ("state", state_cases)) if part in parts for c in make()]
        results = []
        if options.subprocess:
            with concurrent.futures.ThreadPoolExecutor(options.jobs) as pool:
                for case, defects in pool.map(lambda c: run_case(c, fixtures), cases):
                    results.append((case.label, defects))
        else:  # one at a time: each case changes into its own folder
            results = [(case.label, defects) for case, defects in (run_case(c, fixtures, True) for c in cases)]
        for label, found in results:
            if found:
                print(f"DEFECT {label}: {'; '.join(found)}", flush=True)
        if "faults" in parts:
            results += faults(fixtures)
    defects = [(label, d) for label, d in results if d]
    for label, found in defects[len([r for r in results[:len(cases)] if r[1]]):]:  # the faults'
        print(f"DEFECT {label}: {'; '.join(found)}")
    print(f"tried {len(results)}, handled {len(results) - len(defects)}, defects {len(defects)}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
