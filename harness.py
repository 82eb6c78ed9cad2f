"""The run harness every script shares, framework-free: flags built from a script's
defaults block, the sampling settings, the data cursor, the LR schedule, checkpoint
lookup and atomic commit, stopping (Ctrl-C, out of memory) and the metrics log.
"""

import argparse
import ctypes
import dataclasses
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import tasks

# ----------------------------------------------------------------------------- flags


def defaults_of(namespace):
    """The defaults block of a script: its lowercase module globals that hold a plain value
    (bool, int, float, str), in the order they were written."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k.islower() and type(v) in (bool, int, float, str)}


CHOICES = {  # flags with a fixed set of values, the same in every script
    "loss_type": ("no_baseline", "reinforce_with_baseline", "grpo_clip", "dr_grpo", "dapo", "bnpo", "gspo"),
    "scale_rewards": ("group", "batch", "none"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
}


def parse_flags(defaults, argv=None, description=None, source=None, choices=CHOICES):
    """argparse over a defaults block: `n_steps = 40  # GRPO steps` becomes `--n-steps 40`
    with the default's type and the line's comment as its help; a bool becomes --x / --no-x.
    choices: {name: allowed values}. Returns the parser (for errors) and the Namespace."""
    comments = {}
    if source:  # the help text is the comment on the default's own line
        for m in re.finditer(r"^(\w+) = .*?#\s*(.*)$", Path(source).read_text(), re.M):
            comments[m.group(1)] = m.group(2).replace("%", "%%")
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, value in defaults.items():
        flag, kw = "--" + name.replace("_", "-"), {"default": value, "help": comments.get(name, " ")}
        if type(value) is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=type(value), choices=choices.get(name), **kw)
    return p, p.parse_args(argv)


def require_multiple(parser, pairs):
    """Each (flag, value, flag, divisor): stop with one line naming both numbers and a valid value."""
    for name, value, div_name, divisor in pairs:
        if divisor <= 0 or value <= 0 or value % divisor:
            fit = max(divisor, value - value % divisor) if divisor > 0 else 1
            parser.error(f"{name} ({value}) must be a positive multiple of {div_name} ({divisor}), e.g. {fit}")


def world_size():
    """How many processes run this job: torchrun's WORLD_SIZE, 1 for a plain `python script.py`."""
    return int(os.environ.get("WORLD_SIZE", 1))


def require_grad_accum_split(grad_accum):
    """Under mlx.launch, whose process count is known only once main has joined the group
    (parse_args checks torchrun's): stop with one line unless --grad-accum splits evenly."""
    if grad_accum % world_size():
        raise SystemExit(f"--grad-accum ({grad_accum}) must be a multiple of the number of processes "
                         f"({world_size()}), which share each optimizer step's microbatches")


def is_main():
    """Whether this process writes the run's files and shows its progress: the only one, or torchrun's rank 0."""
    return world_size() == 1 or int(os.environ["RANK"]) == 0


