"""Stopping and starting again: a checkpoint survives a SIGKILL mid-save, every training script
resumes bit for bit (weights and metrics) from its checkpoint, Ctrl-C saves and exits 130 (twice:
at once), and out of memory ends a run with one line naming the flags to lower."""

import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_scripts import SEVENS, assert_loadable, common_flags, rows

import common_mlx  # noqa: F401  (first: the fast BLAS before mlx.core)
import common
import dpo
import expert_iteration
import harness
import sft
import sft_mlx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_FLAGS = ["--task", "chain_sum", "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "1",
             "--eval-every", "0"]


def small_data(tmp_path):
    """--train-data / --eval-data flags of a few lines: a child process need not generate a task (seconds)."""
    harness.write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i}+1=", "response": f"{i + 1}"} for i in range(16)])
    harness.write_jsonl(tmp_path / "eval.jsonl", [{"question": f"{i}+2", "answer": f"{i + 2}"} for i in range(4)])
    return ["--train-data", str(tmp_path / "pairs.jsonl"), "--eval-data", str(tmp_path / "eval.jsonl")]


# ----------------------------------------------------------------------------- checkpoints on disk


def test_commit_checkpoint_renames_prunes_and_cleans_up(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step_{step:06d}").mkdir(parents=True)
    (root / ".tmp-killed").mkdir()  # what a killed save leaves
    tmp = root / ".tmp-new"
    tmp.mkdir()
    (tmp / "train_state.pt").write_text("4")
    harness.commit_checkpoint(str(tmp), str(root / "step_000004"), keep=2)
    assert sorted(os.listdir(root)) == ["step_000003", "step_000004"]
    assert (root / "step_000004" / "train_state.pt").read_text() == "4"
    tmp.mkdir()  # the same step again (a rerun): replaced; keep=0 keeps every checkpoint
    (tmp / "train_state.pt").write_text("4 again")
    harness.commit_checkpoint(str(tmp), str(root / "step_000004"), keep=0)
    assert sorted(os.listdir(root)) == ["step_000003", "step_000004"]
    assert (root / "step_000004" / "train_state.pt").read_text() == "4 again"


def test_metrics_log_drops_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": s}) for s in (1, 2, 2, 3, 4)] + ['{"step": 5, "lo']  # cut by the kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    harness.MetricsLog(tmp_path)  # a fresh start (resume_step 0) keeps the file as it is
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines)
    log = harness.MetricsLog(tmp_path, resume_step=2)
    log({"step": 3, "loss": 3.5})
    assert [(r["step"], r["loss"]) for r in rows(tmp_path / "metrics.jsonl")] == [(1, 1), (2, 2), (2, 2), (3, 3.5)]


def start_child(code, argv, tmp_path):
    """A python process running code (argv and tmp_path as json in sys.argv[1]), once it has
    written tmp_path/marker: it is then where the test wants it, waiting."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code, json.dumps([argv, str(tmp_path)])], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "marker").exists():
        assert child.poll() is None and time.time() < deadline, child.stderr.read()[-2000:]
        time.sleep(0.05)
    return child


KILLED_CHILD = """
import json, os, sys, time
import torch
torch.set_num_threads(1)
import common, sft

argv, tmp = json.loads(sys.argv[1])
real, calls = common.save_pretrained, []

def save_slowly(model, tokenizer, path, weights=None):  # the 2nd save (step 2) writes its files, then hangs before the rename
    real(model, tokenizer, path, weights)
    calls.append(path)
    if len(calls) == 2:
        open(os.path.join(tmp, "marker"), "w").close()
        time.sleep(60)

common.save_pretrained = save_slowly
sft.main(sft.parse_args(argv))
"""


@pytest.mark.slow  # a fresh python process that imports torch and transformers: ~12 s on 2 busy cores
def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_resume_goes_on(char_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = common_flags(char_model_dir, out) + SFT_FLAGS + small_data(tmp_path) + ["--n-steps", "3",
                                                                                  "--save-every", "1"]
    child = start_child(KILLED_CHILD, argv, tmp_path)
    child.kill()  # SIGKILL, in the middle of saving step 2
    child.wait()
    ckpts = out / "checkpoints"
    assert harness.latest_checkpoint(out) == str(ckpts / "step_000001")
    assert [p for p in os.listdir(ckpts) if p.startswith(".tmp-")]  # the half save, never renamed
    assert_loadable(ckpts / "step_000001")
    assert [r["step"] for r in rows(out / "metrics.jsonl")] == [1, 2]  # step 2 was logged before the kill

    sft.main(sft.parse_args(argv + ["--resume", "--keep-checkpoints", "1"]))
    assert sorted(os.listdir(ckpts)) == ["step_000002"]  # the stale temp dir and step 1 are gone
    assert [r["step"] for r in rows(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]  # step 2 once
    assert_loadable(out / "final")


# ----------------------------------------------------------------------------- exact resume


def weights(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def without_timings(metrics):
    return [{k: v for k, v in r.items() if not k.endswith(("_s", "_gb"))} for r in metrics]


@pytest.mark.parametrize("script, flags", [
    (sft, SFT_FLAGS + ["--n-steps", "4"]),
    (sft, SFT_FLAGS + ["--n-steps", "4", "--packed", "--seq-length", "64"]),
    (sft_mlx, SFT_FLAGS + ["--n-steps", "4"]),
    (sft_mlx, SFT_FLAGS + ["--n-steps", "4", "--packed", "--seq-length", "64"]),
    (expert_iteration, ["--n-ei-steps", "4", "--questions-per-step", "4", "--group-size", "2", "--batch-size", "4",
                        "--lr", "3e-3", "--eval-every", "0", "--reward", SEVENS.replace(":sevens", ":always")]),
    (dpo, ["--n-steps", "4", "--batch-size", "4", "--group-size", "2", "--lr", "3e-3", "--eval-every", "0",
           "--reward", SEVENS.replace(":sevens", ":coin")]),
], ids=["sft", "sft-packed", "sft_mlx", "sft_mlx-packed", "expert_iteration", "dpo"])
def test_four_steps_equal_two_and_two_resumed(char_model_dir, tmp_path, script, flags):
    """The run is stopped after step 4 was logged but before its end (no final/): --resume goes on
    from the step-2 checkpoint, ends with the same weights bit for bit, and logs each step once."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    argv = flags + ["--save-every", "2"]
    script.main(script.parse_args(common_flags(char_model_dir, straight) + argv))
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("final"))
    assert harness.latest_checkpoint(resumed).endswith("step_000002")
    script.main(script.parse_args(common_flags(char_model_dir, resumed) + argv + ["--resume"]))
    a, b = weights(straight / "final"), weights(resumed / "final")
    assert a.keys() == b.keys()
    start = weights(char_model_dir)
    assert not all(np.array_equal(a[k], start[k]) for k in a.keys() & start.keys())  # it trained
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert without_timings(rows(resumed / "metrics.jsonl")) == without_timings(rows(straight / "metrics.jsonl"))


