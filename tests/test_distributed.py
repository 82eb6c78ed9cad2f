"""Several processes: `torchrun --nproc_per_node 2` (gloo, CPU) takes the steps one process takes
with the same global batch. Each script runs a few steps on a tiny model once in this process and
once in two: the final weights agree within fp32 rounding (the gradients are summed in another
order), the logged metrics too, process 0 alone logs (each step once) and checkpoints, and runs
resumed in two processes from a one-process checkpoint end where the one-process runs do.
Sampling is taken out of the comparison, not made independent of the number of processes: both
sides sample from tests/distributed_worker.fixed_rollouts (answers fixed by the prompt and its
copy, no RNG), which also records that each process sampled half the rollouts. One more run
samples for real, and the processes' sampling generators are checked to differ."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from distributed_worker import run
from safetensors.torch import load_file
from test_scripts import SEVENS, common_flags, rows

import harness
import sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = {"step_s", "train_tok_s", "rollout_tok_s", "peak_rss_gb"}
GRPO = ["--n-steps", "2", "--warmstart-steps", "0", "--reward", SEVENS, "--lr", "1e-3", "--eval-every", "0"]
JOBS = {  # name: script, flags (each run in one process and in two)
    "sft": ("sft", ["--n-steps", "3", "--batch-size", "8", "--grad-accum", "2", "--lr", "3e-3"]),
    "sft_packed": ("sft", ["--n-steps", "2", "--batch-size", "4", "--grad-accum", "4", "--lr", "3e-3", "--packed",
                           "--seq-length", "24"]),
    # several optimizer steps and epochs per rollout batch (shuffled), old and reference log-probs
    "grpo": ("grpo", GRPO + ["--rollout-batch-size", "8", "--group-size", "2", "--batch-size", "4", "--grad-accum", "2",
                             "--epochs-per-rollout", "2", "--beta", "0.1"]),
    # normalized per microbatch and by the batch's std; groups dropped and sampled again (uneven shares)
    "grpo_bnpo": ("grpo", GRPO + ["--rollout-batch-size", "12", "--group-size", "3", "--grad-accum", "2",
                                  "--loss-type", "bnpo", "--scale-rewards", "batch", "--dynamic-sampling"]),
    "expert_iteration": ("expert_iteration", ["--n-ei-steps", "2", "--questions-per-step", "4", "--group-size", "3",
                                              "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3",
                                              "--reward", SEVENS.replace(":sevens", ":always")]),
    "dpo": ("dpo", ["--n-steps", "2", "--batch-size", "4", "--grad-accum", "2", "--group-size", "2", "--lr", "1e-3",
                    "--reward", SEVENS.replace(":sevens", ":coin")]),
}
# --fsdp: the same steps with each process holding half of the weights, gradients and AdamW state
# (in one process --fsdp shards nothing: the plain run); checkpoints written whole
FSDP = {f"{name}_fsdp": (script, extra + ["--fsdp"]) for name, (script, extra) in JOBS.items() if name in ("sft", "grpo")}
FSDP["grpo_fsdp"][1].append("--checkpoint-activations")
JOBS.update(FSDP)
RESUMED = ("sft", "grpo", "grpo_fsdp")  # from the one-process run's step-1 checkpoint, in two processes


def data_flags(name, root):
    """Small --train-data / --eval-data files: little task to generate in the child processes
    (dpo.py's --train-data is a file of pairs: it samples them for the task's questions)."""
    pairs, questions = root / "pairs.jsonl", root / "questions.jsonl"
    harness.write_jsonl(pairs, [{"prompt": f"{i}+1=", "response": f"{i + 1}"} for i in range(32)])
    harness.write_jsonl(questions, [{"question": f"{i}+2", "answer": f"{i + 2}"} for i in range(32)])
    train = [] if name == "dpo" else ["--train-data", str(pairs if name.startswith("sft") else questions)]
    return train + ["--eval-data", str(questions)]


def flags(name, model_dir, out_dir, root):
    script, extra = JOBS[name]
    return common_flags(model_dir, out_dir) + data_flags(name, root) + extra + ["--save-every", "1"]


@pytest.fixture(scope="module")
def runs(char_model_dir, tmp_path_factory):
    """Every job in one process (here), then all of them in two (one torchrun launch)."""
    root = tmp_path_factory.mktemp("distributed")
    jobs = []
    for name, (script, _) in JOBS.items():
        run(script, flags(name, char_model_dir, root / "one" / name, root))
        jobs.append((script, flags(name, char_model_dir, root / "two" / name, root), True))
    for name in RESUMED:
        checkpoint = "checkpoints/step_000001"
        shutil.copytree(root / "one" / name / checkpoint, root / "resumed" / name / checkpoint)
        jobs.append((JOBS[name][0], flags(name, char_model_dir, root / "resumed" / name, root) + ["--resume"], True))
    for name in ("grpo", "grpo_fsdp"):  # the real sampler (under --fsdp on whole weights, _gathered)
        jobs.append(("grpo", flags(name, char_model_dir, root / "sampled" / name, root), False))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(REPO, "tests", "distributed_worker.py"), json.dumps(jobs), str(root)]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return root


def assert_same_weights(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def assert_same_metrics(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]  # each step once: process 0 alone logs
    for one, two in zip(a, b):
        assert one.keys() == two.keys()
        for k in one.keys() - TIMINGS:
            assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), k


@pytest.mark.slow
@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_take_the_one_process_steps(runs, name):
    one, two = runs / "one" / name, runs / "two" / name
    assert_same_weights(one / "final", two / "final")
    assert_same_metrics(rows(one / "metrics.jsonl"), rows(two / "metrics.jsonl"))
    assert sorted(os.listdir(two / "checkpoints")) == sorted(os.listdir(one / "checkpoints"))
    assert os.path.exists(two / "checkpoints" / "step_000001" / "train_state.pt")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "expert_iteration", "dpo"])
def test_each_process_samples_half_the_rollouts(runs, name):
    def calls(path):
        return [int(n) for n in open(path).read().split()]

    one = calls(runs / "one" / name / "sampled_rank0.txt")
    two = [calls(runs / "two" / name / f"sampled_rank{r}.txt") for r in (0, 1)]
    assert two[0] == two[1] == [n // 2 for n in one]


@pytest.mark.slow
@pytest.mark.parametrize("name", RESUMED)
def test_two_processes_resume_a_one_process_checkpoint(runs, name):
    one, resumed = runs / "one" / name, runs / "resumed" / name
    assert_same_weights(one / "final", resumed / "final")
    assert_same_metrics([r for r in rows(one / "metrics.jsonl") if r["step"] > 1], rows(resumed / "metrics.jsonl"))


@pytest.mark.slow
def test_under_fsdp_each_process_holds_half_the_weights(runs):
    held = [json.load(open(runs / f"fsdp_rank{r}.json")) for r in (0, 1)]
    whole = held[0]["whole"]
    assert held[0]["dtensors"] == held[1]["dtensors"] > 10
    assert held[0]["held"] + held[1]["held"] == whole and max(h["held"] for h in held) <= 0.55 * whole


def test_fsdp_refuses_lora(capsys):
    with pytest.raises(SystemExit):
        sft.parse_args(["--task", "chain_sum", "--fsdp", "--lora-rank", "8"])
    assert "--fsdp shards full fine-tuning" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FSDP))
def test_fsdp_checkpoints_hold_the_whole_optimizer_state(runs, name):
    """What FSDP's processes gathered into the checkpoint is the one-process optimizer state."""
    def state(run):
        return torch.load(runs / run / name / "checkpoints" / "step_000001" / "train_state.pt", weights_only=False)

    one, two = state("one")["optimizer"], state("two")["optimizer"]
    assert one["state"].keys() == two["state"].keys() and len(one["state"]) > 10
    for param, moments in one["state"].items():
        for k, v in moments.items():
            torch.testing.assert_close(two["state"][param][k], v, rtol=1e-5, atol=1e-7, msg=f"{param} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "grpo_fsdp"])
def test_two_processes_sample_independently_from_one_global_rng(runs, name):
    run_dir = runs / "sampled" / name
    assert [r["step"] for r in rows(run_dir / "metrics.jsonl") if "reward" in r] == [1, 2]
    draws = [json.load(open(runs / f"rng_rank{r}.json")) for r in (0, 1)]
    assert draws[0]["rank_generator"] != draws[1]["rank_generator"]
    assert draws[0]["global"] == draws[1]["global"]


def test_grad_accum_must_split_evenly_among_the_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    assert not harness.is_main()
    with pytest.raises(SystemExit):
        sft.parse_args(["--task", "chain_sum", "--batch-size", "8", "--grad-accum", "2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--grad-accum (2) must be a positive multiple of the number of processes (4), e.g. 4" in err
    assert sft.parse_args(["--task", "chain_sum", "--batch-size", "8", "--grad-accum", "4"]).grad_accum == 4
