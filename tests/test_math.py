"""Tests of the torch math in common.py, through tests/adapters.py where an adapter exists.

Expected values are hand-computed (the arithmetic is in the comments) or come from a
second, deliberately naive implementation written in the test (python loops over
torch.log_softmax), never from the formula under test.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import adapters
import common
import harness
import tasks
from conftest import TWINS, tiny_llama

# ----------------------------------------------------------------------------- helpers

# The 2x3 case used by the normalization tests.
T23 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M23 = torch.tensor([[True, False, True], [False, True, True]])


def _close(got, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=got.dtype)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.allclose(got, expected, atol=atol, rtol=0, equal_nan=True), (got, expected)


def _naive_log_probs_and_entropy(model, input_ids, labels):
    """log p(label | prefix) and entropy, one position at a time, in float64."""
    with torch.no_grad():
        logits = model(input_ids).logits.double()  # (B, T, V)
    B, T = labels.shape
    log_probs = torch.zeros(B, T, dtype=torch.float64)
    entropy = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            lp = torch.log_softmax(logits[b, t], dim=-1)
            log_probs[b, t] = lp[labels[b, t]]
            entropy[b, t] = -sum(math.exp(x) * x for x in lp.tolist())
    return log_probs, entropy


def _meta(metadata, *names):
    """The first of several plausible key names (the spec fixes the content, not the key)."""
    for name in names:
        if name in metadata:
            return metadata[name]
    raise AssertionError(f"none of {names} in metadata keys {sorted(metadata)}")


# ----------------------------------------------------------------------------- masked_normalize / masked_mean


@pytest.mark.parametrize("mask", [M23, M23.float()], ids=["bool", "float"])
def test_masked_normalize_hand(mask):
    # masked entries: [[1, ., 3], [., 5, 6]]
    _close(adapters.run_masked_normalize(T23, mask), 15.0)  # 1+3+5+6
    _close(adapters.run_masked_normalize(T23, mask, normalize_constant=2.0), 7.5)  # 15/2
    _close(adapters.run_masked_normalize(T23, mask, dim=0), [1.0, 5.0, 9.0])  # columns: 1, 5, 3+6
    _close(adapters.run_masked_normalize(T23, mask, dim=0, normalize_constant=4.0), [0.25, 1.25, 2.25])
    _close(adapters.run_masked_normalize(T23, mask, dim=-1), [4.0, 11.0])  # rows: 1+3, 5+6
    _close(adapters.run_masked_normalize(T23, mask, dim=1, normalize_constant=0.5), [8.0, 22.0])


@pytest.mark.parametrize("mask", [M23, M23.float()], ids=["bool", "float"])
def test_masked_mean_hand(mask):
    _close(adapters.run_masked_mean(T23, mask), 3.75)  # 15 / 4 entries
    _close(adapters.run_masked_mean(T23, mask, dim=0), [1.0, 5.0, 4.5])  # 1/1, 5/1, 9/2
    _close(adapters.run_masked_mean(T23, mask, dim=-1), [2.0, 5.5])  # 4/2, 11/2
    _close(adapters.run_masked_mean(T23, mask, dim=1), [2.0, 5.5])


def test_masked_mean_fully_masked_slice_is_nan():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    rows = adapters.run_masked_mean(T23, mask, dim=-1)
    assert rows[0].item() == pytest.approx(1.5)  # (1+2)/2
    assert torch.isnan(rows[1]), "a row with no mask entries must be 0/0 = NaN, not 0"
    cols = adapters.run_masked_mean(T23, mask, dim=0)
    _close(cols, [1.0, 2.0, float("nan")])  # 1/1, 2/1, 0/0
    assert torch.isnan(adapters.run_masked_mean(T23, torch.zeros_like(mask)))


def test_masked_normalize_ignores_masked_values():
    # whatever sits under a False mask entry must not change the result
    a = torch.tensor([[1.0, 100.0, 3.0], [-7.0, 5.0, 6.0]])
    _close(adapters.run_masked_normalize(a, M23, dim=-1), [4.0, 11.0])
    _close(adapters.run_masked_mean(a, M23, dim=-1), [2.0, 5.5])


# ----------------------------------------------------------------------------- entropy


def test_entropy_uniform_is_log_v():
    for V in (2, 5, 17):
        for c in (0.0, 7.0, -3.0):
            logits = torch.full((2, 3, V), c)
            _close(adapters.run_compute_entropy(logits), torch.full((2, 3), math.log(V)), atol=1e-5)


def test_entropy_hand_cases():
    # softmax([log 2, 0, 0]) = [1/2, 1/4, 1/4];  H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0], [100.0, 0.0, 0.0]])
    H = adapters.run_compute_entropy(logits)
    assert H.shape == (2,)
    assert H[0].item() == pytest.approx(1.5 * math.log(2.0), abs=1e-6)
    # one-hot-ish: p = [~1, e^-100, e^-100], H ~ 200 e^-100 ~ 0
    assert H[1].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_stable_with_huge_logits():
    logits = torch.tensor(
        [
            [1e4, 1e4, 1e4, 1e4],  # uniform over 4 at a scale where exp overflows: ln 4
            [1e4, 1e4, 0.0, -1e4],  # two equal winners: ln 2
            [1e4, 0.0, 0.0, -1e4],  # one winner: 0
            [-1e4, -1e4, -1e4, -1e4],  # uniform again: ln 4
        ]
    )
    H = adapters.run_compute_entropy(logits)
    assert torch.isfinite(H).all(), H
    # fp32 spacing near 1e4 is ~1e-3, so lse(z) - E[z] at this scale is good to a few 1e-4
    _close(H, [math.log(4.0), math.log(2.0), 0.0, math.log(4.0)], atol=2e-3)


def test_entropy_with_masked_minus_inf_logits():
    # a vocabulary entry masked to -inf has probability 0 and contributes 0 log 0 = 0
    inf = float("inf")
    logits = torch.tensor([[0.0, 0.0, -inf], [math.log(2.0), 0.0, -inf]])
    H = adapters.run_compute_entropy(logits)
    # [1/2, 1/2, 0]: ln 2;  [2/3, 1/3, 0]: -(2/3 ln 2/3 + 1/3 ln 1/3) = ln 3 - 2/3 ln 2
    assert torch.isfinite(H).all(), H
    _close(H, [math.log(2.0), math.log(3.0) - 2 / 3 * math.log(2.0)], atol=1e-6)


# ----------------------------------------------------------------------------- get_response_log_probs


def _random_ids(shape, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


def test_get_response_log_probs_matches_naive():
    model = tiny_llama(vocab_size=64, seed=0)
    input_ids, labels = _random_ids((2, 7), 64, 1), _random_ids((2, 7), 64, 2)
    expected_lp, expected_H = _naive_log_probs_and_entropy(model, input_ids, labels)

    out = adapters.run_get_response_log_probs(model, input_ids, labels, return_token_entropy=False)
    assert set(out) == {"log_probs"}, "token_entropy only when asked"
    assert out["log_probs"].shape == (2, 7)
    _close(out["log_probs"].double(), expected_lp, atol=1e-5)
    assert (out["log_probs"] <= 0).all()

    out = adapters.run_get_response_log_probs(model, input_ids, labels, return_token_entropy=True)
    assert set(out) == {"log_probs", "token_entropy"}
    assert out["token_entropy"].shape == (2, 7)
    _close(out["log_probs"].double(), expected_lp, atol=1e-5)
    _close(out["token_entropy"].double(), expected_H, atol=1e-5)


def test_get_response_log_probs_shared_prefix_matches_naive():
    # rows identical in their first 4 tokens: the shared-prefix path must give the same values
    # and the same parameter gradients as the plain forward pass
    model = tiny_llama(vocab_size=64, seed=0)
    input_ids, labels = _random_ids((3, 9), 64, 1), _random_ids((3, 9), 64, 2)
    input_ids[:, :4] = input_ids[0, :4]
    expected_lp, expected_H = _naive_log_probs_and_entropy(model, input_ids, labels)
    out = common.get_response_log_probs(model, input_ids, labels, True, shared_prefix=4)
    _close(out["log_probs"].double(), expected_lp, atol=1e-5)
    _close(out["token_entropy"].double(), expected_H, atol=1e-5)
    weights = torch.linspace(-1, 1, 27).view(3, 9)
    (out["log_probs"] * weights).sum().backward()
    shared = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = adapters.run_get_response_log_probs(model, input_ids, labels, False)["log_probs"]
    (plain * weights).sum().backward()
    for g_shared, p in zip(shared, model.parameters()):
        assert torch.allclose(g_shared, p.grad, atol=1e-5), "shared-prefix gradients differ"


def test_shared_prefix_forward_leaves_no_tensor_for_the_garbage_collector():
    # the shared prefix's KV (~70 MB a 16-row microbatch of the default run) must be freed with
    # the autograd graph; a reference cycle through the cache kept it until Python's next gc
    # pass, and a GRPO run's peak memory grew with every microbatch until then
    import gc

    model = tiny_llama(vocab_size=64, seed=0)
    input_ids, labels = _random_ids((3, 9), 64, 1), _random_ids((3, 9), 64, 2)
    input_ids[:, :4] = input_ids[0, :4]
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage, to look at
    try:
        out = common.get_response_log_probs(model, input_ids, labels, True, shared_prefix=4)
        out["log_probs"].sum().backward()
        del out
        gc.collect()
        garbage = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert garbage == []


def test_prefix_replayed_in_the_backward_is_freed_after_it(monkeypatch):
    # the prefix's KV leaves, whose gradients the backward pass collects for the prefix's replay,
    # must die with the graph: a cycle through autograd's C++ nodes (register_multi_grad_hook's)
    # is invisible to Python's collector, and a run's memory grew by every microbatch's prefix
    import gc
    import weakref

    leaves, make_cache = [], common._prefix_replayed_in_backward

    def recorded(*args):
        cache = make_cache(*args)
        leaves.extend(weakref.ref(t) for layer in cache.layers for t in (layer.keys, layer.values))
        return cache

    monkeypatch.setattr(common, "_prefix_replayed_in_backward", recorded)
    model = tiny_llama(vocab_size=64, seed=0)
    input_ids, labels = _random_ids((3, 9), 64, 1), _random_ids((3, 9), 64, 2)
    input_ids[:, :4] = input_ids[0, :4]
    out = common.get_response_log_probs(model, input_ids, labels, True, shared_prefix=4, score_from=6)
    out["log_probs"].sum().backward()
    del out
    gc.collect()
    assert len(leaves) == 2 * 2 and all(leaf() is None for leaf in leaves)


def test_prefix_replayed_in_the_backward_with_part_of_the_model_frozen():
    # the embedding (and so the tied head), the first layer's norm and its key and value projections
    # frozen: that layer's prefix KV has no graph to replay into; the trainable weights get
    # autograd's gradients through the model's own logits, the frozen ones none
    model = tiny_llama(vocab_size=64, seed=0)
    first = model.model.layers[0]
    for frozen in (model.model.embed_tokens, first.input_layernorm, first.self_attn.k_proj, first.self_attn.v_proj):
        frozen.requires_grad_(False)
    input_ids, labels = _random_ids((3, 9), 64, 1), _random_ids((3, 9), 64, 2)
    input_ids[:, :4] = input_ids[0, :4]
    weights = torch.linspace(-1, 1, 27).view(3, 9)
    weights[:, :6] = 0
    log_softmax = torch.log_softmax(model(input_ids).logits, -1)
    (log_softmax.gather(-1, labels[..., None])[..., 0] * weights).sum().backward()
    expected = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    out = common.get_response_log_probs(model, input_ids, labels, shared_prefix=4, score_from=6)
    (out["log_probs"] * weights).sum().backward()
    for g, p in zip(expected, model.parameters()):
        assert (g is None) == (p.grad is None) == (not p.requires_grad)
        assert g is None or torch.allclose(p.grad, g, atol=1e-5), "gradients differ from autograd's through the logits"


def test_log_probs_in_chunks_equal_the_whole_batch_at_once():
    # 21 positions in chunks of 4 (the last one short): log_softmax's values, entropy and gradient
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50)).requires_grad_()
    labels = torch.randint(0, 50, (3, 7))
    out = common._log_probs_from_logits(logits, labels, True, chunk=4)
    log_softmax = torch.log_softmax(logits.double(), -1)
    _close(out["log_probs"].double(), log_softmax.gather(-1, labels[..., None])[..., 0], atol=1e-5)
    _close(out["token_entropy"].double(), -(log_softmax.exp() * log_softmax).sum(-1), atol=1e-5)
    weights = torch.linspace(-1, 1, 21).view(3, 7)
    (out["log_probs"] * weights).sum().backward()
    expected = torch.autograd.grad((log_softmax.gather(-1, labels[..., None])[..., 0] * weights).sum(), logits)[0]
    _close(logits.grad.double(), expected.double(), atol=1e-6)


@pytest.mark.parametrize("score_from", [2, 6])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_activation_checkpointing_keeps_the_shared_prefix_values_and_gradients(compute_dtype, score_from):
    # --checkpoint-activations: each layer runs again in the backward pass (counted), reading
    # the prefix KV it read the first time: the same log-probs and gradients as without it
    # (a pre-hook counts: the replay stops early, after the last tensor the backward needs).
    # score_from 6 > the prefix's 4 tokens: the prefix pass itself is replayed in the backward
    def run(checkpointed):
        model = tiny_llama(vocab_size=64, seed=0).train()
        model.compute_dtype = compute_dtype
        if compute_dtype != torch.float32:
            model.get_decoder().forward = torch.autocast("cpu", dtype=compute_dtype)(model.get_decoder().forward)
        if checkpointed:
            common._checkpoint_layers(model)
        calls = []
        for layer in model.model.layers:
            layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        input_ids, labels = _random_ids((3, 9), 64, 1), _random_ids((3, 9), 64, 2)
        input_ids[:, :4] = input_ids[0, :4]
        out = common.get_response_log_probs(model, input_ids, labels, True, shared_prefix=4, score_from=score_from)
        (out["log_probs"] * torch.linspace(-1, 1, 27).view(3, 9)).sum().backward()
        return out["log_probs"].detach(), [p.grad for p in model.parameters()], len(calls)

    plain_lp, plain_grads, plain_calls = run(False)
    lp, grads, calls = run(True)
    prefix_passes = 1 if score_from < 4 else 2  # + the prefix replayed in the backward pass
    assert plain_calls == 2 * (prefix_passes + 1)  # 2 layers: the prefix pass(es) and the tail pass
    assert calls == 2 * (prefix_passes + 2)  # + the tail pass replayed in the backward pass
    tol = 1e-5 if compute_dtype == torch.float32 else 1e-2
    _close(lp, plain_lp, atol=tol)
    for g, g_plain in zip(grads, plain_grads):
        assert torch.allclose(g, g_plain, atol=tol, rtol=tol), "checkpointed gradients differ"


def _attention(name):
    """An attn_implementation name; "nanoalign" (common._grouped_attention) is load_model's
    choice for bf16 on a CPU and is registered with transformers first."""
    return common._register_grouped_attention() if name == "nanoalign" else name


@pytest.mark.parametrize("attention", ["sdpa", "nanoalign"])
@pytest.mark.parametrize("shared_prefix,score_from", [(0, 3), (4, 2), (4, 6), (0, 0)])
def test_get_response_log_probs_score_from(shared_prefix, score_from, attention):
    # positions >= score_from: the full forward pass's values and gradients; before it: 0
    model = tiny_llama(vocab_size=64, seed=0)
    model.set_attn_implementation(_attention(attention))
    input_ids, labels = _random_ids((3, 9), 64, 1), _random_ids((3, 9), 64, 2)
    input_ids[:, :4] = input_ids[0, :4]
    expected_lp, expected_H = _naive_log_probs_and_entropy(model, input_ids, labels)
    expected_lp[:, :score_from], expected_H[:, :score_from] = 0, 0
    out = common.get_response_log_probs(model, input_ids, labels, True, shared_prefix=shared_prefix,
                                        score_from=score_from)
    assert out["log_probs"].shape == out["token_entropy"].shape == (3, 9)
    _close(out["log_probs"].double(), expected_lp, atol=1e-5)
    _close(out["token_entropy"].double(), expected_H, atol=1e-5)
    weights = torch.linspace(-1, 1, 27).view(3, 9)
    (out["log_probs"] * weights).sum().backward()
    scored = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = adapters.run_get_response_log_probs(model, input_ids, labels, False)["log_probs"]
    (full[:, score_from:] * weights[:, score_from:]).sum().backward()
    for g, p in zip(scored, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5), "score_from changes the gradient of the scored positions"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_lm_head_in_chunks_has_the_numerical_gradient(monkeypatch, temperature):
    # _HeadLogProbs writes its backward out (the logits recomputed a chunk at a time):
    # torch's finite differences in float64 check it, over 5 positions in chunks of 2, with a bias
    monkeypatch.setattr(common._HeadLogProbs, "chunk", 2)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, 3, 3, 1])

    def log_probs(h, w, b):
        return common._HeadLogProbs.apply(h, w, b, labels, temperature, True)[0]

    assert torch.autograd.gradcheck(log_probs, (hidden, weight, bias))
    # values: log_softmax((h Wᵀ + b) / T) at the labels, and the entropy of that distribution
    lp, entropy = common._HeadLogProbs.apply(hidden, weight, bias, labels, temperature, True)
    log_softmax = torch.log_softmax((hidden @ weight.T + bias) / temperature, -1)
    _close(lp.detach(), log_softmax.gather(-1, labels[:, None])[:, 0].detach(), atol=1e-12)
    _close(entropy.double(), -(log_softmax.exp() * log_softmax).sum(-1).detach(), atol=1e-6)  # fp32, as compute_entropy


@pytest.mark.parametrize("head", ["in chunks", "the model's logits"])
@pytest.mark.parametrize("shared_prefix,score_from,temperature", [(0, 0, 1.0), (4, 0, 1.0), (4, 0, 0.7), (4, 5, 1.0),
                                                                  (4, 6, 0.7)])
def test_get_response_log_probs_gradient_is_autograds_through_the_logits(monkeypatch, head, shared_prefix, score_from,
                                                                          temperature):
    # the parameter gradients of sum(w * log p), against autograd through the model's own
    # logits and log_softmax (the LM head is tied to the embedding: both of its uses count).
    # score_from past the prefix: the prefix's pass is replayed in the backward pass
    if head == "the model's logits":  # the path of any other head (soft-capped, scaled, sharded)
        monkeypatch.setattr(common, "_PLAIN_HEAD_MODELS", ())
    monkeypatch.setattr(common._HeadLogProbs, "chunk", 5)  # 27 positions: 6 chunks, the last short
    model = tiny_llama(vocab_size=64, seed=0)
    input_ids, labels = _random_ids((3, 9), 64, 1), _random_ids((3, 9), 64, 2)
    input_ids[:, :4] = input_ids[0, :4]
    weights = torch.linspace(-1, 1, 27).view(3, 9)
    weights[:, :score_from] = 0
    log_softmax = torch.log_softmax(model(input_ids).logits / temperature, -1)
    (log_softmax.gather(-1, labels[..., None])[..., 0] * weights).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = common.get_response_log_probs(model, input_ids, labels, True, shared_prefix=shared_prefix,
                                        temperature=temperature, score_from=score_from)
    (out["log_probs"] * weights).sum().backward()
    for g, p in zip(expected, model.parameters()):
        assert torch.allclose(p.grad, g, atol=1e-5), "gradients differ from autograd's through the logits"


def test_get_response_log_probs_gradient_flows():
    model = tiny_llama(vocab_size=64, seed=3)
    input_ids, labels = _random_ids((2, 5), 64, 4), _random_ids((2, 5), 64, 5)
    out = adapters.run_get_response_log_probs(model, input_ids, labels, return_token_entropy=True)
    out["log_probs"].sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- SFT step


def _lp23():
    return torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)


SFT_MASK = torch.tensor([[True, True, False], [False, True, True]])


def test_sft_microbatch_train_step_hand():
    lp = _lp23()
    loss, meta = adapters.run_sft_microbatch_train_step(lp, SFT_MASK, gradient_accumulation_steps=1, normalize_constant=2.0)
    # per example: (-1-2)/2 = -1.5, (-5-6)/2 = -5.5; negated mean: (1.5+5.5)/2 = 3.5
    assert loss.item() == pytest.approx(3.5)
    assert isinstance(meta, dict)
    # d loss / d lp = -mask / (B * normalize_constant * grad_accum) = -mask / (2*2*1)
    _close(lp.grad, [[-0.25, -0.25, 0.0], [0.0, -0.25, -0.25]])


def test_sft_microbatch_train_step_default_constant():
    lp = _lp23()
    loss, _ = adapters.run_sft_microbatch_train_step(lp, SFT_MASK, gradient_accumulation_steps=1)
    # (3 + 11) / 2 = 7
    assert loss.item() == pytest.approx(7.0)
    _close(lp.grad, [[-0.5, -0.5, 0.0], [0.0, -0.5, -0.5]])  # -1 / (2*1*1)


def test_sft_microbatch_train_step_grad_accum_scaling():
    lp1, lp4 = _lp23(), _lp23()
    loss1, _ = adapters.run_sft_microbatch_train_step(lp1, SFT_MASK, 1, 2.0)
    loss4, _ = adapters.run_sft_microbatch_train_step(lp4, SFT_MASK, 4, 2.0)
    assert loss4.item() == pytest.approx(loss1.item() / 4)
    assert loss4.item() == pytest.approx(0.875)  # 3.5 / 4
    _close(lp4.grad, lp1.grad / 4)
    _close(lp4.grad, [[-1 / 16, -1 / 16, 0.0], [0.0, -1 / 16, -1 / 16]])  # -1 / (2*2*4)


# ----------------------------------------------------------------------------- group-normalized rewards


def _toy_reward_fn(response, ground_truth):
    r = float(response)
    return {"reward": r, "format_reward": 1.0, "answer_reward": float(response == ground_truth)}


# two consecutive groups of 4: [0, 0, 2, 2] and [1, 1, 1, 1]
RESPONSES = ["0", "0", "2", "2", "1", "1", "1", "1"]
GTS = ["2"] * 8


def test_group_normalized_rewards_no_std():
    adv, raw, meta = adapters.run_compute_group_normalized_rewards(
        _toy_reward_fn, RESPONSES, GTS, group_size=4, advantage_eps=1e-6, normalize_by_std=False
    )
    assert raw.shape == (8,) and adv.shape == (8,)
    _close(raw, [0.0, 0.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    # group means 1 and 1: r - mean
    _close(adv, [-1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert (adv[4:] == 0).all()


def test_group_normalized_rewards_with_std():
    adv, raw, meta = adapters.run_compute_group_normalized_rewards(
        _toy_reward_fn, RESPONSES, GTS, group_size=4, advantage_eps=1e-6, normalize_by_std=True
    )
    # group 1: deviations +-1, unbiased var = 4 / 3, std = 2/sqrt(3); (+-1) / std = +-sqrt(3)/2
    # (the population std, 1, would give +-1: this case tells them apart)
    s = math.sqrt(3) / 2
    _close(adv, [-s, -s, s, s, 0.0, 0.0, 0.0, 0.0], atol=1e-5)
    # identical group: exactly zero, never NaN (0 / (0 + eps))
    assert not torch.isnan(adv).any()
    assert (adv[4:] == 0).all()
    _close(raw, [0.0, 0.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0])


def test_group_normalized_rewards_groups_are_consecutive():
    # [3, 1 | 0, 0 | 5, 1]: group means 2, 0, 3
    adv, _, _ = adapters.run_compute_group_normalized_rewards(
        _toy_reward_fn, ["3", "1", "0", "0", "5", "1"], ["x"] * 6, 2, 1e-6, False
    )
    _close(adv, [1.0, -1.0, 0.0, 0.0, 2.0, -2.0])
    adv, _, _ = adapters.run_compute_group_normalized_rewards(
        _toy_reward_fn, ["3", "1", "0", "0", "5", "1"], ["x"] * 6, 2, 1e-6, True
    )
    # unbiased std of a pair (a, b) is |a-b|/sqrt(2): [3,1] -> sqrt 2, [5,1] -> 2 sqrt 2
    r = 1 / math.sqrt(2)
    _close(adv, [r, -r, 0.0, 0.0, r, -r], atol=1e-5)


def test_group_normalized_rewards_metadata():
    _, _, meta = adapters.run_compute_group_normalized_rewards(
        _toy_reward_fn, RESPONSES, GTS, group_size=4, advantage_eps=1e-6, normalize_by_std=True
    )
    assert _meta(meta, "reward_mean", "mean_reward", "rewards_mean", "mean") == pytest.approx(1.0)  # 8 / 8
    assert _meta(meta, "reward_max", "max_reward", "rewards_max", "max") == pytest.approx(2.0)
    assert _meta(meta, "reward_min", "min_reward", "rewards_min", "min") == pytest.approx(0.0)
    # deviations from 1: four of +-1, four of 0; unbiased sqrt(4/7), population sqrt(4/8)
    std = _meta(meta, "reward_std", "std_reward", "rewards_std", "std")
    assert std == pytest.approx(math.sqrt(4 / 7)) or std == pytest.approx(0.5)


# ----------------------------------------------------------------------------- policy-gradient losses


LP = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -2.0]])


def test_naive_policy_gradient_loss_hand():
    A = torch.tensor([[2.0], [-1.0]])  # (B, 1), broadcast over T
    loss = adapters.run_compute_naive_policy_gradient_loss(A, LP)
    # -A * logp: row 0: -2 * [-1,-2,-3]; row 1: 1 * [-0.5,-1,-2]
    _close(loss, [[2.0, 4.0, 6.0], [-0.5, -1.0, -2.0]])


# ratios exp(logp - old) = [0.5, 1.0, 1.5] in both rows; A = +2 (row 0), -2 (row 1); c = 0.2
RATIOS = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
OLD = torch.tensor([[-1.0, -2.0, -0.3], [-0.7, -1.1, -2.5]])
ADV = torch.tensor([[2.0], [-2.0]])


def _clip_inputs():
    lp = (OLD + RATIOS.log()).clone().requires_grad_(True)
    return lp


def test_grpo_clip_loss_hand_and_gradients():
    lp = _clip_inputs()
    loss, meta = adapters.run_compute_grpo_clip_loss(ADV, lp, OLD, cliprange=0.2)
    # row 0 (A=+2): min(r*A, clip(r, .8, 1.2)*A) = min(1, 1.6)=1, min(2, 2)=2, min(3, 2.4)=2.4 -> negated
    # row 1 (A=-2): min(-1, -1.6)=-1.6, min(-2, -2)=-2, min(-3, -2.4)=-3 -> negated
    _close(loss, [[-1.0, -2.0, -2.4], [1.6, 2.0, 3.0]], atol=1e-5)
    loss.sum().backward()
    # unclipped branch: d(-A r)/dlogp = -A r; clipped branch: constant -> 0
    # row 0: -2*0.5 = -1, -2*1 = -2, clipped (r > 1.2 with A > 0) -> 0
    # row 1: clipped (r < 0.8 with A < 0) -> 0, 2*1 = 2, 2*1.5 = 3
    _close(lp.grad, [[-1.0, -2.0, 0.0], [0.0, 2.0, 3.0]], atol=1e-5)
    clipped = _meta(meta, "clipped", "is_clipped", "clip_mask")
    assert torch.equal(clipped.bool(), torch.tensor([[False, False, True], [True, False, False]]))


def test_grpo_clip_loss_inside_range_is_plain_ratio():
    # all ratios within [0.8, 1.2]: loss = -A r and gradient = -A r everywhere, nothing clipped
    ratios = torch.tensor([[0.9, 1.1], [0.85, 1.15]])
    old = torch.tensor([[-1.0, -2.0], [-3.0, -0.5]])
    lp = (old + ratios.log()).clone().requires_grad_(True)
    A = torch.tensor([[3.0], [-0.5]])
    loss, meta = adapters.run_compute_grpo_clip_loss(A, lp, old, 0.2)
    expected = [[-2.7, -3.3], [0.425, 0.575]]  # -3*0.9, -3*1.1, 0.5*0.85, 0.5*1.15
    _close(loss, expected, atol=1e-5)
    loss.sum().backward()
    _close(lp.grad, expected, atol=1e-5)
    assert not _meta(meta, "clipped", "is_clipped", "clip_mask").bool().any()


def test_policy_gradient_loss_dispatch():
    raw = torch.tensor([[1.0], [0.0]])
    adv = torch.tensor([[0.5], [-0.5]])
    loss, _ = adapters.run_compute_policy_gradient_loss(LP, "no_baseline", raw, adv, None, None)
    _close(loss, [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])  # -raw * logp
    loss, _ = adapters.run_compute_policy_gradient_loss(LP, "reinforce_with_baseline", raw, adv, None, None)
    _close(loss, [[0.5, 1.0, 1.5], [-0.25, -0.5, -1.0]])  # -adv * logp
    lp = _clip_inputs().detach()
    loss, meta = adapters.run_compute_policy_gradient_loss(lp, "grpo_clip", raw, ADV, OLD, 0.2)
    _close(loss, [[-1.0, -2.0, -2.4], [1.6, 2.0, 3.0]], atol=1e-5)  # the hand case above
    assert isinstance(meta, dict)


def test_policy_gradient_loss_unknown_type_raises():
    with pytest.raises(ValueError):
        adapters.run_compute_policy_gradient_loss(LP, "ppo_typo", torch.ones(2, 1), torch.ones(2, 1), LP, 0.2)


# ----------------------------------------------------------------------------- GRPO step


GRPO_MASK = torch.tensor([[True, True, False], [True, False, False]])
GRPO_A = torch.tensor([[1.0], [-2.0]])


def test_grpo_microbatch_train_step_hand():
    lp = _lp23()
    loss, _ = adapters.run_grpo_microbatch_train_step(
        lp, GRPO_MASK, 1, "reinforce_with_baseline", advantages=GRPO_A
    )
    # per-token -A*logp: row 0 [1, 2, 3], row 1 [-8, -10, -12]
    # masked mean over T: (1+2)/2 = 1.5, -8/1 = -8; batch mean (1.5 - 8)/2 = -3.25
    assert loss.item() == pytest.approx(-3.25)
    # d/dlogp = -A * mask / (n_tokens_b * B * grad_accum): row 0 -1/(2*2), row 1 2/(1*2)
    _close(lp.grad, [[-0.25, -0.25, 0.0], [1.0, 0.0, 0.0]])
    assert (lp.grad[~GRPO_MASK] == 0).all(), "padding positions must get no gradient"


def test_grpo_microbatch_train_step_no_baseline_and_clip():
    lp = _lp23()
    loss, _ = adapters.run_grpo_microbatch_train_step(lp, GRPO_MASK, 1, "no_baseline", raw_rewards=GRPO_A)
    assert loss.item() == pytest.approx(-3.25)  # same numbers as above with raw rewards
    lp = _clip_inputs()
    mask = torch.tensor([[True, False, True], [False, True, True]])
    loss, _ = adapters.run_grpo_microbatch_train_step(
        lp, mask, 2, "grpo_clip", advantages=ADV, old_log_probs=OLD, cliprange=0.2
    )
    # per-token [[-1, -2, -2.4], [1.6, 2, 3]]; masked means (-1 - 2.4)/2 = -1.7, (2+3)/2 = 2.5
    # batch mean 0.4, / grad_accum 2 = 0.2
    assert loss.item() == pytest.approx(0.2, abs=1e-5)
    # grads: unclipped-branch -A r / (2 tokens * 2 rows * 2 accum), clipped -> 0, mask False -> 0
    _close(lp.grad, [[-1 / 8, 0.0, 0.0], [0.0, 2 / 8, 3 / 8]], atol=1e-5)


def test_grpo_microbatch_train_step_grad_accum_scaling():
    lp1, lp4 = _lp23(), _lp23()
    loss1, _ = adapters.run_grpo_microbatch_train_step(lp1, GRPO_MASK, 1, "reinforce_with_baseline", advantages=GRPO_A)
    loss4, _ = adapters.run_grpo_microbatch_train_step(lp4, GRPO_MASK, 4, "reinforce_with_baseline", advantages=GRPO_A)
    assert loss4.item() == pytest.approx(loss1.item() / 4)
    _close(lp4.grad, lp1.grad / 4)
    assert lp1.grad.abs().sum() > 0


def test_grpo_microbatch_train_step_on_model_populates_grads():
    model = tiny_llama(vocab_size=64, seed=7)
    input_ids, labels = _random_ids((2, 6), 64, 8), _random_ids((2, 6), 64, 9)
    lp = adapters.run_get_response_log_probs(model, input_ids, labels, False)["log_probs"]
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    adapters.run_grpo_microbatch_train_step(lp, mask, 2, "reinforce_with_baseline", advantages=torch.tensor([[1.0], [-1.0]]))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- tokenization (real tokenizer)


def test_tokenize_prompt_and_output(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompts = ["Hello, world!", "What is 2+2? Think step by step.", "x"]
    outputs = [" Yes.", " The answer is 4, because 2 plus 2 is 4.", "\nok"]
    out = adapters.run_tokenize_prompt_and_output(prompts, outputs, tok)
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    o_ids = [tok(o, add_special_tokens=False)["input_ids"] for o in outputs]
    L = max(len(p) + len(o) for p, o in zip(p_ids, o_ids))
    for key in ("input_ids", "labels", "response_mask"):
        assert out[key].shape == (3, L - 1), key
    assert out["input_ids"].dtype == torch.long and out["labels"].dtype == torch.long
    assert out["response_mask"].dtype == torch.bool
    # labels are input_ids shifted by one
    assert torch.equal(out["labels"][:, :-1], out["input_ids"][:, 1:])
    pad = tok.pad_token_id
    for i in range(3):
        n = len(p_ids[i]) + len(o_ids[i])
        row = out["input_ids"][i].tolist() + [out["labels"][i, -1].item()]
        assert row[:n] == p_ids[i] + o_ids[i]
        assert row[n:] == [pad] * (L - n)
        mask = out["response_mask"][i]
        # the masked labels are exactly the output's tokens, in order
        assert out["labels"][i][mask].tolist() == o_ids[i]
        assert mask.sum().item() == len(o_ids[i])
        # and they sit right after the prompt: label index j is token j+1
        assert mask.nonzero().squeeze(1).tolist() == list(range(len(p_ids[i]) - 1, n - 1))


# ----------------------------------------------------------------------------- packed SFT data (real tokenizer)


SFT_ROWS = [
    {"prompt": "Add 2 and 3.", "response": "2 + 3 = 5."},
    {"prompt": "Name a colour.", "response": "Blue."},
    {"prompt": "Say hi.", "response": "Hi!"},
    {"prompt": "What is the capital of France?", "response": "Paris is the capital of France."},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _independent_stream(tok, rows):
    stream = []
    for r in rows:
        text = tasks.ALPACA_PROMPT.format(instruction=r["prompt"], response=r["response"])
        stream += [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return stream


def _pick_length(n_tokens):
    """A sequence length that leaves an incomplete tail and gives a count not divisible by 3."""
    for L in range(16, 40):
        if (n_tokens - 1) % L != 0 and ((n_tokens - 1) // L) % 3 != 0:
            return L
    raise AssertionError("no suitable length")


def test_packed_sft_dataset(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    path = _write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    stream = _independent_stream(tok, SFT_ROWS)
    L = _pick_length(len(stream))
    ds = adapters.get_packed_sft_dataset(tok, str(path), L, shuffle=False)
    n = (len(stream) - 1) // L  # incomplete tail dropped
    assert len(ds) == n and n >= 4
    for i in range(n):
        ex = ds[i]
        assert ex["input_ids"].shape == (L,) and ex["labels"].shape == (L,)
        assert ex["input_ids"].dtype == torch.long and ex["labels"].dtype == torch.long
        assert torch.equal(ex["labels"][:-1], ex["input_ids"][1:])
        assert ex["input_ids"].tolist() == stream[i * L : (i + 1) * L]
        assert ex["labels"].tolist() == stream[i * L + 1 : (i + 1) * L + 1]
    # the packed stream: BOS first, documents separated by EOS + BOS
    packed = torch.cat([ds[i]["input_ids"] for i in range(n)]).tolist() + [ds[n - 1]["labels"][-1].item()]
    assert packed[0] == tok.bos_token_id
    eos_at = [j for j, t in enumerate(packed) if t == tok.eos_token_id]
    assert eos_at, "the kept stream should cross at least one document boundary"
    for j in eos_at:
        if j + 1 < len(packed):
            assert packed[j + 1] == tok.bos_token_id
    n_eos_in_full = sum(t == tok.eos_token_id for t in stream)
    assert n_eos_in_full == len(SFT_ROWS)
    assert len(packed) < len(stream), "the tail must be dropped"


def test_packed_sft_dataset_shuffle_keeps_documents(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    path = _write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    stream = _independent_stream(tok, SFT_ROWS)
    L = _pick_length(len(stream))
    ds = adapters.get_packed_sft_dataset(tok, str(path), L, shuffle=True)
    assert len(ds) == (len(stream) - 1) // L
    assert ds[0]["input_ids"][0].item() == tok.bos_token_id
    for i in range(len(ds)):
        assert torch.equal(ds[i]["labels"][:-1], ds[i]["input_ids"][1:])


def test_iterate_batches(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    path = _write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    stream = _independent_stream(tok, SFT_ROWS)
    L = _pick_length(len(stream))
    ds = adapters.get_packed_sft_dataset(tok, str(path), L, shuffle=False)
    n = len(ds)
    batches = list(adapters.run_iterate_batches(ds, batch_size=3, shuffle=False))
    assert len(batches) == math.ceil(n / 3)
    for b in batches[:-1]:
        assert b["input_ids"].shape == (3, L) and b["labels"].shape == (3, L)
    assert batches[-1]["input_ids"].shape == (n % 3, L)  # short last batch
    # unshuffled: the first example is the independently built stream's first L tokens
    assert batches[0]["input_ids"][0].tolist() == stream[:L]
    assert batches[0]["labels"][0].tolist() == stream[1 : L + 1]
    all_ids = torch.cat([b["input_ids"] for b in batches])
    assert all_ids.flatten().tolist() == stream[: n * L]

    torch.manual_seed(0)
    shuffled = torch.cat([b["input_ids"] for b in adapters.run_iterate_batches(ds, 3, shuffle=True)])
    assert shuffled.shape == (n, L)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, all_ids.tolist()))


# ----------------------------------------------------------------------------- DPO (real tokenizer, tiny models)


def _naive_sequence_log_prob(model, ids):
    """Sum over tokens 1..n-1 of log p(token_i | tokens_<i), one position at a time."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return sum(torch.log_softmax(logits[i - 1], -1)[ids[i]].item() for i in range(1, len(ids)))


