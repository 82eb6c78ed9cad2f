"""What the RL loop measures and how it picks its batch: pass@k, the sample statistics of
an evaluation, DAPO's dynamic sampling; and both GRPO twins running with them on."""

import itertools
import json

import pytest

import grpo
import grpo_mlx
import harness
import rewards
from test_scripts import SEVENS, common_flags, rows

SEVEN_FIRST = SEVENS.replace(":sevens", ":seven_first")


@pytest.mark.parametrize("n, c, k", [(4, 1, 2), (5, 2, 3), (8, 0, 4), (8, 8, 1), (6, 3, 6), (3, 1, 1)])
def test_pass_at_k_equals_a_count_over_every_draw(n, c, k):
    samples = [1] * c + [0] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in d) for d in draws) / len(draws)
    assert rewards.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_by_hand():
    assert rewards.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs hold the right one
    assert rewards.pass_at_k(10, 0, 5) == 0.0


def row(reward, fmt=1.0, entropy=0.5):
    return {"reward": reward, "format_reward": fmt, "entropy": entropy}


def test_sample_stats_by_hand():
    # 3 questions x k=2: (right, wrong), (wrong, wrong, no format), (right, right)
    rows = [row(1), row(0), row(0), row(0, fmt=0.0, entropy=1.5), row(1), row(1)]
    stats = harness.sample_stats(rows, 2)
    assert stats["mean_at_k"] == pytest.approx(3 / 6)
    assert stats["pass_at_k"] == pytest.approx(2 / 3)
    assert stats["mixed_frac"] == pytest.approx(1 / 3)
    assert stats["sample_format_rate"] == pytest.approx(5 / 6)
    assert stats["sample_entropy"] == pytest.approx((0.5 * 5 + 1.5) / 6)


class Sampler:
    """A fake rollout source: question i's group rewards are patterns[i] (a list of G)."""

    def __init__(self, patterns):
        self.patterns, self.next, self.calls = patterns, 0, []

    def __call__(self, n):
        self.calls.append(n)
        rollouts, scores = [], []
        for q in range(self.next, self.next + n):
            for j, r in enumerate(self.patterns[q % len(self.patterns)]):
                rollouts.append({"question": q, "j": j})
                scores.append({"reward": float(r), "answer_reward": float(r)})
        self.next += n
        return rollouts, scores


def groups_of(rollouts, scores, g):
    return [(rollouts[i]["question"], [s["reward"] for s in scores[i : i + g]]) for i in range(0, len(rollouts), g)]


def test_dynamic_sampling_keeps_only_mixed_groups_when_there_are_enough():
    # questions alternate all-right, mixed, all-wrong, mixed: 2 mixed in every 4
    sampler = Sampler([[1, 1], [1, 0], [0, 0], [0, 1]])
    rollouts, scores, stats = harness.dynamic_sample(sampler, n_groups=4, group_size=2, max_rounds=5)
    groups = groups_of(rollouts, scores, 2)
    assert len(groups) == 4 and all(len(set(r)) > 1 for _, r in groups)
    # 8 questions in rounds of 4, 2, 1, 1: 0 and 4 all right
    assert stats == {"groups_generated": 8, "groups_mixed": 4, "groups_solved": 2, "groups_mixed_kept": 4}
    assert sampler.calls == [4, 2, 1, 1]  # each round asks only for the groups still missing


def test_dynamic_sampling_oversamples_each_round():
    # 2 mixed in every 4 questions (1, 3, 5, 7, ...). A round asks for oversample x the groups
    # still missing, rounded up, and keeps the first mixed ones
    patterns = [[1, 1], [1, 0], [0, 0], [0, 1]]
    sampler = Sampler(patterns)
    rollouts, scores, stats = harness.dynamic_sample(sampler, n_groups=4, group_size=2, max_rounds=5, oversample=1.5)
    assert sampler.calls == [6, 2]  # 6 questions hold 3 mixed; 1 missing -> ceil(1.5) = 2 more
    assert [q for q, _ in groups_of(rollouts, scores, 2)] == [1, 3, 5, 7]
    assert stats == {"groups_generated": 8, "groups_mixed": 4, "groups_solved": 2, "groups_mixed_kept": 4}
    # mixed groups past n_groups are dropped, not carried over
    sampler = Sampler(patterns)
    rollouts, scores, stats = harness.dynamic_sample(sampler, n_groups=2, group_size=2, max_rounds=5, oversample=3.0)
    assert sampler.calls == [6] and [q for q, _ in groups_of(rollouts, scores, 2)] == [1, 3]
    assert stats == {"groups_generated": 6, "groups_mixed": 3, "groups_solved": 2, "groups_mixed_kept": 2}


