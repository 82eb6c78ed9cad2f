"""Tests of tasks.py, rewards.py and harness.py: rewards, answer parsing, task splits, JSONL readers, prompts, flags."""

import json

import pytest

import adapters
import harness
import rewards
import tasks

# ----------------------------------------------------------------------------- r1_zero reward


def _r1(answer, reasoning=" 2 + 2 is 4 "):
    """A response in the r1_zero format (the prompt already ends with '<think>')."""
    return f"{reasoning}</think> <answer>{answer}</answer>"


ALL_ONE = {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}
FORMAT_ONLY = {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}
ALL_ZERO = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}


def _check(got, expected):
    assert set(expected) <= set(got), got
    assert {k: float(got[k]) for k in expected} == expected


def test_r1_zero_right_answer():
    _check(adapters.run_r1_zero_reward_fn(_r1("4"), "4"), ALL_ONE)
    _check(adapters.run_r1_zero_reward_fn(_r1(" 4 "), "4"), ALL_ONE)


def test_r1_zero_wrong_answer():
    _check(adapters.run_r1_zero_reward_fn(_r1("5"), "4"), FORMAT_ONLY)
    _check(adapters.run_r1_zero_reward_fn(_r1("\\frac{1}{3}"), "0.5"), FORMAT_ONLY)


@pytest.mark.parametrize(
    "response",
    [
        " 2 + 2 is 4 </think><answer>4</answer>",  # no space between the tags
        " 2 + 2 is 4 <answer>4</answer>",  # no </think>
        " 2 + 2 is 4 </think> <answer>4",  # no </answer>
        " 2 + 2 is 4 </think> 4",  # no answer tags at all
        "4",
        "",
    ],
)
def test_r1_zero_bad_format_is_all_zero(response):
    _check(adapters.run_r1_zero_reward_fn(response, "4"), ALL_ZERO)


@pytest.mark.parametrize(
    "answer, ground_truth",
    [
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "0.5"),
        ("3.0", "3"),
        ("3", "3.0"),
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
    ],
)
def test_r1_zero_equivalent_forms(answer, ground_truth):
    _check(adapters.run_r1_zero_reward_fn(_r1(answer), ground_truth), ALL_ONE)


@pytest.mark.parametrize(
    "response, ground_truth",
    [
        ("None", "4"),
        ("null", "None"),
        (_r1("None"), "4"),
        (_r1(""), "4"),
        (_r1("4"), ""),
        ("x" * 1_000_000, "4"),  # 1 MB of junk
        (_r1("x" * 1_000_000), "4"),
        (_r1("{" * 10_000), "4"),  # unbalanced braces
        (_r1("}" * 50 + "{" * 50), "4"),
        (_r1("\\frac{" * 40), "\\frac{1}{2}"),
        ("</think> <answer>" * 2000, "4"),  # many openings and no closing tag
        (_r1("\x00\ud800"), "4"),  # a NUL and a lone surrogate
    ],
    ids=["None", "null", "None-answer", "empty-answer", "empty-gt", "1MB", "1MB-answer", "braces",
         "closed-open-braces", "nested-frac", "many-open-tags", "odd-chars"],
)
def test_r1_zero_never_raises_on_junk(response, ground_truth):
    got = adapters.run_r1_zero_reward_fn(response, ground_truth)
    assert set(got) >= {"format_reward", "answer_reward", "reward"}
    assert all(float(v) in (0.0, 1.0) for v in got.values())
    assert float(got["answer_reward"]) == 0.0 and float(got["reward"]) == 0.0


# ----------------------------------------------------------------------------- exact match reward


