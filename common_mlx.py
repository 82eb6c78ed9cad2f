"""Shared MLX code for nanoalign: the twin of common.py, on mx.array.

Same functions, argument names, order and docstrings as common.py (tests/test_twins.py
checks the names and arguments, tests/test_mlx_parity.py the math, tests/test_mlx_scripts.py
the training trajectories), bar completion_log_probs: the MLX scripts tokenize outside
nn.value_and_grad, so they call tokenize_prompt_and_output and get_response_log_probs. The
several-process helpers at the end are the twins of common.py's torchrun ones, on
mx.distributed (`mlx.launch`). MLX
differentiates functions, not tensors: the *_microbatch_train_step functions return the
loss without a backward pass, and the caller wraps its loss function in
nn.value_and_grad(model, fn); optimizer_step takes those gradients. Token ids are int32,
MLX's default integer type (torch uses int64). Models are mlx-lm models read from (and
written as) plain HF directories, so torch and MLX checkpoints are interchangeable.

Private helpers without a twin, on purpose: common.py's _autocast and _cpu_bf16_speedup
(MLX has no autocast, so its dtype is the weights' own and 'auto' is fp32),
_cpu_attention_speedup, _grouped_attention and _register_grouped_attention (attention
written out for transformers models, where the check finds it faster than PyTorch's SDPA
kernel; mlx-lm models have one attention, mx.fast.scaled_dot_product_attention) and
_best_seconds, the timer of those two checks, _written_out_attention, the attention's body,
_attention_probs, its masked softmax, and _kv_cache (transformers' DynamicCache copies the
whole cache at every step; mlx-lm's KVCache already writes in place, in blocks of 256
positions) with Prefixed and _prefixed_attention, its shared-prefix keys and the attention
that reads them (mlx-lm's KVCache has no such mode: the MLX sampler still copies the prefix
to every row, a change for mlx-lm's llama module); _last_log_probs, _HeadLogProbs and
_head_in (the LM head a chunk of positions at a time, its backward written out so the logits
never exist whole) and _prefix_replayed_in_backward (the shared prefix's pass rerun in the
backward, so autograd does not hold the tail's gradient of every weight): memory for torch's
eager autograd, where MLX's value_and_grad plans the graph itself; and this file's
_logits / _last_logits (the LM head on the last positions only: transformers models take
logits_to_keep, mlx-lm models do not) and _gather_rows (mx.distributed gathers equal shapes
only; torch.distributed gathers Python objects).
"""

import contextlib
import math
import os
import random

import harness
import machine
import rewards
import tasks

machine.load_fast_blas()  # before mlx.core: MLX on Linux CPU otherwise uses the bundled reference BLAS

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

# ----------------------------------------------------------------------------- tokenization


def tokenize_prompt_and_output(prompt_strs, output_strs, tokenizer):
    """Tokenize prompts and outputs separately, join, right-pad with the pad id.
    Returns input_ids, labels (B, L-1) int32 and response_mask (B, L-1) bool, True where
    the label is an output token."""
    # encode, not __call__: mlx_lm's TokenizerWrapper forwards attributes but is not callable
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompt_strs]
    output_ids = [tokenizer.encode(o, add_special_tokens=False) for o in output_strs]
    return join_prompt_and_output_ids(prompt_ids, output_ids, tokenizer.pad_token_id)


def join_prompt_and_output_ids(prompt_ids, output_ids, pad_id):
    """tokenize_prompt_and_output on lists of token ids (rollouts are already tokenized)."""
    rows = [p + o for p, o in zip(prompt_ids, output_ids)]
    L = max(len(r) for r in rows)
    padded = np.full((len(rows), L), pad_id, dtype=np.int32)  # (B, L)
    mask = np.zeros((len(rows), L), dtype=bool)
    for i, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        padded[i, : len(p) + len(o)] = p + o
        mask[i, len(p) : len(p) + len(o)] = True
    padded, mask = mx.array(padded), mx.array(mask)
    return {"input_ids": padded[:, :-1], "labels": padded[:, 1:], "response_mask": mask[:, 1:]}


# ----------------------------------------------------------------------------- log-probs


def compute_entropy(logits):
    """Entropy of softmax(logits) over the last axis. (..., V) -> (...).
    H = log s - sum e * z / s, with z the logits shifted by their max (exact at huge logits),
    e = exp(z), s = sum e, and -inf entries (masked tokens, probability 0) contributing 0, not
    NaN. One exp over V: MLX's exp costs ~12 ns an element on x86 Linux (results/speed), and a
    rollout pays this at every step."""
    z = logits.astype(mx.float32)
    z = z - z.max(axis=-1, keepdims=True)
    e = mx.exp(z)
    s = e.sum(-1)
    return mx.log(s) - (e * mx.where(mx.isinf(z), 0, z)).sum(-1) / s


