"""Probe (not a bench.py section: it needs a warm-started model): the training forward and
backward of one GRPO microbatch as the default run makes it (16 rollouts of chain_sum
questions under the r1_zero prompt, 64 response tokens each, the shared prefix run once),
with and without --checkpoint-activations. Prints, per repeat, the seconds of forward +
backward, the resident memory after the forward and the peak of the backward. One setting a
process (the heap is the process's); run the two alternately:

    for i in 1 2; do for f in --no-checkpoint-activations --checkpoint-activations; do
        uv run python results/speed/probe_checkpointing.py runs/grpo/warmstart/final $f; done; done
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


def microbatch(model_dir, flags):
    """The model (training mode) and a default run's microbatch: ids, mask, labels and the
    positions a forward pass can skip (harness.positions)."""
    args = grpo.parse_args(flags)
    model, tokenizer, _ = common.load_policy(args, model_dir)
    model.train()
    questions = tasks.load_examples(args, "train", 16)
    prompt_ids = [tokenizer(tasks.r1_zero_prompt(q["question"]))["input_ids"] for q in questions]
    response_ids = torch.randint(100, 1000, (16, 64), generator=torch.Generator().manual_seed(0)).tolist()
    batch = common.join_prompt_and_output_ids(prompt_ids, response_ids, tokenizer.pad_token_id)
    ids, mask, labels = batch["input_ids"], batch["response_mask"], batch["labels"]
    return model, ids, mask, labels, harness.positions(ids.tolist(), mask.tolist())


def main(model_dir, flag, repeats=5):
    model, ids, mask, labels, where = microbatch(model_dir, [flag])
    print(f"{flag}: {tuple(ids.shape)} tokens, {where}, {torch.get_num_threads()} threads")
    for repeat in range(repeats):
        harness.release_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM, the peak
        t = time.perf_counter()
        out = common.get_response_log_probs(model, ids, labels, True, **where)
        after_forward = resident_gb("VmRSS")
        (-(out["log_probs"] * mask).sum() / mask.sum()).backward()
        seconds = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        print(f"repeat {repeat}: {seconds:.2f} s, RSS after the forward {after_forward:.2f} GB, "
              f"peak {resident_gb('VmHWM'):.2f} GB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