def check_inputs(parser, args, train_kind="qa"):
    """Stop with one line, before any model loads, on what would fail later: an unknown task
    or reward, a JSONL file with a bad line (file:line: what), a local model path that does
    not exist, --resume with nothing to resume. train_kind: how --train-data is read ('qa',
    'sft' for pairs or questions, 'dpo'). Under torchrun: --grad-accum a multiple of the number
    of processes, which share each optimizer step's microbatches."""
    import machine
    import rewards

    if hasattr(args, "grad_accum"):
        require_multiple(parser, [("--grad-accum", args.grad_accum, "the number of processes", world_size())])
    if getattr(args, "fsdp", False) and args.lora_rank:
        parser.error("--fsdp shards full fine-tuning; with --lora-rank the frozen model is whole on every process: drop one")
    for flag in ("n_eval", "n_train", "oversample"):  # at least one (0 would fail deep inside a run)
        if getattr(args, flag, 1) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")

    try:
        train_data, eval_data = getattr(args, "train_data", ""), getattr(args, "eval_data", "")
        if not (train_data and eval_data):
            tasks.check_task(args.task)
        if getattr(args, "harder_task", ""):
            tasks.check_task(args.harder_task)
        if train_data:
            tasks.read_jsonl(train_data, tasks.sft_kind(train_data) if train_kind == "sft" else train_kind)
        if eval_data:
            tasks.read_jsonl(eval_data, "qa")
        rewards.get_reward_fn(args.reward)
        machine.check_model(args.model)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if getattr(args, "resume", False) and latest_checkpoint(args.out_dir) is None:
        parser.error(f"--resume: no checkpoint in {os.path.join(args.out_dir, 'checkpoints')} to resume from")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How rollouts are sampled; one object, so no caller passes these positionally."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop: tuple = (tasks.STOP,)  # stop strings, kept in the text

    @classmethod
    def from_args(cls, args, **overrides):
        """The settings a script's flags name (those it has), with overrides."""
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**{**fields, **overrides})


# ----------------------------------------------------------------------------- the loop's small pieces (both frameworks)