def get_response_log_probs(model, input_ids, labels, return_token_entropy=False, shared_prefix=0, temperature=1.0,
                           score_from=0):
    """log p(labels | prefix) under an mlx-lm causal LM. input_ids, labels (B, T) -> log_probs
    (B, T) [and token_entropy (B, T)]. log p = z[label] - logsumexp(z), no full log-softmax copy.
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
    if shared_prefix <= 0:
        logits = _logits(model, input_ids, None, T - S)
        return _scored(_log_probs_from_logits(_tempered(logits, temperature), labels[:, S:], return_token_entropy), S)
    from mlx_lm.models.cache import make_prompt_cache

    B, K, cache = input_ids.shape[0], shared_prefix, make_prompt_cache(model)
    head = _logits(model, input_ids[:1, :K], cache, max(1, K - S))[0]
    for c in cache:  # differentiable copy: gradients flow back into the prefix
        c.keys, c.values = (mx.repeat(a[..., : c.offset, :], B, axis=0) for a in (c.keys, c.values))
    tail_from = max(S, K)  # first scored position inside the tail
    tail = _tempered(_logits(model, input_ids[:, K:], cache, T - tail_from), temperature)  # (B, T - tail_from, V)
    out = _scored(_log_probs_from_logits(tail, labels[:, tail_from:], return_token_entropy), tail_from - K)
    if S >= K:  # nothing scored in the prefix
        return _scored(out, K)
    # the prefix positions' distributions are the same in every row: normalize them once
    head, positions = _tempered(head.astype(mx.float32), temperature), mx.arange(S, K)  # head: (K - S, V)
    head_log_probs = head[positions - S, labels[:, S:K]] - mx.logsumexp(head, axis=-1)  # (B, K - S)
    out["log_probs"] = mx.concatenate([head_log_probs, out["log_probs"]], axis=1)
    if return_token_entropy:
        head_entropy = mx.stop_gradient(mx.broadcast_to(compute_entropy(head), (B, K - S)))
        out["token_entropy"] = mx.concatenate([head_entropy, out["token_entropy"]], axis=1)
    return _scored(out, S)


def _scored(out, n_skipped):
    """Left-pad each (B, t) array in out with n_skipped zero columns: the unscored positions."""
    if n_skipped == 0:
        return out
    return {k: mx.pad(v, [(0, 0), (n_skipped, 0)]) for k, v in out.items()}


def _logits(model, tokens, cache, keep):
    """Logits (B, keep, V) of the last `keep` positions of tokens (B, S): the LM head runs on
    those only (torch's twin is the logits_to_keep argument of a transformers model)."""
    h = model.model(tokens, cache=cache)[:, -keep:]
    head = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear
    return head(h)


def _tempered(logits, temperature):
    """logits / T; T = 0 (greedy decoding) samples from no distribution: the model's own is used."""
    return logits if temperature in (0, 1) else logits / temperature


def _log_probs_from_logits(logits, labels, return_token_entropy):
    logits = logits.astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    out = {"log_probs": mx.take_along_axis(logits, labels[..., None], axis=-1).squeeze(-1) - lse}
    if return_token_entropy:
        out["token_entropy"] = mx.stop_gradient(compute_entropy(logits))
    return out


# ----------------------------------------------------------------------------- normalization


def masked_normalize(tensor, mask, dim=None, normalize_constant=1.0):
    """Sum of tensor*mask over dim (all when None) / normalize_constant."""
    return (tensor * mask).sum(axis=dim) / normalize_constant


def masked_mean(tensor, mask, dim=None):
    """Mean of tensor over mask entries along dim (all when None); 0/0 = NaN stays NaN."""
    mask = mask.astype(tensor.dtype)
    return (tensor * mask).sum(axis=dim) / mask.sum(axis=dim)


# ----------------------------------------------------------------------------- SFT


def sft_microbatch_train_step(policy_log_probs, response_mask, gradient_accumulation_steps, normalize_constant=1.0):
    """SFT loss on a microbatch, scaled loss back (no backward: wrap in nn.value_and_grad).
    log_probs, mask (B, T). loss = -mean_b[ sum_t(logp * mask) / normalize_constant ] / grad_accum."""
    per_example = masked_normalize(policy_log_probs, response_mask, dim=-1, normalize_constant=normalize_constant)
    loss = -per_example.mean() / gradient_accumulation_steps
    return loss, {}


# ----------------------------------------------------------------------------- GRPO


def compute_group_normalized_rewards(
    reward_fn, rollout_responses, repeated_ground_truths, group_size, advantage_eps, normalize_by_std
):
    """Rewards for B rollouts in consecutive groups of group_size -> advantages (B,), raw (B,).
    A = r - mean_group(r), then / (std_group(r) + eps) when normalize_by_std (unbiased std)."""
    scores = [reward_fn(r, g) for r, g in zip(rollout_responses, repeated_ground_truths)]
    raw_rewards = mx.array([s["reward"] for s in scores], dtype=mx.float32)  # (B,)
    advantages = group_normalize(raw_rewards, group_size, advantage_eps, normalize_by_std)
    grouped = raw_rewards.reshape(-1, group_size)
    metadata = {
        "reward_mean": raw_rewards.mean().item(),
        "reward_std": mx.std(raw_rewards, ddof=1).item() if len(raw_rewards) > 1 else 0.0,
        "reward_max": raw_rewards.max().item(),
        "reward_min": raw_rewards.min().item(),
        "format_reward": float(np.mean([s["format_reward"] for s in scores])),
        "answer_reward": float(np.mean([s["answer_reward"] for s in scores])),
        "zero_std_frac": (mx.std(grouped, -1, ddof=1) == 0).astype(mx.float32).mean().item() if group_size > 1 else 1.0,
    }
    return advantages, raw_rewards, metadata


def group_normalize(raw_rewards, group_size, advantage_eps, normalize_by_std):
    """(B,) rewards in consecutive groups -> (B,) advantages r - mean [/ (std + eps)]."""
    grouped = raw_rewards.reshape(-1, group_size)  # (n_groups, G)
    advantages = grouped - grouped.mean(axis=-1, keepdims=True)
    if normalize_by_std:
        advantages = advantages / (mx.std(grouped, axis=-1, keepdims=True, ddof=1) + advantage_eps)
    return advantages.reshape(-1)


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages, policy_log_probs):
    """Per-token REINFORCE loss. A (B, 1), log_probs (B, T) -> (B, T): -A * log p."""
    return -raw_rewards_or_advantages * policy_log_probs


def compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange, cliprange_high=None):
    """Per-token PPO/GRPO clipped loss. A (B, 1), log_probs (B, T) -> (B, T), metadata.
    ratio = exp(logp - old); loss = -min(ratio*A, clip(ratio, 1-c, 1+c_high)*A)."""
    high = cliprange if cliprange_high is None else cliprange_high
    ratio = mx.exp(policy_log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = mx.clip(ratio, 1 - cliprange, 1 + high) * advantages
    metadata = {"clipped": mx.stop_gradient(clipped < unclipped)}
    return -mx.minimum(unclipped, clipped), metadata


def compute_gspo_loss(advantages, policy_log_probs, old_log_probs, response_mask, cliprange, cliprange_high=None):
    """GSPO: one importance ratio per sequence, s = exp(mean_t(logp - old)), clipped like
    PPO. A (B, 1), log_probs (B, T) -> per-token loss (B, T) (the sequence loss on every
    token, so a per-sequence mean recovers it), metadata."""
    high = cliprange if cliprange_high is None else cliprange_high
    n_tokens = mx.maximum(response_mask.sum(-1), 1)  # an empty row gets ratio 1, not 0/0
    log_ratio = masked_normalize(policy_log_probs - old_log_probs, response_mask, -1, n_tokens)[:, None]  # (B, 1)
    ratio = mx.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = mx.clip(ratio, 1 - cliprange, 1 + high) * advantages
    loss = -mx.broadcast_to(mx.minimum(unclipped, clipped), policy_log_probs.shape)
    clipped_tokens = mx.broadcast_to(clipped < unclipped, policy_log_probs.shape)
    return loss, {"clipped": mx.stop_gradient(clipped_tokens)}


def kl_k3(policy_log_probs, ref_log_probs):
    """Per-token KL(pi || ref) estimate (Schulman's k3): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    delta = ref_log_probs - policy_log_probs
    return mx.exp(delta) - delta - 1


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
    """Policy-gradient loss on a microbatch, scaled loss back (no backward: wrap in nn.value_and_grad).
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
        metadata["kl"] = masked_mean(mx.stop_gradient(kl), response_mask)
    if loss_type in TOKEN_SUM_LOSSES:
        loss = masked_normalize(per_token, response_mask, normalize_constant=loss_normalizer)
    else:
        # a row with no response tokens (--mask-truncated) contributes 0, not 0/0
        per_row = masked_normalize(per_token, response_mask, -1, mx.maximum(response_mask.sum(-1), 1))
        loss = per_row.mean() / gradient_accumulation_steps
    return loss, metadata


# ----------------------------------------------------------------------------- SFT data


class PackedSFTDataset:
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
    """JSONL of {prompt, response} -> packed dataset of {input_ids, labels} (L,) int32.
    Each document is BOS + Alpaca text + EOS; documents (shuffled when asked) are joined."""
    rows = tasks.read_jsonl(dataset_path, "sft")
    if shuffle:
        random.shuffle(rows)
    stream = []
    for row in rows:
        text = tasks.ALPACA_PROMPT.format(instruction=row["prompt"], response=row["response"])
        ids = tokenizer.encode(text, add_special_tokens=False)
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return PackedSFTDataset(mx.array(stream, dtype=mx.int32), seq_length)


def iterate_batches(dataset, batch_size, shuffle):
    """One epoch of (batch, L) batches (the last may be short)."""
    order = list(range(len(dataset)))
    if shuffle:
        random.shuffle(order)
    for start in range(0, len(order), batch_size):
        rows = [dataset[i] for i in order[start : start + batch_size]]
        yield {key: mx.stack([row[key] for row in rows]) for key in rows[0]}


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
    return -nn.log_sigmoid(margin), margin


def compute_per_instance_dpo_loss(lm, lm_ref, tokenizer, beta, prompt, response_chosen, response_rejected):
    """DPO loss of one preference pair, each formatted with the Alpaca template + EOS;
    full-sequence log-probs under lm and lm_ref. -> scalar."""
    texts = [
        tasks.ALPACA_PROMPT.format(instruction=prompt, response=r) + tokenizer.eos_token
        for r in (response_chosen, response_rejected)
    ]
    ids = [mx.array(tokenizer.encode(t), dtype=mx.int32)[None] for t in texts]

    def full_log_prob(model, x):
        return sequence_log_prob(model, x, mx.ones(x[:, 1:].shape, dtype=mx.float32)).squeeze(0)

    chosen, rejected = (full_log_prob(lm, x) for x in ids)
    ref_chosen, ref_rejected = (mx.stop_gradient(full_log_prob(lm_ref, x)) for x in ids)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)[0]


