#!/usr/bin/env bash
# Zero-shot and in-context (ICL) baselines of SmolLM2-135M (--model smollm2-135m) on MeZO's bundled
# tasks: `zoflat finetune --steps 0` (evaluation only), one run folder per task under
# ${OUT:-runs/smollm2}/{zeroshot,icl}/finetune.
#   recipes/smollm2/baselines.sh zeroshot [TASK ...]   # default: all 12 bundled tasks
#   recipes/smollm2/baselines.sh icl [TASK ...]        # default: sst2 rte cb wsc copa; DEMOS=4
#   recipes/smollm2/baselines.sh mean [TASK ...]       # zero-shot, options scored per token (--scoring
#                                                      # mean); default: arc-easy arc-challenge openbookqa
# Sized for 2 CPU cores (README: "SmolLM2-135M, measured"). MeZO evaluates 1,000 examples; zero-shot
# here evaluates the whole pool where it has at most 1,000, else 500 (200 for MultiRC and SQuAD,
# whose prompts are 4-8x longer); ICL, whose prompts are DEMOS+1 times longer, evaluates SST-2 and RTE
# on the 200 examples the fine-tuning runs use (recipes/smollm2/finetune.yaml). Tasks whose train
# split is not bundled draw their demonstrations from the validation pool, disjoint from the
# evaluated sample (--train-pool eval).
set -euo pipefail
kind=${1:-zeroshot}; shift || true
case $kind in
  zeroshot) demos=0; scoring=sum
            tasks=${*:-sst2 rte cb boolq wsc multirc copa piqa arc-easy arc-challenge openbookqa squad} ;;
  icl) demos=${DEMOS:-4}; scoring=sum; tasks=${*:-sst2 rte cb wsc copa} ;;
  mean) demos=0; scoring=mean; tasks=${*:-arc-easy arc-challenge openbookqa} ;;
  *) echo "usage: $0 zeroshot|icl|mean [TASK ...]" >&2; exit 2 ;;
esac
for task in $tasks; do
  case $kind/$task in
    icl/sst2|icl/rte|*/multirc|*/squad) eval=200 ;;
    */boolq|*/piqa|*/arc-easy|*/arc-challenge) eval=500 ;;
    *) eval=1000 ;;
  esac
  case $task in boolq|piqa|arc-easy|arc-challenge|squad) pool=eval ;; *) pool=train ;; esac
  zoflat finetune --model smollm2-135m --task "$task" --steps 0 --optimizer zo --num-train 32 --num-dev 0 \
    --num-eval $eval --train-pool $pool --demos $demos --scoring $scoring \
    --trace none --out "${OUT:-runs/smollm2}/$kind" --name "$task" --quiet
done
