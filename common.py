"""Shared PyTorch math for nanoalign: tokenization, log-probs, losses, advantages, rollouts.

The math functions are pure (tensors in, tensors out) and follow the CS336 (2025)
assignment 5 interface; common_mlx.py has the same functions on mx.array. grpo.py writes
its objective out in `policy_loss` (tests/test_twins.py checks it against the functions
here, a second implementation). Below them, the setup helpers every torch script shares
(device, dtype, model loading) and the batched KV-cache sampler used for rollouts and
evaluation.
"""

import contextlib
import functools
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import harness
import machine
import rewards
import tasks

# ----------------------------------------------------------------------------- tokenization


def tokenize_prompt_and_output(prompt_strs, output_strs, tokenizer):
    """Tokenize prompts and outputs separately, join, right-pad with the pad id.
    Returns input_ids, labels (B, L-1) long and response_mask (B, L-1) bool, True where
    the label is an output token."""
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_strs]
    output_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in output_strs]
    return join_prompt_and_output_ids(prompt_ids, output_ids, tokenizer.pad_token_id)


def join_prompt_and_output_ids(prompt_ids, output_ids, pad_id):
    """tokenize_prompt_and_output on lists of token ids (rollouts are already tokenized)."""
    rows = [p + o for p, o in zip(prompt_ids, output_ids)]
    L = max(len(r) for r in rows)
    padded = torch.full((len(rows), L), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        padded[i, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        mask[i, len(p) : len(p) + len(o)] = True
    return {"input_ids": padded[:, :-1], "labels": padded[:, 1:], "response_mask": mask[:, 1:]}


# ----------------------------------------------------------------------------- log-probs


def compute_entropy(logits):
    """Entropy of softmax(logits) over the last axis. (..., V) -> (...).
    H = sum -p log p, with p = softmax(z) (exact at huge logits) and entr(0) = 0, so -inf
    entries (masked tokens, probability 0) contribute 0, not NaN. Two passes over V: a third
    of the time of logsumexp(z) - sum softmax(z) * z, which a rollout pays at every step."""
    return torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)


def get_response_log_probs(model, input_ids, labels, return_token_entropy=False, shared_prefix=0, temperature=1.0,
                           score_from=0):
    """log p(labels | prefix) under a causal LM. input_ids, labels (B, T) -> log_probs (B, T)
    [and token_entropy (B, T)]. log p = z[label] - logsumexp(z), no full log-softmax copy.
    shared_prefix=K (rows identical in their first K tokens, e.g. the r1_zero instructions):
    those K tokens go through the model once and their KV cache is shared by every row;
    same result, gradients included, at a fraction of the cost. temperature=T: log-probs of
    softmax(z / T), the distribution a rollout at temperature T was sampled from, so that
    the policy gradient is that of the sampling policy (1.0: the model's own).
    score_from=S: positions before S are not scored (log-prob and entropy 0 there) and the LM
    head, a 49k-wide fp32 matmul per position, runs only on positions S.. (pass the first
    response position: the loss looks nowhere else)."""
    T = input_ids.shape[1]
    S = min(score_from, T - 1)
    if shared_prefix <= 0 or _sharded(model):  # FSDP: one forward a microbatch, the same count on every process
        return _scored(_last_log_probs(model, input_ids, labels[:, S:], return_token_entropy, temperature), S)
    from transformers import DynamicCache

    B, K, cache = input_ids.shape[0], shared_prefix, DynamicCache()
    if S >= K and torch.is_grad_enabled():  # nothing scored in the prefix: only its KV is needed
        cache = _prefix_replayed_in_backward(model, input_ids[:1, :K])
    else:
        with _no_checkpointing(model):  # the prefix is one row: its activations are kept, its KV written once
            head = model(input_ids[:1, :K], past_key_values=cache, use_cache=True,
                         logits_to_keep=max(1, K - S)).logits[0]
    cache.batch_repeat_interleave(B)  # differentiable copy: gradients flow back into the prefix
    _read_only(cache)  # the tail reads the prefix's KV and appends nothing to it
    tail_from = max(S, K)  # first scored position inside the tail
    out = _scored(_last_log_probs(model, input_ids[:, K:], labels[:, tail_from:], return_token_entropy, temperature,
                                  past_key_values=cache, use_cache=False), tail_from - K)
    if S >= K:  # nothing scored in the prefix
        return _scored(out, K)
    # the prefix positions' distributions are the same in every row: normalize them once
    head, positions = _tempered(head.float(), temperature), torch.arange(S, K)  # head: (K - S, V)
    head_log_probs = head[positions - S, labels[:, S:K]] - torch.logsumexp(head, dim=-1)  # (B, K - S)
    out["log_probs"] = torch.cat([head_log_probs, out["log_probs"]], 1)
    if return_token_entropy:
        with torch.no_grad():
            out["token_entropy"] = torch.cat([compute_entropy(head).expand(B, K - S), out["token_entropy"]], 1)
    return _scored(out, S)


def _last_log_probs(model, input_ids, labels, return_token_entropy, temperature, **kwargs):
    """Run the model on input_ids (B, T) and score labels (B, n) at its last n positions:
    {"log_probs": (B, n)[, "token_entropy": (B, n)]}. For a plain linear LM head (Llama,
    Mistral, Qwen) _HeadLogProbs computes them without the (B, n, V) logits; for any other
    head (soft-capped, scaled, sharded, LoRA on the head) through the model's own logits."""
    n, head = labels.shape[1], model.get_output_embeddings()
    plain = (type(head) is torch.nn.Linear and model.config.model_type in _PLAIN_HEAD_MODELS
             and not _sharded(model))
    if not plain:
        logits = model(input_ids, logits_to_keep=n, **kwargs).logits
        return _log_probs_from_logits(_tempered(logits, temperature), labels, return_token_entropy)
    hidden = model.get_decoder()(input_ids, **kwargs).last_hidden_state[:, -n:]  # (B, n, d)
    B, d = hidden.shape[0], hidden.shape[-1]
    log_probs, entropy = _HeadLogProbs.apply(hidden.float().reshape(B * n, d), head.weight, head.bias,
                                             labels.reshape(B * n), temperature, return_token_entropy)
    out = {"log_probs": log_probs.view(B, n)}
    if return_token_entropy:
        out["token_entropy"] = entropy.view(B, n)
    return out


_PLAIN_HEAD_MODELS = ("llama", "mistral", "qwen2", "qwen3")  # their logits are lm_head(hidden), nothing after


class _HeadLogProbs(torch.autograd.Function):
    """log p(y) and entropy under softmax(z / T), z = h Wᵀ + b, for N positions, `chunk` at a
    time: the (N, V) logits never exist whole (16 rollouts x 64 tokens: 200 MB, and as much
    again for their gradient). The forward keeps logsumexp(z / T) per position; the backward
    recomputes each chunk's logits, one more LM-head matmul, and applies
    d log p(y) / dz = (onehot(y) - softmax(z / T)) / T.
    hidden (N, d), weight (V, d), bias (V,) or None, labels (N,) -> log_probs (N,), entropy (N,)."""

    chunk = 256  # positions: 50 MB of fp32 logits at V = 49k

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, with_entropy):
        log_probs, entropy, lse = [], [], []
        w, b = _head_in(hidden, weight, bias)
        with torch.autocast(hidden.device.type, enabled=False):  # the head in fp32, as the model's own
            for h, y in zip(hidden.split(_HeadLogProbs.chunk), labels.split(_HeadLogProbs.chunk)):
                z = _tempered(F.linear(h, w, b), temperature)  # (chunk, V)
                lse.append(torch.logsumexp(z, dim=-1))
                log_probs.append(z.gather(-1, y[:, None])[:, 0] - lse[-1])
                if with_entropy:
                    entropy.append(compute_entropy(z))
        ctx.save_for_backward(hidden, weight, bias, labels, torch.cat(lse))
        ctx.temperature = temperature
        entropy = torch.cat(entropy) if with_entropy else hidden.new_zeros(0)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(log_probs), entropy

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        w, b = _head_in(hidden, weight, bias)
        grad_weight = torch.zeros_like(w) if need_weight else None
        grad_bias = torch.zeros_like(b) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, hidden.shape[0], _HeadLogProbs.chunk):
                h, y = hidden[i : i + _HeadLogProbs.chunk], labels[i : i + _HeadLogProbs.chunk, None]
                g = grad_log_probs[i : i + _HeadLogProbs.chunk, None]  # (chunk, 1)
                z = _tempered(F.linear(h, w, b), ctx.temperature)
                grad_z = z.sub_(lse[i : i + _HeadLogProbs.chunk, None]).exp_().mul_(-g)  # -g softmax(z / T), in place
                grad_z = _tempered(grad_z.scatter_add_(-1, y, g), ctx.temperature)  # + g onehot(y); through z / T
                if need_hidden:
                    grad_hidden[i : i + _HeadLogProbs.chunk] = grad_z @ w
                if need_weight:
                    grad_weight.addmm_(grad_z.T, h)
                if need_bias:
                    grad_bias += grad_z.sum(0)
        grad_weight = grad_weight if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = grad_bias if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _head_in(hidden, weight, bias):
    """The head's weight and bias in the hidden states' dtype (fp32: a bf16-weight model too)."""
    return weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)


