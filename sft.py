"""Supervised fine-tuning on reasoning traces in the r1_zero format.

Default data: reasoning-gym gsm_symbolic, whose items carry a chain of thought; each
example is the r1_zero prompt followed by `<cot> </think> <answer>N</answer>`. Loss on the
completion only (tokenize_prompt_and_output + sft_microbatch_train_step, token-mean per
microbatch), or --packed: Alpaca-format documents packed into fixed-length chunks
(get_packed_sft_dataset) with loss on every token. The shared r1_zero instructions go
through the model once per microbatch (common.get_response_log_probs(shared_prefix=...)).

    uv run python sft.py                                          # gsm_symbolic traces
    uv run python sft.py --task chain_sum --n-steps 40            # the GRPO warm start
    uv run python sft.py --train-data pairs.jsonl --packed --seq-length 512
"""

import argparse
import json
import os
import time

import torch
from tqdm import tqdm

import common
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
    args.out_dir = args.out_dir or os.path.join("runs", "sft")
    tasks.check_batch_args(p, args)
    return args


def packed_batches(args, tokenizer, pairs):
    """An endless stream of packed (input_ids, labels, mask) microbatches."""
    path = os.path.join(args.out_dir, "train_pairs.jsonl")
    tasks.write_jsonl(path, [{"prompt": p, "response": r} for p, r in pairs])
    dataset = common.get_packed_sft_dataset(tokenizer, path, args.seq_length, shuffle=True)
    while True:
        for b in common.iterate_batches(dataset, args.batch_size // args.grad_accum, shuffle=True):
            yield b["input_ids"], b["labels"], torch.ones_like(b["labels"], dtype=torch.bool)


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
    device = next(model.parameters()).device

    micro, summary = args.batch_size // args.grad_accum, None
    model.train()
    bar = tqdm(range(start_step, args.n_steps), desc="sft", initial=start_step, total=args.n_steps)
    for step in bar:
        t0, total_loss, n_tokens = time.perf_counter(), 0.0, 0
        for _ in range(args.grad_accum):
            if packed:
                input_ids, labels, mask = (x.to(device) for x in next(packed))
                log_probs = common.get_response_log_probs(model, input_ids, labels)["log_probs"]
            else:
                chunk = tasks.take(pairs, cursor, micro, args.seed)
                cursor += micro
                out, mask = common.completion_log_probs(model, tokenizer, [c[0] for c in chunk], [c[1] for c in chunk])
                log_probs = out["log_probs"]
            # normalized by the microbatch's mean completion length: a token-mean loss
            tokens_per_example = mask.sum().clamp(min=1).item() / len(mask)
            loss, _ = common.sft_microbatch_train_step(log_probs, mask, args.grad_accum, tokens_per_example)
            total_loss += loss.item()
            n_tokens += mask.numel()
        grad_norm = common.optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
        row = {"step": step + 1, "loss": total_loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
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