DPO_PROMPT = "Write a short greeting."
DPO_CHOSEN = "Hello! It is nice to meet you."
DPO_REJECTED = "Go away."


def test_per_instance_dpo_loss_matches_independent(smollm2_tokenizer):
    tok = smollm2_tokenizer
    lm, lm_ref = tiny_llama(vocab_size=49152, seed=0), tiny_llama(vocab_size=49152, seed=1)
    beta = 0.5
    logp = {}
    for name, response in (("c", DPO_CHOSEN), ("r", DPO_REJECTED)):
        text = tasks.ALPACA_PROMPT.format(instruction=DPO_PROMPT, response=response) + tok.eos_token
        ids = tok(text)["input_ids"]
        logp[name] = _naive_sequence_log_prob(lm, ids)
        logp["ref_" + name] = _naive_sequence_log_prob(lm_ref, ids)
    margin = beta * ((logp["c"] - logp["ref_c"]) - (logp["r"] - logp["ref_r"]))
    expected = -math.log(1 / (1 + math.exp(-margin)))
    loss = adapters.run_compute_per_instance_dpo_loss(lm, lm_ref, tok, beta, DPO_PROMPT, DPO_CHOSEN, DPO_REJECTED)
    assert loss.numel() == 1
    assert abs(margin) > 1e-3, "the two random models should disagree"
    assert loss.item() == pytest.approx(expected, abs=1e-4)

    lm.zero_grad(), lm_ref.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lm_ref.parameters()), "no gradient to lm_ref"


