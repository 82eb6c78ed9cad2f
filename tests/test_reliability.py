"""A NaN or inf gradient is skipped, not applied, in both twins; a run that keeps producing
them stops with one line, and the checkpoint on disk predates them."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import common_mlx
import harness
import sft
from test_scripts import common_flags


def test_torch_nan_gradient_skips_the_update():
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, scheduler = common.make_optimizer(model, lr=0.1)
    (model(torch.tensor([[1.0, float("nan"), 0.0]])).sum()).backward()
    assert math.isnan(common.optimizer_step(model, optimizer, scheduler, 1.0))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not optimizer.state and all(p.grad is None for p in model.parameters())
    model(torch.ones(1, 3)).sum().backward()  # a good step afterwards applies
    assert math.isfinite(common.optimizer_step(model, optimizer, scheduler, 1.0))
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_mlx_nan_gradient_skips_the_update():
    import mlx.core as mx
    import mlx.nn as nn

    model = nn.Linear(3, 2)
    mx.eval(model.parameters())
    before = {k: np.array(v) for k, v in model.parameters().items()}
    optimizer, _ = common_mlx.make_optimizer(model, lr=0.1)
    grads = {k: mx.full(v.shape, float("nan")) for k, v in model.parameters().items()}
    assert math.isnan(common_mlx.optimizer_step(model, optimizer, grads, 1.0))
    assert all(np.array_equal(before[k], np.array(v)) for k, v in model.parameters().items())
    assert optimizer.step.item() == 0


def test_count_bad_steps_stops_after_the_limit():
    assert harness.count_bad_steps(1.0, 2, 3) == 0
    assert harness.count_bad_steps(float("nan"), 0, 3) == 1
    assert harness.count_bad_steps(float("inf"), 1, 3) == 2
    with pytest.raises(SystemExit, match="3 optimizer steps in a row"):
        harness.count_bad_steps(float("nan"), 2, 3)


def test_a_run_that_turns_nan_stops_and_keeps_its_last_good_checkpoint(char_model_dir, tmp_path, monkeypatch):
    real = common.get_response_log_probs
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # from the 3rd optimizer step on (2 microbatches a step), log-probs are NaN
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] > 4:
            out["log_probs"] = out["log_probs"] * float("nan")
        return out

    monkeypatch.setattr(common, "get_response_log_probs", poisoned)
    args = sft.parse_args(common_flags(char_model_dir, tmp_path) + [
        "--task", "chain_sum", "--n-steps", "10", "--batch-size", "4", "--grad-accum", "2", "--save-every", "2",
        "--max-bad-steps", "2"])
    with pytest.raises(SystemExit, match="2 optimizer steps in a row"):
        sft.main(args)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [math.isfinite(r["grad_norm"]) for r in rows] == [True, True, False]
    assert (tmp_path / "checkpoints" / "step_000002").exists()  # the good one; no later one was written
    assert not (tmp_path / "checkpoints" / "step_000004").exists()


# ----------------------------------------------------------------------------- bad input, one line, before a model loads


@pytest.mark.parametrize("argv, message", [
    (["--task", "no_such_task"], "--task 'no_such_task': unknown"),
    (["--reward", "nope"], "--reward 'nope'"),
    (["--model", "./no/such/dir"], "no such model directory"),
    (["--resume", "--out-dir", "{tmp}/empty"], "--resume: no checkpoint"),
    (["--train-data", "{tmp}/bad.jsonl"], "bad.jsonl:2: expected"),
    (["--train-data", "{tmp}/missing.jsonl"], "No such file"),
    (["--train-data", "{tmp}/empty.jsonl"], "empty.jsonl: no examples"),
    (["--loss-type", "nope"], "--loss-type: invalid choice: 'nope'"),
    (["--rollout-batch-size", "12", "--group-size", "8"], "--rollout-batch-size (12) must be a positive multiple"),
])
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, capsys, argv, message):
    import grpo

    (tmp_path / "bad.jsonl").write_text('{"question": "1+1", "answer": "2"}\n{"question": "no answer"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit):
        grpo.parse_args([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err


# ----------------------------------------------------------------------------- hostile output, hostile rewards

HOSTILE = {
    "10 MB": "</think> <answer>" + "9" * 10_000_000 + "</answer>",
    "nested braces": "</think> <answer>" + "{" * 10_000 + "}" * 10_000 + "</answer>",
    "frac bomb": "</think> <answer>" + "\\frac{1}{" * 2000 + "2" + "}" * 2000 + "</answer>",
    "power tower": "</think> <answer>9^{9^{9^{9}}}</answer>",
    "factorial": "</think> <answer>(10^{10})!</answer>",
    "surrogate": "</think> <answer>\ud800\udfff 3</answer>",
    "NUL": "</think> <answer>\x003\x00</answer>",
    "code": "</think> <answer>__import__('os').system('touch /tmp/pwned')</answer>",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_output_scores_zero_and_is_bounded(name):
    import time

    import rewards

    fn = rewards.get_reward_fn("r1_zero:1.0,closeness:0.2,digits:0.2")
    t0 = time.perf_counter()
    out = fn(HOSTILE[name], "3")
    assert time.perf_counter() - t0 < 3.0  # a bound on a hang (0.8 s of CPU), not a speed measurement
    assert out["reward"] == 0.0 or name in ("surrogate", "NUL")  # these two hold a 3 the numeric parser may read
    assert out["answer_reward"] in (0.0, 1.0)


@pytest.mark.parametrize("response, truth", [(None, "3"), (b"bytes", "3"), ("</think> <answer>3</answer>", None),
                                             (12, 12)])
def test_a_wrong_type_scores_zero(response, truth):
    import rewards

    assert rewards.get_reward_fn("r1_zero")(response, truth)["reward"] == 0.0


def test_a_user_reward_that_raises_or_hangs_scores_zero_and_is_counted(tmp_path):
    import time

    import rewards

    (tmp_path / "bad.py").write_text(
        "def boom(response, truth):\n    raise RuntimeError('user bug')\n\n"
        "def spin(response, truth):\n    while True:\n        try:\n            pass\n        except Exception:\n"
        "            pass\n\n"
        "def wrong(response, truth):\n    return 1.0\n")
    for name in ("boom", "spin", "wrong"):
        fn = rewards.get_reward_fn(f"{tmp_path}/bad.py:{name}")
        t0 = time.perf_counter()
        assert fn("x", "y")["reward"] == 0.0
        assert time.perf_counter() - t0 < 3.0
        assert fn.failures == 1, name


def test_grpo_goes_on_when_the_reward_raises(char_model_dir, tmp_path):
    import grpo

    (tmp_path / "flaky.py").write_text(
        "def flaky(response, truth):\n    if len(response) % 2:\n        raise ValueError('odd')\n"
        "    return {'reward': 1.0, 'format_reward': 1.0, 'answer_reward': 1.0}\n")
    out = tmp_path / "run"
    args = grpo.parse_args(common_flags(char_model_dir, out) + [
        "--reward", f"{tmp_path}/flaky.py:flaky", "--n-steps", "2", "--rollout-batch-size", "8", "--group-size", "4",
        "--grad-accum", "1", "--warmstart-steps", "0", "--eval-every", "0", "--save-every", "0"])
    grpo.main(args)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "reward_failures" in line]
    assert len(rows) == 2 and rows[-1]["reward_failures"] > 0


MALLOC_PROBE = """
import ctypes, sys
import harness

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]


def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


harness.map_large_allocations(float(sys.argv[1]))
n, before = 8 << 20, rss_kb()
for _ in range(2):  # glibc's own threshold rises to the size of a mapping freed: the second block is heap
    block = libc.malloc(n)
    libc.memset(block, 1, n)  # touched: resident
    libc.free(block)
print(rss_kb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_allocations_go_back_to_the_os_when_freed(tmp_path):
    """Two 8 MB blocks allocated, written and freed in turn: with glibc's defaults the second
    one stays resident after free (heap), with map_large_allocations(1) neither does (kernel's VmRSS)."""
    probe = tmp_path / "probe.py"
    probe.write_text(MALLOC_PROBE)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(harness.__file__)}
    grown = {mb: int(subprocess.run([sys.executable, str(probe), mb], capture_output=True, text=True, check=True,
                                    env=env).stdout) for mb in ("0", "1")}
    assert grown["0"] > 6 * 1024 and grown["1"] < 2 * 1024, grown
