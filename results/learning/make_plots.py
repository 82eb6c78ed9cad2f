"""Redraw this folder's PNGs from its metrics files:

    uv run python results/learning/make_plots.py

accuracy_vs_wall.png: held-out accuracy of the default recipe with the fixed grader (4-step SFT
warm start, then GRPO with dynamic sampling: torch seeds 0-3, seed 0 again with today's faster
sampler (commit aba56fd; its warm start's log was not kept, so its curve starts at GRPO's step 0)
and grpo_mlx.py's seed 0), of the previous default (25-step warm start, plain GRPO; before the grader fix) and of the SFT-only
control against training minutes, the sum of their logged step times (model loading and
evaluations excluded: the runs' full walls are in README.md; only seed 0 and the SFT-only
control ran alone, the others two at a time with one thread each).
default_run/plots/: plot.py's panels for the GRPO part of those five default-recipe runs
(reward, entropy, zero-variance, ...).
experiments/warmstart_plots/: held-out accuracy, entropy and zero-variance share over GRPO
steps from warm starts of 4, 10 and 25 SFT steps (all before the grader fix).
experiments/recipe_80steps_plots/: the same panels for the default recipe at 40 and at 80 GRPO
steps (seed 0, both with the fixed grader).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

import plot  # noqa: E402


def accuracy_by_minute(paths):
    """(minutes, accuracy) at each evaluation of runs logged one after the other."""
    points, minutes = [], 0.0
    for path in paths:
        for row in map(json.loads, open(path)):
            minutes += row.get("step_s", 0.0) / 60
            if "eval_accuracy" in row and not (points and row["step"] == 0):  # GRPO's step 0 = the warm start's end
                points.append((minutes, row["eval_accuracy"]))
    return points


def main():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def sft_then_grpo(run):  # a run saved without its warm start's log starts at its GRPO step 0
        paths = [os.path.join(HERE, run, "warmstart", "metrics.jsonl"), os.path.join(HERE, run, "metrics.jsonl")]
        return [path for path in paths if os.path.exists(path)]

    recipe = {"torch, seed 0 (alone)": "default_run", "torch, seed 1 (1 thread)": "default_run_seed1",
              "torch, seed 2 (1 thread)": "default_run_seed2", "torch, seed 3 (1 thread)": "default_run_seed3",
              "MLX, seed 0 (1 thread)": "mlx_default_run"}
    runs = {f"default recipe, {name}": sft_then_grpo(d) for name, d in recipe.items()}
    runs["default recipe, torch, seed 0, today's sampler (aba56fd, alone)"] = sft_then_grpo("default_run_grouped_attention")
    runs["previous default (25 SFT steps, then GRPO; before the grader fix)"] = sft_then_grpo("default_run_warmstart25")
    runs["SFT only (240 steps)"] = [os.path.join(HERE, "sft_only", "metrics.jsonl")]
    fig = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = {label: accuracy_by_minute(paths) for label, paths in runs.items()}
    for i, (label, run_points) in enumerate(points.items()):
        xs, ys = zip(*run_points)
        dashed = "MLX" in label or "previous" in label or "aba56fd" in label
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=label, linestyle="--" if dashed else "-")
        ax.annotate(f"{ys[-1]:.1%}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(14, -3), fontsize=8,
                    color=f"C{i}")
    ax.set_xlabel("training minutes (sum of step times; loading and evaluation excluded)")
    ax.set_ylabel("held-out accuracy (greedy, strict r1_zero, n = 500)")
    ax.set_ylim(0.45, 0.85)
    ax.set_xlim(right=max(x for run_points in points.values() for x, _ in run_points) * 1.1)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="outside lower center", ncols=2)
    fig.suptitle("chain_sum, SmolLM2-135M, 2-core CPU: GRPO vs SFT for the same time\n"
                 "default recipe (grader fixed): 4 SFT steps, then 40 GRPO steps with dynamic sampling", fontsize=10)
    fig.savefig(os.path.join(HERE, "accuracy_vs_wall.png"), dpi=100)
    for path in plot.plot_runs([os.path.join(HERE, d, "metrics.jsonl") for d in recipe.values()],
                               os.path.join(HERE, "default_run", "plots"), labels=list(recipe)):
        if os.path.basename(path) in ("kl.png", "clip_frac.png"):  # on-policy with beta 0: both 0 by construction
            os.remove(path)
    experiments = {"warm start 25 (previous default)": "default_run_warmstart25", "warm start 10": "experiments/grpo_warmstart10",
                   "warm start 4": "experiments/grpo_warmstart4", "warm start 4, 80 steps": "experiments/grpo_warmstart4_80steps",
                   "warm start 4 + dynamic sampling": "experiments/grpo_warmstart4_dynamic_sampling",
                   "the same, the default run (fresh clone)": "before_grader_fix/default_run"}
    steps = {"the recipe, 40 steps (default_run)": "default_run", "the recipe, 80 steps": "experiments/grpo_recipe_80steps"}
    for group, folder in ((experiments, "warmstart_plots"), (steps, "recipe_80steps_plots")):
        for path in plot.plot_runs([os.path.join(HERE, d, "metrics.jsonl") for d in group.values()],
                                   os.path.join(HERE, "experiments", folder), labels=list(group)):
            if os.path.basename(path) not in ("accuracy.png", "entropy.png", "zero_std.png", "reward.png"):
                os.remove(path)


if __name__ == "__main__":
    main()