# ----------------------------------------------------------------------------- setup helpers


def pick_device(name="auto"):
    """'auto': the Metal GPU where there is one, else the CPU; MLX's default device is set to it."""
    if name == "auto":
        name = "gpu" if mx.metal.is_available() else "cpu"
    device = mx.Device(mx.cpu if name == "cpu" else mx.gpu)  # 'mps' / 'cuda' / 'gpu' all mean the GPU here
    mx.set_default_device(device)
    return device


def pick_dtype(name, device):
    """'auto': fp32. MLX has no autocast, so the dtype is the weights' own, and bf16 weights
    drop any update below 1/256 of a weight (at lr 1e-5, nearly all of them): bf16 only when
    asked (--dtype bfloat16, e.g. for evaluation). MLX's CPU matmuls run in fp32 BLAS anyway.
    (So common.py's _cpu_bf16_speedup has no twin here.)"""
    if name != "auto":
        return {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
                "float16": mx.float16, "fp16": mx.float16}[name]
    return mx.float32


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def load_model(model_name, device, dtype, cache=None):
    """(model, tokenizer) from a local HF dir, the embedded default or a hub id, with mlx_lm.load."""
    import mlx_lm

    path = machine.resolve_model(model_name, cache)
    model, tokenizer = mlx_lm.load(path)
    model.set_dtype(dtype)
    model.source_dir = path  # its config.json is copied next to the weights we save
    return model, tokenizer


# ----------------------------------------------------------------------------- rollouts


def sample_next_token(logits, generated, sampling, generator=None):
    """One sampling step. logits (B, V) fp32, generated (B, t) ids seen so far, sampling a
    harness.Sampling. Returns token (B,) and its log-prob under softmax(logits / temperature) (B,)."""
    temperature, top_k, top_p, min_p = sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p
    repetition_penalty = sampling.repetition_penalty
    if repetition_penalty != 1.0 and generated.shape[1] > 0:
        seen = mx.take_along_axis(logits, generated, 1)
        logits = mx.put_along_axis(logits, generated, mx.where(seen > 0, seen / repetition_penalty,
                                                               seen * repetition_penalty), 1)
    if temperature == 0:  # greedy
        token = mx.argmax(logits, -1)
        return token, mx.take_along_axis(logits - mx.logsumexp(logits, -1, keepdims=True), token[:, None], 1)[:, 0]
    z = logits / temperature
    z = z - z.max(-1, keepdims=True)
    mass = mx.exp(z)  # (B, V) unnormalized probabilities: the step's one exp over the vocabulary
    total = mass.sum(-1, keepdims=True)
    log_probs = z - mx.log(total)  # the policy's sampling distribution, softmax(logits / T)
    # the filters zero the mass of the tokens they drop (the log-probs stay those of the policy)
    if top_k > 0:
        kth = mx.sort(log_probs, -1)[:, -min(top_k, log_probs.shape[-1])][:, None]
        mass = mx.where(log_probs < kth, 0, mass)
    if top_p < 1.0:
        order = mx.argsort(-mass, -1)
        sorted_mass = mx.take_along_axis(mass, order, -1)
        drop = mx.cumsum(sorted_mass, -1) - sorted_mass > top_p * total  # keep the smallest prefix reaching top_p
        mass = mx.put_along_axis(mass, order, mx.where(drop, 0, sorted_mass), -1)
    if min_p > 0.0:
        mass = mx.where(log_probs < log_probs.max(-1, keepdims=True) + np.log(min_p), 0, mass)
    # inverse CDF: the first token whose cumulative mass reaches u ~ U(0, kept mass], so one
    # random number per row; a token of mass 0 adds nothing and is never picked
    cdf = mx.cumsum(mass, -1)
    u = 1 - mx.random.uniform(shape=(cdf.shape[0], 1), key=generator)  # (0, 1]
    token = (cdf < u * cdf[:, -1:]).sum(-1)
    return token, mx.take_along_axis(log_probs, token[:, None], 1)[:, 0]