def test_per_instance_dpo_loss_same_model_is_log2(smollm2_tokenizer):
    lm = tiny_llama(vocab_size=49152, seed=2)
    loss = adapters.run_compute_per_instance_dpo_loss(lm, lm, smollm2_tokenizer, 0.1, DPO_PROMPT, DPO_CHOSEN, DPO_REJECTED)
    # margin 0: -log sigmoid(0) = log 2
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-5)


# ----------------------------------------------------------------------------- sampling


def _sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, framework="torch"):
    """common.sample_next_token or its MLX twin on torch logits; token and log-prob back as torch."""
    sampling = harness.Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if framework == "torch":
        generated = torch.zeros((logits.shape[0], 0), dtype=torch.long)
        return common.sample_next_token(logits, generated, sampling, torch.Generator().manual_seed(seed))
    import common_mlx
    import mlx.core as mx
    import numpy as np

    token, lp = common_mlx.sample_next_token(mx.array(logits.numpy()), mx.zeros((logits.shape[0], 0), mx.int32),
                                             sampling, mx.random.key(seed))
    return torch.from_numpy(np.array(token)).long(), torch.from_numpy(np.array(lp))


# probabilities [0.5, 0.3, 0.15, 0.05] over V = 4
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
N_DRAWS = 4000


def _many(probs=PROBS, n=N_DRAWS):
    return probs.log().expand(n, -1).clone()  # (n, V): n independent rows


