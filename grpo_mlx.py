"""GRPO on a reasoning-gym task (default: 2-term chain_sum) with the strict r1_zero reward, in MLX.

The twin of grpo.py: the same defaults (tests/test_mlx_scripts.py checks that both parse
every flag the same), metric names, logs and checkpoint layout, and the same loop. What
differs is the framework: MLX differentiates a function, so `policy_loss` runs inside
`loss_fn` under nn.value_and_grad instead of a .backward(); there is one mx.eval per
optimizer step, plus one per extra microbatch to bound memory. Checkpoints are plain HF
directories, so a torch run continues here and the other way round.

    uv run python grpo_mlx.py
    uv run python grpo_mlx.py --group-size 4 --loss-type dapo --cliprange-high 0.28
    uv run python grpo_mlx.py --model runs/sft/final --warmstart-steps 0 --lora-rank 16
    uv run mlx.launch -n 2 -- python grpo_mlx.py   # 2 processes (README: Several processes)
"""

import functools
import os
import time

import common_mlx as common  # first: it loads a fast BLAS before mlx.core on Linux
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from tqdm import tqdm

import harness
import rewards
import tasks

# ----------------------------------------------------------------------------- defaults
# Edit a line for an ablation, or override it as a flag: --n-steps 80 --group-size 4.
model = "smollm2-135m-instruct"  # local HF dir, hub id, or the embedded default
task = "chain_sum"  # chain_sum, chain_sum_hard, basic_arithmetic, gsm_symbolic, or reasoning-gym name[:k=v,...]
train_data = ""  # JSONL of your own questions (MATH or GSM8K style); overrides --task
eval_data = ""  # JSONL of your own held-out questions; overrides --task
reward = "r1_zero"  # r1_zero, exact, closeness, digits, path/to/file.py:function, or a weighted sum: r1_zero:1,closeness:0.2
out_dir = "runs/grpo_mlx"  # run directory: metrics.jsonl, checkpoints/, final/
cache_dir = ""  # where the embedded model is converted (default $NANOALIGN_CACHE or ~/.cache/nanoalign)
warmstart_steps = 4  # SFT steps before GRPO: 4 teach the format, leave entropy for RL (0: --model as is)
# GRPO
n_steps = 40  # rollout + update rounds
rollout_batch_size = 64  # completions sampled per step
group_size = 8  # completions per question (16 gained less at seed 0: results/learning)
epochs_per_rollout = 1  # passes over each rollout batch (> 1: off-policy, old log-probs from a forward pass)
loss_type = "grpo_clip"  # no_baseline, reinforce_with_baseline, grpo_clip, dr_grpo, dapo, bnpo, gspo
cliprange = 0.2  # ratio clipped to [1 - cliprange, 1 + cliprange_high]
cliprange_high = 0.2  # clip-higher (DAPO uses 0.28)
beta = 0.0  # KL(k3) to the start model; 0: no reference model is loaded
scale_rewards = "group"  # divide advantages by the group's std, the batch's, or none (Dr. GRPO: none)
advantage_eps = 1e-6
mask_truncated = False  # no loss on completions cut at max_new_tokens
dynamic_sampling = True  # DAPO: drop groups with all rewards equal (no gradient), sample more (results/learning)
max_sampling_rounds = 3  # with --dynamic-sampling: at most this many rollout rounds per step
oversample = 2.0  # with --dynamic-sampling: a round samples the groups missing / the mixed share, at most this x
guide_failed = False  # a group whose samples all fail gets the question's worked trace as one sample (LUFFY)
harder_task = ""  # curriculum: a task mixed in as the share of groups solved in every sample grows, e.g. chain_sum:max_digits=3
# optimization
lr = 1e-5
batch_size = 0  # rollouts per optimizer step (0: the whole rollout batch, one step)
grad_accum = 4  # microbatches per optimizer step
warmup_steps = 0  # linear warmup, then cosine decay to 10%
weight_decay = 0.0
max_grad_norm = 1.0
max_bad_steps = 3  # stop after this many optimizer steps in a row skipped for a NaN / inf gradient
lora_rank = 0  # 0: full fine-tuning
n_train = 20000  # training questions drawn from the task
# sampling (rollouts; evaluation is greedy)
max_new_tokens = 64
min_new_tokens = 4
temperature = 1.0
top_p = 1.0
top_k = 0  # 0: off
min_p = 0.0
repetition_penalty = 1.0
# evaluation, checkpoints, hardware
n_eval = 500  # held-out items per evaluation (one standard error ~2 points at 60%)
eval_batch_size = 64
eval_every = 20  # steps between held-out evaluations (0: only at the end)
eval_samples = 0  # k > 0: also k samples per held-out question (sampling settings): mean@k, pass@k, entropy
save_every = 20  # steps between checkpoints (0: only the final model)
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
    args.batch_size = args.batch_size or args.rollout_batch_size
    harness.require_multiple(p, [("--rollout-batch-size", args.rollout_batch_size, "--group-size", args.group_size),
                                 ("--rollout-batch-size", args.rollout_batch_size, "--batch-size", args.batch_size),
                                 ("--batch-size", args.batch_size, "--grad-accum", args.grad_accum)])
    harness.check_inputs(p, args, train_kind="qa")
    return args


