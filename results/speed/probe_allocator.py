"""Probe: glibc allocator settings against a GRPO run's peak resident memory and speed. Three
GRPO steps from a warm-started model (default settings otherwise; --malloc-mmap-mb 0 unless
the mode sets it), in one mode per process:

- base: glibc's own thresholds (allocations up to 32 MB from the heap);
- trim: malloc_trim before every training microbatch and every rollout round;
- keepgrad: gradients zeroed in place, not freed, between steps;
- mmap1m: allocations of 1 MB or more mapped and unmapped (mallopt), the whole run;
- mmap1m_train: the same only while training microbatches run, glibc's 32 MB during rollouts.

Prints per step: seconds, rollout and training tokens/s, the peak RSS logged; run under
/usr/bin/time -v for the process's maximum. GLIBC_TUNABLES=glibc.malloc.hugetlb=1 with base
tries transparent huge pages for the heap.

    for m in base mmap1m; do /usr/bin/time -v uv run python results/speed/probe_allocator.py \\
        runs/grpo/warmstart/final $m 2>&1 | grep -E "step|Maximum resident"; done
"""

import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
import grpo  # noqa: E402
import harness  # noqa: E402


def before(fn, hook):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        hook()
        return fn(*a, **k)
    return wrapper


def main(model_dir, mode):
    if mode == "trim":
        common.get_response_log_probs = before(common.get_response_log_probs, harness.release_memory)
        common.generate = before(common.generate, harness.release_memory)
    elif mode == "keepgrad":
        zero_grad = torch.optim.Optimizer.zero_grad
        torch.optim.Optimizer.zero_grad = lambda self, set_to_none=True: zero_grad(self, set_to_none=False)
    elif mode == "mmap1m_train":
        common.get_response_log_probs = before(common.get_response_log_probs, lambda: harness.map_large_allocations(1))
        common.generate = before(common.generate, lambda: harness.map_large_allocations(32))
    elif mode != "base" and mode != "mmap1m":
        raise SystemExit(f"unknown mode {mode}")
    out_dir = os.path.join("runs", "probe_allocator", mode)
    grpo.main(grpo.parse_args(["--model", model_dir, "--warmstart-steps", "0", "--n-steps", "3", "--n-eval", "32",
                               "--eval-every", "0", "--out-dir", out_dir,
                               "--malloc-mmap-mb", "1" if mode == "mmap1m" else "0"]))
    for row in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))):
        if "step_s" in row:
            print(f"{mode} step {row['step']}: {row['step_s']:.1f} s, rollouts {row['rollout_tok_s']:.0f} tokens/s, "
                  f"training {row['train_tok_s']:.0f} tokens/s, peak RSS {row['peak_rss_gb']:.2f} GiB")


if __name__ == "__main__":
    main(*sys.argv[1:])
