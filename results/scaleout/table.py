"""The table in results/scaleout/README.md from the runs of run.sh (for each job the median step
time after the first step, process 0's peak resident memory, the final held-out accuracy) and
scaleout.png, the first two as bars.

    uv run python results/scaleout/table.py [runs/scaleout]    # default: the copies in results/scaleout/runs
"""

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "runs")
ORDER = ["sft-1proc", "sft-2proc", "sft-2proc-fsdp", "grpo-1proc", "grpo-2proc", "grpo-2proc-fsdp"]
table = {}
for name in ORDER:
    rows = [json.loads(line) for line in open(root / name / "metrics.jsonl")]
    steps = [r for r in rows if "step_s" in r]
    table[name] = (statistics.median(r["step_s"] for r in steps[1:]), max(r["peak_rss_gb"] for r in steps),
                   [r["eval_accuracy"] for r in rows if "eval_accuracy" in r][-1])

print("| job | median s/step (steps 2..) | peak RSS of process 0, GB | final held-out accuracy |")
print("|---|---|---|---|")
for name, (step_s, rss, acc) in table.items():
    print(f"| {name} | {step_s:.1f} | {rss:.2f} | {acc:.3f} |")

fig, axes = plt.subplots(2, 2, figsize=(10, 6))
colors = ["tab:blue", "tab:orange", "tab:green"]
for col, job in enumerate(("sft", "grpo")):
    names = [n for n in ORDER if n.startswith(job)]
    labels = [n.split("-", 1)[1].replace("-", "\n") for n in names]
    for row, (index, unit) in enumerate(((0, "s per step (median, steps 2..)"), (1, "peak RSS of process 0, GB"))):
        ax = axes[row, col]
        values = [table[n][index] for n in names]
        ax.bar(labels, values, color=colors)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.1f}" if index == 0 else f"{v:.2f}", ha="center", va="bottom")
        ax.set_ylabel(unit)
        ax.set_title(f"{job}.py, SmolLM2-135M, 2-core CPU")
        ax.set_ylim(0, max(values) * 1.2)
fig.tight_layout()
fig.savefig(Path(__file__).parent / "scaleout.png", dpi=110)