def generate(model, tokenizer, prompts, sampling, batch_size=64, generator=None):
    """Sample one completion per prompt with a KV cache, batch_size prompts at a time, as
    `sampling` (a harness.Sampling) says.
    Each sequence stops at EOS, at a stop string (kept in the text) or at max_new_tokens.
    Returns dicts: prompt_ids, response_ids, response (text), log_probs (sampling
    log-probs, one per response token), truncated (hit max_new_tokens without stopping),
    entropy (mean next-token entropy over the response).
    This is the whole rollout interface: another engine only has to return the same."""
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in chunk]
        sampled = _generate_batch(model, tokenizer, prompt_ids, sampling, generator)
        for p_ids, (ids, lps, truncated, entropy) in zip(prompt_ids, sampled):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            results.append({"prompt_ids": p_ids, "response_ids": ids, "response": text, "log_probs": lps,
                            "truncated": truncated, "entropy": entropy})
    return results


class _RolloutCache:
    """One layer's KV cache for a batch laid out as [shared prefix][pad][suffix][new tokens]:
    preallocated to `valid.shape[1]` slots, a RoPE offset per row (so each row sees its true
    positions despite the pad) and a mask of the slots a query may attend to (not the pad).
    It has the interface mlx-lm's attention layers call (offset, update_and_fetch, make_mask)."""

    def __init__(self, valid, offset):
        self.valid, self.offset = valid, offset  # (B, capacity) bool, (B,) int32
        self.keys = self.values = None
        self.idx = 0  # slots written so far

    def write(self, keys, values):
        if self.keys is None:
            B, H, _, D = keys.shape
            self.keys = mx.zeros((B, H, self.valid.shape[1], D), keys.dtype)
            self.values = mx.zeros((B, H, self.valid.shape[1], values.shape[3]), values.dtype)
        n = keys.shape[2]
        self.keys[..., self.idx : self.idx + n, :] = keys
        self.values[..., self.idx : self.idx + n, :] = values
        self.idx += n

    def update_and_fetch(self, keys, values):
        self.write(keys, values)
        self.offset = self.offset + keys.shape[2]
        return self.keys[..., : self.idx, :], self.values[..., : self.idx, :]

    def make_mask(self, N, **kwargs):
        causal = mx.arange(self.idx + N)[None] <= (self.idx + mx.arange(N))[:, None]  # (N, idx + N)
        return (causal[None] & self.valid[:, None, : self.idx + N])[:, None]  # (B, 1, N, idx + N)

    def select(self, rows):
        self.keys, self.values = self.keys[rows], self.values[rows]
        self.valid, self.offset = self.valid[rows], self.offset[rows]


