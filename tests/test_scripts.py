"""End to end: every script runs on a tiny random model through main(parse_args([...])),
writes metrics and a loadable checkpoint; GRPO (torch and MLX) learns a synthetic reward
with every loss type; SFT drives the loss down; a resumed run equals an uninterrupted one."""

import json
import os

import pytest
import torch

import baseline
import dpo
import expert_iteration
import grpo
import grpo_mlx
import sft

HERE = os.path.dirname(os.path.abspath(__file__))
SEVENS = os.path.join(HERE, "synthetic_reward.py") + ":sevens"


def rows(path):
    return [json.loads(line) for line in open(path)]


def common_flags(model_dir, out_dir):
    return ["--model", model_dir, "--out-dir", str(out_dir), "--n-eval", "4", "--max-new-tokens", "8",
            "--n-train", "64", "--device", "cpu", "--dtype", "float32"]


def assert_loadable(path):
    from transformers import AutoModelForCausalLM

    assert os.path.exists(os.path.join(path, "model.safetensors"))
    AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("script, extra", [
    (sft, ["--task", "chain_sum", "--n-steps", "2", "--batch-size", "4"]),
    (grpo, ["--n-steps", "2", "--rollout-batch-size", "8", "--group-size", "4", "--grad-accum", "2",
            "--warmstart-steps", "0", "--beta", "0.1", "--epochs-per-rollout", "2"]),
    (expert_iteration, ["--n-ei-steps", "2", "--questions-per-step", "4", "--group-size", "2", "--reward",
                        SEVENS.replace(":sevens", ":always")]),
    (dpo, ["--n-steps", "2", "--batch-size", "4", "--group-size", "2", "--reward", SEVENS.replace(":sevens", ":coin")]),
])
def test_script_runs_two_steps_and_writes_checkpoints(char_model_dir, tmp_path, script, extra):
    out = tmp_path / script.__name__
    script.main(script.parse_args(common_flags(char_model_dir, out) + extra + ["--save-every", "1", "--plot"]))
    metrics = rows(out / "metrics.jsonl")
    assert (out / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # --plot drew the run
    assert max(r["step"] for r in metrics) == 2
    assert any("eval_accuracy" in r for r in metrics)
    assert_loadable(out / "final")
    assert_loadable(out / "checkpoints" / "step_000001")
    assert os.path.exists(out / "checkpoints" / "step_000001" / "train_state.pt")


def test_baseline_writes_generations_and_summary(char_model_dir, tmp_path):
    flags = [f for f in common_flags(char_model_dir, tmp_path) if f not in ("--n-train", "64")]
    summary = baseline.main(baseline.parse_args(flags))
    generations = rows(tmp_path / "generations.jsonl")
    assert len(generations) == summary["n"] == 4
    assert {"question", "answer", "response", "reward", "format_reward", "answer_reward"} <= set(generations[0])
    assert summary["format_and_answer"] + summary["format_only"] + summary["no_format"] == 4


LOSS_TYPES = ["no_baseline", "reinforce_with_baseline", "grpo_clip", "dr_grpo", "dapo", "bnpo", "gspo"]


@pytest.mark.slow
@pytest.mark.parametrize("script, loss_type", [(grpo, loss) for loss in LOSS_TYPES] + [(grpo_mlx, "grpo_clip")],
                         ids=[loss for loss in LOSS_TYPES] + ["grpo_clip-mlx"])
def test_grpo_learns_a_synthetic_reward(char_model_dir, tmp_path, script, loss_type):
    args = script.parse_args(common_flags(char_model_dir, tmp_path) + [
        "--reward", SEVENS, "--loss-type", loss_type, "--n-steps", "40", "--rollout-batch-size", "32",
        "--group-size", "8", "--grad-accum", "1", "--lr", "3e-3", "--warmstart-steps", "0", "--eval-every", "0",
        "--save-every", "0", "--min-new-tokens", "8", "--epochs-per-rollout", "2",
        "--oversample", "1"])  # a dense reward: nearly every group is mixed, oversampling would only cost time
    script.main(args)
    rewards = [r["reward"] for r in rows(tmp_path / "metrics.jsonl") if "reward" in r]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, (loss_type, rewards)


@pytest.mark.slow
def test_sft_drives_the_loss_down_on_a_fixed_batch(char_model_dir, tmp_path):
    args = sft.parse_args(common_flags(char_model_dir, tmp_path) + [
        "--task", "chain_sum", "--n-train", "4", "--batch-size", "4", "--grad-accum", "1", "--n-steps", "40",
        "--lr", "1e-2", "--warmup-steps", "0"])
    sft.main(args)
    losses = [r["loss"] for r in rows(tmp_path / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.slow
def test_grpo_resume_equals_an_uninterrupted_run(char_model_dir, tmp_path):
    """4 straight steps vs. the same run restarted from its step-2 checkpoint: identical weights."""
    import shutil

    from safetensors.torch import load_file

    flags = ["--rollout-batch-size", "8", "--group-size", "4", "--grad-accum", "2", "--warmstart-steps", "0",
             "--reward", SEVENS, "--lr", "1e-3", "--save-every", "2", "--eval-every", "0", "--n-steps", "4",
             "--warmup-steps", "1", "--temperature", "1.0",
             "--oversample", "16"]  # a step's first round is sized from the last step's mixed share: below 16x here
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    grpo.main(grpo.parse_args(common_flags(char_model_dir, straight) + flags))
    shutil.copytree(straight / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    grpo.main(grpo.parse_args(common_flags(char_model_dir, resumed) + flags + ["--resume"]))
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in rows(resumed / "metrics.jsonl") if "reward" in r]
    assert steps == [3, 4]


@pytest.mark.parametrize("script", ["grpo", "grpo_mlx"])
def test_microbatches_cut_to_their_rollouts_take_the_step_of_one_full_width_batch(char_model_dir, tmp_path, script):
    """The update sorts the rollouts by length into microbatches and cuts each one after its
    last response token (harness.length_sorted, harness.response_end): no work on padding.
    On fixed rollouts of 1-4 digits after prompts of different lengths, two steps in 4 such
    microbatches end at the weights of two steps in one microbatch of the batch's full width."""
    import numpy as np
    from distributed_worker import run
    from safetensors.numpy import load_file

    flags = ["--rollout-batch-size", "16", "--group-size", "4", "--warmstart-steps", "0", "--reward", SEVENS,
             "--lr", "1e-3", "--eval-every", "0", "--n-steps", "2", "--save-every", "0", "--no-dynamic-sampling"]
    for accum in (1, 4):
        run(script, common_flags(char_model_dir, tmp_path / str(accum)) + flags + ["--grad-accum", str(accum)])
    lengths = {r["response_len_max"] - r["response_len"] for r in rows(tmp_path / "4" / "metrics.jsonl") if "reward" in r}
    assert lengths != {0}  # the rollouts differ in length: there is padding to cut
    one, four = (load_file(tmp_path / str(a) / "final" / "model.safetensors") for a in (1, 4))
    assert one.keys() == four.keys()
    for k in one:
        np.testing.assert_allclose(four[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
