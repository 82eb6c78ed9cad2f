"""Supervised fine-tuning on reasoning traces in the r1_zero format, in MLX (twin of sft.py).

Same flags, defaults, metrics, logs and checkpoint layout as sft.py; the model is an
mlx-lm model and checkpoints are plain HF directories, so torch and MLX runs continue
each other. Default data: reasoning-gym gsm_symbolic chains of thought; loss on the
completion only (token-mean per microbatch), or --packed Alpaca documents.

    uv run python sft_mlx.py                                      # gsm_symbolic traces
    uv run python sft_mlx.py --task chain_sum --n-steps 40 --lora-rank 16
    uv run mlx.launch -n 2 -- python sft_mlx.py --task chain_sum   # 2 processes (README: Several processes)
"""

import os
import random
import time

import common_mlx as common  # first: it loads a fast BLAS before mlx.core on Linux
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from tqdm import tqdm

import harness
import tasks


# ----------------------------------------------------------------------------- defaults
# Edit a line for an ablation, or override it as a flag: --n-steps 80 --lr 1e-5.
model = "smollm2-135m-instruct"  # local HF dir, hub id, or the embedded default
task = "gsm_symbolic"  # chain_sum, chain_sum_hard, basic_arithmetic, gsm_symbolic, or reasoning-gym name[:k=v,...]
train_data = ""  # JSONL of {prompt, response} pairs or of questions with reasoning; overrides --task
eval_data = ""  # JSONL of your own held-out questions; overrides --task
reward = "r1_zero"  # how evaluation grades: r1_zero, exact, or path/to/file.py:function
out_dir = "runs/sft_mlx"  # run directory: metrics.jsonl, checkpoints/, final/
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
    input_ids, labels = (mx.stack([r[k] for r in rows]) for k in ("input_ids", "labels"))
    return input_ids, labels, mx.ones(labels.shape, dtype=mx.bool_)


def main(args):
    common.init_distributed(args.device)  # under mlx.launch: join the other processes (a plain run: nothing)
    harness.require_grad_accum_split(args.grad_accum)  # the process count is known only now
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

    def loss_fn(model, input_ids, labels, mask, skip, tokens_per_example):
        log_probs = common.get_response_log_probs(model, input_ids, labels, **skip)["log_probs"]
        return common.sft_microbatch_train_step(log_probs, mask, args.grad_accum, tokens_per_example)[0]

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    micro, summary, bad_steps = args.batch_size // args.grad_accum, None, 0
    bar = tqdm(range(start_step, args.n_steps), desc="sft", initial=start_step, total=args.n_steps,
               disable=not harness.is_main())
    for step in bar:
        t0, losses, n_tokens, grads = time.perf_counter(), [], 0, None
        firsts = common.rank_share(range(cursor, cursor + args.batch_size, micro))  # this process's microbatches
        for i, first in enumerate(firsts):
            if packed:
                input_ids, labels, mask = packed_batch(packed, first, micro, args.seed)
            else:
                chunk = harness.take(pairs, first, micro, args.seed)
                batch = common.tokenize_prompt_and_output([c[0] for c in chunk], [c[1] for c in chunk], tokenizer)
                input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["response_mask"]
            skip = harness.positions(input_ids.tolist(), mask.tolist())  # shared prefix, first scored position
            # normalized by the microbatch's mean completion length: a token-mean loss
            tokens_per_example = max(mask.sum().item(), 1) / len(mask)
            loss, g = loss_and_grad(model, input_ids, labels, mask, skip, tokens_per_example)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            if i + 1 < len(firsts):  # bound memory to one microbatch's graph: what accumulation is for
                mx.eval(grads)
            losses.append(loss)
            n_tokens += mask.size
        cursor += args.batch_size
        grad_norm = common.optimizer_step(model, optimizer, grads, args.max_grad_norm)  # evaluates the step
        total_loss = sum(loss.item() for loss in losses)
        total_loss, n_tokens = common.all_reduce_sum({"loss": total_loss, "tokens": n_tokens}).values()
        bad_steps = harness.count_bad_steps(grad_norm, bad_steps, args.max_bad_steps)
        row = {"step": step + 1, "loss": total_loss, "grad_norm": grad_norm, "lr": scheduler(optimizer.step).item(),
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