def _prefix_replayed_in_backward(model, prefix_ids):
    """The KV cache of prefix_ids (1, K), computed without a graph; its keys and values are
    leaves. Once the backward pass has given every one of them its gradient, the prefix runs
    again, with a graph, and passes those gradients on into the weights. Same gradients as one
    graph through both passes, less memory: autograd holds a weight's gradient from the tail
    until the weight's other use, the prefix, has sent its own (at the very end of the
    backward pass), an fp32 copy of every weight (0.5 GB at 135M); and the prefix's
    activations (under autocast, bf16 copies of every weight: 0.2 GB) are not kept meanwhile.
    The cost: the prefix's forward twice, one row of K tokens. Gradients reach the weights
    through .backward(); torch.autograd.grad would miss the prefix's share."""
    from transformers import DynamicCache

    def prefix_kv(cache):
        with _no_checkpointing(model):
            model.get_decoder()(prefix_ids, past_key_values=cache, use_cache=True)
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]

    cache = DynamicCache()
    with torch.no_grad():
        leaves = [t.requires_grad_() for t in prefix_kv(cache)]
    grads = [None] * len(leaves)  # the hooks hold these, not the leaves: no reference cycle through autograd's
    # C++ nodes, which Python's collector cannot see (torch.autograd.graph.register_multi_grad_hook makes
    # one, and a run leaked every microbatch's prefix KV)

    def keep(i, grad):
        grads[i] = grad
        if all(g is not None for g in grads):  # the last one: go through the prefix with all of them
            with torch.enable_grad():
                kv = prefix_kv(DynamicCache())
            # the KV a graph reaches (not a first layer's keys, say, where its projection and the embedding are frozen)
            reached = [(t, g) for t, g in zip(kv, grads) if t.requires_grad]
            if reached:
                torch.autograd.backward(*zip(*reached))
            grads[:] = [None] * len(grads)

    for i, leaf in enumerate(leaves):
        leaf.register_hook(functools.partial(keep, i))
    return cache


def _read_only(cache):
    """The tail's layers read the prefix's KV without appending to it: a layer run twice (a
    replay under activation checkpointing) sees the same prefix the first run saw."""
    for layer in cache.layers:  # the closure holds the prefix's tensors, not the layer: no reference
        # cycle, so the prefix's KV (~70 MB a 16-row microbatch) is freed with the graph, not at the next gc
        layer.update = lambda k, v, *args, _k=layer.keys, _v=layer.values, **kwargs: (torch.cat([_k, k], -2),
                                                                                       torch.cat([_v, v], -2))


@contextlib.contextmanager
def _no_checkpointing(model):
    """Activation checkpointing off inside the block, back on after it (a no-op for a model
    that never had it enabled: see _checkpoint_layers)."""
    layers = [m for m in model.modules() if getattr(m, "_nanoalign_checkpointing", False)]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


def _scored(out, n_skipped):
    """Left-pad each (B, t) tensor in out with n_skipped zero columns: the unscored positions."""
    if n_skipped == 0:
        return out
    return {k: F.pad(v, (n_skipped, 0)) for k, v in out.items()}


def _tempered(logits, temperature):
    """logits / T; T = 0 (greedy decoding) samples from no distribution: the model's own is used."""
    return logits if temperature in (0, 1) else logits / temperature


def _log_probs_from_logits(logits, labels, return_token_entropy, chunk=512):
    """log p(label) and entropy from (B, T, V) logits, `chunk` positions at a time: the
    V-wide temporaries of logsumexp and the entropy (each as large as the logits, ~6 for the
    entropy) exist for one chunk, not the batch (16 rollouts x 80 tokens: 250 MB each)."""
    B, T, V = logits.shape
    z, y = logits.float().reshape(B * T, V).split(chunk), labels.reshape(B * T, 1).split(chunk)
    out = {"log_probs": torch.cat([zc.gather(-1, yc)[:, 0] - torch.logsumexp(zc, dim=-1) for zc, yc in zip(z, y)])}
    if return_token_entropy:
        with torch.no_grad():
            out["token_entropy"] = torch.cat([compute_entropy(zc) for zc in z])
    return {k: v.view(B, T) for k, v in out.items()}


# ----------------------------------------------------------------------------- normalization


def masked_normalize(tensor, mask, dim=None, normalize_constant=1.0):
    """Sum of tensor*mask over dim (all when None) / normalize_constant."""
    masked = tensor * mask
    return (masked.sum() if dim is None else masked.sum(dim)) / normalize_constant


def masked_mean(tensor, mask, dim=None):
    """Mean of tensor over mask entries along dim (all when None); 0/0 = NaN stays NaN."""
    mask = mask.to(tensor.dtype)
    if dim is None:
        return (tensor * mask).sum() / mask.sum()
    return (tensor * mask).sum(dim) / mask.sum(dim)


# ----------------------------------------------------------------------------- SFT


