"""The table in results/memory/README.md from run.sh's runs (peak RSS as logged over the 3 GRPO
steps, median step time) and memory.png, the same as bars.

    uv run python results/memory/table.py [runs/memory]    # default: the copies in results/memory/runs
"""

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "runs")
VARIANTS = {"before": "before (whole-batch logsumexp, entropy)", "chunked": "512-position chunks (default)",
            "chunked-checkpointed": "chunks + --checkpoint-activations"}
cells = {}
for variant in VARIANTS:
    for lengths in ("natural", "forced64"):
        steps = [r for r in map(json.loads, open(root / f"{variant}-{lengths}" / "metrics.jsonl")) if "step_s" in r]
        cells[variant, lengths] = (max(r["peak_rss_gb"] for r in steps), statistics.median(r["step_s"] for r in steps))

print("| training forward | peak RSS, natural lengths | peak RSS, all rollouts 64 tokens | median step, natural | median step, 64 tokens |")
print("|---|---|---|---|---|")
for variant, label in VARIANTS.items():
    (rss_n, s_n), (rss_f, s_f) = cells[variant, "natural"], cells[variant, "forced64"]
    print(f"| {label} | {rss_n:.2f} GB | {rss_f:.2f} GB | {s_n:.1f} s | {s_f:.1f} s |")

fig, ax = plt.subplots(figsize=(8, 4))
width = 0.38
for i, (lengths, name) in enumerate((("natural", "natural lengths"), ("forced64", "every rollout 64 tokens"))):
    values = [cells[v, lengths][0] for v in VARIANTS]
    xs = [x + (i - 0.5) * width for x in range(len(VARIANTS))]
    ax.bar(xs, values, width, label=name)
    for x, v in zip(xs, values):
        ax.text(x, v, f"{v:.2f}", ha="center", va="bottom")
ax.set_xticks(range(len(VARIANTS)), [label.replace(" (", "\n(").replace(" + ", "\n+ ") for label in VARIANTS.values()])
ax.axhline(4.0, color="gray", linestyle="--", linewidth=1, label="issue 9's target, 4 GB")
ax.set_ylabel("peak RSS over 3 GRPO steps, GB")
ax.set_title("grpo.py training forward, SmolLM2-135M, 2-core CPU")
ax.set_ylim(0, max(c[0] for c in cells.values()) * 1.2)
ax.legend(loc="lower left")
fig.tight_layout()
fig.savefig(Path(__file__).parent / "memory.png", dpi=110)
