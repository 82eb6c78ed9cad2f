"""What the model is asked, framework-free: the r1_zero and Alpaca prompts, the
reasoning-gym tasks (deterministic train / held-out splits that never overlap), and
your own JSONL data (MATH, GSM8K, SFT pairs, DPO triples) with file:line errors.
"""

import functools
import json
import re
import warnings

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


def check_task(task):
    """Raise ValueError (one line) unless task names a known or reasoning-gym dataset."""
    dataset, _ = _parse_task(task)
    if task.partition(":")[0] in TASKS:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from reasoning_gym.factory import DATASETS
    if dataset not in DATASETS:
        raise ValueError(f"--task {task!r}: unknown; expected {', '.join(TASKS)} or a reasoning-gym dataset "
                         f"({len(DATASETS)} of them, e.g. {', '.join(sorted(DATASETS)[:3])})")


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


def task_split(task, split, n, held_out_of=()):
    """n deterministic examples {question, answer, reasoning} of a reasoning-gym task.
    'eval' and 'train' come from different generator seeds, and 'train' drops every
    question of the held-out pool (the task's, and that of each task in held_out_of), so
    nothing held out is ever trained on."""
    if split == "eval":
        if n > EVAL_POOL:
            raise ValueError(f"--n-eval {n}: at most {EVAL_POOL} held-out items per task")
        return list(_rg_items(task, EVAL_SEED, n))
    held_out, out, size = _held_out_questions(task).union(*map(_held_out_questions, held_out_of)), [], n
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
    rows = list(jsonl_objects(path, ROW_PARSERS[kind]))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def jsonl_objects(path, parse=lambda row: row):
    """parse(row) for each JSON object of a JSONL file, blank lines skipped. A line that is not
    a JSON object, or that parse rejects with a DataError, raises one DataError naming the
    file, the line and what is wrong (plot.py reads metrics.jsonl with it too)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not JSON ({e})") from None
            try:
                if not isinstance(row, dict):
                    raise DataError(f"expected a JSON object, got {type(row).__name__}")
                row = parse(row)
            except DataError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            yield row


def load_examples(args, split, n):
    """Question/answer examples for a split: --train-data / --eval-data when given, else the task."""
    path = args.train_data if split == "train" else args.eval_data
    return read_jsonl(path, "qa")[:n] if path else task_split(args.task, split, n)


def harder_examples(args):
    """--harder-task's training questions (none if it is empty), none of them held out by it
    or by --task, whose held-out split the run is evaluated on."""
    if not args.harder_task:
        return []
    return task_split(args.harder_task, "train", args.n_train, held_out_of=(args.task,))


def sft_kind(path):
    """How sft.py reads a --train-data file: 'sft' when its first line is a {prompt, ...}
    pair, else 'qa' (questions, turned into r1_zero traces). A bad first line is left for
    read_jsonl to report with its line number."""
    with open(path, encoding="utf-8") as f:
        try:
            first = json.loads(f.readline() or "{}")
        except json.JSONDecodeError:
            return "qa"
    return "sft" if isinstance(first, dict) and "prompt" in first else "qa"


def sft_pairs(args):
    """(prompt, response) pairs: a JSONL of pairs, or r1_zero traces of a task / QA file."""
    if args.train_data and sft_kind(args.train_data) == "sft":
        return [(r["prompt"], r["response"]) for r in read_jsonl(args.train_data, "sft")][: args.n_train]
    examples = load_examples(args, "train", args.n_train)
    return [(r1_zero_prompt(ex["question"]), r1_zero_trace(ex["reasoning"] or "", ex["answer"]))
            for ex in examples]