@pytest.mark.parametrize("framework", TWINS)
def test_sample_temperature_zero_is_argmax(framework):
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    token, lp = _sample(logits, temperature=0.0, framework=framework)
    assert token.tolist() == [int(torch.argmax(row)) for row in logits]
    assert token.shape == (5,) and lp.shape == (5,)


@pytest.mark.parametrize("framework", TWINS)
def test_sample_top_k_one_is_argmax(framework):
    logits = torch.randn(64, 11, generator=torch.Generator().manual_seed(1))
    token, _ = _sample(logits, temperature=1.5, top_k=1, framework=framework)
    assert token.tolist() == [int(torch.argmax(row)) for row in logits]


@pytest.mark.parametrize("framework", TWINS)
def test_sample_top_k_draws_from_the_k_best_in_proportion(framework):
    # top_k 2 over [0.5, 0.3, 0.15, 0.05]: tokens 0 and 1 only, renormalized to 0.625 and 0.375
    token, _ = _sample(_many(), top_k=2, seed=3, framework=framework)
    freq = torch.bincount(token, minlength=4).float() / N_DRAWS
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - 0.625) < 0.04, freq


@pytest.mark.parametrize("framework", TWINS)
def test_sample_small_top_p_only_top_token(framework):
    token, _ = _sample(_many(), top_p=0.05, framework=framework)
    assert (token == 0).all()
    # nucleus 0.7: the smallest prefix reaching 0.7 is {0.5, 0.3}
    token, _ = _sample(_many(), top_p=0.7, seed=1, framework=framework)
    counts = torch.bincount(token, minlength=4)
    assert counts[2] == 0 and counts[3] == 0 and counts[0] > 0 and counts[1] > 0
    # nucleus 0.9: {0.5, 0.3, 0.15} (0.8 < 0.9), renormalized: 0.5 / 0.95
    token, _ = _sample(_many(), top_p=0.9, seed=5, framework=framework)
    freq = torch.bincount(token, minlength=4).float() / N_DRAWS
    assert freq[3] == 0 and freq[2] > 0 and abs(freq[0].item() - 0.5 / 0.95) < 0.04, freq


