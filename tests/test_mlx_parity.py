"""Parity of common_mlx.py with common.py: the same inputs through both, results within
1e-5 (fp32), gradients included.

Losses are differentiated with respect to their log-prob input: torch through the train
step's own backward (policy_log_probs.grad), MLX through mx.grad of the same function.
Model-level functions run one tiny random Llama (real SmolLM2 tokenizer) loaded by both
transformers and mlx-lm, and compare the gradient of a scalar of the log-probs with
respect to the (tied) embedding matrix.
"""

import json
import random

import numpy as np
import pytest
import torch

import common
import common_mlx  # before mlx.core: it loads the fast BLAS first
import mlx.core as mx
import mlx.nn as nn
import tasks
from conftest import tiny_llama

LOSS_TYPES = ("no_baseline", "reinforce_with_baseline", "grpo_clip", "dr_grpo", "dapo", "bnpo", "gspo")

# ----------------------------------------------------------------------------- helpers


def _close(torch_out, mlx_out, atol=1e-5, rtol=0.0):
    expected = torch_out.detach().float().numpy() if isinstance(torch_out, torch.Tensor) else np.asarray(torch_out)
    got = np.array(mlx_out)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol, equal_nan=True)


def _same(torch_out, mlx_out):
    """Integer / bool outputs: exactly equal."""
    expected = torch_out.numpy() if isinstance(torch_out, torch.Tensor) else np.asarray(torch_out)
    got = np.array(mlx_out)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert (got == expected).all(), (got, expected)


def _close_metadata(torch_meta, mlx_meta):
    assert sorted(torch_meta) == sorted(mlx_meta)
    for key, value in torch_meta.items():
        if isinstance(value, torch.Tensor) and value.dtype in (torch.bool, torch.long):
            _same(value, mlx_meta[key])
        else:
            _close(value, mlx_meta[key])


def _inputs(B=4, T=6, seed=0):
    """Random GRPO/SFT inputs as numpy float32: log-probs (B, T) near old/ref log-probs,
    a mask with >= 1 entry per row, rewards and advantages (B, 1)."""
    rng = np.random.default_rng(seed)
    log_probs = -rng.exponential(size=(B, T)).astype(np.float32)
    mask = rng.random((B, T)) > 0.3
    mask[:, 0] = True
    return {
        "policy_log_probs": log_probs,
        "old_log_probs": (log_probs + 0.3 * rng.standard_normal((B, T))).astype(np.float32),
        "ref_log_probs": (log_probs + 0.3 * rng.standard_normal((B, T))).astype(np.float32),
        "response_mask": mask,
        "raw_rewards": rng.integers(0, 2, size=(B, 1)).astype(np.float32),
        "advantages": rng.standard_normal((B, 1)).astype(np.float32),
    }


def _both(arrays):
    """{name: numpy} -> ({name: torch tensor}, {name: mx.array})."""
    return {k: torch.tensor(v) for k, v in arrays.items()}, {k: mx.array(v) for k, v in arrays.items()}


def _torch_grad(fn, log_probs):
    """The loss of fn(policy_log_probs) and d(sum of it)/d log_probs; fn may call backward itself."""
    log_probs = log_probs.clone().requires_grad_(True)
    out = fn(log_probs)
    loss = out[0] if isinstance(out, tuple) else out
    if log_probs.grad is None:
        loss.sum().backward()
    return out, log_probs.grad


def _mlx_grad(fn, log_probs):
    def scalar(lp):
        out = fn(lp)
        return (out[0] if isinstance(out, tuple) else out).sum()

    return fn(log_probs), mx.grad(scalar)(log_probs)