def sft_microbatch_train_step(policy_log_probs, response_mask, gradient_accumulation_steps, normalize_constant=1.0):
    """SFT loss on a microbatch, backward, scaled loss back. log_probs, mask (B, T).
    loss = -mean_b[ sum_t(logp * mask) / normalize_constant ] / grad_accum."""
    per_example = masked_normalize(policy_log_probs, response_mask, dim=-1, normalize_constant=normalize_constant)
    loss = -per_example.mean() / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), {}


# ----------------------------------------------------------------------------- GRPO


def compute_group_normalized_rewards(
    reward_fn, rollout_responses, repeated_ground_truths, group_size, advantage_eps, normalize_by_std
):
    """Rewards for B rollouts in consecutive groups of group_size -> advantages (B,), raw (B,).
    A = r - mean_group(r), then / (std_group(r) + eps) when normalize_by_std (unbiased std)."""
    scores = [reward_fn(r, g) for r, g in zip(rollout_responses, repeated_ground_truths)]
    raw_rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)  # (B,)
    advantages = group_normalize(raw_rewards, group_size, advantage_eps, normalize_by_std)
    grouped = raw_rewards.view(-1, group_size)
    metadata = {
        "reward_mean": raw_rewards.mean().item(),
        "reward_std": raw_rewards.std().item() if len(raw_rewards) > 1 else 0.0,
        "reward_max": raw_rewards.max().item(),
        "reward_min": raw_rewards.min().item(),
        "format_reward": float(np.mean([s["format_reward"] for s in scores])),
        "answer_reward": float(np.mean([s["answer_reward"] for s in scores])),
        "zero_std_frac": (grouped.std(-1) == 0).float().mean().item() if group_size > 1 else 1.0,
    }
    return advantages, raw_rewards, metadata


def group_normalize(raw_rewards, group_size, advantage_eps, normalize_by_std):
    """(B,) rewards in consecutive groups -> (B,) advantages r - mean [/ (std + eps)]."""
    grouped = raw_rewards.view(-1, group_size)  # (n_groups, G)
    advantages = grouped - grouped.mean(-1, keepdim=True)
    if normalize_by_std:
        advantages = advantages / (grouped.std(-1, keepdim=True) + advantage_eps)
    return advantages.reshape(-1)


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages, policy_log_probs):
    """Per-token REINFORCE loss. A (B, 1), log_probs (B, T) -> (B, T): -A * log p."""
    return -raw_rewards_or_advantages * policy_log_probs


def compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange, cliprange_high=None):
    """Per-token PPO/GRPO clipped loss. A (B, 1), log_probs (B, T) -> (B, T), metadata.
    ratio = exp(logp - old); loss = -min(ratio*A, clip(ratio, 1-c, 1+c_high)*A)."""
    high = cliprange if cliprange_high is None else cliprange_high
    ratio = torch.exp(policy_log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - cliprange, 1 + high) * advantages
    return -torch.minimum(unclipped, clipped), {"clipped": (clipped < unclipped).detach()}


def compute_gspo_loss(advantages, policy_log_probs, old_log_probs, response_mask, cliprange, cliprange_high=None):
    """GSPO: one importance ratio per sequence, s = exp(mean_t(logp - old)), clipped like
    PPO. A (B, 1), log_probs (B, T) -> per-token loss (B, T) (the sequence loss on every
    token, so a per-sequence mean recovers it), metadata."""
    high = cliprange if cliprange_high is None else cliprange_high
    n_tokens = response_mask.sum(-1).clamp(min=1)  # an empty row gets ratio 1, not 0/0
    log_ratio = masked_normalize(policy_log_probs - old_log_probs, response_mask, -1, n_tokens).unsqueeze(-1)  # (B, 1)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - cliprange, 1 + high) * advantages
    loss = -torch.minimum(unclipped, clipped).expand_as(policy_log_probs)
    return loss, {"clipped": (clipped < unclipped).expand_as(policy_log_probs).detach()}


def kl_k3(policy_log_probs, ref_log_probs):
    """Per-token KL(pi || ref) estimate (Schulman's k3): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    delta = ref_log_probs - policy_log_probs
    return torch.exp(delta) - delta - 1


RATIO_LOSSES = ("grpo_clip", "dr_grpo", "dapo", "bnpo", "gspo")  # need old log-probs
TOKEN_SUM_LOSSES = ("dr_grpo", "dapo", "bnpo")  # aggregated as sum over tokens / a normalizer


def compute_policy_gradient_loss(
    policy_log_probs, loss_type, raw_rewards=None, advantages=None, old_log_probs=None, cliprange=None,
    cliprange_high=None, response_mask=None,
):
    """Dispatch: 'no_baseline' (raw rewards), 'reinforce_with_baseline' (advantages),
    'grpo_clip' (clipped ratio); beyond the course 'dr_grpo', 'dapo', 'bnpo' (grpo_clip
    per token, aggregated differently) and 'gspo' (sequence-level ratio, needs
    response_mask). Returns per-token loss (B, T) and metadata."""
    if loss_type == "no_baseline":
        assert raw_rewards is not None, "no_baseline needs raw_rewards"
        return compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        assert advantages is not None, "reinforce_with_baseline needs advantages"
        return compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}
    if loss_type in RATIO_LOSSES:
        assert advantages is not None and old_log_probs is not None and cliprange is not None
        if loss_type == "gspo":
            return compute_gspo_loss(advantages, policy_log_probs, old_log_probs, response_mask, cliprange, cliprange_high)
        return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange, cliprange_high)
    raise ValueError(f"unknown loss_type {loss_type!r}: expected no_baseline, reinforce_with_baseline, "
                     f"{', '.join(RATIO_LOSSES)}")


def grpo_microbatch_train_step(
    policy_log_probs,
    response_mask,
    gradient_accumulation_steps,
    loss_type,
    raw_rewards=None,
    advantages=None,
    old_log_probs=None,
    cliprange=None,
    cliprange_high=None,
    ref_log_probs=None,
    beta=0.0,
    loss_normalizer=None,
):
    """Policy-gradient loss on a microbatch, backward, scaled loss back.
    loss = mean_b[ masked_mean_t(per_token_loss) ] / grad_accum; for dr_grpo / dapo /
    bnpo instead sum_{b,t}(per_token_loss) / loss_normalizer (the caller's constant, the
    optimizer batch's or the microbatch's token count x grad_accum). With beta > 0 the
    per-token k3 KL to ref_log_probs is added first."""
    per_token, metadata = compute_policy_gradient_loss(
        policy_log_probs, loss_type, raw_rewards, advantages, old_log_probs, cliprange, cliprange_high, response_mask
    )
    if beta > 0:
        kl = kl_k3(policy_log_probs, ref_log_probs)
        per_token = per_token + beta * kl
        metadata["kl"] = masked_mean(kl.detach(), response_mask)
    if loss_type in TOKEN_SUM_LOSSES:
        loss = masked_normalize(per_token, response_mask, normalize_constant=loss_normalizer)
    else:
        # a row with no response tokens (--mask-truncated) contributes 0, not 0/0
        per_row = masked_normalize(per_token, response_mask, -1, response_mask.sum(-1).clamp(min=1))
        loss = per_row.mean() / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), metadata


# ----------------------------------------------------------------------------- SFT data


class PackedSFTDataset(torch.utils.data.Dataset):
    def __init__(self, stream, seq_length):
        self.stream, self.L = stream, seq_length

    def __len__(self):
        return (len(self.stream) - 1) // self.L

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        chunk = self.stream[i * self.L : (i + 1) * self.L + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


def get_packed_sft_dataset(tokenizer, dataset_path, seq_length, shuffle):
    """JSONL of {prompt, response} -> packed Dataset of {input_ids, labels} (L,) long.
    Each document is BOS + Alpaca text + EOS; documents (shuffled when asked) are joined."""
    rows = tasks.read_jsonl(dataset_path, "sft")
    if shuffle:
        random.shuffle(rows)
    stream = []
    for row in rows:
        text = tasks.ALPACA_PROMPT.format(instruction=row["prompt"], response=row["response"])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return PackedSFTDataset(torch.tensor(stream, dtype=torch.long), seq_length)


def iterate_batches(dataset, batch_size, shuffle):
    """One epoch of (batch, L) batches (the last may be short)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


