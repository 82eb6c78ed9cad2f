"""Expert iteration: sample, keep what the verifier accepts, fine-tune on it, repeat.

Each of --n-ei-steps: take --questions-per-step training questions, sample --group-size
answers for each, keep the ones with reward 1 (one copy of each distinct answer per
question), then run --sft-epochs of completion-only SFT over the kept set with
sft_microbatch_train_step. Logs how many were kept and the held-out accuracy after each step.

    uv run python expert_iteration.py --model runs/sft/final --task chain_sum
    uv run python expert_iteration.py --n-ei-steps 5 --group-size 8 --questions-per-step 128
"""

import argparse
import json
import os
import time

from tqdm import tqdm

import common
import tasks


def parse_args(argv=None):
    p = tasks.add_shared_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    g = p.add_argument_group("expert iteration")
    g.add_argument("--n-ei-steps", type=int, default=3)
    g.add_argument("--questions-per-step", type=int, default=64)
    g.add_argument("--group-size", type=int, default=4, help="answers sampled per question")
    g.add_argument("--sft-epochs", type=int, default=1, help="passes over the kept answers per EI step")
    tasks.add_training_args(p, sampling=True, lr=2e-5, batch_size=16, grad_accum=2, n_train=5000, eval_every=1,
                            save_every=0, max_new_tokens=64)
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join("runs", "expert_iteration")
    tasks.check_batch_args(p, args)
    return args


def main(args):
    common.set_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    model, tokenizer, ckpt = common.load_policy(args)
    # the number of SFT steps depends on how much is kept, so the schedule is per EI step: constant after warmup
    optimizer, scheduler = common.make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95), args.warmup_steps,
                                                 total_steps=10**9)
    train_examples = tasks.load_examples(args, "train", args.n_train)
    eval_examples = tasks.load_examples(args, "eval", args.n_eval)
    reward_fn = tasks.get_reward_fn(args.reward)
    start_step, cursor = common.resume(ckpt, model, optimizer, scheduler)
    log = tasks.MetricsLog(args.out_dir, args.wandb, vars(args))
    micro = args.batch_size // args.grad_accum
    summary = None

    for ei_step in range(start_step, args.n_ei_steps):
        t0 = time.perf_counter()
        # ---- sample and filter
        questions = tasks.take(train_examples, cursor, args.questions_per_step, args.seed)
        cursor += len(questions)
        prompts = [tasks.r1_zero_prompt(q["question"]) for q in questions for _ in range(args.group_size)]
        answers = [q["answer"] for q in questions for _ in range(args.group_size)]
        model.eval()
        rollouts = common.generate(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_p,
                                   args.top_k, args.min_p, args.repetition_penalty, args.min_new_tokens)
        rewards = [reward_fn(r["response"], a) for r, a in zip(rollouts, answers)]
        kept = list(dict.fromkeys((p, r["response"]) for p, r, s in zip(prompts, rollouts, rewards) if s["reward"] == 1))
        solved = len({p for p, _ in kept})

        # ---- SFT on the kept answers
        model.train()
        losses, n_updates = [], 0
        for epoch in range(args.sft_epochs):
            order = tasks.take(kept, epoch * len(kept), len(kept), args.seed + ei_step) if kept else []
            for first in tqdm(range(0, len(order), args.batch_size), desc=f"ei {ei_step + 1} sft", leave=False):
                opt_batch = order[first : first + args.batch_size]
                n_micro = -(-len(opt_batch) // micro)
                for m0 in range(0, len(opt_batch), micro):
                    chunk = opt_batch[m0 : m0 + micro]
                    out, mask = common.completion_log_probs(model, tokenizer, [c[0] for c in chunk], [c[1] for c in chunk])
                    tokens_per_example = mask.sum().clamp(min=1).item() / len(mask)
                    loss, _ = common.sft_microbatch_train_step(out["log_probs"], mask, n_micro, tokens_per_example)
                    losses.append(loss.item() * n_micro)
                common.optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
                n_updates += 1

        row = {"step": ei_step + 1, "sampled": len(rollouts), "kept": len(kept), "questions_solved": solved,
               "reward": sum(s["reward"] for s in rewards) / len(rewards),
               "format_reward": sum(s["format_reward"] for s in rewards) / len(rewards),
               "sft_loss": sum(losses) / max(1, len(losses)), "sft_updates": n_updates,
               "step_s": time.perf_counter() - t0}
        last = ei_step + 1 == args.n_ei_steps
        if last or (args.eval_every and (ei_step + 1) % args.eval_every == 0):
            summary = common.evaluate_and_log(model, tokenizer, eval_examples, args, ei_step + 1, log)
            row["eval_accuracy"] = summary["accuracy"]
        log(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if not last and args.save_every and (ei_step + 1) % args.save_every == 0:
            common.save_checkpoint(args.out_dir, ei_step + 1, model, tokenizer, optimizer, scheduler, cursor)
    return common.finish(args, model, tokenizer, summary, f"held-out after {args.n_ei_steps} expert-iteration steps")


if __name__ == "__main__":
    main(parse_args())
