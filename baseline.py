"""Zero-shot evaluation of a model on a task's held-out split with the r1_zero prompt.

Batched generation with a KV cache (greedy by default, stop at </answer>), strict r1_zero
grading, a three-category summary, and every generation written to <out-dir>/generations.jsonl.

    uv run python baseline.py                                  # embedded SmolLM2 on chain_sum
    uv run python baseline.py --task gsm_symbolic --max-new-tokens 256
    uv run python baseline.py --model runs/sft/final --eval-data my_test.jsonl
"""

import argparse
import json
import os

import torch

import common
import tasks


def parse_args(argv=None):
    p = tasks.add_shared_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.set_defaults(temperature=0.0)  # evaluation: greedy unless asked
    return p.parse_args(argv)


def main(args):
    common.set_seed(args.seed)
    out_dir = args.out_dir or os.path.join("runs", "baseline")
    os.makedirs(out_dir, exist_ok=True)
    device = common.pick_device(args.device)
    dtype = common.pick_dtype(args.dtype, device)
    model, tokenizer = common.load_model(args.model, device, dtype, args.cache_dir)
    examples = tasks.load_examples(args, "eval", args.n_eval)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    with tasks.Timer() as timer:
        rows, summary = common.evaluate(
            model, tokenizer, examples, tasks.get_reward_fn(args.reward), args.max_new_tokens, args.temperature,
            args.top_p, args.eval_batch_size, generator, desc="baseline",
        )
    summary.update(model=args.model, task=args.eval_data or args.task, dtype=str(dtype).removeprefix("torch."),
                   device=str(device), temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                   seconds=round(timer.seconds, 1))
    tasks.write_jsonl(os.path.join(out_dir, "generations.jsonl"), rows)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    tasks.print_summary(summary, f"{args.model} on {summary['task']} ({timer.seconds:.0f} s, {dtype}, {device})")
    return summary


if __name__ == "__main__":
    main(parse_args())
