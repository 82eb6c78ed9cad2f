"""Expert iteration: sample, keep what the verifier accepts, fine-tune on it, repeat.

Each of --n-ei-steps: take --questions-per-step training questions, sample --group-size
answers for each, keep the ones with reward 1 (one copy of each distinct answer per
question), then run --sft-epochs of completion-only SFT over the kept set with
sft_microbatch_train_step. Logs how many were kept and the held-out accuracy after each step.

    uv run python expert_iteration.py --model runs/sft/final --task chain_sum
    uv run python expert_iteration.py --n-ei-steps 5 --group-size 8 --questions-per-step 128
"""

import json
import os
import time

from tqdm import tqdm

import common
import harness
import rewards
import tasks


# ----------------------------------------------------------------------------- defaults
# Edit a line for an ablation, or override it as a flag: --n-ei-steps 5 --group-size 8.
model = "smollm2-135m-instruct"  # local HF dir, hub id, or the embedded default
task = "chain_sum"  # chain_sum, chain_sum_hard, basic_arithmetic, gsm_symbolic, or reasoning-gym name[:k=v,...]
train_data = ""  # JSONL of your own questions (MATH or GSM8K style); overrides --task
eval_data = ""  # JSONL of your own held-out questions; overrides --task
reward = "r1_zero"  # r1_zero, exact, closeness, digits, path/to/file.py:function, or a weighted sum: r1_zero:1,closeness:0.2
out_dir = "runs/expert_iteration"  # run directory
cache_dir = ""  # where the embedded model is converted (default $NANOALIGN_CACHE or ~/.cache/nanoalign)
# expert iteration
n_ei_steps = 3  # sample -> filter -> SFT rounds
questions_per_step = 64
group_size = 4  # answers sampled per question
sft_epochs = 1  # passes over the kept answers per EI step
# optimization
lr = 2e-5
batch_size = 16  # kept answers per optimizer step
grad_accum = 2  # microbatches per optimizer step
warmup_steps = 0  # linear warmup, then cosine decay to 10%
weight_decay = 0.0
max_grad_norm = 1.0
max_bad_steps = 3  # stop after this many optimizer steps in a row skipped for a NaN / inf gradient
lora_rank = 0  # 0: full fine-tuning
n_train = 5000  # training questions drawn from the task
# sampling
max_new_tokens = 64
min_new_tokens = 4
temperature = 1.0
top_p = 1.0
top_k = 0  # 0: off
min_p = 0.0
repetition_penalty = 1.0
# evaluation (greedy), checkpoints, hardware
n_eval = 200  # held-out items per evaluation
eval_batch_size = 64
eval_every = 1  # steps between held-out evaluations (0: only at the end)
eval_samples = 0  # k > 0: also k samples per held-out question (sampling settings): mean@k, pass@k, entropy
save_every = 0  # steps between checkpoints (0: only the final model)
keep_checkpoints = 2  # checkpoints kept on disk, the latest (0: all)
resume = False  # continue the run in --out-dir from its latest checkpoint
wandb = False  # also log to Weights & Biases
tensorboard = False  # also log to TensorBoard, <out-dir>/tensorboard (uv sync --extra tensorboard)
plot = False  # at the end, PNGs of metrics.jsonl in <out-dir>/plots (plot.py)
seed = 0
device = "auto"  # auto: cuda > mps > cpu
dtype = "auto"  # auto: bf16 where the hardware runs it fast, else fp32
DEFAULTS = harness.defaults_of(globals())


def parse_args(argv=None):
    p, args = harness.parse_flags(DEFAULTS, argv, __doc__.split("\n")[0], __file__)
    harness.require_multiple(p, [("--batch-size", args.batch_size, "--grad-accum", args.grad_accum)])
    harness.check_inputs(p, args, train_kind="qa")
    return args


