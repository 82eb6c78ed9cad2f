"""Probe (not a bench.py section: it needs a warm-started model): the seconds a GRPO step
spends sampling under four dynamic-sampling policies, interleaved in one process so that the
machine's drift hits them alike, and the mixed groups each one keeps. bf16, the real strict
r1_zero grader, 8 groups of 8 wanted a step, fresh questions for every call.

    uv run python results/speed/probe_sampling_rounds.py runs/grpo/warmstart/final 2
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
import grpo  # noqa: E402
import harness  # noqa: E402
import rewards  # noqa: E402
import tasks  # noqa: E402

POLICIES = {  # name -> (oversample, max rounds, generate batch size; 0: the whole round)
    "before: 1x, 3 rounds, batches of 64": (1.0, 3, 64),
    "2x, 3 rounds (the default)": (2.0, 3, 0),
    "2x, 1 round": (2.0, 1, 0),
    "1.5x, 2 rounds": (1.5, 2, 0),
}


def main(model_dir, repeats):
    args = grpo.parse_args([])
    model, tokenizer = common.load_model(model_dir, torch.device("cpu"), torch.bfloat16)
    model.eval()
    questions, grader, cursor = tasks.load_examples(args, "train", 4000), rewards.get_reward_fn("r1_zero"), 0
    sampling = harness.Sampling.from_args(args)

    def sampler(batch_size):
        def sample_groups(n):
            nonlocal cursor
            group = [q for q in questions[cursor : cursor + n] for _ in range(args.group_size)]
            cursor += n
            out = common.generate(model, tokenizer, [tasks.r1_zero_prompt(q["question"]) for q in group], sampling,
                                  batch_size=batch_size or len(group), generator=torch.Generator().manual_seed(cursor))
            return out, [grader(r["response"], q["answer"]) for r, q in zip(out, group)]
        return sample_groups

    results = {name: [] for name in POLICIES}
    for _ in range(repeats):
        for name, (oversample, rounds, batch_size) in POLICIES.items():
            t0 = time.perf_counter()
            _, _, stats = harness.dynamic_sample(sampler(batch_size), 8, args.group_size, rounds, oversample)
            results[name].append((time.perf_counter() - t0, stats["groups_generated"], stats["groups_mixed_kept"]))
    for name, runs in results.items():
        seconds, generated, mixed = (sum(r[i] for r in runs) for i in range(3))
        print(f"{name:36s} {seconds / len(runs):5.1f} s a step, {generated / len(runs):4.1f} groups generated, "
              f"{mixed / len(runs):3.1f} mixed kept, {seconds / mixed:4.2f} s per mixed group "
              f"(calls: {', '.join(f'{r[0]:.1f}' for r in runs)} s)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
