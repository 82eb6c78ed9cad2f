"""Answer parsing and reward functions, framework-free. Model output is hostile: every
reward here is time-bounded, never evaluates code and never raises.

A reward is any function (response, ground_truth) -> {"reward", "format_reward",
"answer_reward"}; `get_reward_fn` finds one by name or as path/to/file.py:function.
"""

import math
import os
import re
import signal
import threading
import warnings
from pathlib import Path

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

def _zero():
    """The score of anything unparseable, wrong or broken."""
    return {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}


MAX_ANSWER_CHARS = 300  # longer answers are never parsed symbolically (sympy bombs)
# where a number is asked for, an answer may hold one number (or one fraction, a way to write a
# number): "9 - 7", "(9)-(7)", "9 \times 7" are the question copied, not an answer to it, and
# math-verify would evaluate them (a GRPO run learned to write them, results/learning)
_FRACTION = re.compile(r"[-+]?\(?\s*(\d+\s*/\s*\d+|\\[dt]?frac\s*\{\s*\d+\s*\}\s*\{\s*\d+\s*\})\s*\)?")


def _is_one_number(text):
    """At most one number in text, or text is one fraction (inside $...$ or \\boxed{...})."""
    text = re.sub(r"^\\boxed\{(.*)\}$", r"\1", text.strip().strip("$").strip()).strip()
    return len(_NUMBER.findall(text)) <= 1 or bool(_FRACTION.fullmatch(text))


def _as_number(text):
    text = text.strip().replace(",", "").rstrip(".")
    if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", text):
        return float(text)
    return None


def answers_match(answer, ground_truth, timeout_s=1):
    """Exact match, numeric match, then math-verify equivalence (time-bounded); where the ground
    truth is a number, an answer holding several numbers (an expression) never matches. Never raises."""
    answer, ground_truth = answer.strip(), str(ground_truth).strip()
    if answer == ground_truth:
        return True
    a, g = _as_number(answer), _as_number(ground_truth)
    if a is not None and g is not None:
        return math.isclose(a, g, rel_tol=1e-9, abs_tol=1e-9)
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return False
    if g is not None and not _is_one_number(answer):  # a number was asked for: an expression is not one
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
            return _zero()
        right = answers_match(answer, ground_truth)
        return {"format_reward": 1.0, "answer_reward": float(right), "reward": float(right)}
    except Exception:  # noqa: BLE001
        return _zero()


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
        return _zero()


def closeness_reward_fn(response, ground_truth):
    """Partial credit for numeric tasks: 1 / (1 + |answer - truth|) for a number between the
    r1_zero answer tags (1 when exact, 1/2 when off by one), 0 without the format or a number.
    Meant as a small extra term next to r1_zero (--reward r1_zero:1,closeness:0.2)."""
    try:
        tagged = _tagged_answer(response[:100_000])
        a, g = _as_number(tagged or ""), _as_number(str(ground_truth))
        if tagged is None or a is None or g is None:
            return {"format_reward": float(tagged is not None), "answer_reward": 0.0, "reward": 0.0}
        right = float(a == g)
        return {"format_reward": 1.0, "answer_reward": right, "reward": 1.0 / (1.0 + min(abs(a - g), 1e12))}
    except Exception:  # noqa: BLE001
        return _zero()


def digits_reward_fn(response, ground_truth):
    """Partial credit for integer answers, digit by digit: the two numbers written out and
    aligned at the units digit, the share of positions that agree (the sign is a position; a
    missing or extra digit is a wrong one). 124 for 134: 2/3; -1 for -41: 1/3; exact: 1.
    Unlike closeness it credits a right units digit under a wrong carry, the error a small
    model makes most. 0 without the format or an integer. Meant next to r1_zero."""
    try:
        tagged = _tagged_answer(response[:100_000])
        a, g = (tagged or "").strip(), str(ground_truth).strip()
        if tagged is None or not re.fullmatch(r"-?\d{1,40}", a) or not re.fullmatch(r"-?\d{1,40}", g):
            return {"format_reward": float(tagged is not None), "answer_reward": 0.0, "reward": 0.0}
        width = max(len(a), len(g))
        same = sum(x == y for x, y in zip(a.rjust(width), g.rjust(width)))
        return {"format_reward": 1.0, "answer_reward": float(a == g), "reward": same / width}
    except Exception:  # noqa: BLE001
        return _zero()


