"""The MLX twins end to end: sft_mlx.py and grpo_mlx.py run on a tiny model, write the same
metrics and HF checkpoints as the torch scripts, continue torch checkpoints (and torch
evaluates theirs), resume exactly, and follow the torch
trajectory step by step from the same weights and data."""

import os
import shutil

import numpy as np
import pytest
from test_scripts import SEVENS, assert_loadable, common_flags, rows

import common_mlx  # noqa: F401  (first: the fast BLAS before mlx.core)
import baseline
import grpo
import grpo_mlx
import sft
import sft_mlx

GRPO_FLAGS = ["--rollout-batch-size", "8", "--group-size", "4", "--grad-accum", "2", "--warmstart-steps", "0"]


@pytest.mark.parametrize("script, extra", [
    (sft_mlx, ["--task", "chain_sum", "--n-steps", "2", "--batch-size", "4"]),
    (sft_mlx, ["--task", "chain_sum", "--n-steps", "2", "--batch-size", "4", "--packed", "--seq-length", "64"]),
    (grpo_mlx, GRPO_FLAGS + ["--n-steps", "2", "--beta", "0.1", "--epochs-per-rollout", "2"]),
    (grpo_mlx, GRPO_FLAGS + ["--n-steps", "2", "--lora-rank", "4", "--scale-rewards", "batch", "--mask-truncated"]),
])
def test_mlx_script_runs_two_steps_and_writes_checkpoints(char_model_dir, tmp_path, script, extra):
    out = tmp_path / script.__name__
    script.main(script.parse_args(common_flags(char_model_dir, out) + extra + ["--save-every", "1"]))
    metrics = rows(out / "metrics.jsonl")
    assert max(r["step"] for r in metrics) == 2
    assert any("eval_accuracy" in r for r in metrics)
    assert_loadable(out / "final")  # by transformers: the MLX checkpoint is a plain HF directory
    assert_loadable(out / "checkpoints" / "step_000001")
    assert os.path.exists(out / "checkpoints" / "step_000001" / "train_state.pkl")


def test_metric_names_match_the_torch_twins(char_model_dir, tmp_path):
    def names(script, extra):
        out = tmp_path / script.__name__
        script.main(script.parse_args(common_flags(char_model_dir, out) + extra))
        return set().union(*(r.keys() for r in rows(out / "metrics.jsonl")))

    flags = GRPO_FLAGS + ["--n-steps", "1", "--beta", "0.1", "--dynamic-sampling", "--eval-samples", "2"]
    assert names(grpo, flags) == names(grpo_mlx, flags)
    flags = ["--task", "chain_sum", "--n-steps", "1", "--batch-size", "4"]
    assert names(sft, flags) == names(sft_mlx, flags)


def test_checkpoints_cross_frameworks(char_model_dir, tmp_path):
    """sft_mlx.py's model is evaluated by baseline.py (torch); a torch sft.py checkpoint is
    trained further by grpo_mlx.py; the weights survive each hop exactly."""
    from safetensors.numpy import load_file

    flags = ["--task", "chain_sum", "--n-steps", "2", "--batch-size", "4"]
    sft_mlx.main(sft_mlx.parse_args(common_flags(char_model_dir, tmp_path / "mlx_sft") + flags))
    mlx_final = str(tmp_path / "mlx_sft" / "final")
    summary = baseline.main(baseline.parse_args(["--model", mlx_final, "--out-dir", str(tmp_path / "eval"),
                                                 "--n-eval", "4", "--max-new-tokens", "8", "--device", "cpu"]))
    assert summary["n"] == 4

    sft.main(sft.parse_args(common_flags(char_model_dir, tmp_path / "torch_sft") + flags))
    torch_final = str(tmp_path / "torch_sft" / "final")
    model, _ = common_mlx.load_model(torch_final, common_mlx.pick_device("cpu"), common_mlx.mx.float32)
    reference = load_file(os.path.join(torch_final, "model.safetensors"))
    from mlx.utils import tree_flatten

    loaded = dict(tree_flatten(model.parameters()))
    assert loaded.keys() == reference.keys()
    for k, v in reference.items():
        assert np.array_equal(np.array(loaded[k]), v), k
    grpo_mlx.main(grpo_mlx.parse_args(common_flags(torch_final, tmp_path / "mlx_grpo") + GRPO_FLAGS
                                      + ["--n-steps", "1"]))
    assert_loadable(tmp_path / "mlx_grpo" / "final")


