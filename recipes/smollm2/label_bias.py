"""Is a zero-shot accuracy at chance the model or the prompt and scoring? For a classification
task, on the same evaluation sample as recipes/smollm2/baselines.sh: how often the model picks
each label, the accuracy, and the accuracy once each label's mean score over the sample is
subtracted (a per-label prior correction, as contextual calibration does). A correction that lifts
the accuracy well above chance means the model ranks the examples but its label words carry a
prior: the prompt's verbalisers, not the model. One that leaves it at chance means the model.

    python recipes/smollm2/label_bias.py sst2 rte cb boolq wsc multirc [--model smollm2-135m] [--num-eval 200]
"""

import argparse

import torch

from zoflat_cli.data import mezo_tasks
from zoflat_cli.experiments import finetune

EVAL = {"boolq": (500, "eval"), "multirc": (200, "train")}  # as baselines.sh samples them (else the pool)


def label_bias(model: str, task: str, most: int) -> str:
    num_eval, pool = EVAL.get(task, (1000, "train"))
    num_eval = min(num_eval, most)  # the first examples of the same sample
    config = finetune.EXPERIMENT.resolve({"model": model, "task": task, "num_train": 32, "num_dev": 0,
                                          "num_eval": num_eval, "train_pool": pool, "steps": 0, "trace": "none"})
    problem = finetune.make_problem(config, torch.device("cpu"), torch.float32)
    scores, gold = [], []
    with torch.inference_mode():
        for batch in problem.splits["test"].batches:
            scores.append(problem.option_scores(problem.model(*problem._inputs(batch)), batch))
            gold.append(batch.gold)
    scores, gold = torch.cat(scores), torch.cat(gold)
    picked, corrected = scores.argmax(-1), (scores - scores.mean(0)).argmax(-1)

    def share(labels):
        return "/".join(f"{float((labels == i).float().mean()):.2f}" for i in range(scores.shape[1]))

    return (f"| {task} | {len(gold)} | {share(gold)} | {share(picked)} | {float((picked == gold).float().mean()):.3f} "
            f"| {float((corrected == gold).float().mean()):.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+", choices=[t for t, s in mezo_tasks.TASKS.items()
                                                    if s.kind == "classification"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-eval", type=int, default=1000, help="At most this many examples of the sample.")
    args = parser.parse_args()
    print("| task | examples | gold label shares | picked label shares | accuracy | prior-corrected accuracy |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        print(label_bias(args.model, task, args.num_eval), flush=True)


if __name__ == "__main__":
    main()