def take(examples, cursor, n, seed):
    """Examples cursor .. cursor+n of an endless stream of seeded per-epoch shuffles.
    A pure function of the cursor, so a resumed run sees exactly the same data."""
    out = []
    while len(out) < n:
        epoch, offset = divmod(cursor, len(examples))
        order = list(range(len(examples)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        take_now = min(n - len(out), len(examples) - offset)
        out += [examples[i] for i in order[offset : offset + take_now]]
        cursor += take_now
    return out


def take_questions(examples, harder, cursor, n, seed):
    """The next n training questions, `take` over each source (its cursor in the dict
    `cursor`, which checkpoints keep). With a harder task (--harder-task, a curriculum), a
    share of them comes from it: the share of last step's groups that the policy answered
    right in every sample (cursor["sampled"], group_counts). Those questions teach nothing
    (zero variance), so as the task saturates its harder items take their place."""
    last = cursor["sampled"]
    n_harder = round(n * last.get("groups_solved", 0) / last["groups_generated"]) if harder and last else 0
    questions = take(examples, cursor["question"], n - n_harder, seed)
    questions += take(harder, cursor["harder"], n_harder, seed)
    cursor["question"] += n - n_harder
    cursor["harder"] += n_harder
    return questions


def guide_failed_groups(questions, rollouts, scores, group_size, tokenizer, reward_fn):
    """Off-policy guidance (LUFFY, Yan et al. 2025), in place: in a group whose samples all
    fail (no right answer: zero variance, so GRPO learns nothing from it), the question's
    worked trace takes the last sample's place, graded like any answer. The group is mixed
    then: its advantages raise the trace's log-probs and lower the failures'. Only questions
    that have a trace (a reasoning-gym task's own reasoning). questions: one per group, in
    order; a guided rollout is marked "guided"."""
    for g, question in enumerate(questions):
        group = range(g * group_size, (g + 1) * group_size)
        if question.get("reasoning") is None or any(scores[i]["answer_reward"] for i in group):
            continue
        text = tasks.r1_zero_trace(question["reasoning"], question["answer"])
        rollouts[group[-1]] = {**rollouts[group[-1]], "response": text, "log_probs": [], "truncated": False,
                               "response_ids": tokenizer.encode(text, add_special_tokens=False), "guided": True}
        scores[group[-1]] = reward_fn(text, question["answer"])


def group_counts(scores, group_size):
    """Consecutive groups of scores: how many there are, how many are mixed (rewards not all
    equal: a gradient), how many solved (every answer right, answer_reward 1: too easy)."""
    groups = [scores[i : i + group_size] for i in range(0, len(scores), group_size)]
    return {"groups_generated": len(groups), "groups_mixed": sum(_is_mixed(g) for g in groups),
            "groups_solved": sum(all(s["answer_reward"] == 1 for s in g) for g in groups)}


def _is_mixed(group_scores):
    return len({s["reward"] for s in group_scores}) > 1


def shared_prefix_length(sequences, keep_last=1):
    """Length of the token prefix common to all sequences, leaving at least keep_last
    tokens of each one outside it (a forward pass needs at least one new token per row)."""
    shortest = min(len(s) for s in sequences) - keep_last
    k = 0
    while k < shortest and all(s[k] == sequences[0][k] for s in sequences):
        k += 1
    return k


def positions(input_ids, response_mask):
    """How a training forward pass can skip work on a batch (lists of rows): shared_prefix, the
    tokens common to every row (run once, KV cache shared), and score_from, the first column
    where any row has a response token (the LM head runs from there only)."""
    starts = [row.index(True) for row in response_mask if True in row]
    return {"shared_prefix": shared_prefix_length(input_ids), "score_from": min(starts, default=0)}


def response_end(response_mask):
    """One past the last column where any row (lists of bools) has a response token; the
    whole width when no row has one. A causal LM's log-probs before that column do not depend
    on the columns after it, so a microbatch can be cut there: exact, and no work on padding."""
    ends = [len(row) - row[::-1].index(True) for row in response_mask if True in row]
    return max(ends, default=len(response_mask[0]))


def length_sorted(rows, lengths):
    """rows (ints) ordered by lengths[row], longest first, ties kept in their given order.
    Microbatches cut from this order hold rollouts of like length: one long rollout pads one
    microbatch, not all. Longest first: each later microbatch fits in the memory the larger one
    before it freed (shortest first grew the heap with every microbatch: +0.9 GB peak RSS)."""
    return sorted(rows, key=lambda row: -lengths[row])


def release_memory():
    """Give the allocator's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).
    Between phases of a step (rollouts, updates) the heap is left fragmented: without this a
    GRPO run's resident memory grows ~2 GB past what it uses."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def map_large_allocations(megabytes):
    """glibc only (elsewhere nothing): every allocation of at least `megabytes` gets pages of its
    own (mmap), given back to the OS when it is freed. By default glibc serves allocations up to
    32 MB from its heap, where a GRPO step's mix of lifetimes (rollout buffers, weight casts,
    gradients, activations) leaves free holes that stay resident: a default run sat 0.6 GB
    higher in 3-step probes (results/speed). The price: fresh pages are faulted in and zeroed
    on every large allocation. 0: glibc's own threshold."""
    if megabytes > 0 and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc (musl)
            return
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
        libc.mallopt(M_MMAP_THRESHOLD, int(megabytes * 2**20))
        libc.mallopt(M_TRIM_THRESHOLD, int(megabytes * 2**20))  # and a free top of the heap past it


def lr_factor(step, warmup_steps, total_steps, final=0.1):
    """Learning-rate multiplier: linear warmup, then cosine decay to `final`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def dynamic_sample(sample_groups, n_groups, group_size, max_rounds, oversample=1.0, last=None):
    """DAPO's dynamic sampling. sample_groups(n) -> (rollouts, scores) for n new questions,
    group_size of each, consecutive. A group whose rewards are all equal has zero advantage
    and adds no gradient: it is dropped and more questions are sampled, for at most
    max_rounds rounds; if the batch is still short it is topped up with dropped groups, so
    every step trains on n_groups groups. Mixed groups beyond n_groups are dropped too.

    How many questions a round samples: the groups still missing / the share of mixed groups,
    at most oversample x the groups missing. The share is this step's so far, or in its first
    round the previous step's (`last`, the dict the previous call returned; None: unknown, so
    oversample x). A sparse reward thus gets one big round, which costs less than several
    small ones since a round lasts as long as its longest answer; a dense one (nearly every
    group mixed) samples little more than it keeps.
    Returns rollouts, scores, {groups_generated, groups_mixed (all found), groups_solved,
    groups_mixed_kept} (group_counts over every round)."""
    kept, dropped, counts, last = [], [], {}, last or {}
    for _ in range(max_rounds):
        missing = n_groups - len(kept)
        if missing == 0:
            break
        if counts:  # this step's share so far, else the previous step's
            seen, seen_mixed = counts["groups_generated"], counts["groups_mixed"]
        else:
            seen, seen_mixed = last.get("groups_generated", 0), last.get("groups_mixed", 0)
        n = math.ceil(missing * oversample)
        if seen_mixed:  # missing / share = ceil(missing * seen / seen_mixed), in integers: exact
            n = min(n, -(-missing * seen // seen_mixed))
        rollouts, scores = sample_groups(n)
        counts = {k: counts.get(k, 0) + v for k, v in group_counts(scores, group_size).items()}
        for i in range(0, len(rollouts), group_size):
            group = (rollouts[i : i + group_size], scores[i : i + group_size])
            (kept if _is_mixed(group[1]) and len(kept) < n_groups else dropped).append(group)
    n_mixed = len(kept)
    groups = kept + dropped[: n_groups - len(kept)]
    return [r for g in groups for r in g[0]], [s for g in groups for s in g[1]], {**counts, "groups_mixed_kept": n_mixed}


def count_bad_steps(grad_norm, bad_steps, max_bad_steps):
    """Optimizer steps skipped in a row for a NaN / inf gradient (common.optimizer_step skips
    them), 0 after a good one. Stops the run with one line after max_bad_steps in a row: the
    checkpoints on disk all predate the trouble."""
    if math.isfinite(grad_norm):
        return 0
    bad_steps += 1
    if bad_steps >= max_bad_steps:
        raise SystemExit(f"nanoalign: {bad_steps} optimizer steps in a row had a NaN or inf gradient and were skipped; "
                         "stopping. Lower --lr (or check the data), then --resume from the last checkpoint.")
    return bad_steps


def due(step, every, n_steps, at_end=True):
    """Whether step (1-based) is an every-th step: the last step counts when at_end (for
    evaluations, which the final summary needs) and never otherwise (for checkpoints,
    since the final model is saved anyway). every = 0: only at the end."""
    if step == n_steps:
        return at_end
    return every > 0 and step % every == 0


def latest_checkpoint(out_dir):
    """<out_dir>/checkpoints/step_N with the largest N, or None (each one is complete: they
    are written to a temp dir and renamed, commit_checkpoint)."""
    found = sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*")))
    return found[-1] if found else None


def commit_checkpoint(tmp, final, keep=0):
    """Publish a checkpoint written to the temp dir tmp (.tmp-* next to it) as final, atomically:
    fsync its files and itself, rename, fsync the parent, so that after a kill or a power cut
    final is either complete or absent. Then delete the temp dirs a killed save left and all
    but the last `keep` checkpoints (0: keep all). Returns final."""
    root = os.path.dirname(final)
    for name in os.listdir(tmp):  # flat: save_pretrained writes no subdirectories
        _fsync(os.path.join(tmp, name))
    _fsync(tmp)
    if os.path.exists(final):  # the same step saved again (a rerun): the old one goes with the stale temp dirs
        os.rename(final, tmp + "-old")
    os.rename(tmp, final)
    _fsync(root)
    for stale in glob.glob(os.path.join(root, ".tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for old in sorted(glob.glob(os.path.join(root, "step_*")))[:-keep]:
            if old != final:  # (a rerun's step older than those of the run before it stays)
                shutil.rmtree(old)
    return final


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)  # a directory too: that makes its entries (a rename) durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- stopping: Ctrl-C, out of memory

_ctrl_c = {"pressed": False, "previous": None}  # a signal handler is process-wide: so is its state


def _on_ctrl_c(signum, frame):
    if _ctrl_c["pressed"]:  # the second one: Python's handler back, and stop now
        signal.signal(signal.SIGINT, _ctrl_c["previous"])
        _ctrl_c.update(pressed=False, previous=None)
        raise KeyboardInterrupt
    _ctrl_c["pressed"] = True
    print("\nnanoalign: Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again stops at once)",
          file=sys.stderr, flush=True)


def ctrl_c_pressed(step, n_steps):
    """The check at the end of training step `step` (1-based): whether Ctrl-C came during the run.
    The loop then saves this step and exits with status 130 (the shell's code for Ctrl-C, so
    `sft.py && grpo.py` stops too). The first call installs the handler (before a run's first
    step ends Ctrl-C stops at once: there is nothing to save); the last step's call, or a True
    answer, restores Python's. While it is installed a first Ctrl-C only sets the flag and a
    second raises KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        return False
    pressed = _ctrl_c["pressed"]
    if pressed or step >= n_steps:
        if _ctrl_c["previous"] is not None:
            signal.signal(signal.SIGINT, _ctrl_c["previous"])
        _ctrl_c.update(pressed=False, previous=None)
    elif _ctrl_c["previous"] is None:
        _ctrl_c["previous"] = signal.signal(signal.SIGINT, _on_ctrl_c)
    if pressed:
        print(f"nanoalign: Ctrl-C: saving step {step} and stopping; continue with --resume and the same --out-dir",
              file=sys.stderr, flush=True)
    return pressed