def _generate_batch(model, tokenizer, prompt_ids, sampling, generator):
    max_new_tokens, min_new_tokens, stop = sampling.max_new_tokens, sampling.min_new_tokens, sampling.stop
    repetition_penalty = sampling.repetition_penalty
    from mlx_lm.models.cache import make_prompt_cache

    B = len(prompt_ids)
    eos_ids = {tokenizer.eos_token_id} | set(getattr(tokenizer, "eos_token_ids", None) or [])
    eos = mx.array(sorted(i for i in eos_ids if i is not None))
    stop_tail = max([len(tokenizer.encode(s, add_special_tokens=False)) for s in stop] + [1]) + 2
    # The prompts share a long prefix (the r1_zero instructions): run it once and copy its
    # KV cache to every row. Each row is then [prefix][pad][suffix], the pad masked out.
    K = harness.shared_prefix_length(prompt_ids)
    S = max(len(p) - K for p in prompt_ids)
    pads = [S - (len(p) - K) for p in prompt_ids]
    suffix = mx.array([[tokenizer.pad_token_id] * pad + p[K:] for pad, p in zip(pads, prompt_ids)])  # (B, S)
    slot = mx.arange(K + S + max_new_tokens)[None]
    valid = (slot < K) | (slot >= K + mx.array(pads)[:, None])  # (B, K + S + max_new_tokens)
    caches = [_RolloutCache(valid, mx.array([K - pad for pad in pads])) for _ in model.layers]
    if K > 0:
        prefix_cache = make_prompt_cache(model)
        model(mx.array([prompt_ids[0][:K]]), cache=prefix_cache)
        for c, p in zip(caches, prefix_cache):
            c.write(mx.repeat(p.keys[..., :K, :], B, 0), mx.repeat(p.values[..., :K, :], B, 0))
    # what the repetition penalty sees: each row's own prompt; its pad slots repeat the row's
    # last prompt token (already in the row, so penalized once anyway) rather than the pad id
    history = mx.array([p[:K] + [p[-1]] * pad + p[K:] for pad, p in zip(pads, prompt_ids)])
    history = history if repetition_penalty != 1.0 else history[:, :0]
    out_tokens, out_lps = [], []  # per step: (B,) over all rows, pad / 0 for finished ones
    lengths = [max_new_tokens] * B  # where each row stopped
    finished = [False] * B
    entropy_sum = np.zeros(B)
    active = np.arange(B)  # rows still in the (compacted) batch
    logits = _last_logits(model, suffix, caches)
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits[:, eos] = -mx.inf
        entropy = compute_entropy(logits)  # (b,) of the model's next-token distribution
        token, lp = sample_next_token(logits, history[mx.array(active)] if history.shape[1] else history, sampling, generator)
        mx.eval(token, lp, entropy)
        token_np = np.array(token)
        step_tokens = np.full(B, tokenizer.pad_token_id)
        step_lps = np.zeros(B, dtype=np.float32)
        step_tokens[active], step_lps[active] = token_np, np.array(lp)
        entropy_sum[active] += np.array(entropy)
        out_tokens.append(step_tokens)
        out_lps.append(step_lps)
        if repetition_penalty != 1.0:
            history = mx.concatenate([history, mx.array(step_tokens)[:, None]], 1)
        done = np.isin(token_np, np.array(eos))
        if stop and t + 1 >= min_new_tokens:
            tails = tokenizer.batch_decode(np.stack(out_tokens, 1)[active, -stop_tail:].tolist())
            done |= np.array([any(s in tail for s in stop) for tail in tails])
        for row in active[done]:
            lengths[row], finished[row] = t + 1, True
        if all(finished) or t + 1 == max_new_tokens:
            break
        if done.any():  # drop finished rows from the batch and the cache
            keep = mx.array(np.flatnonzero(~done))
            for c in caches:
                c.select(keep)
            active, token = active[~done], token[keep]
        logits = _last_logits(model, token[:, None], caches)
    out_tokens, out_lps = np.stack(out_tokens, 1), np.stack(out_lps, 1)  # (B, t)
    return [
        (out_tokens[i, : lengths[i]].tolist(), out_lps[i, : lengths[i]].tolist(), not finished[i],
         entropy_sum[i] / max(1, lengths[i]))
        for i in range(B)
    ]


def _last_logits(model, tokens, cache):
    """Next-token logits (B, V) fp32 after tokens (B, S): the LM head only on the last position."""
    return _logits(model, tokens, cache, 1)[:, -1].astype(mx.float32)


def evaluate(model, tokenizer, examples, reward_fn, sampling, batch_size=64, generator=None, desc="eval"):
    """Generate one answer per example with the r1_zero prompt (as `sampling` says) and grade it.
    Returns (rows, summary): one row per example and the three-category counts."""
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(examples), desc=desc, leave=False)
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
    return rows, rewards.summarize_rewards(rows)


# ----------------------------------------------------------------------------- training state