# ----------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def mlx_tokenizer(smollm2_tokenizer):
    """The same tokenizer as mlx_lm.load returns it: a TokenizerWrapper around the HF one."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(smollm2_tokenizer)


@pytest.mark.parametrize("wrapped", [False, True], ids=["hf", "mlx_lm_wrapper"])
def test_tokenize_prompt_and_output(smollm2_tokenizer, mlx_tokenizer, wrapped):
    prompts = [tasks.r1_zero_prompt("What is 2 + 3?"), "Hello", "x"]
    outputs = [" 5 </think> <answer>5</answer>", " world, how are you?", ""]
    expected = common.tokenize_prompt_and_output(prompts, outputs, smollm2_tokenizer)
    got = common_mlx.tokenize_prompt_and_output(prompts, outputs, mlx_tokenizer if wrapped else smollm2_tokenizer)
    assert sorted(got) == sorted(expected)
    for key in expected:
        _same(expected[key], got[key])


def test_join_prompt_and_output_ids():
    prompt_ids, output_ids = [[5, 6, 7], [8], [9, 10]], [[11, 12], [13, 14, 15, 16], []]
    expected = common.join_prompt_and_output_ids(prompt_ids, output_ids, pad_id=0)
    got = common_mlx.join_prompt_and_output_ids(prompt_ids, output_ids, pad_id=0)
    for key in ("input_ids", "labels", "response_mask"):
        _same(expected[key], got[key])


# ----------------------------------------------------------------------------- log-probs


def test_compute_entropy():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, 3, 50)) * 5).astype(np.float32)
    logits[0, 0] += 1e4  # huge logits: the max shift keeps them exact
    logits[1, 2, ::3] = -np.inf  # masked vocabulary entries contribute 0, not NaN
    _close(common.compute_entropy(torch.tensor(logits)), common_mlx.compute_entropy(mx.array(logits)))


@pytest.fixture(scope="module")
def models(tiny_model_dir, smollm2_tokenizer, tmp_path_factory):
    """{"lm", "ref"}: (torch, mlx) pairs of the tiny Llama and of a second one (seed 1, the
    DPO reference), each loaded from one HF directory; "mlx_tokenizer": what mlx_lm.load gives."""
    import mlx_lm
    from transformers import AutoModelForCausalLM

    ref_dir = str(tmp_path_factory.mktemp("tiny-ref"))
    tiny_llama(vocab_size=len(smollm2_tokenizer), seed=1).save_pretrained(ref_dir)
    smollm2_tokenizer.save_pretrained(ref_dir)
    out = {}
    for name, path in (("lm", tiny_model_dir), ("ref", ref_dir)):
        mlx_model, out["mlx_tokenizer"] = mlx_lm.load(path)
        out[name] = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), mlx_model)
    return out


def _token_batch(B=3, T=12, K=5, vocab=49152, seed=0):
    """(B, T+1) random ids whose rows share their first K tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(B, T + 1))
    ids[:, :K] = ids[0, :K]
    return ids


def _torch_embedding_grad(torch_model, fn):
    torch_model.zero_grad()
    fn().backward()
    return torch_model.model.embed_tokens.weight.grad


def _mlx_embedding_grad(mlx_model, fn):
    _, grads = nn.value_and_grad(mlx_model, fn)()
    return grads["model"]["embed_tokens"]["weight"]


def _close_grad(torch_grad, mlx_grad):
    """Summed gradients of a 50k x 32 matrix: within 1e-5 of their largest entry (fp32
    round-off of two differently ordered sums of many terms, not of one value)."""
    scale = torch_grad.abs().max().item()
    assert scale > 0
    _close(torch_grad, mlx_grad, atol=1e-5 * scale)


@pytest.mark.parametrize("shared_prefix,score_from", [(0, 0), (5, 0), (0, 4), (5, 3), (5, 7)])
def test_get_response_log_probs(models, shared_prefix, score_from):
    torch_model, mlx_model = models["lm"]
    ids = _token_batch(K=5)
    x, y = ids[:, :-1], ids[:, 1:]
    weights = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)  # a generic scalar of log-probs
    expected = common.get_response_log_probs(torch_model, torch.tensor(x), torch.tensor(y), return_token_entropy=True,
                                             score_from=score_from)
    got = common_mlx.get_response_log_probs(
        mlx_model, mx.array(x), mx.array(y), return_token_entropy=True, shared_prefix=shared_prefix,
        score_from=score_from
    )
    # log-probs ~ -log V ~ -11: two frameworks' forward passes round differently, so 1e-5 abs
    # plus 1e-6 relative (~10 fp32 ulps; the largest difference seen is 6.7e-6)
    _close(expected["log_probs"], got["log_probs"], rtol=1e-6)
    _close(expected["token_entropy"], got["token_entropy"], rtol=1e-6)

    def torch_scalar():
        return (common.get_response_log_probs(torch_model, torch.tensor(x), torch.tensor(y),
                                              score_from=score_from)["log_probs"] * torch.tensor(weights)).sum()

    def mlx_scalar():
        lp = common_mlx.get_response_log_probs(mlx_model, mx.array(x), mx.array(y), shared_prefix=shared_prefix,
                                               score_from=score_from)
        return (lp["log_probs"] * mx.array(weights)).sum()

    _close_grad(_torch_embedding_grad(torch_model, torch_scalar), _mlx_embedding_grad(mlx_model, mlx_scalar))


