"""Values checked on paper, for the additions beyond the course, in both twins: a bug that
both twins share (a flipped sign, an ignored argument) fails here even though the parity
tests pass."""

import math

import numpy as np
import pytest
import torch

import common
import common_mlx
import harness
import rewards
from conftest import TWINS


def as_array(framework, x, dtype=None):
    import mlx.core as mx

    return torch.tensor(x, dtype=dtype or torch.float32) if framework == "torch" else mx.array(np.array(x))


def module(framework):
    return common if framework == "torch" else common_mlx


def value(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.array(x)


@pytest.mark.parametrize("framework", TWINS)
def test_kl_k3_direction(framework):
    # pi = 0.5, ref = 0.25: d = log(ref / pi) = -log 2; k3 = e^d - d - 1 = 0.5 + log 2 - 1 (the reversed
    # direction would give 2 - log 2 - 1 = 0.307)
    lp, ref = as_array(framework, [[math.log(0.5)]]), as_array(framework, [[math.log(0.25)]])
    kl = module(framework).kl_k3(lp, ref)
    assert value(kl).item() == pytest.approx(math.log(2) - 0.5, abs=1e-6)


@pytest.mark.parametrize("framework", TWINS)
def test_cliprange_high_is_the_upper_bound(framework):
    # ratio 1.5, A = +2: clipped at 1 + 0.28, loss -1.28 * 2; A = -2: the unclipped side wins, -(1.5 * -2)
    lp, old = as_array(framework, [[math.log(1.5)], [math.log(1.5)]]), as_array(framework, [[0.0], [0.0]])
    adv = as_array(framework, [[2.0], [-2.0]])
    loss, meta = module(framework).compute_grpo_clip_loss(adv, lp, old, cliprange=0.2, cliprange_high=0.28)
    np.testing.assert_allclose(value(loss).ravel(), [-2.56, 3.0], rtol=1e-6)
    assert value(meta["clipped"]).ravel().tolist() == [True, False]
    loss_low, _ = module(framework).compute_grpo_clip_loss(as_array(framework, [[2.0]]),
                                                           as_array(framework, [[math.log(0.5)]]),
                                                           as_array(framework, [[0.0]]), 0.2, 0.28)
    assert value(loss_low).item() == pytest.approx(-0.5 * 2, rel=1e-6)  # ratio 0.5 < 0.8: min picks 0.5 * A


@pytest.mark.parametrize("framework", TWINS)
def test_dpo_loss_orders_chosen_and_rejected(framework):
    # margin = 0.5 * ((-1 - -2) - (-3 - -2)) = 1: loss = -log sigmoid(1) = 0.3133 (swapped: 1.3133)
    c, r, rc, rr = (as_array(framework, [x]) for x in (-1.0, -3.0, -2.0, -2.0))
    loss, margin = module(framework).dpo_loss(c, r, rc, rr, beta=0.5)
    assert value(margin).item() == pytest.approx(1.0)
    assert value(loss).item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


@pytest.mark.parametrize("framework", TWINS)
def test_repetition_penalty_direction(framework):
    # logits (2, 0, 1.5), token 0 seen, penalty 2: 2 -> 1 (positive logits are divided), so greedy picks
    # token 2 with log-prob 1.5 - log(e^1 + e^0 + e^1.5); an inverted penalty would make token 0 win
    logits = as_array(framework, [[2.0, 0.0, 1.5]])
    seen = as_array(framework, [[0]], dtype=torch.long) if framework == "torch" else as_array(framework, [[0]])
    token, lp = module(framework).sample_next_token(logits, seen, harness.Sampling(temperature=0.0,
                                                                                   repetition_penalty=2.0))
    assert value(token).item() == 2
    assert value(lp).item() == pytest.approx(1.5 - math.log(math.e + 1 + math.exp(1.5)), abs=1e-6)
    # a negative logit is multiplied: (-1, 0.5), token 0 seen, penalty 2 -> (-2, 0.5)
    token, lp = module(framework).sample_next_token(as_array(framework, [[-1.0, 0.5]]), seen,
                                                    harness.Sampling(temperature=0.0, repetition_penalty=2.0))
    assert value(lp).item() == pytest.approx(0.5 - math.log(math.exp(-2) + math.exp(0.5)), abs=1e-6)


def test_answer_ends_at_the_first_closing_tag():
    out = rewards.r1_zero_reward_fn("3 + 1 = 4 </think> <answer>4</answer> and more </answer>", "4")
    assert out["reward"] == 1.0
    out = rewards.r1_zero_reward_fn("</think> <answer>5</answer> <answer>4</answer>", "4")
    assert out["reward"] == 0.0  # the first answer counts


def _load(framework, path):
    if framework == "torch":
        return common.load_model(path, torch.device("cpu"), torch.float32)
    import mlx.core as mx

    return common_mlx.load_model(path, common_mlx.pick_device("cpu"), mx.float32)


def _sharpen(framework, model, ids, factor=5.0, pad_id=2):
    """Scale the tied embeddings (the random model's logits go from ~0.1 to ~1) and give the
    pad token (a zero row: logit 0, which no penalty changes) the row of the runner-up token
    after `ids`: then penalizing the pad visibly changes the greedy token's log-prob."""
    if framework == "torch":
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight.mul_(factor)
            runner_up = model(torch.tensor([ids])).logits[0, -1].argsort(descending=True)[1]
            weight[pad_id] = weight[runner_up]
    else:
        import mlx.core as mx

        model.model.embed_tokens.weight = model.model.embed_tokens.weight * factor
        runner_up = mx.argsort(-model(mx.array([ids]))[0, -1])[1].item()
        weight = model.model.embed_tokens.weight
        weight[pad_id] = weight[runner_up]
        model.model.embed_tokens.weight = weight


@pytest.mark.parametrize("framework", TWINS)
def test_generation_stops_at_a_stop_string(char_model_dir, framework):
    # the char model writes one character per token: greedy text t, then the same run with stop t[2:4]
    # must end right after the first occurrence of that stop string, keeping it
    model, tokenizer = _load(framework, char_model_dir)
    prompt = ["User: 12 + 34\nAssistant: <think>"]
    free = module(framework).generate(model, tokenizer, prompt, harness.Sampling(max_new_tokens=12, temperature=0.0,
                                                                                 stop=()))[0]
    text = free["response"]
    assert len(text) >= 6
    stop = text[2:4]
    stopped = module(framework).generate(model, tokenizer, prompt, harness.Sampling(max_new_tokens=12,
                                                                                    temperature=0.0, stop=(stop,)))[0]
    assert stopped["response"] == text[: text.index(stop) + len(stop)]
    assert not stopped["truncated"]


@pytest.mark.parametrize("framework", TWINS)
def test_repetition_penalty_ignores_the_batch_padding(char_model_dir, framework):
    # a short prompt batched with a long one sits behind pad tokens; with a repetition penalty its
    # samples must be what it gets alone (greedy, so the same tokens and log-probs)
    model, tokenizer = _load(framework, char_model_dir)
    head = "A long shared instruction. User: "
    short, long = head + "1+2", head + "10 + 20 + 30 + 40 + 50"
    _sharpen(framework, model, tokenizer.encode(short, add_special_tokens=False))
    sampling = harness.Sampling(max_new_tokens=6, temperature=0.0, repetition_penalty=1.8, stop=())
    gen = module(framework).generate
    alone = gen(model, tokenizer, [short], sampling)[0]
    batched = gen(model, tokenizer, [short, long], sampling)[0]
    assert batched["response_ids"] == alone["response_ids"]
    np.testing.assert_allclose(batched["log_probs"], alone["log_probs"], atol=1e-5)


def test_microbatch_cut_and_length_order():
    # rows' last response tokens at columns 2 and 3 -> cut after column 3 (width 4 of 6);
    # no response token anywhere -> keep the whole width
    mask = [[False, True, True, False, False, False], [False, False, True, True, False, False]]
    assert harness.response_end(mask) == 4
    assert harness.response_end([[False] * 6]) == 6
    # lengths 5, 2, 9, 2 -> rows longest first (9, 5, 2, 2), the two 2s in their given order (3 before 1 here)
    assert harness.length_sorted([0, 3, 1, 2], [5, 2, 9, 2]) == [2, 0, 3, 1]
