"""The twins cannot drift: grpo.py / grpo_mlx.py and sft.py / sft_mlx.py parse every flag
the same, common.py and common_mlx.py define the same functions with the same arguments,
and the objective written out in grpo.py equals the CS336 functions of common.py (a second,
independent implementation) for every loss type, value and gradient."""

import inspect
import types

import numpy as np
import pytest
import torch

import common
import common_mlx
import grpo
import grpo_mlx
import harness
import sft
import sft_mlx

ARGVS = [
    [],
    ["--group-size", "4", "--loss-type", "dapo", "--cliprange-high", "0.28", "--lr", "3e-6"],
    ["--no-mask-truncated", "--mask-truncated", "--beta", "0.04", "--scale-rewards", "batch", "--batch-size", "32"],
    ["--task", "basic_arithmetic", "--temperature", "0.7", "--top-k", "20", "--eval-samples", "4", "--wandb", "--seed", "3"],
]
SFT_ARGVS = [[], ["--packed", "--seq-length", "128", "--lora-rank", "8"], ["--task", "chain_sum", "--n-steps", "25"]]


TORCH_ONLY_FLAGS = {"checkpoint_activations",  # mlx_lm's KV cache is written in place: no replay of a layer yet
                    "fsdp",  # MLX has no sharded training across processes (mx.distributed averages gradients)
                    "malloc_mmap_mb"}  # measured with torch's allocations; MLX keeps freed buffers in its own cache


@pytest.mark.parametrize("argv", ARGVS)
def test_grpo_twins_parse_the_same(argv):
    torch_args, mlx_args = vars(grpo.parse_args(argv)), vars(grpo_mlx.parse_args(argv))
    for flag in TORCH_ONLY_FLAGS:
        torch_args.pop(flag)
    assert torch_args.pop("out_dir") == "runs/grpo" and mlx_args.pop("out_dir") == "runs/grpo_mlx"
    assert torch_args == mlx_args


@pytest.mark.parametrize("argv", SFT_ARGVS)
def test_sft_twins_parse_the_same(argv):
    torch_args, mlx_args = vars(sft.parse_args(argv)), vars(sft_mlx.parse_args(argv))
    for flag in TORCH_ONLY_FLAGS:
        torch_args.pop(flag, None)
    assert torch_args.pop("out_dir") == "runs/sft" and mlx_args.pop("out_dir") == "runs/sft_mlx"
    assert torch_args == mlx_args


def test_flags_come_from_the_defaults_block():
    # every default at the top of the script is a flag, with its value
    args = grpo.parse_args([])
    for name, value in grpo.DEFAULTS.items():
        expected = grpo.rollout_batch_size if name == "batch_size" and value == 0 else value
        assert getattr(args, name) == expected, name
    assert grpo.parse_args(["--n-steps", "7"]).n_steps == 7
    assert grpo.parse_args(["--mask-truncated"]).mask_truncated is True


