#!/usr/bin/env bash
# MeZO's comparison on SmolLM2-135M, scaled to 2 CPU cores (recipes/smollm2/finetune.yaml: the
# protocol). One `zoflat sweep` per task, what is trained (all weights, or LoRA r=8 on q/v as MeZO)
# and optimizer: ZO-SGD (MeZO) and GD with Adam (MeZO's FT baseline); two sweeps at a time, each one
# job at a time on one CPU thread, under ${OUT:-runs/smollm2}/sweep (`zoflat sweep --resume` each).
#   recipes/smollm2/finetune.sh grid    # SST-2, seed 0: the lr grid (pick by dev accuracy)
#   LR_ZO_ALL=.. LR_ZO_LORA=.. LR_GD_ALL=.. LR_GD_LORA=.. recipes/smollm2/finetune.sh main
#                                       # the picked lrs: COPA and RTE seed 0, SST-2 seed 1 (TASKS=...:
#                                       # some of them)
set -euo pipefail
export OUT=${OUT:-runs/smollm2}
sweep() {  # task trainable optimizer lr seeds
  local steps extra=()
  # ZO is cheaper per step (two forward passes) than GD (a forward and a backward) and MeZO runs it
  # for many more steps; RTE's prompts are ~3x longer than SST-2's and COPA's
  case $1/$3 in rte/zo) steps=20 ;; rte/gd) steps=6 ;; */zo) steps=60 ;; */gd) steps=15 ;; esac
  [ "$3" = gd ] && extra=(--update adam)
  [ "$3/$2" = zo/lora ] && extra=(--lambda 1e-2)  # MeZO's LoRA runs: eps 1e-2
  # RTE: half the samples too, as its evaluations (train, dev, test at step 0 and at the end) cost
  # a ZO job more than its steps
  [ "$1" = rte ] && extra+=(--num-train 128 --num-dev 32 --num-eval 100)
  zoflat sweep recipes/smollm2/finetune.yaml --jobs 1 --cpus-per-job 1 --quiet --task "$1" --trainable "$2" \
    --optimizer "$3" "${extra[@]}" --lr "$4" --seeds "$5" --steps $steps --name "$1-$2-$3" --out "$OUT"
}
export -f sweep
case ${1:-main} in
  grid) printf '%s\n' "sst2 all zo 1e-6,1e-5 0," "sst2 lora zo 1e-4,1e-3 0," "sst2 all gd 1e-5,5e-5 0," \
                      "sst2 lora gd 1e-4,1e-3 0," ;;
  main) for task in ${TASKS:-copa rte sst2}; do
          seeds=0,; [ "$task" = sst2 ] && seeds=1,
          for method in "all zo ${LR_ZO_ALL:-}" "lora zo ${LR_ZO_LORA:-}" "all gd ${LR_GD_ALL:-}" \
                        "lora gd ${LR_GD_LORA:-}"; do  # the methods whose LR_* is set
            if [ -n "${method#* * }" ]; then echo "$task $method $seeds"; fi
          done
        done ;;
  *) echo "usage: $0 grid|main" >&2; exit 2 ;;
esac | xargs -P 2 -L 1 bash -c 'sweep "$@"' _