def test_dynamic_sampling_sizes_the_first_round_from_the_last_step():
    dense = [[1, 0]]  # every group mixed
    for last, calls in [(None, [8]),  # no share known yet: oversample x 4
                        ({"groups_generated": 8, "groups_mixed": 8}, [4]),  # share 1: exactly the 4 missing
                        ({"groups_generated": 5, "groups_mixed": 4}, [5]),  # share 4/5: ceil(4 x 5/4) = 5
                        ({"groups_generated": 12, "groups_mixed": 4}, [8]),  # share 1/3: 12, capped at 2 x 4
                        ({"groups_generated": 6, "groups_mixed": 0}, [8])]:  # none mixed: the cap
        sampler = Sampler(dense)
        harness.dynamic_sample(sampler, n_groups=4, group_size=2, max_rounds=3, oversample=2.0, last=last)
        assert sampler.calls == calls, last
    # later rounds use this step's own share: 2 mixed in every 4 questions (1, 3, 5, ...)
    sampler = Sampler([[1, 1], [1, 0], [0, 0], [0, 1]])
    _, _, stats = harness.dynamic_sample(sampler, n_groups=4, group_size=2, max_rounds=3, oversample=4.0,
                                         last={"groups_generated": 4, "groups_mixed": 4})
    # share 1 -> 4 questions, 2 mixed; share 2/4 -> 2 missing x 2 = 4 more, 2 mixed
    assert sampler.calls == [4, 4]
    assert stats == {"groups_generated": 8, "groups_mixed": 4, "groups_solved": 2, "groups_mixed_kept": 4}