@pytest.mark.parametrize("framework", TWINS)
def test_sample_min_p_removes_unlikely_tokens(framework):
    # min_p 0.2: floor 0.2 * 0.5 = 0.1 -> token 3 (0.05) removed, tokens 0..2 kept
    token, _ = _sample(_many(), min_p=0.2, seed=2, framework=framework)
    counts = torch.bincount(token, minlength=4).float()
    assert counts[3] == 0
    freq = counts / N_DRAWS
    # renormalized over the kept tokens: 0.5/0.95, 0.3/0.95, 0.15/0.95
    for k, p in enumerate([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]):
        assert abs(freq[k].item() - p) < 0.04, (k, freq)
    # without min_p token 3 does appear (so the check above can fail)
    token, _ = _sample(_many(), seed=2, framework=framework)
    assert (token == 3).any()


@pytest.mark.parametrize("framework", TWINS)
def test_sample_unfiltered_frequencies_match_the_probabilities(framework):
    # 4000 draws: one standard error of a frequency is at most 0.008, so 0.04 is 5 of them
    token, _ = _sample(_many(), seed=6, framework=framework)
    freq = torch.bincount(token, minlength=4).float() / N_DRAWS
    assert torch.allclose(freq, PROBS, atol=0.04), freq


@pytest.mark.parametrize("framework", TWINS)
@pytest.mark.parametrize(
    "temperature, filters",
    [(1.0, {}), (0.7, {}), (2.0, {}), (0.7, {"top_k": 3}), (1.0, {"top_p": 0.8, "min_p": 0.05})],
)
def test_sample_log_prob_is_tempered_log_softmax(temperature, filters, framework):
    # the log-prob is under softmax(logits / temperature), the filters only restrict the draw
    logits = torch.randn(6, 9, generator=torch.Generator().manual_seed(3)) * 3
    token, lp = _sample(logits, temperature=temperature, seed=4, framework=framework, **filters)
    for b in range(6):
        expected = torch.log_softmax(logits[b].double() / temperature, -1)[token[b]].item()
        assert lp[b].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("framework", TWINS)