def warm_start(args):
    """Run sft_mlx.py on the task's traces once (cached in <out-dir>/warmstart) and return its model."""
    import sft_mlx as sft

    path = os.path.join(args.out_dir, "warmstart")
    if not os.path.exists(os.path.join(path, "final", "config.json")):
        sft.main(sft.parse_args(["--model", args.model, "--task", args.task, "--out-dir", path, "--seed", str(args.seed),
                                 "--n-steps", str(args.warmstart_steps), "--device", args.device, "--dtype", args.dtype,
                                 "--n-eval", str(args.n_eval), "--max-new-tokens", str(args.max_new_tokens),
                                 "--eval-every", "0", "--save-every", "0", "--cache-dir", args.cache_dir,
                                 # under mlx.launch, at least one microbatch per process
                                 "--grad-accum", str(max(sft.grad_accum, harness.world_size()))]))
    return os.path.join(path, "final")


def policy_loss(log_probs, mask, advantages, raw_rewards, old_log_probs, ref_log_probs, step_tokens, args):
    """The objective on one microbatch (minimized). Row b, response token t, advantage A_b:

        ρ_bt = π_θ(o_bt) / π_old(o_bt)                 gspo: one ρ_b = exp(mean_t log ρ_bt) per row
        ℓ_bt = −min(ρ_bt·A_b, clip(ρ_bt, 1−ε, 1+ε_high)·A_b)     no_baseline / reinforce_with_baseline: −A_b·log π_θ(o_bt)
               + β·KL_k3(π_θ ‖ π_ref)
        loss = Σ_bt mask_bt·ℓ_bt / Z_b

    Z_b, the normalizer (the variants differ only here): grpo_clip, gspo and the REINFORCE
    losses average each row over its own length, then over the rows of the optimizer step;
    dapo averages over every token of the optimizer step (step_tokens); bnpo over the
    microbatch's tokens; dr_grpo divides by a constant, rows × max_new_tokens.
    log_probs, mask, old/ref log-probs (b, T); advantages, raw_rewards (b, 1)."""
    mask = mask.astype(mx.float32)
    A = raw_rewards if args.loss_type == "no_baseline" else advantages
    log_ratio = log_probs - old_log_probs
    if args.loss_type == "gspo":  # an empty row (masked truncation) gets ratio 1, not 0/0
        log_ratio = (log_ratio * mask).sum(-1, keepdims=True) / mx.maximum(mask.sum(-1, keepdims=True), 1)
    ratio = mx.exp(log_ratio)  # exactly 1 on-policy, with the gradient of log π_θ
    if args.loss_type not in common.RATIO_LOSSES:  # no_baseline, reinforce_with_baseline
        per_token, clipped = -A * log_probs, mx.zeros_like(mask)
    else:
        surrogate, clipped_surrogate = ratio * A, mx.clip(ratio, 1 - args.cliprange, 1 + args.cliprange_high) * A
        per_token = -mx.minimum(surrogate, clipped_surrogate)
        clipped = mx.broadcast_to(clipped_surrogate < surrogate, mask.shape).astype(mx.float32)
    kl = mx.zeros_like(log_probs)
    if args.beta > 0:  # k3 estimate of KL(π_θ ‖ π_ref) per token
        kl = common.kl_k3(policy_log_probs=log_probs, ref_log_probs=ref_log_probs)
        per_token = per_token + args.beta * kl
    Z = {"dapo": mx.array(step_tokens), "bnpo": mask.sum() * args.grad_accum,
         "dr_grpo": mx.array(args.batch_size * args.max_new_tokens)}.get(
        args.loss_type, mask.sum(-1, keepdims=True) * args.batch_size)
    loss = (per_token * mask / mx.maximum(Z, 1)).sum()
    n = mx.maximum(mask.sum(), 1)
    stats = {"clip_frac": (clipped * mask).sum() / n, "kl": mx.stop_gradient(kl * mask).sum() / n}
    return loss, stats