def test_dynamic_sampling_respects_its_cap_and_keeps_the_batch_full():
    sampler = Sampler([[1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])  # 1 mixed in 6
    rollouts, scores, stats = harness.dynamic_sample(sampler, n_groups=3, group_size=3, max_rounds=2)
    assert len(sampler.calls) == 2 and sum(sampler.calls) == stats["groups_generated"]
    groups = groups_of(rollouts, scores, 3)
    assert len(groups) == 3  # topped up with dropped groups
    assert stats["groups_mixed_kept"] == sum(len(set(r)) > 1 for _, r in groups)
    # every mixed group that was generated is in the batch
    generated_mixed = sum(len(set(p)) > 1 for q, p in enumerate(sampler.patterns * 2) if q < sampler.next)
    assert stats["groups_mixed_kept"] == generated_mixed >= 1
    assert groups[0][1] == [1, 0, 0]  # the mixed group first, then the top-up


def test_group_counts_by_hand():
    scores = [{"reward": r, "answer_reward": a} for r, a in
              [(1, 1), (1, 1), (0.5, 0), (1, 1), (0, 0), (0, 0), (0.2, 0), (0.2, 0)]]
    # groups of 2: all right; mixed; all wrong; same reward, all wrong (a partial-credit reward)
    assert harness.group_counts(scores, 2) == {"groups_generated": 4, "groups_mixed": 1, "groups_solved": 1}
    # groups of 4: mixed (1 and 0.5), not all right; mixed (0 and 0.2), all wrong
    assert harness.group_counts(scores, 4) == {"groups_generated": 2, "groups_mixed": 2, "groups_solved": 0}


def test_take_questions_mixes_in_the_harder_task_by_the_share_solved_last_step():
    easy, harder = [f"e{i}" for i in range(10)], [f"h{i}" for i in range(10)]
    cursor = {"question": 0, "harder": 0, "sampled": {}}
    first = harness.take_questions(easy, harder, cursor, 5, seed=1)  # no last step yet: none harder
    assert first == harness.take(easy, 0, 5, seed=1) and cursor["question"] == 5 and cursor["harder"] == 0
    cursor["sampled"] = {"groups_generated": 10, "groups_mixed": 4, "groups_solved": 4}  # 2 in 5 solved
    second = harness.take_questions(easy, harder, cursor, 5, seed=1)
    assert second == harness.take(easy, 5, 3, seed=1) + harness.take(harder, 0, 2, seed=1)
    assert (cursor["question"], cursor["harder"]) == (8, 2)
    # a pure function of the cursor: a resumed run (the checkpoint's cursor) draws the same questions
    resumed = {"question": 8, "harder": 2, "sampled": dict(cursor["sampled"])}
    assert harness.take_questions(easy, harder, resumed, 5, seed=1) == harness.take_questions(easy, harder, cursor, 5,
                                                                                                seed=1)
    # no harder task: the share is ignored
    cursor = {"question": 0, "harder": 0, "sampled": {"groups_generated": 2, "groups_mixed": 0, "groups_solved": 2}}
    assert harness.take_questions(easy, [], cursor, 4, seed=1) == harness.take(easy, 0, 4, seed=1)
    # everything solved: every question harder
    assert harness.take_questions(easy, harder, cursor, 3, seed=1) == harness.take(harder, 0, 3, seed=1)


class CharTokenizer:
    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def test_guide_failed_groups_puts_the_trace_in_place_of_the_last_failure():
    import tasks

    questions = [{"question": "1 + 2 =", "answer": "3", "reasoning": "1 + 2 = 3"},  # all fail: guided
                 {"question": "2 + 2 =", "answer": "4", "reasoning": "2 + 2 = 4"},  # one right: as sampled
                 {"question": "5 + 5 =", "answer": "10", "reasoning": None}]  # all fail, no trace: as sampled
    rollouts = [{"response": f"r{i}", "response_ids": [i], "prompt_ids": [9, g], "truncated": True}
                for g in range(3) for i in range(2)]
    scores = [{"reward": 0.0, "answer_reward": 0.0} for _ in range(6)]
    scores[2] = {"reward": 1.0, "answer_reward": 1.0}
    before_rollouts, before_scores = [dict(r) for r in rollouts], [dict(s) for s in scores]

    def reward_fn(response, answer):
        return {"reward": float(response.endswith(f"<answer>{answer}</answer>")), "answer_reward": 1.0}

    harness.guide_failed_groups(questions, rollouts, scores, 2, CharTokenizer(), reward_fn)
    trace = tasks.r1_zero_trace("1 + 2 = 3", "3")
    assert rollouts[1] == {"response": trace, "response_ids": [ord(c) for c in trace], "prompt_ids": [9, 0],
                           "truncated": False, "log_probs": [], "guided": True}
    assert scores[1] == {"reward": 1.0, "answer_reward": 1.0}  # graded by reward_fn
    assert rollouts[:1] + rollouts[2:] == before_rollouts[:1] + before_rollouts[2:]
    assert scores[:1] + scores[2:] == before_scores[:1] + before_scores[2:]


@pytest.mark.slow
@pytest.mark.parametrize("script", [grpo, grpo_mlx])
def test_grpo_guides_the_groups_that_all_fail(char_model_dir, tmp_path, script):
    # the character model never writes the r1_zero format: every group fails, and the strict
    # grader gives each group's trace its reward of 1
    args = script.parse_args(common_flags(char_model_dir, tmp_path) + [
        "--n-steps", "2", "--rollout-batch-size", "8", "--group-size", "4", "--grad-accum", "2",
        "--warmstart-steps", "0", "--guide-failed", "--max-new-tokens", "24", "--eval-every", "0", "--save-every", "0"])
    script.main(args)
    steps = [r for r in rows(tmp_path / "metrics.jsonl") if "groups_guided" in r]
    assert [r["groups_guided"] for r in steps] == [2, 2]
    assert all(r["reward"] == pytest.approx(1 / 4) and r["zero_std_frac"] == 0 for r in steps)


@pytest.mark.slow
@pytest.mark.parametrize("script", [grpo, grpo_mlx])
def test_grpo_mixes_in_the_harder_task_once_groups_are_solved(char_model_dir, tmp_path, script):
    always = SEVENS.replace(":sevens", ":always")  # every answer right: every group solved
    args = script.parse_args(common_flags(char_model_dir, tmp_path) + [
        "--reward", always, "--n-steps", "3", "--rollout-batch-size", "8", "--group-size", "4", "--grad-accum", "2",
        "--warmstart-steps", "0", "--no-dynamic-sampling", "--harder-task", "chain_sum:max_digits=3",
        "--eval-every", "0", "--save-every", "0"])
    script.main(args)
    steps = [r for r in rows(tmp_path / "metrics.jsonl") if "groups_solved" in r]
    assert [r["groups_solved"] for r in steps] == [2, 2, 2]
    assert [r["harder_questions"] for r in steps] == [0, 2, 2]  # none known solved before step 1


@pytest.mark.slow
@pytest.mark.parametrize("script", [grpo, grpo_mlx])
def test_grpo_runs_with_dynamic_sampling_and_eval_samples(char_model_dir, tmp_path, script):
    args = script.parse_args(common_flags(char_model_dir, tmp_path) + [
        "--reward", SEVENS.replace(":sevens", ":coin") + ":1.0," + SEVENS + ":0.5", "--n-steps", "2", "--rollout-batch-size", "8", "--group-size",
        "4", "--grad-accum", "2", "--warmstart-steps", "0", "--dynamic-sampling", "--max-sampling-rounds", "2",
        "--eval-samples", "3", "--eval-every", "1", "--save-every", "0"])
    script.main(args)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if "groups_generated" in r]
    # 2 groups a step, oversampled 2x: a first round of 4, a second of at most 2 x 2
    assert len(steps) == 2 and all(4 <= r["groups_generated"] <= 8 for r in steps)
    for r in steps:  # each part of the weighted reward is logged, and they add up
        assert r["reward"] == pytest.approx(r["reward/coin"] + 0.5 * r["reward/sevens"])
    evals = [r for r in rows if "eval_pass_at_k" in r]
    assert len(evals) == 3  # steps 0, 1, 2
    assert all(r["eval_mean_at_k"] <= r["eval_pass_at_k"] for r in evals)