def test_sample_reproducible_with_generator(framework):
    logits = torch.randn(16, 30, generator=torch.Generator().manual_seed(5))
    a, _ = _sample(logits, temperature=1.0, seed=11, framework=framework)
    b, _ = _sample(logits, temperature=1.0, seed=11, framework=framework)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- generate


class CharTokenizer:
    """Minimal character tokenizer for a 64-token vocabulary: 0 pad, 1 bos, 2 eos, 3.. chars."""

    CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 <>/.,?!+-=:;()ABCDEFGHIJKLM"[:61]
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    pad_token, eos_token = "<pad>", "<eos>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + self.CHARS.index(c) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        out = []
        for i in ids:
            if i < 3:
                if not skip_special_tokens:
                    out.append(["<pad>", "<bos>", "<eos>"][i])
            else:
                out.append(self.CHARS[i - 3])
        return "".join(out)

    def batch_decode(self, batch, skip_special_tokens=False):
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def _greedy_reference(model, prompt_ids, max_new_tokens, eos_ids):
    """Greedy decoding with the model recomputed on the whole growing sequence (no cache).
    Returns the new tokens, their log-probs and the mean next-token entropy."""
    ids, new, lps, entropies = list(prompt_ids), [], [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            token = int(torch.argmax(logits))
            log_p = torch.log_softmax(logits, -1)
            new.append(token)
            lps.append(log_p[token].item())
            entropies.append(-(log_p.exp() * log_p).sum().item())
            ids.append(token)
            if token in eos_ids:
                break
    return new, lps, sum(entropies) / len(entropies)


GEN_PROMPTS = ["what is 2+3?", "hi", "a much longer prompt, with more words in it."]


def _check_greedy_matches(model, tok, prompts, max_new_tokens, eos_ids):
    results = common.generate(model, tok, prompts, harness.Sampling(max_new_tokens=max_new_tokens, temperature=0.0, stop=()))
    assert len(results) == len(prompts)
    for prompt, res in zip(prompts, results):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ref_ids, ref_lps, ref_entropy = _greedy_reference(model, p_ids, max_new_tokens, eos_ids)
        assert res["prompt_ids"] == p_ids
        assert res["response_ids"] == ref_ids, prompt
        assert len(res["log_probs"]) == len(ref_ids)
        for got, exp in zip(res["log_probs"], ref_lps):
            assert got == pytest.approx(exp, abs=1e-4)
        # the docstring's "entropy": mean next-token entropy over the response
        assert res["entropy"] == pytest.approx(ref_entropy, abs=1e-4)
    return results


def test_generate_greedy_single_prompt_matches_reference():
    model, tok = tiny_llama(vocab_size=64, seed=0), CharTokenizer()
    _check_greedy_matches(model, tok, GEN_PROMPTS[:1], 12, {2})


def test_generate_greedy_batch_left_padding_matches_reference():
    # prompts of different lengths: left padding and position ids must not change the result
    model, tok = tiny_llama(vocab_size=64, seed=0), CharTokenizer()
    _check_greedy_matches(model, tok, GEN_PROMPTS, 12, {2})


def test_generate_greedy_batch_with_shared_prefix_matches_reference():
    # prompts that share a long prefix (as r1_zero prompts do) and differ in suffix length
    model, tok = tiny_llama(vocab_size=64, seed=5), CharTokenizer()
    prefix = "user: solve this. question: "
    prompts = [prefix + q for q in ("1+1?", "what is 12+30?", "x", "1+1?")]
    _check_greedy_matches(model, tok, prompts, 10, {2})


def test_generate_with_grouped_attention_matches_reference():
    # load_model picks common._grouped_attention for bf16 on a CPU: the cached, shared-prefix,
    # left-padded decode loop must give what the uncached model gives, there too
    model, tok = tiny_llama(vocab_size=64, seed=5), CharTokenizer()
    model.set_attn_implementation(_attention("nanoalign"))
    prefix = "user: solve this. question: "
    _check_greedy_matches(model, tok, [prefix + q for q in ("1+1?", "what is 12+30?", "x")] + GEN_PROMPTS[1:], 10, {2})


@pytest.mark.parametrize("share_prefix", [False, True])
def test_kv_cache_returns_what_dynamic_cache_returns(share_prefix):
    # the sampler's preallocated cache against transformers' DynamicCache (concatenation), as a
    # rollout uses it: a prefix for one row, repeated for the batch, steps, rows dropped. With
    # share_prefix the prefix stays one row (Prefixed keys): the same keys once written out
    from transformers import DynamicCache

    def whole(kv):  # (rows, heads, positions, dim), the prefix copied to every row
        if not isinstance(kv, common.Prefixed):
            return kv
        assert kv.prefix.shape[0] == 1  # held once, whatever the rows
        return torch.cat([kv.prefix.expand(kv.rows.shape[0], -1, -1, -1), kv.rows], 2)

    torch.manual_seed(0)
    ours, theirs = common._kv_cache(capacity=9, share_prefix=share_prefix), DynamicCache()
    kv = lambda rows, n: (torch.randn(rows, 3, n, 4), torch.randn(rows, 3, n, 4))  # noqa: E731
    steps = [("update", kv(1, 4)), ("repeat", 3), ("update", kv(3, 1)), ("select", torch.tensor([0, 2])),
             ("update", kv(2, 1)), ("select", torch.tensor([1])), ("update", kv(1, 2))]
    for op, arg in steps:
        for cache in (ours, theirs):
            if op == "update":
                for layer in range(2):
                    out = cache.update(*arg, layer_idx=layer)
                    got = out if cache is ours else got
            elif op == "repeat":
                cache.batch_repeat_interleave(arg)
            else:
                cache.batch_select_indices(arg)
        if op == "update":
            assert ours.get_seq_length() == theirs.get_seq_length()
            for layer in range(2):
                assert torch.equal(whole(ours.layers[layer].keys), theirs.layers[layer].keys)
                assert torch.equal(whole(ours.layers[layer].values), theirs.layers[layer].values)
    assert ours.get_seq_length() == 8 and whole(got[0]).shape == (1, 3, 8, 4)
    assert isinstance(got[0], common.Prefixed) == share_prefix


def test_prefixed_attention_is_the_attention_over_the_prefix_copied_to_every_row():
    # _prefixed_attention reads the prefix's keys and values once for all rows; the reference
    # is the written-out attention over [prefix | row], the prefix copied to each row (3 rows,
    # 9 query heads over 3 key/value heads, 5 prefix and 4 own positions, a decode step and a
    # 3-token prefill, a masked pad slot in row 0)
    torch.manual_seed(0)
    prefix_k, prefix_v = torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8)
    rows_k, rows_v = torch.randn(3, 3, 4, 8), torch.randn(3, 3, 4, 8)
    whole_k = torch.cat([prefix_k.expand(3, -1, -1, -1), rows_k], 2)
    whole_v = torch.cat([prefix_v.expand(3, -1, -1, -1), rows_v], 2)
    for Q in (1, 3):
        q = torch.randn(3, 9, Q, 8)
        mask = torch.zeros(3, 1, Q, 9)
        mask[0, :, :, 5] = -float("inf")
        got, _ = common._grouped_attention(None, q, common.Prefixed((prefix_k, rows_k)),
                                           common.Prefixed((prefix_v, rows_v)), mask, 0.35)
        expected, _ = common._written_out_attention(None, q, whole_k, whole_v, mask, 0.35, 0.0)
        assert got.shape == expected.shape == (3, Q, 9, 8)
        _close(got, expected, atol=1e-6)
    # a model whose weights are bf16 (no autocast) caches bf16 keys: the attention runs in bf16
    half = [t.bfloat16() for t in (prefix_k, rows_k, prefix_v, rows_v)]
    got, _ = common._grouped_attention(None, q.bfloat16(), common.Prefixed(half[:2]), common.Prefixed(half[2:]),
                                       mask.bfloat16(), 0.35)
    assert got.dtype == torch.bfloat16
    _close(got.float(), expected, atol=5e-2)