def add_lora(model, rank, alpha=None, dropout=0.0):
    """Freeze the model and put mlx-lm LoRA adapters on every linear projection of every layer."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj"]
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": rank, "scale": (alpha or 2 * rank) / rank,
                                                     "dropout": dropout, "keys": keys})
    return model


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95), warmup_steps=0, total_steps=1):
    """AdamW (with bias correction, as torch's) + linear warmup then cosine decay to 10% of lr.
    The schedule is the optimizer's learning_rate, so its state is the optimizer's step."""
    import mlx.optimizers as optim

    def schedule(step):
        return mx.array(lr * harness.lr_factor(step.item(), warmup_steps, total_steps), mx.float32)

    optimizer = optim.AdamW(learning_rate=schedule, betas=list(betas), weight_decay=weight_decay,
                            bias_correction=True)
    optimizer.init(model.trainable_parameters())
    return optimizer, schedule


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "mlx": np.array(mx.random.state[0])}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    high, low = (int(x) for x in state["mlx"])  # MLX's key is the 64-bit seed that makes it
    mx.random.seed((high << 32) | low)


def save_pretrained(model, tokenizer, path):
    """A plain HF directory (safetensors + config + tokenizer) that transformers and
    mlx_lm.load both read; LoRA adapters are merged into the saved weights."""
    import json

    weights = dict(tree_flatten(model.parameters()))
    for name, module in model.named_modules():
        if hasattr(module, "fuse"):  # an mlx-lm LoRA layer: save W + scale * B A under W's name
            weights = {k: v for k, v in weights.items() if not k.startswith(name + ".")}
            weights.update({f"{name}.{k}": v for k, v in tree_flatten(module.fuse().parameters())})
    os.makedirs(path, exist_ok=True)
    mx.save_safetensors(os.path.join(path, "model.safetensors"), weights, metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
    config = json.load(open(os.path.join(model.source_dir, "config.json")))
    config["torch_dtype"] = config["dtype"] = str(next(iter(weights.values())).dtype).split(".")[-1]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def save_checkpoint(out_dir, step, model, tokenizer, optimizer, scheduler, cursor, keep=0):
    """<out_dir>/checkpoints/step_N: HF weights + train_state.pkl (optimizer with its step,
    RNG, data cursor, step, and for LoRA the adapter weights). Written to a temp dir, fsynced and
    renamed (harness.commit_checkpoint), so a crash mid-save never leaves a half checkpoint
    behind; keeps the last `keep` checkpoints (0: all). Under mlx.launch process 0 writes it (the
    processes hold the same weights, optimizer and RNG state) and the others return None."""
    import pickle
    import tempfile

    if not harness.is_main():
        return None
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
    save_pretrained(model, tokenizer, tmp)
    to_numpy = lambda tree: {k: np.array(v) for k, v in tree_flatten(tree)}  # noqa: E731
    adapter = {k: v for k, v in to_numpy(model.trainable_parameters()).items() if "lora_" in k} or None
    state = {"optimizer": to_numpy(optimizer.state), "cursor": cursor, "step": step, "rng": rng_state(),
             "adapter": adapter}
    with open(os.path.join(tmp, "train_state.pkl"), "wb") as f:
        pickle.dump(state, f)
    return harness.commit_checkpoint(tmp, final, keep)


def load_train_state(path, model):
    """Restore what save_checkpoint wrote (weights must already be loaded for full
    fine-tuning; LoRA adapters are restored here). Returns the state dict."""
    import pickle

    with open(os.path.join(path, "train_state.pkl"), "rb") as f:
        state = pickle.load(f)
    if state.get("adapter"):
        model.load_weights([(k, mx.array(v)) for k, v in state["adapter"].items()], strict=False)
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
    return model, tokenizer, ckpt


def resume(ckpt, model, optimizer, scheduler, cursor=0):
    """Restore the optimizer (its step drives the schedule), RNG (and LoRA adapters) from a
    checkpoint -> (step, cursor).
    Without a checkpoint: (0, cursor), the fresh run's cursor (any picklable value: the data position)."""
    if not ckpt:
        return 0, cursor
    state = load_train_state(ckpt, model)
    optimizer.state = tree_unflatten([(k, mx.array(v)) for k, v in state["optimizer"].items()])
    return state["step"], state["cursor"]


def optimizer_step(model, optimizer, grads, max_grad_norm):
    """Clip, step, evaluate. Returns the pre-clip gradient norm. MLX has no .grad: the caller
    passes the accumulated gradients and drops them after. A NaN or inf norm skips the update:
    the weights and optimizer state stay as they were (so the norm is evaluated first: two
    mx.eval per step, the gradients then the update). Under mlx.launch it first sums the
    processes' gradients (each holds its microbatches' share), so all of them take the same step."""
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    if harness.world_size() > 1:
        grads = tree_map(mx.distributed.all_sum, grads)
    grads, grad_norm = optim.clip_grad_norm(grads, max_grad_norm)
    grad_norm = grad_norm.item()
    if math.isfinite(grad_norm):
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    return grad_norm


def evaluate_and_log(model, tokenizer, examples, args, step, log):
    """Greedy held-out evaluation, logged and printed (harness.record_eval); with
    --eval-samples k, also k samples per question at the run's sampling settings: mean@k,
    pass@k, mixed share and entropy (harness.sample_stats). Returns the summary. Under mlx.launch
    each process answers its share of the questions and every process gets the whole summary."""
    reward_fn = rewards.get_reward_fn(args.reward)
    greedy = harness.Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0)
    examples = rank_share(examples)
    rows = all_gather(evaluate(model, tokenizer, examples, reward_fn, greedy, batch_size=args.eval_batch_size,
                               desc=f"eval@{step}")[0])
    summary = rewards.summarize_rewards(rows)
    if args.eval_samples > 0:
        k = args.eval_samples
        with rank_generator(mx.default_device()):
            sampled, _ = evaluate(model, tokenizer, [ex for ex in examples for _ in range(k)], reward_fn,
                                  harness.Sampling.from_args(args), batch_size=args.eval_batch_size,
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
    evaluated, print and save its summary. Under mlx.launch process 0 does it and the others wait
    for it (grpo_mlx.py's warm start loads that final model next)."""
    if harness.is_main():
        save_pretrained(model, tokenizer, os.path.join(args.out_dir, "final"))
        if args.plot:
            harness.plot_run(args.out_dir)
    all_reduce_sum({"finished": 1})  # a barrier (mx.distributed has none): it returns when every process got here
    return harness.write_summary(summary, args.out_dir, title)


# ----------------------------------------------------------------------------- several processes (mlx.launch)
# `mlx.launch -n N -- python script.py` starts N copies of a script (the ring backend over TCP
# on this machine's 127.0.0.1; --hosts for several machines), each holding the whole model.
# As under torchrun (common.py): each takes its share of a step's microbatches (and of the
# rollouts to sample and grade, and of the held-out questions); the losses keep the one-process
# normalizers and optimizer_step sums the gradients, so every process takes the step one
# process would. Process 0 alone writes files. A plain `python script.py` joins nothing, and
# these helpers hand their input back unchanged.


def init_distributed(device="auto"):
    """Join the other processes when mlx.launch started this one (mx.distributed, the backend
    mlx.launch set up). Sets torchrun's WORLD_SIZE and RANK from the group, which
    harness.world_size / is_main read. Nothing in a single process, or when already joined."""
    group = mx.distributed.init()
    if group.size() > 1:
        os.environ["WORLD_SIZE"], os.environ["RANK"] = str(group.size()), str(group.rank())


def rank_share(items):
    """This process's contiguous share of items (a list or a range): rank r of N takes
    items[len·r // N : len·(r+1) // N]. All of them in a single process."""
    world = harness.world_size()
    if world == 1:
        return items
    rank = mx.distributed.init().rank()
    return items[len(items) * rank // world : len(items) * (rank + 1) // world]


def all_gather(x):
    """Every process's x, joined in rank order, on every process: a list (of picklable items)
    or an mx.array (joined along axis 0; its first dimension may differ between processes).
    x in a single process."""
    if harness.world_size() == 1:
        return x
    if isinstance(x, mx.array):
        return mx.concatenate(_gather_rows(x))
    import pickle

    parts = _gather_rows(mx.array(np.frombuffer(pickle.dumps(x), dtype=np.uint8)))
    return [item for part in parts for item in pickle.loads(bytes(np.array(part)))]


def _gather_rows(x):
    """x (n, ...) of every process, n per process -> the list of them, in rank order. MLX's
    all_gather wants one shape: each x is padded to the largest n first."""
    sizes = mx.distributed.all_gather(mx.array([x.shape[0]])).tolist()
    n = max(sizes)
    gathered = mx.distributed.all_gather(mx.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1)))
    return [gathered[r * n : r * n + size] for r, size in enumerate(sizes)]


def all_reduce_sum(values):
    """values, a dict of numbers, summed over the processes (as they are in a single process)."""
    if harness.world_size() == 1:
        return values
    total = mx.distributed.all_sum(mx.array([float(v) for v in values.values()], dtype=mx.float64), stream=mx.cpu)
    return dict(zip(values, total.tolist()))


@contextlib.contextmanager
def rank_generator(device):
    """Where a sampling call draws: `with rank_generator(device): generate(...)`. MLX has no
    generator object (a key passed to generate would be reused at every token), so this forks
    the global RNG instead: in a single process nothing (the global RNG, as always); under
    mlx.launch every process keeps the same global RNG state (seeded alike and drawn from
    alike, so a checkpoint's one state resumes them all): one seed is drawn from it, the body
    samples from seed + rank, and the global state is put back after."""
    if harness.world_size() == 1:
        yield None
        return
    seed = mx.random.randint(0, 2**31 - 1, ()).item()
    high, low = (int(x) for x in np.array(mx.random.state[0]))
    mx.random.seed(seed + mx.distributed.init().rank())
    try:
        yield None
    finally:
        mx.random.seed((high << 32) | low)
