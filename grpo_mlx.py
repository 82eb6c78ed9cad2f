"""GRPO on a reasoning-gym task (default: 2-term chain_sum) with the strict r1_zero reward, in MLX.

The twin of grpo.py: same flags, defaults, metric names, logs and checkpoint layout, same
loop; only the framework lines differ (nn.value_and_grad instead of .backward(); one
mx.eval per optimizer step, plus one per extra microbatch to bound memory). Checkpoints
are plain HF directories, so a torch run continues here and the other way round.

Each step: sample --group-size answers for each of --rollout-batch-size / --group-size
questions, grade them, turn rewards into group-relative advantages, then take
--epochs-per-rollout passes of microbatch policy-gradient steps over them. The losses
(no_baseline, reinforce_with_baseline, grpo_clip, dr_grpo, dapo, bnpo, gspo), the KL to
a frozen reference and the advantage scaling are one flag each; the math is in common.py.

Deviation from R1-Zero, on purpose: the embedded 135M model almost never writes the
r1_zero format (0% on chain_sum), so strict rewards give GRPO no signal. By default the
run first makes a short SFT warm start with sft.py on the task's own traces (cached in
<out-dir>/warmstart; --warmstart-steps 0 turns it off) and then does GRPO on top.

    uv run python grpo_mlx.py
    uv run python grpo_mlx.py --group-size 4 --loss-type dapo --cliprange-high 0.28
    uv run python grpo_mlx.py --model runs/sft/final --warmstart-steps 0 --lora-rank 16
"""

import argparse
import os
import time

import common_mlx as common  # first: it loads a fast BLAS before mlx.core on Linux
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from tqdm import tqdm

import tasks


def parse_args(argv=None):
    p = tasks.add_shared_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    g = p.add_argument_group("grpo")
    g.add_argument("--n-steps", type=int, default=40)
    g.add_argument("--rollout-batch-size", type=int, default=64, help="completions sampled per step")
    g.add_argument("--group-size", type=int, default=8)
    g.add_argument("--epochs-per-rollout", type=int, default=1)
    g.add_argument("--loss-type", default="grpo_clip",
                   choices=["no_baseline", "reinforce_with_baseline", "grpo_clip", "dr_grpo", "dapo", "bnpo", "gspo"])
    g.add_argument("--cliprange", type=float, default=0.2)
    g.add_argument("--cliprange-high", type=float, default=None, help="clip-higher upper bound (default: --cliprange)")
    g.add_argument("--beta", type=float, default=0.0, help="KL(k3) coefficient to a frozen reference; 0 = no reference")
    g.add_argument("--scale-rewards", default=None, choices=["group", "batch", "none"],
                   help="divide advantages by the group or batch std (default: group; none for dr_grpo)")
    g.add_argument("--advantage-eps", type=float, default=1e-6)
    g.add_argument("--mask-truncated", action="store_true", help="no loss on completions cut at max-new-tokens")
    g.add_argument("--warmstart-steps", type=int, default=25, help="sft.py steps on task traces before GRPO (0: off)")
    tasks.add_training_args(p, sampling=True, lr=1e-5, batch_size=None, grad_accum=4, n_train=20_000, eval_every=20,
                            save_every=20, max_new_tokens=64)
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join("runs", "grpo_mlx")
    args.batch_size = args.batch_size or args.rollout_batch_size
    args.scale_rewards = args.scale_rewards or ("none" if args.loss_type == "dr_grpo" else "group")
    for name, a, b in [("rollout-batch-size", args.rollout_batch_size, args.group_size),
                       ("rollout-batch-size", args.rollout_batch_size, args.batch_size),
                       ("batch-size", args.batch_size, args.grad_accum)]:
        if a % b:
            p.error(f"--{name} ({a}) must be a multiple of {b}")
    return args


def warm_start(args):
    """Run sft_mlx.py on the task's traces once (cached in <out-dir>/warmstart) and return its model."""
    import sft_mlx as sft

    path = os.path.join(args.out_dir, "warmstart")
    if not os.path.exists(os.path.join(path, "final", "config.json")):
        sft.main(sft.parse_args(["--model", args.model, "--task", args.task, "--out-dir", path, "--seed", str(args.seed),
                                 "--n-steps", str(args.warmstart_steps), "--device", args.device, "--dtype", args.dtype,
                                 "--n-eval", str(args.n_eval), "--max-new-tokens", str(args.max_new_tokens),
                                 "--eval-every", "0", "--save-every", "0"]
                                + (["--cache-dir", args.cache_dir] if args.cache_dir else [])))
    return os.path.join(path, "final")


