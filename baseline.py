"""Zero-shot evaluation of a model on a task's held-out split with the r1_zero prompt.

Batched generation with a KV cache (greedy by default, stop at </answer>), strict r1_zero
grading, a three-category summary, and every generation written to <out-dir>/generations.jsonl.

    uv run python baseline.py                                  # embedded SmolLM2 on chain_sum
    uv run python baseline.py --task gsm_symbolic --max-new-tokens 256
    uv run python baseline.py --model runs/sft/final --eval-data my_test.jsonl
"""

import json
import os
import time

import torch

import common
import harness
import rewards
import tasks


# ----------------------------------------------------------------------------- defaults
# Edit a line for an ablation, or override it as a flag: --task gsm_symbolic --max-new-tokens 256.
model = "smollm2-135m-instruct"  # local HF dir, hub id, or the embedded default
task = "chain_sum"  # chain_sum, chain_sum_hard, basic_arithmetic, gsm_symbolic, or reasoning-gym name[:k=v,...]
eval_data = ""  # JSONL of your own held-out questions; overrides --task
reward = "r1_zero"  # r1_zero, exact, closeness, digits, path/to/file.py:function, or a weighted sum: r1_zero:1,closeness:0.2
out_dir = "runs/baseline"  # run directory
cache_dir = ""  # where the embedded model is converted (default $NANOALIGN_CACHE or ~/.cache/nanoalign)
max_new_tokens = 128
temperature = 0.0  # 0: greedy
top_p = 1.0
n_eval = 200  # held-out items
eval_batch_size = 64
seed = 0
device = "auto"  # auto: cuda > mps > cpu
dtype = "auto"  # auto: bf16 where the hardware runs it fast, else fp32
DEFAULTS = harness.defaults_of(globals())


def parse_args(argv=None):
    p, args = harness.parse_flags(DEFAULTS, argv, __doc__.split("\n")[0], __file__)
    harness.check_inputs(p, args)
    return args


def main(args):
    common.set_seed(args.seed)
    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    device = common.pick_device(args.device)
    dtype = common.pick_dtype(args.dtype, device)
    model, tokenizer = common.load_model(args.model, device, dtype, args.cache_dir)
    examples = tasks.load_examples(args, "eval", args.n_eval)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    t0 = time.perf_counter()
    sampling = harness.Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    rows, summary = common.evaluate(model, tokenizer, examples, rewards.get_reward_fn(args.reward), sampling,
                                    batch_size=args.eval_batch_size, generator=generator, desc="baseline")
    seconds = time.perf_counter() - t0
    summary.update(model=args.model, task=args.eval_data or args.task, dtype=str(dtype).removeprefix("torch."),
                   device=str(device), temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                   seconds=round(seconds, 1))
    harness.write_jsonl(os.path.join(out_dir, "generations.jsonl"), rows)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    harness.print_summary(summary, f"{args.model} on {summary['task']} ({seconds:.0f} s, {dtype}, {device})")
    return summary


if __name__ == "__main__":
    harness.exit_on_oom(main, parse_args(), "--eval-batch-size, --max-new-tokens")
