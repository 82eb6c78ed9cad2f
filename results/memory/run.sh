#!/usr/bin/env bash
# Peak RSS of GRPO steps: the training forward before 2069f62 (whole-batch logsumexp and entropy),
# in 512-position chunks (the default since), and chunks + --checkpoint-activations; each with
# the rollouts' natural lengths and with every rollout forced to the 64-token cap. 3 steps from
# the default run's 4-step warm start (runs/grpo/warmstart/final: uv run python grpo.py makes it),
# dynamic sampling off, one run after another on an otherwise idle machine.
# Then: uv run python results/memory/table.py runs/memory
set -euo pipefail
START=$(realpath runs/grpo/warmstart/final)
FLAGS="--warmstart-steps 0 --model $START --n-steps 3 --n-eval 64 --eval-every 0 --save-every 0"
BEFORE=/tmp/nanoalign-before-2069f62
[ -d $BEFORE ] || git worktree add --detach $BEFORE 2069f62^
for lengths in natural forced64; do
  extra=$([ $lengths = forced64 ] && echo "--min-new-tokens 64" || true)
  (cd $BEFORE && uv run python grpo.py $FLAGS $extra --out-dir $OLDPWD/runs/memory/before-$lengths)
  uv run python grpo.py $FLAGS $extra --no-dynamic-sampling --out-dir runs/memory/chunked-$lengths
  uv run python grpo.py $FLAGS $extra --no-dynamic-sampling --checkpoint-activations \
    --out-dir runs/memory/chunked-checkpointed-$lengths
done
