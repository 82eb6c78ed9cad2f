"""DPO against a frozen reference, on preference pairs from a file or from the policy itself.

--train-data pairs.jsonl ({prompt, chosen, rejected}): each response is formatted with the
Alpaca template + EOS, as compute_per_instance_dpo_loss does. Without a file, pairs are
built on the fly from the policy's own samples on the task: for each question, one answer
the verifier accepts (chosen) and one it rejects (rejected), under the r1_zero prompt.
The batched loss is -log sigmoid(beta * ((logpi(c) - logref(c)) - (logpi(r) - logref(r)))),
with log-probs summed over the response tokens (the prompt's terms cancel).

    uv run python dpo.py --model runs/sft/final --task chain_sum
    uv run python dpo.py --train-data prefs.jsonl --beta 0.1 --n-steps 100
"""

import os
import time

import torch
from tqdm import tqdm

import common
import harness
import rewards
import tasks


# ----------------------------------------------------------------------------- defaults
# Edit a line for an ablation, or override it as a flag: --n-steps 40 --beta 0.2.
model = "smollm2-135m-instruct"  # local HF dir, hub id, or the embedded default
task = "chain_sum"  # chain_sum, chain_sum_hard, basic_arithmetic, gsm_symbolic, or reasoning-gym name[:k=v,...]
train_data = ""  # JSONL of {prompt, chosen, rejected}; else pairs from the policy's own samples
eval_data = ""  # JSONL of your own held-out questions; overrides --task
reward = "r1_zero"  # r1_zero, exact, closeness, digits, path/to/file.py:function, or a weighted sum: r1_zero:1,closeness:0.2
out_dir = "runs/dpo"  # run directory
cache_dir = ""  # where the embedded model is converted (default $NANOALIGN_CACHE or ~/.cache/nanoalign)
# DPO
n_steps = 20  # optimizer steps
beta = 0.1  # DPO temperature
group_size = 8  # samples per question when building pairs from the policy
# optimization
lr = 1e-6
batch_size = 16  # pairs (or questions) per optimizer step
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
eval_every = 0  # steps between held-out evaluations (0: only at the end)
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
    harness.check_inputs(p, args, train_kind="dpo")
    return args


def pairs_from_file(path, tokenizer):
    """(prompt, chosen, rejected) strings in the Alpaca format that compute_per_instance_dpo_loss uses."""
    rows = tasks.read_jsonl(path, "dpo")
    head = tasks.ALPACA_PROMPT.split("{response}")[0]
    return [(head.format(instruction=r["prompt"]), r["chosen"] + tokenizer.eos_token, r["rejected"] + tokenizer.eos_token)
            for r in rows]


def pairs_from_policy(model, tokenizer, questions, args):
    """Sample group_size answers per question; pair one accepted with one rejected answer. Under
    torchrun each process samples and grades its share of the questions; each gets all the pairs."""
    questions = common.rank_share(questions)
    prompts = [tasks.r1_zero_prompt(q["question"]) for q in questions]
    model.eval()
    rollouts = common.generate(model, tokenizer, [p for p in prompts for _ in range(args.group_size)],
                               harness.Sampling.from_args(args),
                               generator=common.rank_generator(next(model.parameters()).device))
    model.train()
    reward_fn, pairs = rewards.get_reward_fn(args.reward), []
    for i, (prompt, q) in enumerate(zip(prompts, questions)):
        group = rollouts[i * args.group_size : (i + 1) * args.group_size]
        good = [r["response"] for r in group if reward_fn(r["response"], q["answer"])["reward"] == 1]
        bad = [r["response"] for r in group if reward_fn(r["response"], q["answer"])["reward"] != 1]
        if good and bad:
            pairs.append((prompt, good[0], bad[0]))
    return common.all_gather(pairs)


def pair_log_probs(model, tokenizer, pairs):
    """Summed response log-probs of chosen and rejected, (n,) each."""
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    out, mask = common.completion_log_probs(model, tokenizer, prompts, responses)
    return (out["log_probs"] * mask).sum(-1).split(len(pairs))


def main(args):
    common.init_distributed(args.device)  # under torchrun: join the other processes (a plain run: nothing)
    common.set_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    model, tokenizer, ckpt = common.load_policy(args)
    device, dtype = next(model.parameters()).device, model.compute_dtype
    ref_model = common.load_model(args.model, device, dtype, args.cache_dir)[0].eval().requires_grad_(False)
    optimizer, scheduler = common.make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95), args.warmup_steps,
                                                 args.n_steps)
    file_pairs = pairs_from_file(args.train_data, tokenizer) if args.train_data else None
    train_examples = None if file_pairs else tasks.load_examples(args, "train", args.n_train)
    eval_examples = tasks.load_examples(args, "eval", args.n_eval)
    start_step, cursor = common.resume(ckpt, model, optimizer, scheduler)
    log = harness.MetricsLog(args.out_dir, args.wandb, vars(args), start_step, args.tensorboard)
    micro, summary, bad_steps = args.batch_size // args.grad_accum, None, 0

    model.train()
    bar = tqdm(range(start_step, args.n_steps), desc="dpo", initial=start_step, total=args.n_steps,
               disable=not harness.is_main())
    for step in bar:
        t0 = time.perf_counter()
        if file_pairs:
            pairs = harness.take(file_pairs, cursor, args.batch_size, args.seed)
            cursor += len(pairs)
        else:  # one pair at most per question: sample batch_size questions
            pairs = pairs_from_policy(model, tokenizer, harness.take(train_examples, cursor, args.batch_size, args.seed),
                                      args)
            cursor += args.batch_size
        stats = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}
        for m0 in common.rank_share(range(0, len(pairs), micro)):  # this process's microbatches
            chunk = pairs[m0 : m0 + micro]
            chosen, rejected = pair_log_probs(model, tokenizer, chunk)
            with torch.no_grad():
                ref_chosen, ref_rejected = pair_log_probs(ref_model, tokenizer, chunk)
            losses, margins = common.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta)
            (losses.sum() / len(pairs)).backward()  # mean over the step's pairs
            stats["loss"] += losses.sum().item() / len(pairs)
            stats["accuracy"] += (margins > 0).float().sum().item() / len(pairs)
            stats["margin"] += margins.sum().item() / len(pairs)
            stats["chosen_reward"] += args.beta * (chosen - ref_chosen).sum().item() / len(pairs)
            stats["rejected_reward"] += args.beta * (rejected - ref_rejected).sum().item() / len(pairs)
        grad_norm = common.optimizer_step(model, optimizer, scheduler, args.max_grad_norm) if pairs else 0.0
        stats = common.all_reduce_sum(stats)
        bad_steps = harness.count_bad_steps(grad_norm, bad_steps, args.max_bad_steps)
        row = {"step": step + 1, "pairs": len(pairs), **stats, "grad_norm": grad_norm,
               "lr": scheduler.get_last_lr()[0], "step_s": time.perf_counter() - t0}
        log(row)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}", pairs=len(pairs))
        if harness.due(step + 1, args.eval_every, args.n_steps):
            summary = common.evaluate_and_log(model, tokenizer, eval_examples, args, step + 1, log)
        common.save_or_stop(args, step + 1, args.n_steps, model, tokenizer, optimizer, scheduler, cursor)
    return common.finish(args, model, tokenizer, summary, f"held-out after {args.n_steps} DPO steps")


if __name__ == "__main__":
    harness.exit_on_oom(main, parse_args(), "--batch-size (or raise --grad-accum), --max-new-tokens, --eval-batch-size")