@pytest.mark.parametrize(
    "response, ground_truth, expected",
    [
        (_r1("42"), "42", ALL_ONE),
        (_r1("42.0"), "42", ALL_ONE),  # equal as numbers
        (_r1(" 1,234 "), "1234", ALL_ONE),
        (_r1("-7"), "-7", ALL_ONE),
        (_r1("41"), "42", FORMAT_ONLY),
        (_r1("forty-two"), "42", FORMAT_ONLY),
        (_r1(""), "42", FORMAT_ONLY),
        # without the tags: the last number counts for the answer, but the reward needs the format
        ("so the answer is 42", "42", {"format_reward": 0.0, "answer_reward": 1.0, "reward": 0.0}),
        ("first 42 then 41", "42", ALL_ZERO),
        ("no number here", "42", ALL_ZERO),
    ],
)
def test_exact_match_reward_fn(response, ground_truth, expected):
    _check(rewards.exact_match_reward_fn(response, ground_truth), expected)


def test_exact_match_reward_fn_never_raises():
    for response in ("", "x" * 1_000_000, _r1("{" * 10_000), "</think> <answer>"):
        got = rewards.exact_match_reward_fn(response, "42")
        assert float(got["reward"]) == 0.0


# ----------------------------------------------------------------------------- parsers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 42.", "42"),
        ("First 3 apples, then 7 more, so 10", "10"),
        ("It dropped to -5 degrees", "-5"),
        ("She paid 3.75 dollars", "3.75"),
        ("Total: 1,234,567 people", "1234567"),
        ("The change is -0.5 and then 12.", "12"),
        ("#### 1,234", "1234"),
        ("no numbers at all", None),
        ("", None),
    ],
)
def test_parse_gsm8k_response(text, expected):
    assert adapters.run_parse_gsm8k_response(text) == expected


MMLU_EXAMPLE = {
    "subject": "arithmetic",
    "question": "What is 2 + 2?",
    "options": ["3", "4", "5", "6"],
    "answer": "B",
}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The correct answer is B", "B"),
        ("Let me think. 2 + 2 = 4, so the correct answer is B.", "B"),
        ("The answer is D", "D"),
        ("The answer is (A)", "A"),
        ("I am not sure about this one.", None),
        ("", None),
    ],
)
def test_parse_mmlu_response(text, expected):
    assert adapters.run_parse_mmlu_response(MMLU_EXAMPLE, text) == expected


# ----------------------------------------------------------------------------- task splits


SPLIT_TASKS = ["chain_sum", "basic_arithmetic", "gsm_symbolic"]
N_SPLIT = 200


@pytest.fixture(scope="module")
def splits():
    return {t: (tasks.task_split(t, "eval", N_SPLIT), tasks.task_split(t, "train", N_SPLIT)) for t in SPLIT_TASKS}


@pytest.mark.parametrize("task", SPLIT_TASKS)
def test_task_split_disjoint_and_well_formed(splits, task):
    eval_items, train_items = splits[task]
    assert len(eval_items) == N_SPLIT and len(train_items) == N_SPLIT
    eval_q = {ex["question"] for ex in eval_items}
    train_q = {ex["question"] for ex in train_items}
    assert not eval_q & train_q, f"{task}: {len(eval_q & train_q)} questions in both splits"
    for ex in eval_items + train_items:
        assert isinstance(ex["question"], str) and ex["question"]
        assert isinstance(ex["answer"], str) and ex["answer"]


@pytest.mark.parametrize("task", SPLIT_TASKS)
def test_task_split_deterministic(splits, task):
    n = 50  # a fresh call, shorter than the fixture's: the same generator gives the same prefix
    eval_items, train_items = splits[task]
    assert tasks.task_split(task, "eval", N_SPLIT) == eval_items
    assert tasks.task_split(task, "eval", n) == eval_items[:n]
    assert tasks.task_split(task, "train", N_SPLIT) == train_items


def test_harder_task_never_trains_on_the_run_s_held_out_questions():
    """--harder-task chain_sum:max_digits=3 draws 1-3 digit sums, some of which are in
    chain_sum's held-out pool (the run is evaluated there): harder_examples drops them."""
    from types import SimpleNamespace

    held_out = {ex["question"] for ex in tasks.task_split("chain_sum", "eval", tasks.EVAL_POOL)}
    unfiltered = tasks.task_split("chain_sum:max_digits=3", "train", 500)
    assert any(ex["question"] in held_out for ex in unfiltered)  # the case exists (5 of 500)
    args = SimpleNamespace(task="chain_sum", harder_task="chain_sum:max_digits=3", n_train=500)
    harder = tasks.harder_examples(args)
    assert len(harder) == 500 and not any(ex["question"] in held_out for ex in harder)
    assert tasks.harder_examples(SimpleNamespace(task="chain_sum", harder_task="", n_train=500)) == []