# ----------------------------------------------------------------------------- temperature-consistent log-probs


def _rollout_vs_forward(common, load, to_numpy, model_dir, temperature):
    import tasks

    model, tokenizer = load(model_dir)
    prompts = [tasks.r1_zero_prompt(q) for q in ("1 + 2 =", "30 + 4 =", "7 + 70 =")] * 2
    rollouts = common.generate(model, tokenizer, prompts, harness.Sampling(max_new_tokens=8, temperature=temperature,
                                                                           stop=()))
    batch = common.join_prompt_and_output_ids([r["prompt_ids"] for r in rollouts], [r["response_ids"] for r in rollouts],
                                              tokenizer.pad_token_id)
    prefix = harness.shared_prefix_length(batch["input_ids"].tolist())
    ours = {}
    for t in (temperature, 1.0):
        out = common.get_response_log_probs(model, batch["input_ids"], batch["labels"], shared_prefix=prefix, temperature=t)
        lp, mask = to_numpy(out["log_probs"]), to_numpy(batch["response_mask"]).astype(bool)
        ours[t] = [row[m] for row, m in zip(lp, mask)]
    sampled = [r["log_probs"] for r in rollouts]
    return ours, sampled


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_training_log_probs_at_the_sampling_temperature_give_ratio_one(char_model_dir, framework):
    """Rollouts at T = 0.7: log-probs taken in the loss at the same T equal the sampler's to
    1e-4, so the importance ratio of an on-policy token is 1; at T = 1 they are not."""
    import numpy as np

    if framework == "torch":
        import torch

        import common

        def load(path):
            return common.load_model(path, torch.device("cpu"), torch.float32)

        def to_numpy(x):
            return x.detach().numpy()
    else:
        import mlx.core as mx

        import common_mlx as common

        def load(path):
            return common.load_model(path, common.pick_device("cpu"), mx.float32)

        def to_numpy(x):
            return np.array(x)
    ours, sampled = _rollout_vs_forward(common, load, to_numpy, char_model_dir, temperature=0.7)
    ratio = np.concatenate([np.exp(o - np.array(s)) for o, s in zip(ours[0.7], sampled)])
    assert len(ratio) > 20 and np.abs(ratio - 1).max() < 1e-4
    untempered = np.concatenate([np.exp(o - np.array(s)) for o, s in zip(ours[1.0], sampled)])
    assert np.abs(untempered - 1).max() > 0.01


# ----------------------------------------------------------------------------- composed rewards