REWARDS = {"r1_zero": r1_zero_reward_fn, "exact": exact_match_reward_fn, "closeness": closeness_reward_fn,
           "digits": digits_reward_fn}


class _OutOfTime(BaseException):  # not an Exception: a reward's own `except Exception` cannot swallow it
    pass


def guarded(fn, seconds=0.8):
    """fn made safe for hostile output and for user code: a call that raises, returns no
    {"reward": ...} dict, or runs past `seconds` of CPU time scores 0 and is counted in
    .failures (the run goes on). The time limit is a SIGVTALRM timer, so it does not clash
    with math-verify's SIGALRM; it works in the main thread and can only stop Python code
    (one C call, such as a huge integer power, runs to its end)."""

    def safe(response, ground_truth):
        timed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        if timed:
            previous = signal.signal(signal.SIGVTALRM, _raise_out_of_time)
            signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
        try:
            out = fn(response, ground_truth)
            if not isinstance(out, dict) or not isinstance(out.get("reward"), (int, float)):
                raise TypeError(f"a reward must return a dict with a numeric 'reward', got {out!r:.80}")
            return out
        except (Exception, _OutOfTime):  # noqa: BLE001 - whatever the reward does, the run goes on
            safe.failures += 1
            return _zero()
        finally:
            if timed:
                signal.setitimer(signal.ITIMER_VIRTUAL, 0)
                signal.signal(signal.SIGVTALRM, previous)

    safe.failures = 0
    return safe


def _raise_out_of_time(signum, frame):
    raise _OutOfTime()


def get_reward_fn(spec):
    """A reward function from --reward: a name (r1_zero, exact, closeness), a user function
    'path/to/file.py:function', or a weighted sum of those, 'r1_zero:1.0,closeness:0.2'
    (name[:weight], comma-separated). A sum's reward is sum_i w_i * reward_i, each part's
    reward is also returned as 'reward/<name>' (for the logs), and format_reward /
    answer_reward are the first part's, so held-out accuracy stays the first reward's.
    Every reward has the signature (response, ground_truth) -> {reward, format_reward, answer_reward}.
    The result is `guarded`: exceptions and calls past 0.8 s of CPU score 0 and are counted
    in its .failures."""
    answers_match("\\frac{1}{2}", "0.5")  # load math-verify's parsers now: a time limit must never cut an import short
    parts = [_weighted(part) for part in spec.split(",")]
    if len(parts) == 1 and parts[0][2] == 1.0:
        return guarded(parts[0][1])

    def weighted_sum(response, ground_truth):
        scores = [(name, weight, fn(response, ground_truth)) for name, fn, weight in parts]
        out = {"format_reward": scores[0][2]["format_reward"], "answer_reward": scores[0][2]["answer_reward"],
               "reward": sum(weight * score["reward"] for _, weight, score in scores)}
        out.update({f"reward/{name}": score["reward"] for name, _, score in scores})
        return out

    return guarded(weighted_sum)


def _weighted(part):
    """'name[:weight]' -> (name, function, weight)."""
    name, sep, weight = part.strip().rpartition(":")
    try:
        weight = float(weight) if sep and name else None
    except ValueError:
        weight = None
    if weight is None:
        name, weight = part.strip(), 1.0
    label = name.rpartition(":")[2] if ".py:" in name else name  # a user function: its name
    return label, _one_reward_fn(name), weight


def _one_reward_fn(name):
    if name in REWARDS:
        return REWARDS[name]
    path, sep, fn = name.rpartition(":")
    if not sep or not path.endswith(".py") or not os.path.exists(path):
        raise ValueError(f"--reward {name!r}: expected one of {', '.join(REWARDS)}, path/to/file.py:function, "
                         "or a weighted sum like r1_zero:1.0,closeness:0.2")
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, fn, None)):
        raise ValueError(f"--reward {name!r}: {path} has no function {fn!r}")
    return getattr(module, fn)


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


def pass_at_k(n, c, k):
    """Unbiased pass@k of one question from n samples of which c are right (Chen et al.
    2021): 1 - C(n-c, k) / C(n, k), the chance that k of the n, drawn without
    replacement, include a right one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