def exit_on_oom(main, args, flags):
    """main(args), except that running out of memory (torch's OutOfMemoryError, CUDA / MPS / Metal
    'out of memory') ends the run with one line naming the flags that bound memory, not a traceback."""
    try:
        return main(args)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not re.search(r"out ?of ?memory", f"{type(e).__name__} {e}", re.I):
            raise
        raise SystemExit(f"nanoalign: out of memory ({type(e).__name__}): lower {flags}, then rerun "
                         "(add --resume to continue from the last checkpoint)") from None


# ----------------------------------------------------------------------------- logging


def peak_rss_gb():
    """The process's peak resident memory so far, GB (logged with every step)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def print_summary(summary, title):
    n = max(summary["n"], 1)
    lines = [
        f"{title}",
        f"  {'category':<28}{'count':>7}{'share':>9}",
        f"  {'format right, answer right':<28}{summary['format_and_answer']:>7}{summary['format_and_answer'] / n:>9.1%}",
        f"  {'format right, answer wrong':<28}{summary['format_only']:>7}{summary['format_only'] / n:>9.1%}",
        f"  {'format wrong':<28}{summary['no_format']:>7}{summary['no_format'] / n:>9.1%}",
        f"  accuracy {summary['accuracy']:.1%}  (n={summary['n']})",
    ]
    print("\n".join(lines), flush=True)


class MetricsLog:
    """One dict per call appended to <out_dir>/metrics.jsonl (and wandb with --wandb; with
    --tensorboard, its numbers as TensorBoard scalars in <out_dir>/tensorboard).
    resume_step=N > 0 (a run resumed from its step-N checkpoint): the rows a killed run logged
    after step N are dropped first (from eval_samples.jsonl too), so no step is logged twice."""

    def __init__(self, out_dir, use_wandb=False, config=None, resume_step=0, use_tensorboard=False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.main = is_main()  # under torchrun process 0 alone writes
        if resume_step and self.main:
            for path in (self.path, Path(out_dir) / "eval_samples.jsonl"):
                _drop_rows_after(path, resume_step)
        self.wandb = None
        if use_wandb and self.main:
            import wandb

            self.wandb = wandb
            wandb.init(project="nanoalign", config=config)
        self.tensorboard = TensorBoard(Path(out_dir) / "tensorboard") if use_tensorboard and self.main else None

    def __call__(self, row):
        if not self.main:
            return
        write_jsonl(self.path, [row], "a")
        if self.wandb:
            self.wandb.log(row, step=row["step"])
        if self.tensorboard:
            self.tensorboard.log(row)


class TensorBoard:
    """Each row's numbers as scalars (tag: the metrics.jsonl key) at its step, in an event file
    of log_dir, written with the tensorboard package's own event writer and protos: no torch
    (torch.utils.tensorboard wraps the same writer), so the MLX scripts log the same way."""

    def __init__(self, log_dir):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(log_dir))

    def log(self, row):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float))]
        self.writer.add_event(Event(wall_time=time.time(), step=row["step"], summary=Summary(value=values)))
        self.writer.flush()  # a killed run keeps what it logged


def _drop_rows_after(path, step):
    def step_of(line):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            return math.inf

    if path.exists():
        kept = [line for line in path.read_text().splitlines() if step_of(line) <= step]
        path.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
        os.replace(path.with_suffix(".tmp"), path)


def plot_run(out_dir):
    """PNGs of <out_dir>/metrics.jsonl in <out_dir>/plots (plot.py; matplotlib loads only here)."""
    import plot

    for path in plot.plot_runs([os.path.join(out_dir, "metrics.jsonl")], os.path.join(out_dir, "plots")):
        print(f"wrote {path}")


def write_jsonl(path, rows, mode="w"):
    """rows as JSON lines, appended (mode "a") or replacing the file at once (mode "w": a temp
    file renamed, so a reader, another of torchrun's processes writing it too, never sees half)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target if mode == "a" else target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(path, mode, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if path != target:
        os.replace(path, target)


def sample_stats(rows, k):
    """What k samples per question (consecutive rows, graded) say about headroom: mean@k
    (= pass@1 at the sampling temperature), pass@k, the share of questions whose k samples
    are mixed (some right, some wrong: the groups GRPO learns from), their format rate and
    mean per-token entropy."""
    import rewards

    right = [sum(r["reward"] == 1 for r in rows[i : i + k]) for i in range(0, len(rows), k)]
    return {"mean_at_k": sum(right) / len(rows), "pass_at_k": sum(rewards.pass_at_k(k, c, k) for c in right) / len(right),
            "mixed_frac": sum(0 < c < k for c in right) / len(right),
            "sample_format_rate": sum(r["format_reward"] == 1 for r in rows) / len(rows),
            "sample_entropy": sum(r["entropy"] for r in rows) / len(rows), "k": k}


def record_eval(rows, summary, out_dir, step, log):
    """A held-out evaluation's trace: accuracy and format rate (and, after sampling, mean@k,
    pass@k, mixed share, entropy) to the metrics log, the first 16 generations (prompt,
    response, reward parts, entropy, length) to eval_samples.jsonl, one line to the
    terminal (under torchrun: process 0 writes and prints). Returns the summary."""
    if is_main():
        write_jsonl(os.path.join(out_dir, "eval_samples.jsonl"), [{"step": step, **r} for r in rows[:16]], "a")
    sampled = {f"eval_{key}": summary[key] for key in ("mean_at_k", "pass_at_k", "mixed_frac", "sample_format_rate",
                                                        "sample_entropy") if key in summary}
    log({"step": step, "eval_accuracy": summary["accuracy"], "eval_format_rate": summary["format_rate"], **sampled})
    from tqdm import tqdm

    line = f"step {step}: held-out accuracy {summary['accuracy']:.1%} format {summary['format_rate']:.1%}"
    if sampled:
        line += (f"; {summary['k']} samples each: mean@k {summary['mean_at_k']:.1%} pass@k {summary['pass_at_k']:.1%} "
                 f"mixed {summary['mixed_frac']:.1%} entropy {summary['sample_entropy']:.3f}")
    if is_main():
        tqdm.write(line + f" (n={summary['n']})")
    return summary


def write_summary(summary, out_dir, title):
    """Print the final three-category summary and save it as <out_dir>/summary.json (None:
    the run was resumed after its end and evaluated nothing). Under torchrun process 0 does it."""
    if summary is None or not is_main():
        return summary
    print_summary(summary, title)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
