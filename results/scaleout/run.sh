#!/usr/bin/env bash
# One process, two processes (whole model each) and two processes under --fsdp, on the embedded
# SmolLM2-135M, one after another on an otherwise idle machine. Writes runs/scaleout/<job>/.
# GRPO starts from the default run's 4-step warm start, runs/grpo/warmstart/final (uv run python grpo.py makes it).
# Then: uv run python results/scaleout/table.py runs/scaleout (without an argument: the copies in results/scaleout/runs)
set -euo pipefail
SFT="sft.py --task chain_sum --max-new-tokens 64 --n-steps 6 --batch-size 16 --grad-accum 2 --n-eval 64 --eval-every 0"
GRPO="grpo.py --warmstart-steps 0 --model runs/grpo/warmstart/final --n-steps 3 --no-dynamic-sampling --n-eval 64 --eval-every 0"
for job in sft grpo; do
  cmd=$([ $job = sft ] && echo "$SFT" || echo "$GRPO")
  uv run python $cmd --out-dir runs/scaleout/$job-1proc
  uv run torchrun --standalone --nproc_per_node 2 $cmd --out-dir runs/scaleout/$job-2proc
  uv run torchrun --standalone --nproc_per_node 2 $cmd --fsdp --out-dir runs/scaleout/$job-2proc-fsdp
done
