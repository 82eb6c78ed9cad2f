"""Supervised fine-tuning on reasoning traces in the r1_zero format, in MLX (twin of sft.py).

Same flags, defaults, metrics, logs and checkpoint layout as sft.py; the model is an
mlx-lm model and checkpoints are plain HF directories, so torch and MLX runs continue
each other. Default data: reasoning-gym gsm_symbolic chains of thought; loss on the
completion only (token-mean per microbatch), or --packed Alpaca documents.

    uv run python sft_mlx.py                                      # gsm_symbolic traces
    uv run python sft_mlx.py --task chain_sum --n-steps 40 --lora-rank 16
"""

import argparse
import os
import time

import common_mlx as common  # first: it loads a fast BLAS before mlx.core on Linux
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from tqdm import tqdm

import tasks


def parse_args(argv=None):
    p = tasks.add_shared_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    g = p.add_argument_group("sft")
    g.add_argument("--n-steps", type=int, default=60, help="optimizer steps")
    g.add_argument("--packed", action="store_true", help="packed Alpaca documents instead of completion-only")
    g.add_argument("--seq-length", type=int, default=512, help="chunk length with --packed")
    tasks.add_training_args(p, sampling=False, lr=5e-5, batch_size=16, grad_accum=2, warmup_steps=5, n_train=5000,
                            eval_every=0, save_every=0, task="gsm_symbolic", max_new_tokens=256)
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join("runs", "sft_mlx")
    tasks.check_batch_args(p, args)
    return args


def packed_batches(args, tokenizer, pairs):
    """An endless stream of packed (input_ids, labels, mask) microbatches."""
    path = os.path.join(args.out_dir, "train_pairs.jsonl")
    tasks.write_jsonl(path, [{"prompt": p, "response": r} for p, r in pairs])
    dataset = common.get_packed_sft_dataset(tokenizer, path, args.seq_length, shuffle=True)
    while True:
        for b in common.iterate_batches(dataset, args.batch_size // args.grad_accum, shuffle=True):
            yield b["input_ids"], b["labels"], mx.ones(b["labels"].shape, dtype=mx.bool_)


def main(args):
    common.set_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    model, tokenizer, ckpt = common.load_policy(args)
    optimizer, scheduler = common.make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95), args.warmup_steps,
                                                 args.n_steps)
    pairs = tasks.sft_pairs(args)
    eval_examples = tasks.load_examples(args, "eval", args.n_eval)
    start_step, cursor = common.resume(ckpt, model, optimizer, scheduler)
    packed = packed_batches(args, tokenizer, pairs) if args.packed else None
    log = tasks.MetricsLog(args.out_dir, args.wandb, vars(args))

    def loss_fn(model, input_ids, labels, mask, prefix, tokens_per_example):
        log_probs = common.get_response_log_probs(model, input_ids, labels, shared_prefix=prefix)["log_probs"]
        return common.sft_microbatch_train_step(log_probs, mask, args.grad_accum, tokens_per_example)[0]

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    micro, summary = args.batch_size // args.grad_accum, None
    bar = tqdm(range(start_step, args.n_steps), desc="sft", initial=start_step, total=args.n_steps)
    for step in bar:
        t0, losses, n_tokens, grads = time.perf_counter(), [], 0, None
        for i in range(args.grad_accum):
            if packed:
                input_ids, labels, mask = next(packed)
            else:
                chunk = tasks.take(pairs, cursor, micro, args.seed)
                cursor += micro
                batch = common.tokenize_prompt_and_output([c[0] for c in chunk], [c[1] for c in chunk], tokenizer)
                input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["response_mask"]
            prefix = 0 if packed else tasks.shared_prefix_length(input_ids.tolist())
            # normalized by the microbatch's mean completion length: a token-mean loss
            tokens_per_example = max(mask.sum().item(), 1) / len(mask)
            loss, g = loss_and_grad(model, input_ids, labels, mask, prefix, tokens_per_example)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            if i + 1 < args.grad_accum:  # bound memory to one microbatch's graph: what accumulation is for
                mx.eval(grads)
            losses.append(loss)
            n_tokens += mask.size
        grad_norm = common.optimizer_step(model, optimizer, grads, args.max_grad_norm)  # evaluates the step
        total_loss = sum(loss.item() for loss in losses)
        row = {"step": step + 1, "loss": total_loss, "grad_norm": grad_norm, "lr": scheduler(optimizer.step).item(),
               "train_tok_s": n_tokens / (time.perf_counter() - t0), "step_s": time.perf_counter() - t0}
        log(row)
        bar.set_postfix(loss=f"{total_loss:.3f}", s=f"{row['step_s']:.1f}")
        last = step + 1 == args.n_steps
        if last or (args.eval_every and (step + 1) % args.eval_every == 0):
            summary = common.evaluate_and_log(model, tokenizer, eval_examples, args, step + 1, log)
            bar.write(f"step {step + 1}: held-out accuracy {summary['accuracy']:.1%} format {summary['format_rate']:.1%}")
        if not last and args.save_every and (step + 1) % args.save_every == 0:
            common.save_checkpoint(args.out_dir, step + 1, model, tokenizer, optimizer, scheduler, cursor)
    return common.finish(args, model, tokenizer, summary, f"held-out after {args.n_steps} SFT steps")


if __name__ == "__main__":
    main(parse_args())
