"""What tests/test_distributed.py runs under torchrun: a list of jobs (script, flags, fixed),
each script.main(parse_args(flags)) in turn in these processes, with fixed the sampler
replaced by fixed_rollouts so that one process and several sample the same answers; then a
check of common.rank_generator and of how much of an --fsdp model each process holds."""

import functools
import hashlib
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fixed_rollouts(model, tokenizer, prompts, sampling, batch_size=64, generator=None, record=None):
    """common.generate's (or common_mlx.generate's) rollouts, drawn from no RNG: the k-th copy
    of a prompt in the list answers 1-4 digits picked by a hash of (prompt, k), whatever the
    batch or the process. record: a file that gets each call's number of prompts, one per line."""
    if record:
        with open(record, "a") as f:
            f.write(f"{len(prompts)}\n")
    seen, out = {}, []
    for prompt in prompts:
        k = seen[prompt] = seen.get(prompt, -1) + 1
        h = int(hashlib.sha256(f"{prompt}|{k}".encode()).hexdigest(), 16)
        response = "".join("0123456777"[(h >> (4 * i)) % 10] for i in range(1 + h % 4))
        ids = tokenizer.encode(response, add_special_tokens=False)  # encode: mlx-lm's tokenizer wrapper has it too
        out.append({"prompt_ids": tokenizer.encode(prompt, add_special_tokens=False), "response_ids": ids,
                    "response": response, "log_probs": [0.0] * len(ids), "truncated": False, "entropy": 0.0})
    return out


def run(script, flags, fixed=True):
    """script.main(script.parse_args(flags)); with fixed, on fixed_rollouts (each call's size
    recorded in <out-dir>/sampled_rank<R>.txt) and with no per-rank generator, so that the
    global RNG (GRPO's shuffles) is drawn from as in one process. An MLX script (*_mlx) gets
    common_mlx patched instead (its rank from mlx.launch's MLX_RANK, its rank_generator a
    no-op context)."""
    import contextlib

    mlx = script.endswith("_mlx")
    common = importlib.import_module("common_mlx" if mlx else "common")
    module = importlib.import_module(script)
    args = module.parse_args(flags)
    if not fixed:
        return module.main(args)
    os.makedirs(args.out_dir, exist_ok=True)
    rank = os.environ.get("MLX_RANK" if mlx else "RANK", 0)
    record = os.path.join(args.out_dir, f"sampled_rank{rank}.txt")
    saved = common.generate, common.rank_generator
    common.generate = functools.partial(fixed_rollouts, record=record)
    common.rank_generator = (lambda device: contextlib.nullcontext()) if mlx else (lambda device: None)
    try:
        return module.main(args)
    finally:
        common.generate, common.rank_generator = saved


def check_rank_generator(out_dir):
    """<out_dir>/rng_rank<R>.json: a draw from this rank's sampling generator and one from the
    global RNG after it (the test wants the first to differ between ranks, the second not)."""
    import torch

    import common

    sample = torch.rand(3, generator=common.rank_generator(torch.device("cpu"))).tolist()
    with open(os.path.join(out_dir, f"rng_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"rank_generator": sample, "global": torch.rand(3).tolist()}, f)


def check_sharding(script, flags, out_dir):
    """<out_dir>/fsdp_rank<R>.json: how many weights this process holds of the whole, for the
    model that script's --fsdp run trains."""
    import torch

    import common

    model = common.load_policy(importlib.import_module(script).parse_args(flags))[0]
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    with open(os.path.join(out_dir, f"fsdp_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"held": held, "whole": sum(p.numel() for p in model.parameters()),
                   "dtensors": sum(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())}, f)


if __name__ == "__main__":
    jobs = json.loads(sys.argv[1])
    for script, flags, fixed in jobs:
        run(script, flags, fixed)
    check_rank_generator(sys.argv[2])
    check_sharding(*next((script, flags) for script, flags, _ in jobs if "--fsdp" in flags), sys.argv[2])