def test_weighted_reward_by_hand():
    fn = rewards.get_reward_fn("r1_zero:1.0,closeness:0.5")
    out = fn("5 + 2 = 5 </think> <answer>5</answer>", "7")  # format right, answer off by 2
    assert out["reward/r1_zero"] == 0.0 and out["reward/closeness"] == pytest.approx(1 / 3)
    assert out["reward"] == pytest.approx(0.5 / 3)
    assert (out["format_reward"], out["answer_reward"]) == (1.0, 0.0)  # the first part's: held-out stays strict
    out = fn("</think> <answer>7</answer>", "7")
    assert out["reward"] == pytest.approx(1.5) and out["answer_reward"] == 1.0


def test_weighted_reward_with_a_user_function():
    fn = rewards.get_reward_fn(SEVENS + ":0.25,r1_zero")
    out = fn("7777", "1")
    assert out["reward/sevens"] == 1.0 and out["reward"] == pytest.approx(0.25)
    out = rewards.get_reward_fn("r1_zero")("</think> <answer>7</answer>", "7")
    assert out == rewards.r1_zero_reward_fn("</think> <answer>7</answer>", "7")  # a single part: the function itself


@pytest.mark.parametrize("response", ["", "</think> <answer>1e400</answer>", "</think> <answer>-9" + "9" * 5000 + "</answer>",
                                      "</think> <answer>nan</answer>", "\ud800</think> <answer>3</answer>"])
@pytest.mark.parametrize("fn", [rewards.closeness_reward_fn, rewards.digits_reward_fn], ids=["closeness", "digits"])
def test_partial_credit_never_raises(response, fn):
    out = fn(response, "3")
    assert 0.0 <= out["reward"] <= 1.0


@pytest.mark.parametrize("answer, truth, expected", [
    ("124", "124", 1.0), ("134", "124", 2 / 3), ("-1", "-41", 1 / 3), ("41", "-41", 2 / 3),
    ("1240", "124", 0.0), ("24", "124", 2 / 3), ("7", "8", 0.0), ("12.0", "12", 0.0)])
def test_digits_reward_by_hand(answer, truth, expected):
    # written out and aligned at the units digit: 134/124 agree in '1' and '4'; ' -1'/'-41' in '1';
    # '1240'/' 124' nowhere; ' 24'/'124' in '2' and '4'; a decimal is not an integer answer
    out = rewards.digits_reward_fn(f"x </think> <answer>{answer}</answer>", truth)
    assert out["reward"] == pytest.approx(expected)
    assert (out["format_reward"], out["answer_reward"]) == (1.0, float(answer == truth))
    assert rewards.digits_reward_fn(f"x <answer>{answer}</answer>", truth)["reward"] == 0.0  # no format, no credit


def test_unknown_reward_is_one_clear_error():
    with pytest.raises(ValueError, match="weighted sum"):
        rewards.get_reward_fn("r1_zero:1.0,nonsense:0.2")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_dynamic_sampling_learns_a_sparse_reward_in_fewer_steps(char_model_dir, tmp_path, seed):
    # reward 1 iff the response starts with '7': ~1 in 100 for the random character model, so
    # most groups of 8 are all 0 and carry no gradient; dropping them and sampling more
    # questions (4 rounds at most) gives each step more of the rare mixed groups
    def steps_to_learn(dynamic):
        out = tmp_path / f"dynamic-{dynamic}"
        grpo.main(grpo.parse_args([
            "--model", char_model_dir, "--out-dir", str(out), "--n-eval", "4", "--max-new-tokens", "8",
            "--n-train", "256", "--device", "cpu", "--dtype", "float32", "--reward", SEVEN_FIRST, "--n-steps", "16",
            "--rollout-batch-size", "32", "--group-size", "8", "--grad-accum", "1", "--lr", "3e-3",
            "--warmstart-steps", "0", "--eval-every", "2", "--save-every", "0", "--seed", str(seed),
            "--max-sampling-rounds", "4", "--dynamic-sampling" if dynamic else "--no-dynamic-sampling"]))
        evals = [json.loads(line) for line in open(out / "metrics.jsonl")]
        return min([r["step"] for r in evals if r.get("eval_accuracy", 0) == 1.0], default=float("inf"))

    with_ds, without = steps_to_learn(True), steps_to_learn(False)
    assert with_ds < without, (with_ds, without)  # measured: 4 vs 8 (seed 0), 4 vs not in 16 steps (seed 1)