def test_gsm_symbolic_has_reasoning_and_trace(splits):
    for ex in splits["gsm_symbolic"][0][:50] + splits["gsm_symbolic"][1][:50]:
        assert isinstance(ex["reasoning"], str) and ex["reasoning"].strip()
        assert "####" not in ex["reasoning"]
        trace = tasks.r1_zero_trace(ex["reasoning"], ex["answer"])
        assert trace.endswith(f"</think> <answer>{ex['answer']}</answer>")
        # the trace is a right answer under the r1_zero reward
        _check(adapters.run_r1_zero_reward_fn(trace, ex["answer"]), ALL_ONE)


def test_r1_zero_trace_hand():
    assert tasks.r1_zero_trace("  2 + 3 = 5\n", "5") == " 2 + 3 = 5 </think> <answer>5</answer>"


# ----------------------------------------------------------------------------- JSONL readers


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_read_jsonl_math_with_answer(tmp_path):
    path = _write(tmp_path, [{"problem": "What is 1+1?", "answer": "2", "solution": "1+1=2"}])
    (row,) = tasks.read_jsonl(path, "qa")
    assert row["question"] == "What is 1+1?" and row["answer"] == "2"


def test_read_jsonl_math_with_boxed_solution(tmp_path):
    path = _write(
        tmp_path,
        [
            {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
            {"problem": "Two tries", "solution": "Not \\boxed{3}, but \\boxed{4}."},
            {"problem": "Set", "solution": "$\\boxed{\\{1, 2\\}}$"},
        ],
    )
    rows = tasks.read_jsonl(path, "qa")
    assert [r["answer"] for r in rows] == ["\\frac{1}{2}", "4", "\\{1, 2\\}"]
    assert rows[0]["question"] == "Half of 1?"


def test_read_jsonl_gsm8k(tmp_path):
    path = _write(
        tmp_path,
        [
            {"question": "How many?", "answer": "Some reasoning.\n#### 1,234"},
            {"question": "Negative?", "answer": "Down by 5.\n#### -5"},
        ],
    )
    rows = tasks.read_jsonl(path, "qa")
    assert [r["answer"] for r in rows] == ["1234", "-5"]
    assert rows[0]["question"] == "How many?"


def test_read_jsonl_sft_and_dpo(tmp_path):
    sft = _write(tmp_path, [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2", "extra": 1}], "sft.jsonl")
    rows = tasks.read_jsonl(sft, "sft")
    assert [(r["prompt"], r["response"]) for r in rows] == [("p1", "r1"), ("p2", "r2")]
    dpo = _write(tmp_path, [{"prompt": "p", "chosen": "good", "rejected": "bad"}], "dpo.jsonl")
    (row,) = tasks.read_jsonl(dpo, "dpo")
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("p", "good", "bad")


GOOD_SFT = {"prompt": "p", "response": "r"}


@pytest.mark.parametrize(
    "kind, bad_line, must_mention",
    [
        ("sft", '{"prompt": "p", "response": ', []),  # bad JSON
        ("sft", '["prompt", "response"]', []),  # not an object
        ("sft", '"just a string"', []),
        ("sft", {"prompt": "p"}, ["response"]),  # missing key
        ("dpo", {"prompt": "p", "chosen": "c"}, ["rejected"]),
        ("qa", {"problem": "no answer here"}, ["answer"]),
        ("qa", {"question": "gsm8k style, no answer"}, ["answer"]),
        ("qa", {"text": "neither style"}, ["question"]),
    ],
    ids=["bad-json", "list", "string", "sft-missing", "dpo-missing", "math-missing", "gsm8k-missing", "qa-neither"],
)
def test_read_jsonl_malformed_line(tmp_path, kind, bad_line, must_mention):
    good = {
        "sft": GOOD_SFT,
        "dpo": {"prompt": "p", "chosen": "c", "rejected": "r"},
        "qa": {"question": "q", "answer": "1"},
    }[kind]
    path = _write(tmp_path, [good, good, bad_line, good])
    with pytest.raises(tasks.DataError) as info:
        tasks.read_jsonl(path, kind)
    message = str(info.value)
    assert str(path) in message
    assert ":3:" in message
    for word in must_mention:
        assert word in message, message
    assert isinstance(info.value, ValueError)


# ----------------------------------------------------------------------------- prompts


def test_r1_zero_prompt():
    question = "What is 17 + 25?"
    prompt = tasks.r1_zero_prompt(question)
    assert question in prompt
    assert prompt.endswith("Assistant: <think>")
    assert prompt.startswith("A conversation between User and Assistant.")
    assert f"\nUser: {question}\nAssistant: <think>" in prompt
    assert "<think> reasoning process here </think> <answer> answer here </answer>." in prompt


# ----------------------------------------------------------------------------- training loop helpers


def test_take_is_a_pure_function_of_the_cursor():
    examples = list(range(10))
    whole = harness.take(examples, 0, 25, seed=3)
    assert harness.take(examples, 0, 7, seed=3) + harness.take(examples, 7, 18, seed=3) == whole  # resume anywhere
    for epoch in range(2):  # each epoch is a permutation of all examples
        assert sorted(whole[epoch * 10 : (epoch + 1) * 10]) == examples
    assert whole[:10] != whole[10:20]  # reshuffled per epoch
    assert harness.take(examples, 0, 10, seed=4) != whole[:10]


def test_shared_prefix_length_leaves_one_token_per_row():
    assert harness.shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert harness.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical rows keep their last token
    assert harness.shared_prefix_length([[7, 1], [8, 1]]) == 0


def test_lr_factor_warmup_then_cosine_to_ten_percent():
    assert [harness.lr_factor(s, 4, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert harness.lr_factor(4, 4, 14) == 1.0
    assert harness.lr_factor(9, 4, 14) == pytest.approx(0.55)  # half way: 0.1 + 0.9 * 0.5
    assert harness.lr_factor(14, 4, 14) == pytest.approx(0.1)
    assert harness.lr_factor(100, 4, 14) == pytest.approx(0.1)


def test_r1_zero_refuses_the_question_copied_as_the_answer():
    """A GRPO run learned to write the question's expression between the answer tags, which
    math-verify evaluates (results/learning/before_grader_fix/default_run_seed3_hack): a number was asked for."""
    import rewards

    from math_verify import parse, verify

    # each copied form is worth its truth to math-verify (asserted below), so only the rule
    # refuses it; the forms from "(9)-(7)" on got past the first, regex-only, fix
    copied_forms = {"9 - 7": "2", "94 + 30": "124", "6*7": "42", "2^3": "8", "3 + (4)": "7",
                    "(9)-(7)": "2", "9 \u2212 7": "2", "9 \\times 7": "63", "9 \\cdot 7": "63", "{9}-{7}": "2",
                    "9 \\div 3": "3", "$9-7$": "2", "\\boxed{9 - 7}": "2"}
    for copied, truth in copied_forms.items():
        assert verify(parse(f"${truth}$"), parse(f"${copied}$")), copied
        assert rewards.r1_zero_reward_fn(f"x</think> <answer>{copied}</answer>", truth)["reward"] == 0.0, copied
        assert not rewards.answers_match(copied, truth)
    for right, truth in (("2", "2"), ("-5", "-5"), ("1,000", "1000"), ("\\frac{1}{2}", "0.5"), ("1/2", "0.5"),
                         ("124.0", "124"), ("(-5)", "-5"), ("$2$", "2"), ("\\boxed{2}", "2"), ("x = 2", "2"),
                         ("-\\frac{1}{2}", "-0.5"), ("$\\dfrac{3}{4}$", "0.75")):
        assert rewards.r1_zero_reward_fn(f"x</think> <answer>{right}</answer>", truth)["reward"] == 1.0, right
