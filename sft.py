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

import os
import random
import time

import torch
from tqdm import tqdm

import common
import harness
import tasks


# ----------------------------------------------------------------------------- defaults
# Edit a line for an ablation, or override it as a flag: --n-steps 80 --lr 1e-5.
model = "smollm2-135m-instruct"  # local HF dir, hub id, or the embedded default
task = "gsm_symbolic"  # chain_sum, chain_sum_hard, basic_arithmetic, gsm_symbolic, or reasoning-gym name[:k=v,...]
train_data = ""  # JSONL of {prompt, response} pairs or of questions with reasoning; overrides --task
eval_data = ""  # JSONL of your own held-out questions; overrides --task
reward = "r1_zero"  # how evaluation grades: r1_zero, exact, or path/to/file.py:function
out_dir = "runs/sft"  # run directory: metrics.jsonl, checkpoints/, final/
cache_dir = ""  # where the embedded model is converted (default $NANOALIGN_CACHE or ~/.cache/nanoalign)
# SFT
n_steps = 60  # optimizer steps
packed = False  # packed Alpaca documents with loss on every token, instead of completion-only
seq_length = 512  # chunk length with --packed
# optimization
lr = 5e-5
batch_size = 16  # examples per optimizer step
grad_accum = 2  # microbatches per optimizer step
warmup_steps = 5  # linear warmup, then cosine decay to 10%
weight_decay = 0.0
max_grad_norm = 1.0
max_bad_steps = 3  # stop after this many optimizer steps in a row skipped for a NaN / inf gradient
lora_rank = 0  # 0: full fine-tuning
fsdp = False  # under torchrun: each process holds 1/N of the weights, gradients, AdamW state (FSDP2; torch)
n_train = 5000  # training examples drawn from the task
# evaluation (greedy), checkpoints, hardware
max_new_tokens = 256
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
device = "auto"  # auto: cuda > mps > cpu (MLX: the Metal GPU on a Mac, else the CPU)
dtype = "auto"  # auto: bf16 where the hardware runs it fast, else fp32
DEFAULTS = harness.defaults_of(globals())


def parse_args(argv=None):
    p, args = harness.parse_flags(DEFAULTS, argv, __doc__.split("\n")[0], __file__)
    harness.require_multiple(p, [("--batch-size", args.batch_size, "--grad-accum", args.grad_accum)])
    harness.check_inputs(p, args, train_kind="sft")
    return args


def packed_dataset(args, tokenizer, pairs):
    """The pairs as Alpaca documents (seeded shuffle) packed into --seq-length chunks."""
    rows = [{"prompt": p, "response": r} for p, r in pairs]
    random.Random(args.seed).shuffle(rows)  # not the global RNG, which resume() restores: the same chunks on resume
    path = os.path.join(args.out_dir, "train_pairs.jsonl")
    harness.write_jsonl(path, rows)
    return common.get_packed_sft_dataset(tokenizer, path, args.seq_length, shuffle=False)


def packed_batch(dataset, cursor, n, seed):
    """Chunks cursor .. cursor+n of the packed dataset's endless seeded shuffle (harness.take, so a
    resumed run goes on where it stopped) -> input_ids, labels, mask (n, L): loss on every token."""
    rows = harness.take(dataset, cursor, n, seed)
    input_ids, labels = (torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels"))
    return input_ids, labels, torch.ones_like(labels, dtype=torch.bool)


def main(args):
    common.init_distributed(args.device)  # under torchrun: join the other processes (a plain run: nothing)
    common.set_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    model, tokenizer, ckpt = common.load_policy(args)
    optimizer, scheduler = common.make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95), args.warmup_steps,
                                                 args.n_steps)
    pairs = tasks.sft_pairs(args)
    eval_examples = tasks.load_examples(args, "eval", args.n_eval)
    start_step, cursor = common.resume(ckpt, model, optimizer, scheduler)
    packed = packed_dataset(args, tokenizer, pairs) if args.packed else None
    log = harness.MetricsLog(args.out_dir, args.wandb, vars(args), start_step, args.tensorboard)
    device = next(model.parameters()).device

    micro, summary, bad_steps = args.batch_size // args.grad_accum, None, 0
    model.train()
    bar = tqdm(range(start_step, args.n_steps), desc="sft", initial=start_step, total=args.n_steps,
               disable=not harness.is_main())
    for step in bar:
        t0, total_loss, n_tokens = time.perf_counter(), 0.0, 0
        for first in common.rank_share(range(cursor, cursor + args.batch_size, micro)):  # this process's microbatches
            if packed:
                input_ids, labels, mask = (x.to(device) for x in packed_batch(packed, first, micro, args.seed))
                log_probs = common.get_response_log_probs(model, input_ids, labels)["log_probs"]
            else:
                chunk = harness.take(pairs, first, micro, args.seed)
                out, mask = common.completion_log_probs(model, tokenizer, [c[0] for c in chunk], [c[1] for c in chunk])
                log_probs = out["log_probs"]
            # normalized by the microbatch's mean completion length: a token-mean loss
            tokens_per_example = mask.sum().clamp(min=1).item() / len(mask)
            loss, _ = common.sft_microbatch_train_step(log_probs, mask, args.grad_accum, tokens_per_example)
            total_loss += loss.item()
            n_tokens += mask.numel()
        cursor += args.batch_size
        grad_norm = common.optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
        total_loss, n_tokens = common.all_reduce_sum({"loss": total_loss, "tokens": n_tokens}).values()
        bad_steps = harness.count_bad_steps(grad_norm, bad_steps, args.max_bad_steps)
        row = {"step": step + 1, "loss": total_loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
               "train_tok_s": n_tokens / (time.perf_counter() - t0), "step_s": time.perf_counter() - t0,
               "peak_rss_gb": harness.peak_rss_gb()}
        log(row)
        bar.set_postfix(loss=f"{total_loss:.3f}", s=f"{row['step_s']:.1f}")
        if harness.due(step + 1, args.eval_every, args.n_steps):
            summary = common.evaluate_and_log(model, tokenizer, eval_examples, args, step + 1, log)
        common.save_or_stop(args, step + 1, args.n_steps, model, tokenizer, optimizer, scheduler, cursor)
    return common.finish(args, model, tokenizer, summary, f"held-out after {args.n_steps} SFT steps")


if __name__ == "__main__":
    harness.exit_on_oom(main, parse_args(), "--batch-size (or raise --grad-accum), --seq-length with --packed, "
                                           "--eval-batch-size, --max-new-tokens")