def main(args):
    common.init_distributed(args.device)  # under mlx.launch: join the other processes (a plain run: nothing)
    harness.require_grad_accum_split(args.grad_accum)  # the process count is known only now
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
    train_examples, harder_examples = tasks.load_examples(args, "train", args.n_train), tasks.harder_examples(args)
    eval_examples = tasks.load_examples(args, "eval", args.n_eval)
    # guarded (a reward that raises or hangs scores 0, counted); a response repeated in a group
    # graded once; the advantages reuse the scores of sample_groups (under mlx.launch, graded by
    # the process that sampled them)
    grader = rewards.get_reward_fn(args.reward)
    reward_fn = functools.lru_cache(maxsize=4096)(grader)
    sampling = harness.Sampling.from_args(args)
    # the next question of the task and of --harder-task, and the last step's sampling counts (the
    # next step's first round and harder share are sized from them): checkpoints keep all three,
    # so a resumed run samples as an unbroken one
    cursor = {"question": 0, "harder": 0, "sampled": {}}
    start_step, saved = common.resume(ckpt, model, optimizer, scheduler, cursor=cursor)
    cursor.update(saved)  # (an older version's checkpoint has no "harder")
    log = harness.MetricsLog(args.out_dir, args.wandb, vars(args), start_step, args.tensorboard)

    off_policy = optimizer_steps_per_rollout * args.epochs_per_rollout > 1
    needs_ratio = args.loss_type in common.RATIO_LOSSES
    micro, bad_steps = args.batch_size // args.grad_accum, 0

    def loss_fn(model, batch, rows, end, advantages, raw_rewards, old_log_probs, ref_log_probs, step_tokens):
        ids, mask = batch["input_ids"][rows, :end], batch["response_mask"][rows, :end]
        out = common.get_response_log_probs(model, ids, batch["labels"][rows, :end], True, temperature=args.temperature,
                                            **harness.positions(ids.tolist(), mask.tolist()))  # softmax(logits / T)
        old = mx.stop_gradient(out["log_probs"]) if old_log_probs is None else old_log_probs
        loss, stats = policy_loss(out["log_probs"], mask, advantages[rows], raw_rewards[rows], old, ref_log_probs,
                                  step_tokens, args)
        return loss, common.masked_mean(out["token_entropy"], mask), stats

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def sample_groups(n_questions):  # rollouts for n_questions new questions x group_size, graded
        questions = harness.take_questions(train_examples, harder_examples, cursor, n_questions, args.seed)
        questions = common.rank_share(questions)  # under mlx.launch each process samples and grades its share
        prompts = [tasks.r1_zero_prompt(q["question"]) for q in questions for _ in range(args.group_size)]
        answers = [q["answer"] for q in questions for _ in range(args.group_size)]
        with common.rank_generator(mx.default_device()):
            rollouts = common.generate(model, tokenizer, prompts, sampling, batch_size=max(1, len(prompts)))
        for r, answer in zip(rollouts, answers):
            r["answer"] = answer
        scores = [reward_fn(r["response"], r["answer"]) for r in rollouts]
        if args.guide_failed:
            harness.guide_failed_groups(questions, rollouts, scores, args.group_size, tokenizer, reward_fn)
        return common.all_gather(rollouts), common.all_gather(scores)  # every process holds the whole batch

    summary = None
    if start_step == 0:
        summary = common.evaluate_and_log(model, tokenizer, eval_examples, args, 0, log)
    bar = tqdm(range(start_step, args.n_steps), desc="grpo", initial=start_step, total=args.n_steps,
               disable=not harness.is_main())
    for step in bar:
        t0 = time.perf_counter()
        # ---- rollouts: group_size samples for each question, graded (sample_groups above)
        n_groups, harder_before = args.rollout_batch_size // args.group_size, cursor["harder"]
        if args.dynamic_sampling:
            rollouts, scores, sampled = harness.dynamic_sample(sample_groups, n_groups, args.group_size,
                                                               args.max_sampling_rounds, args.oversample,
                                                               last=cursor["sampled"])
        else:
            rollouts, scores = sample_groups(n_groups)
            sampled = harness.group_counts(scores, args.group_size)
        cursor["sampled"] = sampled
        answers = [r["answer"] for r in rollouts]
        reward_parts = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0] if k.startswith("reward/")}
        t_rollout = time.perf_counter() - t0

        # ---- rewards -> advantages: A = (r - mean_group) [/ std]
        graded = {(r["response"], r["answer"]): s for r, s in zip(rollouts, scores)}
        advantages, raw_rewards, reward_meta = common.compute_group_normalized_rewards(
            reward_fn=lambda response, answer: graded[response, answer],
            rollout_responses=[r["response"] for r in rollouts], repeated_ground_truths=answers,
            group_size=args.group_size, advantage_eps=args.advantage_eps, normalize_by_std=args.scale_rewards == "group")
        if args.scale_rewards == "batch":
            advantages = advantages / (np.std(np.array(raw_rewards), ddof=1).item() + args.advantage_eps)
        batch = common.join_prompt_and_output_ids([r["prompt_ids"] for r in rollouts],
                                                  [r["response_ids"] for r in rollouts], tokenizer.pad_token_id)
        truncated = np.array([r["truncated"] for r in rollouts])
        if args.mask_truncated:
            batch["response_mask"] = batch["response_mask"] & mx.array(~truncated)[:, None]
        advantages, raw_rewards = advantages[:, None], raw_rewards[:, None]  # (B, 1)
        lengths = [len(r["response_ids"]) for r in rollouts]

        def all_log_probs(m):  # each process computes its share of the microbatches
            starts = common.rank_share(range(0, args.rollout_batch_size, micro))
            chunks = [{k: v[i : i + micro] for k, v in batch.items()} for i in starts]
            return common.all_gather(mx.concatenate([
                common.get_response_log_probs(m, c["input_ids"], c["labels"], temperature=args.temperature,
                                              **harness.positions(c["input_ids"].tolist(), c["response_mask"].tolist())
                                              )["log_probs"] for c in chunks]))

        # a forward pass for π_old only when a ratio needs it and a later update reuses these rollouts
        old_log_probs = all_log_probs(model) if needs_ratio and off_policy else None
        ref_log_probs = all_log_probs(ref_model) if ref_model is not None else None
        mx.eval(old_log_probs, ref_log_probs)

        # ---- policy-gradient steps over the rollouts
        t1, stats = time.perf_counter(), {"loss": [], "entropy": [], "clip_frac": [], "kl": [], "grad_norm": []}
        for epoch in range(args.epochs_per_rollout):
            shuffle = epoch > 0 or optimizer_steps_per_rollout > 1
            order = mx.random.permutation(args.rollout_batch_size) if shuffle else mx.arange(args.rollout_batch_size)
            for first in range(0, args.rollout_batch_size, args.batch_size):
                opt_rows, grads, micro_stats = order[first : first + args.batch_size], None, []
                if args.loss_type != "bnpo":  # like lengths share a microbatch (bnpo normalizes per microbatch)
                    opt_rows = mx.array(harness.length_sorted(opt_rows.tolist(), lengths))
                step_tokens = batch["response_mask"][opt_rows].sum().item()
                firsts = common.rank_share(range(0, args.batch_size, micro))  # this process's microbatches
                for m0 in firsts:
                    rows = opt_rows[m0 : m0 + micro]
                    end = harness.response_end(batch["response_mask"][rows].tolist())  # no columns of padding only
                    (loss, entropy, loss_stats), g = loss_and_grad(
                        model, batch, rows, end, advantages, raw_rewards,
                        None if old_log_probs is None else old_log_probs[rows, :end],
                        None if ref_log_probs is None else ref_log_probs[rows, :end], step_tokens)
                    grads = g if grads is None else tree_map(mx.add, grads, g)
                    if m0 != firsts[-1]:  # bound memory to one microbatch's graph
                        mx.eval(grads)
                    micro_stats.append((loss, entropy, loss_stats))
                stats["grad_norm"].append(common.optimizer_step(model, optimizer, grads, args.max_grad_norm))
                bad_steps = harness.count_bad_steps(stats["grad_norm"][-1], bad_steps, args.max_bad_steps)
                for loss, entropy, loss_stats in micro_stats:  # .item() now adds only what the update skipped
                    stats["loss"].append(loss.item())
                    stats["entropy"].append(entropy.item())
                    stats["clip_frac"].append(loss_stats["clip_frac"].item())
                    stats["kl"].append(loss_stats["kl"].item())
        t_train = time.perf_counter() - t1
        for key in ("loss", "entropy", "clip_frac", "kl"):  # every process's microbatches
            stats[key] = common.all_gather(stats[key])
        reward_failures = int(common.all_reduce_sum({"failures": grader.failures})["failures"])

        # ---- log, eval, checkpoint
        lengths = np.array(lengths, dtype=np.float32)
        n_train_tokens = batch["input_ids"].size * args.epochs_per_rollout
        row = {"step": step + 1, "reward": reward_meta["reward_mean"], "reward_std": reward_meta["reward_std"],
               "format_reward": reward_meta["format_reward"], "answer_reward": reward_meta["answer_reward"],
               "zero_std_frac": reward_meta["zero_std_frac"], "response_len": lengths.mean().item(),
               "response_len_max": lengths.max().item(), "truncated_frac": truncated.mean().item(),
               "entropy": sum(stats["entropy"]) / len(stats["entropy"]), "loss": sum(stats["loss"]),
               "clip_frac": sum(stats["clip_frac"]) / len(stats["clip_frac"]),
               "kl": sum(stats["kl"]) / len(stats["kl"]), "grad_norm": max(stats["grad_norm"]),
               "lr": scheduler(optimizer.step).item(), "rollout_tok_s": lengths.sum().item() / t_rollout,
               "train_tok_s": n_train_tokens / t_train, "step_s": time.perf_counter() - t0,
               "peak_rss_gb": harness.peak_rss_gb(), "reward_failures": reward_failures,
               "harder_questions": cursor["harder"] - harder_before,
               "groups_guided": sum(r.get("guided", False) for r in rollouts), **sampled, **reward_parts}
        log(row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", fmt=f"{row['format_reward']:.2f}", len=f"{row['response_len']:.0f}",
                        s=f"{row['step_s']:.0f}")
        if harness.due(step + 1, args.eval_every, args.n_steps):
            summary = common.evaluate_and_log(model, tokenizer, eval_examples, args, step + 1, log)
        common.save_or_stop(args, step + 1, args.n_steps, model, tokenizer, optimizer, scheduler, cursor)
    return common.finish(args, model, tokenizer, summary, f"held-out after {args.n_steps} GRPO steps")


if __name__ == "__main__":
    harness.exit_on_oom(main, parse_args(), "--batch-size (or raise --grad-accum), --rollout-batch-size, "
                                           "--max-new-tokens, --eval-batch-size")
