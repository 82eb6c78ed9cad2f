"""grpo.py against TRL's GRPOTrainer on identical settings, curves overlaid: the cross-check
of our GRPO against the most used implementation.

    uv run python results/trl_overlay/run.py                 # both runs, then the PNGs (~35 min on 2 CPU cores)
    uv run python results/trl_overlay/run.py --model DIR     # from another start model
    uv run python results/trl_overlay/run.py --plot-only     # redraw from the metrics in this folder

Identical on both sides: the start model (default: the default run's SFT warm start, 25 steps
of sft.py, cached in runs/trl_overlay/warmstart), the questions and their order (ours, handed
to TRL unshuffled), 4 questions x 8 completions a step, temperature 1, at most 64 new tokens,
the loss (TRL "grpo" = our grpo_clip: each completion's mean over its tokens, then the batch
mean, ratio clipped to [0.8, 1.2]; on-policy, one update per batch), advantages (reward minus
the group mean, over the group's std + 1e-4), beta 0.04 (k3 KL to the start model), AdamW
(lr 1e-5, betas 0.9 / 0.95, no weight decay), cosine decay to 10% with no warmup, gradient
norm clipped to 1, fp32, seed 0. Each side samples with its own RNG, so the curves agree in
distribution, not sample for sample. Afterwards both final models answer the same held-out
questions with the same greedy evaluation (ours).
Writes nanoalign/metrics.jsonl, trl/metrics.jsonl and plots/*.png here; the weights stay
in runs/trl_overlay.
"""

import argparse
import functools
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import common  # noqa: E402
import grpo  # noqa: E402
import harness  # noqa: E402
import plot  # noqa: E402
import rewards  # noqa: E402
import tasks  # noqa: E402

RUNS = "runs/trl_overlay"
SETTINGS = ["--task", "chain_sum", "--n-steps", "30", "--rollout-batch-size", "32", "--group-size", "8",
            "--grad-accum", "2", "--lr", "1e-5", "--beta", "0.04", "--loss-type", "grpo_clip", "--cliprange", "0.2",
            "--cliprange-high", "0.2", "--scale-rewards", "group", "--advantage-eps", "1e-4", "--max-new-tokens", "64",
            "--min-new-tokens", "0", "--temperature", "1.0", "--warmup-steps", "0", "--dtype", "float32",
            "--seed", "0", "--n-eval", "200", "--eval-every", "0", "--save-every", "0", "--warmstart-steps", "0"]


def trl(model, args):
    """TRL's GRPOTrainer on args' settings; its log mapped to our metric names."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    n_questions = args.rollout_batch_size // args.group_size
    # the questions grpo.py took, in its order (harness.take), for TRL to read unshuffled
    questions = harness.take(tasks.load_examples(args, "train", args.n_train), 0, args.n_steps * n_questions, args.seed)
    data = Dataset.from_list([{"prompt": tasks.r1_zero_prompt(q["question"]), "answer": q["answer"]} for q in questions])

    def reward(completions, answer, **kwargs):
        return [rewards.r1_zero_reward_fn(c, a)["reward"] for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        ends = [time.perf_counter()]

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=os.path.join(RUNS, "trl"), per_device_train_batch_size=args.rollout_batch_size,
        num_generations=args.group_size, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        max_steps=args.n_steps, learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, beta=args.beta, epsilon=args.cliprange,
        epsilon_high=args.cliprange_high, loss_type="grpo", scale_rewards="group", shuffle_dataset=False,
        generation_kwargs={"stop_strings": [tasks.STOP]}, use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no", seed=args.seed)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model)
    # transformers stops at a string only when generate() gets the tokenizer, which TRL does not
    # pass: bind it, so that TRL stops after </answer> as our sampler does (tasks.STOP)
    policy.generate = functools.partial(policy.generate, tokenizer=tokenizer)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    names = {"reward": "reward", "reward_std": "reward_std", "loss": "loss", "kl": "kl", "entropy": "entropy",
             "completions/mean_length": "response_len", "completions/max_length": "response_len_max",
             "frac_reward_zero_std": "zero_std_frac",
             "clip_ratio/region_mean": "clip_frac", "grad_norm": "grad_norm", "learning_rate": "lr"}
    rows = [{"step": r["step"], **{ours_name: r[k] for k, ours_name in names.items() if k in r}}
            for r in trainer.state.log_history if "reward" in r]
    for row, (a, b) in zip(rows, zip(Clock.ends, Clock.ends[1:])):
        row["step_s"] = b - a
    # the same held-out questions and greedy evaluation as grpo.py's
    common.set_seed(args.seed)
    policy.compute_dtype = torch.float32
    greedy = harness.Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0)
    answers = common.evaluate(policy.eval(), tokenizer, tasks.load_examples(args, "eval", args.n_eval),
                              rewards.get_reward_fn(args.reward), greedy, batch_size=args.eval_batch_size, desc="eval TRL")
    summary = rewards.summarize_rewards(answers[0])
    rows.append({"step": args.n_steps, "eval_accuracy": summary["accuracy"], "eval_format_rate": summary["format_rate"]})
    harness.write_jsonl(os.path.join(HERE, "trl", "metrics.jsonl"), rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="start model (default: the default run's SFT warm start, built once)")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--trl-only", action="store_true", help="rerun TRL's side only")
    a = p.parse_args(argv)
    if not a.plot_only:
        model = a.model or grpo.warm_start(grpo.parse_args(["--out-dir", RUNS]))
        args = grpo.parse_args(SETTINGS + ["--model", model, "--out-dir", os.path.join(RUNS, "nanoalign")])
        if not a.trl_only:
            grpo.main(args)
            os.makedirs(os.path.join(HERE, "nanoalign"), exist_ok=True)
            shutil.copy(os.path.join(RUNS, "nanoalign", "metrics.jsonl"), os.path.join(HERE, "nanoalign"))
        trl(model, args)
    plot.plot_runs([os.path.join(HERE, side, "metrics.jsonl") for side in ("nanoalign", "trl")],
                   os.path.join(HERE, "plots"), ["nanoalign grpo.py", "TRL GRPOTrainer"], "step")
    for empty in ("clip_frac", "throughput"):  # on-policy both are 0 clipped; TRL logs no tokens/s
        os.remove(os.path.join(HERE, "plots", f"{empty}.png"))
    for side in ("nanoalign", "trl"):
        rows = [json.loads(line) for line in open(os.path.join(HERE, side, "metrics.jsonl"))]
        train = [r for r in rows if "reward" in r]
        print(side, {k: round(sum(r[k] for r in train) / len(train), 4) for k in ("reward", "loss", "kl", "entropy",
                                                                                   "response_len", "step_s")},
              [r["eval_accuracy"] for r in rows if "eval_accuracy" in r])


if __name__ == "__main__":
    main()