# ----------------------------------------------------------------------------- normalization


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
@pytest.mark.parametrize("float_mask", [False, True], ids=["bool", "float"])
def test_masked_normalize_and_mean(dim, float_mask):
    data = _inputs(B=3, T=5)
    mask = data["response_mask"].astype(np.float32) if float_mask else data["response_mask"]
    mask[2] = False  # a fully masked row: masked_mean gives NaN along dim=-1, both sides
    t, m = _both({"x": data["policy_log_probs"], "mask": mask})
    for constant in (1.0, 3.0):
        _close(common.masked_normalize(t["x"], t["mask"], dim, constant),
               common_mlx.masked_normalize(m["x"], m["mask"], dim, constant))
    _close(common.masked_mean(t["x"], t["mask"], dim), common_mlx.masked_mean(m["x"], m["mask"], dim))


# ----------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("grad_accum, constant", [(1, 1.0), (4, 7.0)])
def test_sft_microbatch_train_step(grad_accum, constant):
    t, m = _both(_inputs())
    (loss, meta), grad = _torch_grad(
        lambda lp: common.sft_microbatch_train_step(lp, t["response_mask"], grad_accum, constant),
        t["policy_log_probs"])
    (mlx_loss, mlx_meta), mlx_grad = _mlx_grad(
        lambda lp: common_mlx.sft_microbatch_train_step(lp, m["response_mask"], grad_accum, constant),
        m["policy_log_probs"])
    _close(loss, mlx_loss)
    _close_metadata(meta, mlx_meta)
    _close(grad, mlx_grad)


# ----------------------------------------------------------------------------- GRPO


def _reward_fn(response, ground_truth):
    right = float(response == ground_truth)
    return {"reward": right, "format_reward": float(response != ""), "answer_reward": right}


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # torch warns on the 1-sample std of group_size 1
@pytest.mark.parametrize("normalize_by_std", [True, False])
@pytest.mark.parametrize("group_size", [1, 4])
def test_compute_group_normalized_rewards(normalize_by_std, group_size):
    # groups of 4: mixed, all right (zero std), all wrong (zero std)
    responses = ["1", "2", "1", "", "1", "1", "1", "1", "3", "3", "", "3"]
    truths = ["1"] * len(responses)
    args = (_reward_fn, responses, truths, group_size, 1e-6, normalize_by_std)
    advantages, raw, meta = common.compute_group_normalized_rewards(*args)
    mlx_advantages, mlx_raw, mlx_meta = common_mlx.compute_group_normalized_rewards(*args)
    _close(advantages, mlx_advantages)  # NaN in both for group_size 1 with the std (0/0 std)
    _close(raw, mlx_raw)
    assert sorted(meta) == sorted(mlx_meta)
    for key in meta:
        assert meta[key] == pytest.approx(mlx_meta[key], abs=1e-6, nan_ok=True), key


@pytest.mark.parametrize("normalize_by_std", [True, False])
def test_group_normalize(normalize_by_std):
    rewards = np.random.default_rng(0).standard_normal(12).astype(np.float32)
    rewards[4:8] = 0.5  # a zero-std group
    _close(common.group_normalize(torch.tensor(rewards), 4, 1e-6, normalize_by_std),
           common_mlx.group_normalize(mx.array(rewards), 4, 1e-6, normalize_by_std))


@pytest.mark.parametrize("cliprange_high", [None, 0.28])
@pytest.mark.parametrize("name", ["naive", "grpo_clip", "gspo", "kl_k3"])
def test_per_token_losses(name, cliprange_high):
    t, m = _both(_inputs())
    calls = {
        "naive": lambda c, d, lp: c.compute_naive_policy_gradient_loss(d["advantages"], lp),
        "grpo_clip": lambda c, d, lp: c.compute_grpo_clip_loss(
            d["advantages"], lp, d["old_log_probs"], 0.2, cliprange_high),
        "gspo": lambda c, d, lp: c.compute_gspo_loss(
            d["advantages"], lp, d["old_log_probs"], d["response_mask"], 0.05, cliprange_high),
        "kl_k3": lambda c, d, lp: c.kl_k3(lp, d["ref_log_probs"]),
    }
    out, grad = _torch_grad(lambda lp: calls[name](common, t, lp), t["policy_log_probs"])
    mlx_out, mlx_grad = _mlx_grad(lambda lp: calls[name](common_mlx, m, lp), m["policy_log_probs"])
    if isinstance(out, tuple):
        (out, meta), (mlx_out, mlx_meta) = out, mlx_out
        _close_metadata(meta, mlx_meta)
        assert meta["clipped"].any() and not meta["clipped"].all()  # the inputs exercise both branches
    _close(out, mlx_out)
    _close(grad, mlx_grad)