# ----------------------------------------------------------------------------- DPO


def sequence_log_prob(model, input_ids, mask):
    """Sum of log p(token | prefix) over the positions where mask (B, T) is True, with
    input_ids (B, T+1). -> (B,)."""
    log_probs = get_response_log_probs(model, input_ids[:, :-1], input_ids[:, 1:])["log_probs"]
    return (log_probs * mask).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Batched DPO loss from sequence log-probs (B,): -log sigmoid(beta * (dc - dr)),
    dc = logpi(c) - logpi_ref(c), dr likewise. Returns per-pair loss (B,) and the margin."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


def compute_per_instance_dpo_loss(lm, lm_ref, tokenizer, beta, prompt, response_chosen, response_rejected):
    """DPO loss of one preference pair, each formatted with the Alpaca template + EOS;
    full-sequence log-probs under lm and lm_ref. -> scalar."""
    texts = [
        tasks.ALPACA_PROMPT.format(instruction=prompt, response=r) + tokenizer.eos_token
        for r in (response_chosen, response_rejected)
    ]
    ids = [torch.tensor(tokenizer(t)["input_ids"], dtype=torch.long).unsqueeze(0) for t in texts]

    def full_log_prob(model, x):
        device = next(model.parameters()).device
        x = x.to(device)
        return sequence_log_prob(model, x, torch.ones_like(x[:, 1:], dtype=torch.float32)).squeeze(0)

    chosen, rejected = (full_log_prob(lm, x) for x in ids)
    with torch.no_grad():
        ref_chosen, ref_rejected = (full_log_prob(lm_ref, x).to(chosen.device) for x in ids)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)[0]


# ----------------------------------------------------------------------------- setup helpers


def pick_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def _cpu_bf16_speedup():
    """How many times faster this CPU multiplies bf16 than fp32 matrices: 128 x 512 x 512
    products, the two dtypes interleaved, the best of 6 each (the first round warms both up),
    on one thread (so another job on the cores cannot starve a worker thread of one side).
    Well under a second even where bf16 is emulated. Measured, not read from CPU flags: CPUs
    with the same flags gave 3.5x and 0.3x."""
    a, b = torch.randn(128, 512), torch.randn(512, 512)
    a16, b16 = a.bfloat16(), b.bfloat16()
    fp32, bf16 = _best_seconds([lambda: a @ b, lambda: a16 @ b16], rounds=6)
    return fp32 / bf16


@functools.cache
def _cpu_attention_speedup(dtype):
    """How many times faster a decode step's attention runs written out (_grouped_attention:
    q·kᵀ, softmax, ·v) than in PyTorch's fused SDPA kernel as transformers calls it (each
    key/value head copied for the 3 query heads that read it), in `dtype` on this CPU: 64 rows,
    9 query and 3 key/value heads, one query against 160 cached positions, the two
    interleaved, the best of 5 each, on one thread. In bf16 on the 2-core AMD EPYC: 5-12x
    (16.8 ms against 1.3 ms in one run), and 8 x 64 bf16 rollouts made 200 tokens/s written out
    against transformers' 128 with SDPA; on the Intel Xeon with AMX: 3.5x in bf16, 9.4x in
    fp32, where 64-row fp32 rollouts went from 229 to 304-329 tokens/s (results/speed)."""
    q, k, v = (torch.randn(64, h, n, 64, dtype=dtype) for h, n in ((9, 1), (3, 160), (3, 160)))
    mask = torch.zeros(64, 1, 1, 160, dtype=dtype)
    mask[:, :, :, 100:110] = -float("inf")  # a pad run, as in a batch of rollouts

    def written_out():
        return _grouped_attention(None, q, k, v, mask, 1 / 8)

    def fused():
        heads_per_group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(heads_per_group, 1),
                                              v.repeat_interleave(heads_per_group, 1), attn_mask=mask)

    written_out_s, fused_s = _best_seconds([written_out, fused], rounds=5)
    return fused_s / written_out_s


@functools.cache
def _register_grouped_attention():
    """Register _grouped_attention with transformers (once) and return its name there, for
    from_pretrained(attn_implementation=...) or model.set_attn_implementation(...)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("nanoalign", _grouped_attention)
    AttentionMaskInterface.register("nanoalign", eager_mask)  # the additive 0 / -inf mask eager takes
    return "nanoalign"


def _grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention (q·kᵀ·scaling + mask, softmax in fp32, ·v) without its
    copies. With grouped-query attention (SmolLM2: 9 query heads, 3 key/value heads) eager
    first copies each key/value head once per query head that reads it: in a decode step that
    is the whole KV cache, copied again in every layer at every step (a third of a bf16
    rollout's time here). Instead the query heads of a group share one matmul as extra rows.
    Same arithmetic; load_model registers it with transformers as "nanoalign".
    It runs in fp32 even under autocast: queries and keys leave the rotary embedding in fp32
    (its cos / sin are fp32), so autocast would cast the whole cached keys and values to bf16
    again at every decode step; fp32 matmuls read them in place (rollouts +8%, results/speed).
    A whole fp32 sequence goes to PyTorch's fused kernel, told of the groups (no copies).
    Keys and values as a rollout's cache gives them (Prefixed: the prompts' common prefix
    held once for every row) go to _prefixed_attention."""
    if isinstance(key, Prefixed):
        with torch.autocast(query.device.type, enabled=False):
            return _prefixed_attention(query.to(key.rows.dtype), key, value, attention_mask, scaling)
    if torch.is_autocast_enabled(query.device.type):  # see the docstring's last lines
        with torch.autocast(query.device.type, enabled=False):
            return _written_out_attention(module, query.float(), key.float(), value.float(), attention_mask,
                                          scaling, dropout)
    if query.shape[2] > 1 and query.dtype == torch.float32:  # a whole sequence (prefill, training) in fp32:
        # PyTorch's fused kernel, which reads each key/value head for its group without copies, was faster
        # there (training forward + backward 9.1-9.9 s against 11.8, 16 x 170 tokens, results/speed)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             dropout_p=dropout, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return _written_out_attention(module, query, key, value, attention_mask, scaling, dropout)


