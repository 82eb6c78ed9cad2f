"""Probe (not a bench.py section: it needs a warm-started model): one dynamic-sampling round
of the default run (22 questions x 8 rollouts, T = 1, up to 64 tokens, the compute dtype
--dtype auto picks) with the shared prefix's KV cache copied to every row (as before commit
e317c41) and held once (_kv_cache's share_prefix), interleaved in one process, the order
swapped each repeat, the same random numbers for both. Prints seconds, tokens/s and the
peak resident memory above what the process held before the round.

    uv run python results/speed/probe_prefix_cache.py runs/grpo/warmstart/final 3
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
import grpo  # noqa: E402
import harness  # noqa: E402
import tasks  # noqa: E402


def resident_gb(field):  # VmRSS (now) or VmHWM (the peak since the last reset), GB
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 2**20 for line in f if line.startswith(field))


def main(model_dir, repeats, questions=22):
    args = grpo.parse_args([])
    model, tokenizer = common.load_model(model_dir, torch.device("cpu"), common.pick_dtype("auto", torch.device("cpu")))
    model.eval()
    examples = tasks.load_examples(args, "train", questions)
    prompts = [tasks.r1_zero_prompt(q["question"]) for q in examples for _ in range(args.group_size)]
    sampling, kv_cache = harness.Sampling.from_args(args), common._kv_cache
    print(f"{len(prompts)} rows, dtype {model.compute_dtype}, attention {model.config._attn_implementation}, "
          f"{torch.get_num_threads()} threads")
    for repeat in range(repeats):
        for shared in (False, True) if repeat % 2 == 0 else (True, False):
            common._kv_cache = lambda capacity, share_prefix=False, _shared=shared: kv_cache(capacity, _shared)
            harness.release_memory()
            before = resident_gb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM, the peak
            t = time.perf_counter()
            out = common.generate(model, tokenizer, prompts, sampling, batch_size=len(prompts),
                                  generator=torch.Generator().manual_seed(repeat))
            seconds, tokens = time.perf_counter() - t, sum(len(o["response_ids"]) for o in out)
            print(f"repeat {repeat}, prefix {'held once' if shared else 'copied to every row'}: {seconds:.1f} s, "
                  f"{tokens} tokens, {tokens / seconds:.0f} tokens/s, peak RSS {resident_gb('VmHWM') - before:.2f} GB "
                  f"above the {before:.2f} before", flush=True)
    common._kv_cache = kv_cache


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