def test_loss_type_lists():
    assert common_mlx.RATIO_LOSSES == common.RATIO_LOSSES
    assert common_mlx.TOKEN_SUM_LOSSES == common.TOKEN_SUM_LOSSES
    assert set(LOSS_TYPES) == {"no_baseline", "reinforce_with_baseline", *common.RATIO_LOSSES}
    with pytest.raises(ValueError, match="unknown loss_type"):
        common_mlx.compute_policy_gradient_loss(mx.zeros((2, 3)), "ppo", advantages=mx.zeros((2, 1)))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_compute_policy_gradient_loss(loss_type):
    t, m = _both(_inputs())

    def call(c, d, lp):
        return c.compute_policy_gradient_loss(lp, loss_type, d["raw_rewards"], d["advantages"], d["old_log_probs"],
                                              0.2, 0.28, d["response_mask"])

    (out, meta), grad = _torch_grad(lambda lp: call(common, t, lp), t["policy_log_probs"])
    (mlx_out, mlx_meta), mlx_grad = _mlx_grad(lambda lp: call(common_mlx, m, lp), m["policy_log_probs"])
    _close(out, mlx_out)
    _close_metadata(meta, mlx_meta)
    _close(grad, mlx_grad)


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_microbatch_train_step(loss_type, beta):
    t, m = _both(_inputs())

    def call(c, d, lp):
        return c.grpo_microbatch_train_step(
            lp, d["response_mask"], 4, loss_type, raw_rewards=d["raw_rewards"], advantages=d["advantages"],
            old_log_probs=d["old_log_probs"], cliprange=0.2, cliprange_high=0.28, ref_log_probs=d["ref_log_probs"],
            beta=beta, loss_normalizer=96.0,
        )

    (loss, meta), grad = _torch_grad(lambda lp: call(common, t, lp), t["policy_log_probs"])
    (mlx_loss, mlx_meta), mlx_grad = _mlx_grad(lambda lp: call(common_mlx, m, lp), m["policy_log_probs"])
    _close(loss, mlx_loss)
    _close_metadata(meta, mlx_meta)
    assert ("kl" in mlx_meta) == (beta > 0)
    _close(grad, mlx_grad)


def test_grpo_microbatch_train_step_under_value_and_grad():
    """The MLX way to train: the step inside mx.value_and_grad, metadata as auxiliary outputs."""
    t, m = _both(_inputs())

    def call(c, d, lp):
        return c.grpo_microbatch_train_step(lp, d["response_mask"], 1, "dapo", advantages=d["advantages"],
                                            old_log_probs=d["old_log_probs"], cliprange=0.2,
                                            ref_log_probs=d["ref_log_probs"], beta=0.1, loss_normalizer=96.0)

    (loss, meta), grad = _torch_grad(lambda lp: call(common, t, lp), t["policy_log_probs"])
    (mlx_loss, mlx_meta), mlx_grad = mx.value_and_grad(lambda lp: call(common_mlx, m, lp))(m["policy_log_probs"])
    _close(loss, mlx_loss)
    _close_metadata(meta, mlx_meta)
    _close(grad, mlx_grad)


# ----------------------------------------------------------------------------- SFT data