def main(args):
    common.init_distributed(args.device)  # under torchrun: join the other processes (a plain run: nothing)
    common.set_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    model, tokenizer, ckpt = common.load_policy(args)
    # the number of SFT steps depends on how much is kept, so the schedule is per EI step: constant after warmup
    optimizer, scheduler = common.make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95), args.warmup_steps,
                                                 total_steps=10**9)
    train_examples = tasks.load_examples(args, "train", args.n_train)
    eval_examples = tasks.load_examples(args, "eval", args.n_eval)
    reward_fn = rewards.get_reward_fn(args.reward)
    start_step, cursor = common.resume(ckpt, model, optimizer, scheduler)
    log = harness.MetricsLog(args.out_dir, args.wandb, vars(args), start_step, args.tensorboard)
    micro, summary, bad_steps = args.batch_size // args.grad_accum, None, 0

    for ei_step in range(start_step, args.n_ei_steps):
        t0 = time.perf_counter()
        # ---- sample and filter
        questions = harness.take(train_examples, cursor, args.questions_per_step, args.seed)
        cursor += len(questions)
        questions = common.rank_share(questions)  # under torchrun each process samples and grades its share
        prompts = [tasks.r1_zero_prompt(q["question"]) for q in questions for _ in range(args.group_size)]
        answers = [q["answer"] for q in questions for _ in range(args.group_size)]
        model.eval()
        rollouts = common.generate(model, tokenizer, prompts, harness.Sampling.from_args(args),
                                   generator=common.rank_generator(next(model.parameters()).device))
        scores = [reward_fn(r["response"], a) for r, a in zip(rollouts, answers)]
        prompts, rollouts, scores = (common.all_gather(x) for x in (prompts, rollouts, scores))  # all, on every process
        kept = list(dict.fromkeys((p, r["response"]) for p, r, s in zip(prompts, rollouts, scores) if s["reward"] == 1))
        solved = len({p for p, _ in kept})

        # ---- SFT on the kept answers
        model.train()
        losses, n_updates = [], 0
        for epoch in range(args.sft_epochs):
            order = harness.take(kept, epoch * len(kept), len(kept), args.seed + ei_step) if kept else []
            for first in tqdm(range(0, len(order), args.batch_size), desc=f"ei {ei_step + 1} sft", leave=False,
                              disable=not harness.is_main()):
                opt_batch = order[first : first + args.batch_size]
                n_micro = -(-len(opt_batch) // micro)
                for m0 in common.rank_share(range(0, len(opt_batch), micro)):  # this process's microbatches
                    chunk = opt_batch[m0 : m0 + micro]
                    out, mask = common.completion_log_probs(model, tokenizer, [c[0] for c in chunk], [c[1] for c in chunk])
                    tokens_per_example = mask.sum().clamp(min=1).item() / len(mask)
                    loss, _ = common.sft_microbatch_train_step(out["log_probs"], mask, n_micro, tokens_per_example)
                    losses.append(loss.item() * n_micro)
                grad_norm = common.optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
                bad_steps = harness.count_bad_steps(grad_norm, bad_steps, args.max_bad_steps)
                n_updates += 1
        losses = common.all_gather(losses)

        row = {"step": ei_step + 1, "sampled": len(rollouts), "kept": len(kept), "questions_solved": solved,
               "reward": sum(s["reward"] for s in scores) / len(scores),
               "format_reward": sum(s["format_reward"] for s in scores) / len(scores),
               "sft_loss": sum(losses) / max(1, len(losses)), "sft_updates": n_updates,
               "step_s": time.perf_counter() - t0}
        if harness.due(ei_step + 1, args.eval_every, args.n_ei_steps):
            summary = common.evaluate_and_log(model, tokenizer, eval_examples, args, ei_step + 1, log)
            row["eval_accuracy"] = summary["accuracy"]
        log(row)
        if harness.is_main():
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        common.save_or_stop(args, ei_step + 1, args.n_ei_steps, model, tokenizer, optimizer, scheduler, cursor)
    return common.finish(args, model, tokenizer, summary, f"held-out after {args.n_ei_steps} expert-iteration steps")


if __name__ == "__main__":
    harness.exit_on_oom(main, parse_args(), "--batch-size (or raise --grad-accum), --max-new-tokens, --eval-batch-size")
