#!/usr/bin/env bash
# The LM-claim runs and their flatness measures (README, "The paper's LM claim, tested"), one CPU
# thread each. Resumable: with RESUME_ZO / RESUME_GD set to the run folders, unfinished runs go on
# (zoflat finetune --resume) and the measures are taken again (each (run, step, measure) replaced).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-runs/flatness}
if [ -n "${RESUME_ZO:-}" ]; then zo=$(zoflat finetune --resume "$RESUME_ZO" --quiet)
else zo=$(zoflat finetune --config recipes/flatness/lm_claim_zo.yaml --out "$OUT" --quiet); fi
if [ -n "${RESUME_GD:-}" ]; then gd=$(zoflat finetune --resume "$RESUME_GD" --quiet)
else gd=$(zoflat finetune --config recipes/flatness/lm_claim_gd.yaml --out "$OUT" --quiet); fi
SETTINGS=(--measures all --probes 6 --hutchpp 18 --top-k 2 --slq-vectors 1 --slq-steps 20 --points 9)
# step 0 is one point for all three runs (the same base weights and LoRA initialisation, and each
# measure's random numbers come from the run's seed and the step): measured once, on zo
zoflat flatness "$zo" --runs zo --at 0 "${SETTINGS[@]}"
zoflat flatness "$zo" --at 1000,end "${SETTINGS[@]}"
zoflat flatness "$gd" --at end "${SETTINGS[@]}"
# dd where its training loss brackets ZO's at step 1000 (the comparison at equal loss)
zoflat flatness "$zo" --runs dd --at 500,600 --measures trace,eigenvalues,sharpness --probes 6 --hutchpp 18 --top-k 2
python recipes/flatness/lm_claim_table.py "$zo" "$gd"