# ----------------------------------------------------------------------------- Ctrl-C

CTRL_C_CHILD = """
import json, os, sys, time
import torch
torch.set_num_threads(1)
import common, sft

argv, tmp = json.loads(sys.argv[1])
real, calls = common.optimizer_step, []

def step_and_wait(*args, **kwargs):  # in step 3: tell the parent, wait for its signal(s)
    calls.append(1)
    if len(calls) == 3:
        open(os.path.join(tmp, "marker"), "w").close()
        for _ in range(3000):
            if os.path.exists(os.path.join(tmp, "go")):
                break
            time.sleep(0.01)
    return real(*args, **kwargs)

common.optimizer_step = step_and_wait
sft.main(sft.parse_args(argv))
"""


@pytest.mark.slow  # a fresh python process that imports torch and transformers: ~12 s on 2 busy cores
def test_ctrl_c_finishes_the_step_saves_and_exits_130(char_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = common_flags(char_model_dir, out) + SFT_FLAGS + small_data(tmp_path)
    child = start_child(CTRL_C_CHILD, argv + ["--n-steps", "50"], tmp_path)  # now in step 3
    child.send_signal(signal.SIGINT)
    (tmp_path / "go").touch()  # after the signal: the step goes on only once the signal is in
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-2000:]
    assert harness.latest_checkpoint(out) == str(out / "checkpoints" / "step_000003")
    assert [r["step"] for r in rows(out / "metrics.jsonl")] == [1, 2, 3]
    assert "continue with --resume" in err and "Traceback" not in err
    sft.main(sft.parse_args(argv + ["--n-steps", "4", "--resume"]))
    assert [r["step"] for r in rows(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow  # a fresh python process that imports torch and transformers: ~12 s on 2 busy cores
def test_a_second_ctrl_c_stops_at_once(char_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = common_flags(char_model_dir, out) + SFT_FLAGS + small_data(tmp_path) + ["--n-steps", "50"]
    child = start_child(CTRL_C_CHILD, argv, tmp_path)  # now in step 3, and no "go" comes
    child.send_signal(signal.SIGINT)
    for line in child.stderr:  # the first one is in when the handler says so
        if "Ctrl-C again stops at once" in line:
            break
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode not in (0, 130) and err.rstrip().endswith("KeyboardInterrupt"), err[-2000:]
    assert harness.latest_checkpoint(out) is None  # step 3 never finished


# ----------------------------------------------------------------------------- out of memory


@pytest.mark.parametrize("script, error", [
    ("sft", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("dpo", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("expert_iteration", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("grpo", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("sft_mlx", RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory "
                             "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")),
    ("grpo_mlx", RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory "
                              "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")),
])
def test_out_of_memory_exits_with_one_line_naming_the_flags(char_model_dir, tmp_path, monkeypatch, script, error):
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(common_mlx if script.endswith("_mlx") else common, "optimizer_step", out_of_memory)
    flags = {"sft": SFT_FLAGS, "sft_mlx": SFT_FLAGS, "dpo": ["--batch-size", "4", "--reward",
                                                             SEVENS.replace(":sevens", ":coin")],
             "expert_iteration": ["--questions-per-step", "4", "--reward", SEVENS.replace(":sevens", ":always")]}
    steps = "--n-ei-steps" if script == "expert_iteration" else "--n-steps"
    argv = common_flags(char_model_dir, tmp_path) + [steps, "2"] + flags.get(script, [
        "--rollout-batch-size", "8", "--group-size", "4", "--warmstart-steps", "0"])
    monkeypatch.setattr(sys, "argv", [script + ".py"] + argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(REPO, script + ".py"), run_name="__main__")
    message = str(exit_.value.code)
    assert message.startswith("nanoalign: out of memory") and "\n" not in message, message
    named = re.findall(r"--[a-z-]+", message)
    defaults = vars(__import__(script)).get("DEFAULTS")
    assert "--batch-size" in named and "--max-new-tokens" in named
    assert all(flag[2:].replace("-", "_") in defaults for flag in named), named
    assert ("--rollout-batch-size" in named) == script.startswith("grpo")


def test_other_errors_pass_through():
    def buggy(args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        harness.exit_on_oom(buggy, None, "--batch-size")
