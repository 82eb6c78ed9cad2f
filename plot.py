"""Plot runs from their metrics.jsonl: one PNG per panel group (reward, held-out accuracy,
response length, entropy, ...), one subplot per metric, the runs overlaid in each. A group
no run has is skipped. Training scripts can call `plot_runs` at the end of a run.

    uv run python plot.py runs/grpo/metrics.jsonl --out runs/grpo/plots
    uv run python plot.py runs/grpo/metrics.jsonl runs/dapo/metrics.jsonl --out plots --x wall
    uv run python plot.py a/metrics.jsonl b/metrics.jsonl --out plots --labels base,dapo
"""

import argparse
import fnmatch
import math
import os
import sys

import tasks

# ---- panel groups: PNG name -> (figure title, metrics.jsonl keys, one subplot each; globs allowed)
PANELS = {
    "reward": ("reward (training rollouts)", ["reward", "format_reward", "answer_reward", "reward_std", "reward/*"]),
    "accuracy": ("held-out evaluation", ["eval_accuracy", "eval_format_rate", "eval_mean_at_k", "eval_pass_at_k",
                                         "eval_mixed_frac"]),
    "response_len": ("response length (tokens)", ["response_len", "response_len_max", "truncated_frac"]),
    "entropy": ("per-token entropy (nats)", ["entropy", "eval_sample_entropy"]),
    "zero_std": ("groups with zero reward variance (no gradient)", ["zero_std_frac"]),
    "sampling": ("groups sampled per step (--dynamic-sampling, --harder-task)",
                 ["groups_generated", "groups_mixed", "groups_solved", "harder_questions"]),
    "clip_frac": ("fraction of tokens clipped", ["clip_frac"]),
    "kl": ("KL to the reference policy (k3)", ["kl"]),
    "loss": ("loss and gradient norm", ["loss", "sft_loss", "grad_norm"]),
    "throughput": ("throughput (tokens/s)", ["rollout_tok_s", "train_tok_s"]),
}
# rates drawn on a fixed 0..1 axis (when they stay in it), so that 0.98 vs 1.0 does not fill the panel
UNIT = ["reward", "format_reward", "answer_reward", "reward/*", "eval_accuracy", "eval_*_rate", "eval_*_at_k",
        "eval_mixed_frac", "zero_std_frac", "truncated_frac"]
SMOOTH_ABOVE = 25  # a longer series is drawn faint, under its trailing mean over a tenth of its points


def read_metrics(path):
    """The rows of one metrics.jsonl; a missing file or a bad line raises one ValueError
    naming file:line."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    rows = list(tasks.jsonl_objects(path, _with_step))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _with_step(row):
    if not isinstance(row.get("step"), (int, float)):
        raise tasks.DataError("expected a JSON object with a numeric 'step'")
    return row


def series(rows, key, x):
    """(xs, ys) of one metric; x='wall' is the cumulative step_s in minutes (eval rows carry
    none and sit at the end of the step logged before them)."""
    xs, ys, wall = [], [], 0.0
    for row in rows:
        wall += row.get("step_s", 0.0) / 60
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(wall if x == "wall" else row["step"])
            ys.append(value)
    return xs, ys


def trailing_mean(ys, window):
    """Each point replaced by the mean of itself and the window - 1 points before it."""
    return [sum(ys[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(ys))]


def plot_runs(paths, out_dir, labels=None, x="step"):
    """Write <out_dir>/<group>.png for each panel group some run has; returns the paths written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state, no display
    from matplotlib.figure import Figure

    runs = [read_metrics(p) for p in paths]
    if labels is None:
        labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
        if len(set(labels)) < len(labels):  # same run name under different parents
            labels = [os.path.relpath(os.path.dirname(os.path.abspath(p))) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    all_keys = sorted({k for rows in runs for row in rows for k in row})
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, (title, patterns) in PANELS.items():
        keys = dict.fromkeys(k for pattern in patterns for k in all_keys if fnmatch.fnmatchcase(k, pattern))
        curves = {k: [series(rows, k, x) for rows in runs] for k in keys}  # key -> per run (xs, ys)
        curves = {k: per_run for k, per_run in curves.items() if any(ys for _, ys in per_run)}
        if not curves:
            continue
        ncols = min(3, len(curves))
        nrows = math.ceil(len(curves) / ncols)
        fig = Figure(figsize=(max(5, 4.5 * ncols), 3.2 * nrows + 0.8), layout="constrained")
        FigureCanvasAgg(fig)
        handles, smoothed = {}, False  # one legend entry per run that has a curve in this figure
        for i, (key, per_run) in enumerate(curves.items()):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            for j, (xs, ys) in enumerate(per_run):
                if len(ys) > SMOOTH_ABOVE:
                    ax.plot(xs, ys, color=f"C{j}", linewidth=0.8, alpha=0.3)
                    ys, smoothed = trailing_mean(ys, len(ys) // 10), True
                if ys:
                    handles[labels[j]] = ax.plot(xs, ys, color=f"C{j}", linewidth=1.4, markersize=3,
                                                 marker="o" if len(ys) <= SMOOTH_ABOVE else None)[0]
            values = [y for _, ys in per_run for y in ys]
            if any(fnmatch.fnmatchcase(key, p) for p in UNIT) and 0 <= min(values) <= max(values) <= 1:
                ax.set_ylim(-0.02, 1.02)
            elif min(values) >= 0:
                ax.set_ylim(bottom=0)
            ax.set_title(key, fontsize=10)
            ax.set_xlabel("wall minutes (sum of step_s)" if x == "wall" else "step")
            ax.grid(alpha=0.3)
        fig.axes[0].legend(handles.values(), handles.keys(), fontsize=8)
        fig.suptitle(title + ("\n(faint: each step; solid: trailing mean)" if smoothed else ""), fontsize=11)
        written.append(os.path.join(out_dir, f"{name}.png"))
        fig.savefig(written[-1], dpi=100)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="metrics.jsonl files, one per run")
    parser.add_argument("--out", required=True, help="directory for the PNGs")
    parser.add_argument("--x", choices=["step", "wall"], default="step", help="x axis: step, or wall minutes")
    parser.add_argument("--labels", default=None, help="comma-separated legend labels (default: run directory names)")
    args = parser.parse_args(argv)
    try:
        written = plot_runs(args.paths, args.out, args.labels.split(",") if args.labels else None, args.x)
    except ValueError as e:
        sys.exit(f"plot.py: {e}")
    print("\n".join(written) if written else "plot.py: no known metrics in these runs")


if __name__ == "__main__":
    main()