@pytest.fixture(scope="module")
def sft_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    rows = [{"prompt": f"Add {i} and {i + 1}.", "response": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("shuffle", [False, True])
def test_get_packed_sft_dataset(smollm2_tokenizer, mlx_tokenizer, sft_jsonl, shuffle):
    random.seed(0)  # both shuffle their documents with Python's random
    dataset = common.get_packed_sft_dataset(smollm2_tokenizer, sft_jsonl, 16, shuffle)
    random.seed(0)
    mlx_dataset = common_mlx.get_packed_sft_dataset(mlx_tokenizer, sft_jsonl, 16, shuffle)
    assert len(mlx_dataset) == len(dataset) > 2
    for i in range(len(dataset)):
        for key in ("input_ids", "labels"):
            _same(dataset[i][key], mlx_dataset[i][key])
    with pytest.raises(IndexError):
        mlx_dataset[len(dataset)]


def test_iterate_batches(smollm2_tokenizer, mlx_tokenizer, sft_jsonl):
    dataset = common.get_packed_sft_dataset(smollm2_tokenizer, sft_jsonl, 8, shuffle=False)
    mlx_dataset = common_mlx.get_packed_sft_dataset(mlx_tokenizer, sft_jsonl, 8, shuffle=False)
    batches = list(common.iterate_batches(dataset, 3, shuffle=False))
    mlx_batches = list(common_mlx.iterate_batches(mlx_dataset, 3, shuffle=False))
    assert len(mlx_batches) == len(batches) > 1
    assert len(dataset) % 3 != 0 and mlx_batches[-1]["input_ids"].shape == (len(dataset) % 3, 8)  # short last batch
    for batch, mlx_batch in zip(batches, mlx_batches):
        assert sorted(batch) == sorted(mlx_batch)
        for key in batch:
            _same(batch[key], mlx_batch[key])
    # shuffled: the same rows in another order (torch's order comes from its own RNG)
    random.seed(0)
    shuffled = list(common_mlx.iterate_batches(mlx_dataset, 3, shuffle=True))
    rows = lambda bs: [tuple(r) for b in bs for r in np.array(b["input_ids"]).tolist()]  # noqa: E731
    assert sorted(rows(shuffled)) == sorted(rows(mlx_batches)) and rows(shuffled) != rows(mlx_batches)


# ----------------------------------------------------------------------------- DPO


def test_sequence_log_prob(models):
    torch_model, mlx_model = models["lm"]
    ids = _token_batch(B=2, T=9)
    mask = np.random.default_rng(2).random((2, 9)) > 0.4
    expected = common.sequence_log_prob(torch_model, torch.tensor(ids), torch.tensor(mask))
    got = common_mlx.sequence_log_prob(mlx_model, mx.array(ids), mx.array(mask))
    _close(expected, got, atol=1e-4)  # a sum of ~5 log-probs of magnitude ~11 each (log 49152)
    _close_grad(
        _torch_embedding_grad(torch_model, lambda: common.sequence_log_prob(
            torch_model, torch.tensor(ids), torch.tensor(mask)).sum()),
        _mlx_embedding_grad(mlx_model, lambda: common_mlx.sequence_log_prob(
            mlx_model, mx.array(ids), mx.array(mask)).sum()),
    )


def test_dpo_loss():
    rng = np.random.default_rng(0)
    arrays = {k: (rng.standard_normal(5) * 20).astype(np.float32) for k in ("pc", "pr", "rc", "rr")}
    arrays["pc"][0] = 1e4  # saturated margins: stable log-sigmoid on both sides
    arrays["pr"][1] = 1e4
    t, m = _both(arrays)
    (loss, margin), grad = _torch_grad(lambda pc: common.dpo_loss(pc, t["pr"], t["rc"], t["rr"], 0.1), t["pc"])
    (mlx_loss, mlx_margin), mlx_grad = _mlx_grad(
        lambda pc: common_mlx.dpo_loss(pc, m["pr"], m["rc"], m["rr"], 0.1), m["pc"])
    _close(loss, mlx_loss, atol=1e-5, rtol=1e-6)  # the saturated pair's loss is ~1e3
    _close(margin, mlx_margin, atol=1e-5, rtol=1e-6)
    _close(grad, mlx_grad)


def test_compute_per_instance_dpo_loss(models, smollm2_tokenizer):
    (torch_lm, mlx_lm), (torch_ref, mlx_ref) = models["lm"], models["ref"]
    torch_tok, mlx_tok = smollm2_tokenizer, models["mlx_tokenizer"]
    args = (0.1, "Add 2 and 3.", "2 + 3 = 5", "It is 6, I think.")
    expected = common.compute_per_instance_dpo_loss(torch_lm, torch_ref, torch_tok, *args)
    got = common_mlx.compute_per_instance_dpo_loss(mlx_lm, mlx_ref, mlx_tok, *args)
    assert abs(expected.item() - np.log(2)) > 1e-4  # two different (near-uniform) models: not log 2
    # the loss moves ~beta x the fp32 round-off of four ~650-nat sequence sums (~1e-4 each)
    _close(expected, got)
    _close_grad(
        _torch_embedding_grad(torch_lm, lambda: common.compute_per_instance_dpo_loss(
            torch_lm, torch_ref, torch_tok, *args)),
        _mlx_embedding_grad(mlx_lm, lambda: common_mlx.compute_per_instance_dpo_loss(
            mlx_lm, mlx_ref, mlx_tok, *args)),
    )