def main(args):
    common.set_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    start_model = warm_start(args) if args.warmstart_steps > 0 else args.model
    model, tokenizer, ckpt = common.load_policy(args, start_model)
    ref_model = None
    if args.beta > 0:
        device = mx.default_device()  # never differentiated: no freeze needed
        ref_model = common.load_model(start_model, device, common.pick_dtype(args.dtype, device), args.cache_dir)[0]
    optimizer_steps_per_rollout = args.rollout_batch_size // args.batch_size
    total_optimizer_steps = args.n_steps * optimizer_steps_per_rollout * args.epochs_per_rollout
    optimizer, scheduler = common.make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95), args.warmup_steps,
                                                 total_optimizer_steps)
    train_examples = tasks.load_examples(args, "train", args.n_train)
    eval_examples = tasks.load_examples(args, "eval", args.n_eval)
    reward_fn = tasks.get_reward_fn(args.reward)
    start_step, cursor = common.resume(ckpt, model, optimizer, scheduler)
    log = tasks.MetricsLog(args.out_dir, args.wandb, vars(args))

    needs_ratio = args.loss_type in common.RATIO_LOSSES
    off_policy = optimizer_steps_per_rollout * args.epochs_per_rollout > 1
    micro = args.batch_size // args.grad_accum

    def loss_fn(model, batch, rows, advantages, raw_rewards, old, ref, normalizer, prefix):
        out = common.get_response_log_probs(model, batch["input_ids"][rows], batch["labels"][rows], True,
                                            shared_prefix=prefix)
        mask = batch["response_mask"][rows]
        old = mx.stop_gradient(out["log_probs"]) if old is None else old  # on-policy: ratio 1, same gradient
        loss, meta = common.grpo_microbatch_train_step(
            out["log_probs"], mask, args.grad_accum, args.loss_type, raw_rewards[rows], advantages[rows], old,
            args.cliprange, args.cliprange_high, ref, args.beta, normalizer)
        return loss, common.masked_mean(out["token_entropy"], mask), meta

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    summary = None
    if start_step == 0:
        summary = common.evaluate_and_log(model, tokenizer, eval_examples, args, 0, log)
        tasks.print_summary(summary, "held-out before GRPO (step 0)")
    bar = tqdm(range(start_step, args.n_steps), desc="grpo", initial=start_step, total=args.n_steps)
    for step in bar:
        t0 = time.perf_counter()
        # ---- rollouts: group_size samples for each question
        questions = tasks.take(train_examples, cursor, args.rollout_batch_size // args.group_size, args.seed)
        cursor += len(questions)
        prompts = [tasks.r1_zero_prompt(q["question"]) for q in questions for _ in range(args.group_size)]
        answers = [q["answer"] for q in questions for _ in range(args.group_size)]
        rollouts = common.generate(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_p,
                                   args.top_k, args.min_p, args.repetition_penalty, args.min_new_tokens,
                                   batch_size=args.rollout_batch_size)
        t_rollout = time.perf_counter() - t0

        # ---- rewards -> advantages
        advantages, raw_rewards, reward_meta = common.compute_group_normalized_rewards(
            reward_fn, [r["response"] for r in rollouts], answers, args.group_size, args.advantage_eps,
            normalize_by_std=args.scale_rewards == "group")
        if args.scale_rewards == "batch":
            advantages = advantages / (np.std(np.array(raw_rewards), ddof=1).item() + args.advantage_eps)
        batch = common.join_prompt_and_output_ids([r["prompt_ids"] for r in rollouts],
                                                  [r["response_ids"] for r in rollouts], tokenizer.pad_token_id)
        truncated = np.array([r["truncated"] for r in rollouts])
        if args.mask_truncated:
            batch["response_mask"] = batch["response_mask"] & mx.array(~truncated)[:, None]
        advantages, raw_rewards = advantages[:, None], raw_rewards[:, None]  # (B, 1)
        prefix = tasks.shared_prefix_length(batch["input_ids"].tolist())

        def log_probs_of(m, rows):
            return common.get_response_log_probs(m, batch["input_ids"][rows], batch["labels"][rows],
                                                 shared_prefix=prefix)["log_probs"]

        # old log-probs only when a later update reuses these rollouts; on-policy they are
        # the current log-probs (stop_gradient), which saves a full forward pass.
        old_log_probs = ref_log_probs = None
        if needs_ratio and off_policy:
            old_log_probs = mx.concatenate([log_probs_of(model, mx.arange(i, i + micro))
                                            for i in range(0, args.rollout_batch_size, micro)])
        if ref_model is not None:
            ref_log_probs = mx.concatenate([log_probs_of(ref_model, mx.arange(i, i + micro))
                                            for i in range(0, args.rollout_batch_size, micro)])
        mx.eval(old_log_probs, ref_log_probs)

        # ---- policy-gradient steps over the rollouts
        t1, stats = time.perf_counter(), {"loss": 0.0, "entropy": [], "clip_frac": [], "kl": [], "grad_norm": []}
        for epoch in range(args.epochs_per_rollout):
            order = mx.random.permutation(args.rollout_batch_size) if epoch or optimizer_steps_per_rollout > 1 \
                else mx.arange(args.rollout_batch_size)
            for first in range(0, args.rollout_batch_size, args.batch_size):
                opt_rows, grads, micro_stats = order[first : first + args.batch_size], None, []
                n_tokens = max(batch["response_mask"][opt_rows].sum().item(), 1)
                for m0 in range(0, args.batch_size, micro):
                    rows = opt_rows[m0 : m0 + micro]
                    normalizer = {"dapo": n_tokens, "bnpo": max(batch["response_mask"][rows].sum().item(), 1)
                                  * args.grad_accum, "dr_grpo": args.batch_size * args.max_new_tokens}.get(args.loss_type)
                    (loss, entropy, meta), g = loss_and_grad(
                        model, batch, rows, advantages, raw_rewards,
                        old_log_probs[rows] if old_log_probs is not None else None,
                        ref_log_probs[rows] if ref_model else None, normalizer, prefix)
                    grads = g if grads is None else tree_map(mx.add, grads, g)
                    if m0 + micro < args.batch_size:  # bound memory to one microbatch's graph
                        mx.eval(grads)
                    micro_stats.append((loss, entropy, meta, batch["response_mask"][rows]))
                stats["grad_norm"].append(common.optimizer_step(model, optimizer, grads, args.max_grad_norm))
                for loss, entropy, meta, mask in micro_stats:  # .item() now adds only what the update skipped
                    stats["loss"] += loss.item()
                    stats["entropy"].append(entropy.item())
                    if "kl" in meta:
                        stats["kl"].append(meta["kl"].item())
                    if "clipped" in meta:
                        stats["clip_frac"].append(common.masked_mean(meta["clipped"].astype(mx.float32), mask).item())
        t_train = time.perf_counter() - t1

        # ---- log, eval, checkpoint
        lengths = np.array([len(r["response_ids"]) for r in rollouts], dtype=np.float32)
        n_train_tokens = batch["input_ids"].size * args.epochs_per_rollout
        row = {"step": step + 1, "reward": reward_meta["reward_mean"], "reward_std": reward_meta["reward_std"],
               "format_reward": reward_meta["format_reward"], "answer_reward": reward_meta["answer_reward"],
               "zero_std_frac": reward_meta["zero_std_frac"], "response_len": lengths.mean().item(),
               "response_len_max": lengths.max().item(), "truncated_frac": truncated.mean().item(),
               "entropy": sum(stats["entropy"]) / len(stats["entropy"]), "loss": stats["loss"],
               "clip_frac": sum(stats["clip_frac"]) / max(1, len(stats["clip_frac"])),
               "kl": sum(stats["kl"]) / max(1, len(stats["kl"])), "grad_norm": max(stats["grad_norm"]),
               "lr": scheduler(optimizer.step).item(), "rollout_tok_s": lengths.sum().item() / t_rollout,
               "train_tok_s": n_train_tokens / t_train, "step_s": time.perf_counter() - t0}
        log(row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", fmt=f"{row['format_reward']:.2f}", len=f"{row['response_len']:.0f}",
                        s=f"{row['step_s']:.0f}")
        last = step + 1 == args.n_steps
        if last or (args.eval_every and (step + 1) % args.eval_every == 0):
            summary = common.evaluate_and_log(model, tokenizer, eval_examples, args, step + 1, log)
            bar.write(f"step {step + 1}: held-out accuracy {summary['accuracy']:.1%} format {summary['format_rate']:.1%}")
        if not last and args.save_every and (step + 1) % args.save_every == 0:
            common.save_checkpoint(args.out_dir, step + 1, model, tokenizer, optimizer, scheduler, cursor)
    return common.finish(args, model, tokenizer, summary, f"held-out after {args.n_steps} GRPO steps")


if __name__ == "__main__":
    main(parse_args())