def test_grpo_mlx_resume_equals_an_uninterrupted_run(char_model_dir, tmp_path):
    from safetensors.numpy import load_file

    flags = GRPO_FLAGS + ["--reward", SEVENS, "--lr", "1e-3", "--save-every", "2", "--eval-every", "0",
                          "--n-steps", "4", "--warmup-steps", "1",
                          "--oversample", "16"]  # the first round's size comes from the last step: below 16x here
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    grpo_mlx.main(grpo_mlx.parse_args(common_flags(char_model_dir, straight) + flags))
    shutil.copytree(straight / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    grpo_mlx.main(grpo_mlx.parse_args(common_flags(char_model_dir, resumed) + flags + ["--resume"]))
    a, b = (load_file(d / "final" / "model.safetensors") for d in (straight, resumed))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert [r["step"] for r in rows(resumed / "metrics.jsonl") if "reward" in r] == [3, 4]


# ----------------------------------------------------------------------------- trajectory parity


def losses(path):
    return np.array([r["loss"] for r in rows(path / "metrics.jsonl") if "loss" in r])


def assert_same_trajectory(torch_losses, mlx_losses, n):
    assert len(torch_losses) == len(mlx_losses) == n
    np.testing.assert_allclose(mlx_losses[0], torch_losses[0], rtol=1e-4)
    np.testing.assert_allclose(mlx_losses, torch_losses, rtol=0.02, atol=1e-6)


def test_sft_trajectory_matches_torch(char_model_dir, tmp_path):
    """20 SFT steps from the same weights on the same data: the same losses in both frameworks."""
    flags = ["--task", "chain_sum", "--n-steps", "20", "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3",
             "--warmup-steps", "3", "--n-eval", "2"]
    sft.main(sft.parse_args(common_flags(char_model_dir, tmp_path / "torch") + flags))
    sft_mlx.main(sft_mlx.parse_args(common_flags(char_model_dir, tmp_path / "mlx") + flags))
    torch_losses, mlx_losses = losses(tmp_path / "torch"), losses(tmp_path / "mlx")
    assert torch_losses[-1] < 0.8 * torch_losses[0]  # it trained: the comparison is not of constants
    assert_same_trajectory(torch_losses, mlx_losses, 20)


def fixed_rollouts(tokenizer, prompts, max_new_tokens):
    """Rollouts with the sampling randomness removed: response i is a fixed pseudo-random
    string (seeded by i), the same in both frameworks."""
    rng = np.random.default_rng(0)
    out = []
    for prompt in prompts:
        text = "".join(rng.choice(list("0123456789 +7</answer>"), size=int(rng.integers(3, max_new_tokens + 1))))
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        ids = tokenizer.encode(text, add_special_tokens=False)[:max_new_tokens]
        out.append({"prompt_ids": prompt_ids, "response_ids": ids, "response": tokenizer.decode(ids),
                    "log_probs": [0.0] * len(ids), "truncated": len(ids) == max_new_tokens, "entropy": 0.0})
    return out


# every loss type (test_scripts' learning test runs grpo_mlx.py with one: these show the others
# update as in torch)
@pytest.mark.parametrize("loss_type, extra", [("grpo_clip", ["--epochs-per-rollout", "2"]),
                                              ("dapo", ["--beta", "0.1"]), ("gspo", ["--epochs-per-rollout", "2"]),
                                              ("no_baseline", []), ("reinforce_with_baseline", []),
                                              ("dr_grpo", ["--epochs-per-rollout", "2"]), ("bnpo", ["--beta", "0.1"])])
def test_grpo_trajectory_matches_torch_on_fixed_rollouts(char_model_dir, tmp_path, monkeypatch, loss_type, extra):
    import common

    for module in (common, common_mlx):
        monkeypatch.setattr(module, "generate", lambda model, tokenizer, prompts, sampling, *a, **k:
                            fixed_rollouts(tokenizer, prompts, sampling.max_new_tokens))
    flags = GRPO_FLAGS + ["--reward", SEVENS, "--loss-type", loss_type, "--n-steps", "5", "--lr", "3e-3",
                          "--eval-every", "0", "--save-every", "0", "--n-eval", "2"] + extra
    grpo.main(grpo.parse_args(common_flags(char_model_dir, tmp_path / "torch") + flags))
    grpo_mlx.main(grpo_mlx.parse_args(common_flags(char_model_dir, tmp_path / "mlx") + flags))
    torch_rows = [r for r in rows(tmp_path / "torch" / "metrics.jsonl") if "loss" in r]
    mlx_rows = [r for r in rows(tmp_path / "mlx" / "metrics.jsonl") if "loss" in r]
    assert len({r["loss"] for r in torch_rows}) > 1  # the updates change the loss: not a constant comparison
    assert_same_trajectory(np.array([r["loss"] for r in torch_rows]), np.array([r["loss"] for r in mlx_rows]), 5)
    # (clip_frac is a mean over microbatches, whose rows the second epoch shuffles differently
    # in each framework; the sums above do not depend on that order)
    for key in ("grad_norm", "reward", "kl"):
        np.testing.assert_allclose([r[key] for r in mlx_rows], [r[key] for r in torch_rows], rtol=0.02, atol=1e-6)


def test_example_command_parses():
    args = grpo_mlx.parse_args(["--group-size", "4"])
    assert args.group_size == 4 and args.rollout_batch_size % 4 == 0