def test_grouped_attention_under_autocast_is_the_fp32_attention():
    # under bf16 autocast the written-out attention must not cast the cached keys and values
    # to bf16 (autocast would, at every decode step): it computes in fp32, to the bit
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 1, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    mask = torch.zeros(2, 1, 1, 5)
    mask[0, :, :, 1] = -float("inf")
    fp32, _ = common._grouped_attention(None, q, k, v, mask, 0.35)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = common._grouped_attention(None, q, k, v.bfloat16(), mask, 0.35)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, common._grouped_attention(None, q, k, v.bfloat16().float(), mask, 0.35)[0])
    assert torch.allclose(mixed, fp32, atol=1e-2)  # only v's rounding to bf16 (as v_proj gives it) differs


def _tiny_gpt2(seed=0):
    """A random 2-layer GPT-2: learned absolute position embeddings, so a wrong position id
    changes the output (RoPE in tiny_llama is blind to a constant per-row offset). A large
    init scale keeps the random model from repeating one token forever."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, initializer_range=0.5)
    return GPT2LMHeadModel(config).eval()


def test_generate_greedy_batch_absolute_positions_matches_reference():
    model, tok = _tiny_gpt2(), CharTokenizer()
    _check_greedy_matches(model, tok, GEN_PROMPTS, 10, {2})
    prefix = "user: solve this. question: "
    _check_greedy_matches(model, tok, [prefix + q for q in ("1+1?", "what is 12+30?", "x")], 10, {2})


def test_generate_greedy_is_deterministic():
    model, tok = tiny_llama(vocab_size=64, seed=1), CharTokenizer()
    a = common.generate(model, tok, GEN_PROMPTS, harness.Sampling(max_new_tokens=10, temperature=0.0))
    b = common.generate(model, tok, GEN_PROMPTS, harness.Sampling(max_new_tokens=10, temperature=0.0))
    assert [r["response_ids"] for r in a] == [r["response_ids"] for r in b]
    assert [r["response"] for r in a] == [r["response"] for r in b]


def test_generate_result_structure_and_truncation():
    model, tok = tiny_llama(vocab_size=64, seed=2), CharTokenizer()
    g = torch.Generator().manual_seed(0)
    max_new = 8
    results = common.generate(model, tok, GEN_PROMPTS * 3, harness.Sampling(max_new_tokens=max_new), generator=g)
    assert len(results) == len(GEN_PROMPTS) * 3
    for prompt, res in zip(GEN_PROMPTS * 3, results):
        assert {"prompt_ids", "response_ids", "response", "log_probs", "truncated"} <= set(res)
        ids = res["response_ids"]
        assert 1 <= len(ids) <= max_new
        assert len(res["log_probs"]) == len(ids)
        assert all(lp <= 0 for lp in res["log_probs"])
        assert res["response"] == tok.decode(ids, skip_special_tokens=True)
        stopped = ids[-1] == tok.eos_token_id or tasks.STOP in tok.decode(ids)
        if res["truncated"]:
            assert len(ids) == max_new and not stopped
        else:
            assert stopped
        # nothing is generated past an EOS
        assert tok.eos_token_id not in ids[:-1]


def _eos_biased_model():
    """tiny_llama whose output layer ignores the hidden state: logits 0 everywhere, 10 at EOS."""
    model = tiny_llama(vocab_size=64, seed=3)
    head = torch.nn.Linear(32, 64, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[2] = 10.0
    model.lm_head = head
    return model


def test_generate_stops_at_eos_and_is_not_truncated():
    # an output layer that always puts EOS on top: every response is exactly [EOS]
    model, tok = _eos_biased_model(), CharTokenizer()
    results = common.generate(model, tok, GEN_PROMPTS, harness.Sampling(max_new_tokens=8, temperature=0.0))
    for res in results:
        assert res["response_ids"] == [tok.eos_token_id]
        assert res["truncated"] is False
        assert res["response"] == ""


def test_generate_min_new_tokens_hand():
    # EOS-biased head (all logits 0, EOS 10). With min_new_tokens=3 EOS is masked for three
    # steps: the 63 other tokens tie at 0, argmax picks token 0 (pad), log p = -ln 63,
    # entropy ln 63; then EOS: log p = 10 - ln(e^10 + 63), entropy of [e^10, 1 x 63] / Z.
    model, tok = _eos_biased_model(), CharTokenizer()
    results = common.generate(model, tok, GEN_PROMPTS[:2], harness.Sampling(max_new_tokens=8, temperature=0.0, min_new_tokens=3))
    z = math.exp(10) + 63
    p_eos, p_other = math.exp(10) / z, 1 / z
    h_last = -(p_eos * math.log(p_eos) + 63 * p_other * math.log(p_other))
    for res in results:
        assert res["response_ids"] == [0, 0, 0, tok.eos_token_id]
        assert res["truncated"] is False
        expected_lps = [-math.log(63)] * 3 + [10 - math.log(z)]
        for got, exp in zip(res["log_probs"], expected_lps):
            assert got == pytest.approx(exp, abs=1e-4)
        assert math.isfinite(res["entropy"]), "entropy with EOS masked must stay finite"
        assert res["entropy"] == pytest.approx((3 * math.log(63) + h_last) / 4, abs=1e-4)


def test_generate_greedy_with_real_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = tiny_llama(vocab_size=49152, seed=4)
    prompts = ["What is 2 + 3?", "Hi", "Tell me a long story about a dragon and a knight."]
    results = _check_greedy_matches(model, tok, prompts, 6, {tok.eos_token_id, 2})
    for res in results:
        assert res["response"] == tok.decode(res["response_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("loss_type", ["no_baseline", "reinforce_with_baseline", "grpo_clip", "gspo"])
def test_a_fully_masked_row_adds_nothing_and_no_nan(loss_type):
    """--mask-truncated can mask a whole response: that row contributes 0 to the loss and
    its gradient, and the other rows' loss is what it would be without it."""
    torch.manual_seed(0)
    log_probs = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    kwargs = dict(raw_rewards=torch.tensor([[1.0], [2.0]]), advantages=torch.tensor([[0.5], [-1.0]]),
                  old_log_probs=log_probs.detach() - 0.1, cliprange=0.2)
    loss, _ = common.grpo_microbatch_train_step(log_probs, mask, 1, loss_type, **kwargs)
    assert torch.isfinite(loss) and torch.isfinite(log_probs.grad).all()
    assert (log_probs.grad[1] == 0).all()
    alone = log_probs.detach()[:1].clone().requires_grad_(True)
    single = {k: v[:1] for k, v in kwargs.items() if torch.is_tensor(v)}
    loss_alone, _ = common.grpo_microbatch_train_step(alone, mask[:1], 1, loss_type, cliprange=0.2, **single)
    assert loss.item() == pytest.approx(loss_alone.item() / 2)  # mean over 2 rows, one of them empty


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("speedup,expected", [(2.0, "nanoalign"), (1.0, "sdpa")])
def test_load_model_picks_attention_by_measurement(tiny_model_dir, monkeypatch, dtype, speedup, expected):
    # attention written out only where the check, in the run's dtype, measured PyTorch's SDPA kernel slower
    checked = []
    monkeypatch.setattr(common, "_cpu_attention_speedup", lambda d: checked.append(d) or speedup)
    model, _ = common.load_model(tiny_model_dir, torch.device("cpu"), dtype)
    assert model.config._attn_implementation == expected and checked == [dtype]


