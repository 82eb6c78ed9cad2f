"""The CS336 (2025) assignment 5 adapter interface: each run_* is a thin call into
common.py or rewards.py, with exactly the course's names and keyword names."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import rewards  # noqa: E402


def run_tokenize_prompt_and_output(prompt_strs, output_strs, tokenizer):
    return common.tokenize_prompt_and_output(prompt_strs, output_strs, tokenizer)


def run_compute_entropy(logits):
    return common.compute_entropy(logits)


def run_get_response_log_probs(model, input_ids, labels, return_token_entropy):
    return common.get_response_log_probs(model, input_ids, labels, return_token_entropy)


def run_masked_normalize(tensor, mask, dim=None, normalize_constant=1.0):
    return common.masked_normalize(tensor, mask, dim, normalize_constant)


def run_masked_mean(tensor, mask, dim=None):
    return common.masked_mean(tensor, mask, dim)


def run_sft_microbatch_train_step(policy_log_probs, response_mask, gradient_accumulation_steps, normalize_constant=1.0):
    return common.sft_microbatch_train_step(policy_log_probs, response_mask, gradient_accumulation_steps, normalize_constant)


def run_compute_group_normalized_rewards(
    reward_fn, rollout_responses, repeated_ground_truths, group_size, advantage_eps, normalize_by_std
):
    return common.compute_group_normalized_rewards(
        reward_fn, rollout_responses, repeated_ground_truths, group_size, advantage_eps, normalize_by_std
    )


def run_compute_naive_policy_gradient_loss(raw_rewards_or_advantages, policy_log_probs):
    return common.compute_naive_policy_gradient_loss(raw_rewards_or_advantages, policy_log_probs)


def run_compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange):
    return common.compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)


def run_compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards, advantages, old_log_probs, cliprange):
    return common.compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards, advantages, old_log_probs, cliprange)


def run_grpo_microbatch_train_step(
    policy_log_probs,
    response_mask,
    gradient_accumulation_steps,
    loss_type,
    raw_rewards=None,
    advantages=None,
    old_log_probs=None,
    cliprange=None,
):
    return common.grpo_microbatch_train_step(
        policy_log_probs, response_mask, gradient_accumulation_steps, loss_type, raw_rewards, advantages,
        old_log_probs, cliprange,
    )


def get_packed_sft_dataset(tokenizer, dataset_path, seq_length, shuffle):
    return common.get_packed_sft_dataset(tokenizer, dataset_path, seq_length, shuffle)


def run_iterate_batches(dataset, batch_size, shuffle):
    return common.iterate_batches(dataset, batch_size, shuffle)


def run_parse_mmlu_response(mmlu_example, model_output):
    return rewards.parse_mmlu_response(mmlu_example, model_output)


def run_parse_gsm8k_response(model_output):
    return rewards.parse_gsm8k_response(model_output)


def run_compute_per_instance_dpo_loss(lm, lm_ref, tokenizer, beta, prompt, response_chosen, response_rejected):
    return common.compute_per_instance_dpo_loss(lm, lm_ref, tokenizer, beta, prompt, response_chosen, response_rejected)


def run_r1_zero_reward_fn(response, ground_truth):
    return rewards.r1_zero_reward_fn(response, ground_truth)