class Prefixed(tuple):
    """Keys (or values) of a rollout batch whose prompts share a prefix: (prefix, rows), the
    prefix's (1, groups, K, D) once for every row, then each row's own (B, groups, L, D)."""

    prefix, rows = property(lambda self: self[0]), property(lambda self: self[1])


def _prefixed_attention(query, key, value, attention_mask, scaling):
    """_written_out_attention over [prefix | row] keys without copying the prefix to every row:
    the prefix's scores and weighted values are one matmul per group over all the batch's
    query rows. The cache holds the prefix once (the r1_zero instructions: ~100 of a rollout's
    ~165 positions), so a decode step reads it once, not once a row (results/speed)."""
    B, H, Q, D = query.shape
    groups, K = key.rows.shape[1], key.prefix.shape[2]
    q = query.reshape(B, groups, H // groups * Q, D)  # (B, groups, rows, D), as in _written_out_attention
    per_group = q.transpose(0, 1).reshape(groups, -1, D)  # (groups, B x rows, D)
    prefix_scores = (per_group @ key.prefix[0].transpose(1, 2)).view(groups, B, -1, K).transpose(0, 1)
    scores = torch.cat([prefix_scores, q @ key.rows.transpose(2, 3)], -1) * scaling  # (B, groups, rows, K + L)
    probs = _attention_probs(scores, attention_mask, Q)
    from_prefix = probs[..., :K].transpose(0, 1).reshape(groups, -1, K) @ value.prefix[0]  # (groups, B x rows, D)
    out = probs[..., K:] @ value.rows + from_prefix.view(groups, B, -1, D).transpose(0, 1)
    return out.view(B, H, Q, D).transpose(1, 2).contiguous(), None


def _attention_probs(scores, attention_mask, Q):
    """softmax(scores + mask) in fp32, back in the scores' dtype. scores (B, groups, heads of a
    group x Q, T), a group's query heads stacked as rows; attention_mask (B, 1, Q, T), 0 or
    -inf, the same for every head."""
    if attention_mask is not None:
        B, groups, rows, T = scores.shape
        scores = (scores.view(B, groups, rows // Q, Q, T) + attention_mask[:, :, None]).view(scores.shape)
    return torch.softmax(scores, -1, dtype=torch.float32).to(scores.dtype)


def _written_out_attention(module, query, key, value, attention_mask, scaling, dropout):
    B, H, Q, D = query.shape
    groups = key.shape[1]
    scores = query.reshape(B, groups, H // groups * Q, D) @ key.transpose(2, 3) * scaling  # (B, groups, rows, T)
    probs = _attention_probs(scores, attention_mask, Q)
    if dropout > 0:  # transformers passes the model's attention dropout while training, else 0
        probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).view(B, H, Q, D).transpose(1, 2).contiguous(), None


def _best_seconds(fns, rounds):
    """The best of `rounds` timings of each function, interleaved (the first round warms
    them all up), on one thread: another job on the cores cannot starve a worker thread of
    one side. For the start-up checks above."""
    best = [float("inf")] * len(fns)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            for i, f in enumerate(fns):
                t0 = time.perf_counter()
                f()
                best[i] = min(best[i], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best


def pick_dtype(name, device):
    """The dtype the matmuls run in. 'auto': bf16 on CUDA (fp16 without bf16 support); on
    a CPU, bf16 where a quick measurement finds it at least 1.5x faster than fp32, else
    fp32. Weights stay fp32 either way (see load_model)."""
    if name != "auto":
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_bf16_speedup() >= 1.5:
        return torch.bfloat16
    return torch.float32


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model(model_name, device, dtype, cache=None):
    """(model, tokenizer) from a local HF dir, the embedded default or a hub id.
    Mixed precision when dtype is not fp32: the weights (and so the optimizer's updates)
    stay fp32, since a bf16 weight drops any update below 1/256 of itself (lr 1e-5 would
    change nothing); the transformer body runs under autocast in dtype; the output layer
    and the log-softmax run in fp32, so log-probs keep fp32 precision."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = machine.resolve_model(model_name, cache)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # attention: written out (_grouped_attention) where a quick check finds PyTorch's SDPA
    # kernel slower at a decode step in this dtype (so far every CPU, fp32 and bf16);
    # elsewhere transformers' default, SDPA
    written_out = device.type == "cpu" and _cpu_attention_speedup(dtype) >= 1.2
    attention = _register_grouped_attention() if written_out else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention).to(device)
    model.compute_dtype = dtype
    if dtype != torch.float32:
        body = model.get_decoder()
        body.forward = torch.autocast(device.type, dtype=dtype)(body.forward)
        model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0].float(), *args[1:]))
    return model, tokenizer


def _autocast(model):
    """A context in which the model's matmuls run in its compute dtype. Around a whole
    generation loop it also keeps the bf16 copies of the weights from one decode step to
    the next (autocast's cast cache lives until the outermost context exits)."""
    dtype = getattr(model, "compute_dtype", torch.float32)
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# ----------------------------------------------------------------------------- rollouts


def sample_next_token(logits, generated, sampling, generator=None):
    """One sampling step. logits (B, V) fp32, generated (B, t) ids seen so far, sampling a
    harness.Sampling. Returns token (B,) and its log-prob under softmax(logits / temperature) (B,)."""
    temperature, top_k, top_p, min_p = sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p
    repetition_penalty = sampling.repetition_penalty
    if repetition_penalty != 1.0 and generated.shape[1] > 0:
        seen = logits.gather(1, generated)
        logits = logits.scatter(1, generated, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    if temperature == 0:  # greedy
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(1, token[:, None]).squeeze(1)
    z = logits / temperature
    z = z - z.max(-1, keepdim=True).values
    mass = z.exp()  # (B, V) unnormalized probabilities
    total = mass.sum(-1, keepdim=True)
    log_probs = z - total.log()  # the policy's sampling distribution, softmax(logits / T)
    # the filters zero the mass of the tokens they drop (the log-probs stay those of the policy)
    if top_k > 0:
        kth = torch.topk(log_probs, min(top_k, log_probs.shape[-1]), dim=-1).values[:, -1:]
        mass = mass.masked_fill(log_probs < kth, 0)
    if top_p < 1.0:
        sorted_mass, order = mass.sort(-1, descending=True)
        drop = sorted_mass.cumsum(-1) - sorted_mass > top_p * total  # keep the smallest prefix reaching top_p
        mass = mass.scatter(1, order, sorted_mass.masked_fill(drop, 0))
    if min_p > 0.0:
        mass = mass.masked_fill(log_probs < log_probs.max(-1, keepdim=True).values + np.log(min_p), 0)
    # inverse CDF: the first token whose cumulative mass reaches u ~ U(0, kept mass], so one
    # random number per row (torch.multinomial draws one per vocabulary entry: 12% of a bf16
    # rollout's time at 49k entries); a token of mass 0 adds nothing and is never picked
    cdf = mass.cumsum(-1)
    u = 1 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)  # (0, 1]
    token = (cdf < u * cdf[:, -1:]).sum(-1)
    return token, log_probs.gather(1, token[:, None]).squeeze(1)


@torch.no_grad()
def generate(model, tokenizer, prompts, sampling, batch_size=64, generator=None):
    """Sample one completion per prompt with a KV cache, batch_size prompts at a time, as
    `sampling` (a harness.Sampling) says.
    Each sequence stops at EOS, at a stop string (kept in the text) or at max_new_tokens.
    Returns dicts: prompt_ids, response_ids, response (text), log_probs (sampling
    log-probs, one per response token), truncated (hit max_new_tokens without stopping),
    entropy (mean next-token entropy over the response).
    This is the whole rollout interface: another engine (vLLM) only has to return the same."""
    results = []
    with _gathered(model):  # under --fsdp: whole weights, once per call on every process
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
            with _autocast(model):
                sampled = _generate_batch(model, tokenizer, prompt_ids, sampling, generator)
            for p_ids, (ids, lps, truncated, entropy) in zip(prompt_ids, sampled):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                results.append({"prompt_ids": p_ids, "response_ids": ids, "response": text, "log_probs": lps,
                                "truncated": truncated, "entropy": entropy})
    return results


def _generate_batch(model, tokenizer, prompt_ids, sampling, generator):
    max_new_tokens, min_new_tokens, stop = sampling.max_new_tokens, sampling.min_new_tokens, sampling.stop
    repetition_penalty = sampling.repetition_penalty
    device, B = next(model.parameters()).device, len(prompt_ids)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = {tokenizer.eos_token_id} | set(config_eos if isinstance(config_eos, list) else [config_eos])
    eos = torch.tensor(sorted(i for i in eos_ids if i is not None), device=device)
    stop_tail = max([len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stop] + [1]) + 2
    # The prompts share a long prefix (the r1_zero instructions): run it once for the batch;
    # its KV cache is held once for every row (_kv_cache's share_prefix, with our attention)
    # or copied to each (transformers' attention). Each row is then [prefix][pad][suffix].
    K = harness.shared_prefix_length(prompt_ids)
    S = max(len(p) - K for p in prompt_ids)
    input_ids = torch.full((B, S), tokenizer.pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros((B, K + S), dtype=torch.long, device=device)
    attention[:, :K] = 1
    for i, p in enumerate(prompt_ids):  # the pad sits between prefix and suffix
        input_ids[i, S - (len(p) - K) :] = torch.tensor(p[K:], dtype=torch.long, device=device)
        attention[i, K + S - (len(p) - K) :] = 1
    # what the repetition penalty sees: each row's own prompt; its pad slots repeat the row's
    # last prompt token (already in the row, so penalized once anyway) rather than the pad id
    history = torch.tensor([p[:K] + [p[-1]] * (S - (len(p) - K)) + p[K:] for p in prompt_ids], device=device)
    history = history if repetition_penalty != 1.0 else history[:, :0]
    out_tokens = torch.zeros((B, 0), dtype=torch.long, device=device)  # (B, t)
    out_lps = torch.zeros((B, 0), device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long)  # where each row stopped
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    entropy_sum = torch.zeros(B, device=device)
    active = torch.arange(B, device=device)  # rows still in the (compacted) batch
    cache = _kv_cache(K + S + max_new_tokens, share_prefix=model.config._attn_implementation == "nanoalign")
    if K > 0:
        prefix = torch.tensor([prompt_ids[0][:K]], dtype=torch.long, device=device)
        model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(B)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, K:]
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits[:, eos] = -float("inf")
        entropy = compute_entropy(logits)  # (b,) of the model's next-token distribution
        token, lp = sample_next_token(logits, history[active] if history.shape[1] else history, sampling, generator)
        step_tokens = torch.full((B,), tokenizer.pad_token_id, dtype=torch.long, device=device)
        step_lps = torch.zeros(B, device=device)
        step_tokens[active], step_lps[active] = token, lp
        entropy_sum[active] += entropy
        out_tokens = torch.cat([out_tokens, step_tokens[:, None]], 1)
        out_lps = torch.cat([out_lps, step_lps[:, None]], 1)
        if repetition_penalty != 1.0:
            history = torch.cat([history, step_tokens[:, None]], 1)
        done = torch.isin(token, eos)
        if stop and t + 1 >= min_new_tokens:
            tails = tokenizer.batch_decode(out_tokens[active, -stop_tail:].tolist())
            done |= torch.tensor([any(s in tail for s in stop) for tail in tails], device=device)
        for row in active[done].tolist():
            lengths[row] = t + 1
        finished[active[done]] = True
        if finished.all() or t + 1 == max_new_tokens:
            break
        keep = ~done
        if not keep.all():  # drop finished rows from the batch and the cache
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            active, token, attention, positions = active[idx], token[idx], attention[idx], positions[idx]
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=token[:, None], attention_mask=attention, position_ids=positions,
                       past_key_values=cache, use_cache=True).logits[:, -1].float()
    return [
        (out_tokens[i, : lengths[i]].tolist(), out_lps[i, : lengths[i]].tolist(), not bool(finished[i]),
         entropy_sum[i].item() / max(1, lengths[i].item()))
        for i in range(B)
    ]


def _kv_cache(capacity, share_prefix=False):
    """transformers' DynamicCache, except that each layer writes a step's keys and values
    into buffers of `capacity` positions made once, not torch.cat into a new tensor holding
    the whole cache (at 64 rows and ~170 positions those copies were ~20% of a bf16 rollout's
    time on the Intel Xeon, results/speed). Attention reads views of the filled part. Both
    buffers take the keys' dtype: fp32 under autocast too (keys leave RoPE in fp32), so the
    fp32 attention reads the values in place as well.
    share_prefix (for an attention that reads Prefixed keys, _grouped_attention): what the
    cache holds when batch_repeat_interleave is called (the prompts' common prefix, one row)
    stays one row, and the layers return Prefixed (prefix, rows) keys and values. A round of
    176 rollouts (~100 prefix and ~80 own positions each) then holds 0.6 GB of fp32 buffers,
    not 1.5, and each decode step reads the prefix once, not once a row."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class Layer(DynamicLayer):
        prefix = None  # the shared prefix's (keys, values), one row each
        offset = property(lambda self: 0 if self.prefix is None else self.prefix[0].shape[2])  # its length

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                B, H, _, D = key_states.shape
                self.dtype, self.device, self.is_initialized, self.length = key_states.dtype, key_states.device, True, 0
                self.buffers = [key_states.new_empty(B, H, capacity, D) for _ in range(2)]
            n, end = self.length - self.offset, self.length - self.offset + key_states.shape[-2]
            self.buffers[0][:, :, n:end], self.buffers[1][:, :, n:end] = key_states, value_states
            self.length += key_states.shape[-2]
            return self._views()

        def get_seq_length(self):
            return self.length if self.is_initialized else 0

        def _views(self):
            own = [b[:, :, : self.length - self.offset] for b in self.buffers]
            self.keys, self.values = own if self.prefix is None else map(Prefixed, zip(self.prefix, own))
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats):  # new buffers for the rows (after the prefix, if shared)
            if self.is_initialized:
                filled = [b[:, :, : self.length] for b in self.buffers]
                if share_prefix:  # the prefix stays one row; each row's own positions start after it
                    self.prefix, filled = filled, [b[:, :, :0] for b in filled]
                for i, f in enumerate(filled):
                    f = f.repeat_interleave(repeats, dim=0)
                    self.buffers[i] = f.new_empty(f.shape[0], f.shape[1], capacity - self.offset, f.shape[3])
                    self.buffers[i][:, :, : f.shape[2]] = f
                self._views()

        def batch_select_indices(self, indices):  # the rows kept close ranks in place (fresh buffers
            if self.is_initialized:  # cost more); rows before the first one that changes stay put
                n = len(indices)
                moved = (indices != torch.arange(n, device=indices.device)).nonzero()
                first = moved[0, 0].item() if len(moved) else n
                for i, b in enumerate(self.buffers):
                    b[first:n, :, : self.length - self.offset] = b[indices[first:], :, : self.length - self.offset]
                    self.buffers[i] = b[:n]
                self._views()

    cache = DynamicCache()
    cache.layer_class_to_replicate = Layer
    return cache


def evaluate(model, tokenizer, examples, reward_fn, sampling, batch_size=64, generator=None, desc="eval"):
    """Generate one answer per example with the r1_zero prompt (as `sampling` says) and grade it.
    Returns (rows, summary): one row per example and the three-category counts."""
    from tqdm import tqdm

    rows, was_training = [], model.training
    model.eval()
    bar = tqdm(total=len(examples), desc=desc, leave=False, disable=not harness.is_main())
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tasks.r1_zero_prompt(ex["question"]) for ex in chunk]
        outs = generate(model, tokenizer, prompts, sampling, batch_size=batch_size, generator=generator)
        for ex, prompt, out in zip(chunk, prompts, outs):
            rows.append({"question": ex["question"], "answer": ex["answer"], "prompt": prompt,
                         "response": out["response"], "length": len(out["response_ids"]), "entropy": out["entropy"],
                         "truncated": out["truncated"], **reward_fn(out["response"], ex["answer"])})
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return rows, rewards.summarize_rewards(rows)


# ----------------------------------------------------------------------------- training state


def add_lora(model, rank, alpha=None, dropout=0.0):
    """Wrap a causal LM with peft LoRA adapters on every linear projection."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95), warmup_steps=0, total_steps=1):
    """AdamW (fused) on the trainable parameters + linear warmup then cosine decay to 10% of lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters (on 2 CPU cores 0.1 s a step instead of 0.33 s)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: harness.lr_factor(s, warmup_steps, total_steps))
    return optimizer, scheduler


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_pretrained(model, tokenizer, path, weights=None):
    """A plain HF directory (safetensors + config + tokenizer) that transformers and
    mlx_lm.load both read; LoRA adapters are merged into a copy first. weights: the state
    dict to write instead of the model's own (an FSDP model's, gathered by _full_weights)."""
    import copy
    import json
    import os

    if hasattr(model, "merge_and_unload"):  # peft
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(path)
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None and "rope_theta" not in config:  # mlx-lm reads only the top-level key
        config["rope_theta"] = rope_theta
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)


def save_checkpoint(out_dir, step, model, tokenizer, optimizer, scheduler, cursor, keep=0):
    """<out_dir>/checkpoints/step_N: HF weights + train_state.pt (optimizer, scheduler, RNG,
    data cursor, step, and for LoRA the adapter weights). Written to a temp dir, fsynced and
    renamed (harness.commit_checkpoint), so a crash mid-save never leaves a half checkpoint
    behind; keeps the last `keep` checkpoints (0: all). Under torchrun process 0 writes it (the
    processes hold the same weights, optimizer and RNG state; under --fsdp every process first
    hands it their shards) and the others return None. The optimizer state is keyed by
    parameter name, so a run resumes with or without --fsdp, in any number of processes."""
    import tempfile

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = _full_weights(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not harness.is_main():
        return None
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
    save_pretrained(model, tokenizer, tmp, weights)
    trainable = {k: v for k, v in model.state_dict().items() if "lora_" in k} if hasattr(model, "peft_config") else None
    state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "cursor": cursor, "step": step,
             "rng": rng_state(), "adapter": trainable}
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    return harness.commit_checkpoint(tmp, final, keep)


def load_train_state(path, model):
    """Restore what save_checkpoint wrote (weights must already be loaded for full
    fine-tuning; LoRA adapters are restored here). Returns the state dict."""
    state = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
    if state.get("adapter"):
        model.load_state_dict(state["adapter"], strict=False)
    set_rng_state(state["rng"])
    return state


def load_policy(args, start_model=None):
    """The model to train and its tokenizer: from the latest checkpoint in args.out_dir when
    --resume finds one (full fine-tuning), else from start_model or args.model; LoRA-wrapped
    when --lora-rank > 0 (its adapters are restored by resume()). Returns model, tokenizer,
    checkpoint path or None."""
    ckpt = harness.latest_checkpoint(args.out_dir) if args.resume else None
    device = pick_device(args.device)
    source = ckpt if ckpt and not args.lora_rank else (start_model or args.model)
    model, tokenizer = load_model(source, device, pick_dtype(args.dtype, device), args.cache_dir)
    if args.lora_rank:
        model = add_lora(model, args.lora_rank)
    model.config.use_cache = False
    if getattr(args, "checkpoint_activations", False):
        _checkpoint_layers(model)
    if getattr(args, "fsdp", False) and dist.is_initialized():
        _shard(model)
    return model, tokenizer, ckpt


def _checkpoint_layers(model):  # torch only, like _read_only and _no_checkpointing: mlx_lm's cache is written in place
    """Activation checkpointing: in training, each decoder layer keeps only its input and runs
    again in the backward pass (one more forward of the body; the training forward's memory
    falls from ~50 KB to ~2 KB a token per layer). transformers drops a KV cache under
    checkpointing, since a layer that writes its cache would write it twice; the shared
    prefix's cache is read-only in the tail (_read_only), so the layers may keep it."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.modules():
        if getattr(layer, "gradient_checkpointing", False):
            layer._can_checkpoint_with_cache = layer._nanoalign_checkpointing = True


def resume(ckpt, model, optimizer, scheduler, cursor=0):
    """Restore optimizer, scheduler, RNG (and LoRA adapters) from a checkpoint -> (step, cursor).
    Without a checkpoint: (0, cursor), the fresh run's cursor (any picklable value: the data position)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not ckpt:
        return 0, cursor
    state = load_train_state(ckpt, model)
    # keyed by parameter name; under --fsdp each process keeps its shard of it
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["cursor"]


def completion_log_probs(model, tokenizer, prompts, responses, return_token_entropy=False):
    """log p of each response given its prompt, (B, T) with the response mask (0 before the
    first response token), sharing the forward pass of the prompts' common prefix."""
    batch = tokenize_prompt_and_output(prompts, responses, tokenizer)
    device = next(model.parameters()).device
    input_ids, labels, mask = (batch[k].to(device) for k in ("input_ids", "labels", "response_mask"))
    out = get_response_log_probs(model, input_ids, labels, return_token_entropy,
                                 **harness.positions(input_ids.tolist(), mask.tolist()))
    return out, mask


def optimizer_step(model, optimizer, scheduler, max_grad_norm):
    """Clip, step, schedule, zero. Returns the pre-clip gradient norm. A NaN or inf norm (a
    NaN loss or gradient) skips the update: the weights and optimizer state stay as they were
    (harness.count_bad_steps stops a run that keeps doing it). Under torchrun it first sums the
    processes' gradients (each holds its microbatches' share), so all of them take the same step;
    under --fsdp the backward pass has summed them already, each process holding its shard."""
    if dist.is_initialized() and not _sharded(model):
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:  # a process with no microbatch in this step (a short last batch)
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: a DTensor
    if math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def evaluate_and_log(model, tokenizer, examples, args, step, log):
    """Greedy held-out evaluation, logged and printed (harness.record_eval); with
    --eval-samples k, also k samples per question at the run's sampling settings: mean@k,
    pass@k, mixed share and entropy (harness.sample_stats). Returns the summary. Under torchrun
    each process answers its share of the questions and every process gets the whole summary."""
    reward_fn = rewards.get_reward_fn(args.reward)
    greedy = harness.Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0)
    examples = rank_share(examples)
    rows = all_gather(evaluate(model, tokenizer, examples, reward_fn, greedy, batch_size=args.eval_batch_size,
                               desc=f"eval@{step}")[0])
    summary = rewards.summarize_rewards(rows)
    if args.eval_samples > 0:
        k, generator = args.eval_samples, rank_generator(next(model.parameters()).device)
        sampled, _ = evaluate(model, tokenizer, [ex for ex in examples for _ in range(k)], reward_fn,
                              harness.Sampling.from_args(args), batch_size=args.eval_batch_size, generator=generator,
                              desc=f"samples@{step}")
        summary.update(harness.sample_stats(all_gather(sampled), k))
    return harness.record_eval(rows, summary, args.out_dir, step, log)


def save_or_stop(args, step, n_steps, model, tokenizer, optimizer, scheduler, cursor):
    """The end of training step `step` of n_steps: save a checkpoint when --save-every says so
    or Ctrl-C came during the run (harness.ctrl_c_pressed), and after a Ctrl-C exit with
    status 130 (continue with --resume)."""
    stop = harness.ctrl_c_pressed(step, n_steps)
    if stop or harness.due(step, args.save_every, n_steps, at_end=False):
        save_checkpoint(args.out_dir, step, model, tokenizer, optimizer, scheduler, cursor, keep=args.keep_checkpoints)
    if stop:
        raise SystemExit(130)


def finish(args, model, tokenizer, summary, title):
    """Save <out_dir>/final (HF format), with --plot draw its metrics, and, when the run
    evaluated, print and save its summary. Under torchrun process 0 does it and the others wait
    for it (grpo.py's warm start loads that final model next)."""
    weights = _full_weights(model)  # under --fsdp every process hands process 0 its shards
    if harness.is_main():
        save_pretrained(model, tokenizer, os.path.join(args.out_dir, "final"), weights)
        if args.plot:
            harness.plot_run(args.out_dir)
    if dist.is_initialized():
        dist.barrier()
    return harness.write_summary(summary, args.out_dir, title)


# ----------------------------------------------------------------------------- several processes (torchrun)
# `torchrun --nproc_per_node N script.py` starts N copies of a script, each holding the whole
# model. Each takes its share of a step's microbatches (and of the rollouts to sample and
# grade, and of the held-out questions); the losses keep the one-process normalizers (the
# global batch's), and optimizer_step sums the gradients, so every process takes the step
# one process would. Process 0 alone writes files. A plain `python script.py` initializes
# nothing, and these helpers hand their input back unchanged.


def init_distributed(device="auto"):
    """Join the other processes when torchrun started this one (WORLD_SIZE > 1): gloo on CPU;
    on CUDA each process on its LOCAL_RANK GPU, nccl for CUDA tensors and gloo for the rest.
    Nothing in a single process, or when already joined."""
    if harness.world_size() == 1 or dist.is_initialized():
        return
    if pick_device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    import atexit

    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def rank_share(items):
    """This process's contiguous share of items (a list or a range): rank r of N takes
    items[len·r // N : len·(r+1) // N]. All of them in a single process."""
    if not dist.is_initialized():
        return items
    rank, world = dist.get_rank(), dist.get_world_size()
    return items[len(items) * rank // world : len(items) * (rank + 1) // world]


def all_gather(x):
    """Every process's x, joined in rank order, on every process: a list (of picklable items)
    or a tensor (the same shape on every process; joined along dim 0). x in a single process."""
    if not dist.is_initialized():
        return x
    if isinstance(x, torch.Tensor):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x)
    return [item for part in parts for item in part]


def all_reduce_sum(values):
    """values, a dict of numbers, summed over the processes (as they are in a single process)."""
    if not dist.is_initialized():
        return values
    total = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    dist.all_reduce(total)
    return dict(zip(values, total.tolist()))


def rank_generator(device):
    """The random generator for a sampling call: None in a single process (the global RNG, as
    always). Under torchrun every process keeps the same global RNG state (seeded alike and
    drawn from alike, so a checkpoint's one state resumes them all); each call forks from it a
    generator seeded by the rank, so the processes sample their shares independently."""
    if not dist.is_initialized():
        return None
    seed = torch.randint(2**62, (1,)).item()
    return torch.Generator(device).manual_seed(seed + dist.get_rank())


# ----------------------------------------------------------------------------- --fsdp (torch only)
# Without it every process holds the whole model, its gradients and AdamW's moments. With it
# (FSDP2's fully_shard) each holds 1/N of them: a decoder layer's weights are gathered from the
# processes just before the layer runs and dropped after it, and the backward pass sums the
# gradients and leaves each process its shard. A forward pass is then a collective: every
# process must run the same layers the same number of times. So under --fsdp a training
# forward takes no shared-prefix shortcut (whose use differs between microbatches), and
# sampling, where each process decodes its own number of steps, runs on whole weights
# (_gathered). The reference model of --beta is not sharded.


def _shard(model):
    """Shard each decoder layer (the classes transformers lists in _no_split_modules) and the
    rest of the model (embeddings, final norm, LM head) across the processes."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = set(model._no_split_modules or [])
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # summed, not averaged: the losses keep the global normalizers
            module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied one)


def _sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def _gathered(model):
    """Every layer's whole weights, gathered once for the block and kept (a no-op without
    FSDP): the processes decode different numbers of steps, which sharded layers cannot."""
    if not _sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        for unit in units:
            unit.reshard()


def _full_weights(model):
    """An FSDP model's whole state dict, gathered from every process (all of them must call
    this) onto process 0 (the others get {}); None for a model that holds its weights whole."""
    if not _sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (SmolLM2's LM head is its embedding) once, under the name save_pretrained keeps
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {k: v for k, v in weights.items() if k in names}