@pytest.mark.parametrize("q_len,mask,dtype", [(1, True, torch.float64), (5, True, torch.float64),
                                              (5, False, torch.float64), (1, True, torch.float32),
                                              (5, True, torch.float32), (5, False, torch.float32)])
def test_grouped_attention_matches_transformers_eager(q_len, mask, dtype):
    # the reference: transformers' own eager attention, which copies each key/value head for
    # the query heads that read it (3 here); outputs and gradients must agree. A whole fp32
    # sequence takes the other path (PyTorch's fused kernel), so both are checked
    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 8, generator=g, dtype=dtype, requires_grad=True)
               for h, n in ((6, q_len), (2, 7), (2, 7)))
    additive = torch.zeros(2, 1, q_len, 7, dtype=dtype)
    additive[0, :, :, :2] = -float("inf")  # row 0: two pad positions
    additive[:, :, :, 7 - q_len + 1 :] += torch.triu(torch.full((q_len, q_len - 1), -float("inf")), 0)
    module = SimpleNamespace(num_key_value_groups=3, training=False)
    results = []
    for attend in (common._grouped_attention, eager_attention_forward):
        out, _ = attend(module, q, k, v, additive if mask else None, scaling=0.3)
        grads = torch.autograd.grad((out * torch.arange(out.numel()).view(out.shape).sin()).sum(), (q, k, v))
        results.append((out, *grads))
    assert results[0][0].shape == (2, q_len, 6, 8)
    for ours, reference in zip(*results):
        assert torch.allclose(ours, reference, atol=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_attention_speedup_is_a_measured_ratio(dtype):
    speedup = common._cpu_attention_speedup.__wrapped__(dtype)
    assert 0 < speedup < 1000 and speedup != 1.0  # two timings divided, not a constant


def test_mixed_precision_keeps_fp32_weights_and_log_probs(tiny_model_dir):
    """--dtype bfloat16: weights (and updates) stay fp32, the body computes in bf16, the
    output layer in fp32; log-probs stay near the fp32 model's, and a step of lr 1e-5,
    below a bf16 ulp of most weights, still changes them."""
    cpu = torch.device("cpu")
    fp32, _ = common.load_model(tiny_model_dir, cpu, torch.float32)
    mixed, _ = common.load_model(tiny_model_dir, cpu, torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    ids = torch.randint(3, 1000, (2, 12))
    exact = common.get_response_log_probs(fp32, ids[:, :-1], ids[:, 1:])["log_probs"]
    out = common.get_response_log_probs(mixed, ids[:, :-1], ids[:, 1:])["log_probs"]
    assert out.dtype == torch.float32 and not torch.equal(out, exact)  # bf16 really ran
    torch.testing.assert_close(out, exact, atol=0.05, rtol=0)
    before = [p.detach().clone() for p in mixed.parameters()]
    optimizer, scheduler = common.make_optimizer(mixed, lr=1e-5)
    (-out.sum()).backward()
    common.optimizer_step(mixed, optimizer, scheduler, max_grad_norm=1.0)
    changed = sum(not torch.equal(a, p) for a, p in zip(before, mixed.parameters()))
    assert changed == len(before)
