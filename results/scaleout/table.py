"""The table in results/scaleout/README.md from the runs of run.sh: for each job, the median
step time after the first step and process 0's peak resident memory."""

import json
import statistics
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/scaleout/runs")  # default: the committed copies
print("| job | median s/step (steps 2..) | peak RSS of process 0, GB | final held-out accuracy |")
print("|---|---|---|---|")
for run in sorted(p for p in root.iterdir() if (p / "metrics.jsonl").exists()):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r for r in rows if "step_s" in r]
    acc = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    print(f"| {run.name} | {statistics.median(r['step_s'] for r in steps[1:]):.1f} | "
          f"{max(r['peak_rss_gb'] for r in steps):.2f} | {acc[-1]:.3f} |")
