"""Probe: where a GRPO run's resident memory peaks, phase by phase. A thread reads VmRSS
every 2 ms while grpo.main runs; wrappers name the phase (the warm start's SFT, rollouts,
a training microbatch's forward + backward, the optimizer step, evaluation). Prints the
phases in order with each one's peak (consecutive calls of the same phase merged). Flags
after the script go to grpo.py:

    uv run python results/speed/probe_memory_phases.py --n-steps 3 --n-eval 32 --out-dir runs/probe
"""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
import grpo  # noqa: E402

phases = [["start", 0.0]]  # [name, peak GB], in order


def rss_gb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 2**20 for line in f if line.startswith("VmRSS"))


def watch():
    while True:
        entry = phases[-1]
        entry[1] = max(entry[1], rss_gb())
        time.sleep(0.002)


def enter(name):
    if phases[-1][0] != name:
        phases.append([name, rss_gb()])


def named(name, fn, after=None):
    def wrapper(*a, **k):
        enter(name)
        out = fn(*a, **k)
        if after:
            enter(after)
        return out
    return wrapper


common.generate = named("rollouts", common.generate, after="between")
common.get_response_log_probs = named("microbatch fwd+bwd", common.get_response_log_probs)
common.optimizer_step = named("optimizer step", common.optimizer_step, after="between")
common.evaluate_and_log = named("eval", common.evaluate_and_log, after="between")
grpo.warm_start = named("warm start (SFT)", grpo.warm_start, after="between")

threading.Thread(target=watch, daemon=True).start()
grpo.main(grpo.parse_args(sys.argv[1:]))
for name, gb in phases:
    print(f"{name:22s} {gb:.2f} GB")