def test_bad_flag_values_stop_with_one_line(capsys):
    with pytest.raises(SystemExit):
        grpo.parse_args(["--rollout-batch-size", "60", "--group-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--rollout-batch-size (60)" in err and "--group-size (8)" in err and "56" in err
    with pytest.raises(SystemExit):
        grpo.parse_args(["--loss-type", "ppo"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grpo.parse_args(["--n-eval", "0"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--n-eval 0: must be at least 1")


TORCH_ONLY = {"completion_log_probs"}  # the MLX scripts tokenize outside nn.value_and_grad
DIFFERENT_SIGNATURES = {"optimizer_step",  # MLX has no .grad: it takes the gradients (see common_mlx.py)
                        "save_pretrained"}  # torch's also takes weights gathered from --fsdp's shards


def public_functions(module):
    return {name: inspect.signature(f) for name, f in vars(module).items()
            if inspect.isfunction(f) and f.__module__ == module.__name__ and not name.startswith("_")}


def test_common_twins_define_the_same_functions_in_the_same_order():
    torch_fns, mlx_fns = public_functions(common), public_functions(common_mlx)
    assert [n for n in torch_fns if n not in TORCH_ONLY] == list(mlx_fns)
    for name, signature in mlx_fns.items():
        if name not in DIFFERENT_SIGNATURES:
            assert list(signature.parameters) == list(torch_fns[name].parameters), name


# ----------------------------------------------------------------------------- the objective in grpo.py


def loss_inputs(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    log_probs = -torch.rand(B, T, generator=g) * 3
    old = log_probs + 0.3 * torch.randn(B, T, generator=g)  # ratios on both sides of the clip range
    ref = log_probs + 0.2 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    raw = torch.tensor([[1.0], [0.0], [1.0], [0.5]])
    adv = torch.tensor([[0.9], [-1.2], [0.3], [-0.4]])
    return log_probs, old, ref, mask, raw, adv


@pytest.mark.parametrize("loss_type", harness.CHOICES["loss_type"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_grpo_objective_equals_the_cs336_functions(loss_type, beta):
    log_probs, old, ref, mask, raw, adv = loss_inputs()
    args = types.SimpleNamespace(loss_type=loss_type, cliprange=0.2, cliprange_high=0.28, beta=beta, grad_accum=2,
                                 batch_size=8, max_new_tokens=6)
    step_tokens = mask.sum() + 9  # the optimizer step's other microbatch has 9 response tokens
    normalizer = {"dapo": step_tokens, "bnpo": mask.sum() * args.grad_accum, "dr_grpo": 8 * 6}.get(loss_type)

    ours = log_probs.clone().requires_grad_()
    loss, stats = grpo.policy_loss(ours, mask, adv, raw, old, ref, step_tokens, args)
    loss.backward()
    theirs = log_probs.clone().requires_grad_()
    expected, meta = common.grpo_microbatch_train_step(
        policy_log_probs=theirs, response_mask=mask, gradient_accumulation_steps=2, loss_type=loss_type,
        raw_rewards=raw, advantages=adv, old_log_probs=old, cliprange=0.2, cliprange_high=0.28, ref_log_probs=ref,
        beta=beta, loss_normalizer=normalizer)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    if "clipped" in meta:
        torch.testing.assert_close(stats["clip_frac"].float(), common.masked_mean(meta["clipped"].float(), mask))
    if beta:
        torch.testing.assert_close(stats["kl"], meta["kl"])


@pytest.mark.parametrize("loss_type", harness.CHOICES["loss_type"])
def test_grpo_objective_twins_agree(loss_type):
    import mlx.core as mx

    log_probs, old, ref, mask, raw, adv = loss_inputs(seed=1)
    args = types.SimpleNamespace(loss_type=loss_type, cliprange=0.2, cliprange_high=0.28, beta=0.05, grad_accum=2,
                                 batch_size=8, max_new_tokens=6)
    ours = log_probs.clone().requires_grad_()
    loss, _ = grpo.policy_loss(ours, mask, adv, raw, old, ref, mask.sum() + 9, args)
    loss.backward()
    to_mx = [mx.array(t.numpy()) for t in (old, ref, mask, raw, adv)]
    old_m, ref_m, mask_m, raw_m, adv_m = to_mx
    step_tokens = int(mask.sum()) + 9

    def f(lp):
        return grpo_mlx.policy_loss(lp, mask_m, adv_m, raw_m, old_m, ref_m, step_tokens, args)[0]

    value, grad = mx.value_and_grad(f)(mx.array(log_probs.numpy()))
    np.testing.assert_allclose(value.item(), loss.item(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.array(grad), ours.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_on_policy_ratio_is_one_with_the_reinforce_gradient():
    # old = log_probs.detach(): ratio 1, nothing clipped, and the gradient of -A log p / Z
    log_probs, _, _, mask, raw, adv = loss_inputs(seed=2)
    args = types.SimpleNamespace(loss_type="grpo_clip", cliprange=0.2, cliprange_high=0.2, beta=0.0, grad_accum=1,
                                 batch_size=4, max_new_tokens=6)
    x = log_probs.clone().requires_grad_()
    loss, stats = grpo.policy_loss(x, mask, adv, raw, x.detach(), None, mask.sum(), args)
    loss.backward()
    assert stats["clip_frac"].item() == 0
    expected = -adv * mask / (mask.sum(-1, keepdim=True) * 4)  # d loss / d log p, by hand
    torch.testing.assert_close(x.grad, expected.float())
