"""Several processes in MLX: `mlx.launch -n 2` (the ring backend on 127.0.0.1, CPU) takes the
steps one process takes with the same global batch, as tests/test_distributed.py checks for
torchrun. sft_mlx.py and grpo_mlx.py run a few steps on a tiny model once in this process and
once in two: the final weights agree within fp32 rounding, the logged metrics too, process 0
alone logs (each step once) and checkpoints, and runs resumed in two processes from a
one-process checkpoint end where the one-process runs do. Both sides sample from
tests/distributed_worker.fixed_rollouts (no RNG), which records that each process sampled
half the rollouts. One more run samples for real, and the processes' sampling RNGs are
checked to differ.

This file is also the worker that mlx.launch starts: `python tests/test_mlx_distributed.py
JOBS ROOT` runs each job, then the checks of check_helpers, then writes done_rank<R>.json
(mlx.launch exits 0 even when a process fails, so the test looks for those)."""

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys

from distributed_worker import run  # the torch test's runner on fixed answers, common_mlx patched for *_mlx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# ----------------------------------------------------------------------------- the worker


def check_helpers(out_dir):
    """<out_dir>/helpers_rank<R>.json: a draw inside rank_generator and one from the global RNG
    after it (the test wants the first to differ between ranks, the second not), all_gather of
    arrays with a different number of rows per process, and all_reduce_sum."""
    import common_mlx
    import mlx.core as mx

    rank = int(os.environ["RANK"])
    with common_mlx.rank_generator(mx.default_device()):
        inside = mx.random.uniform(shape=(3,)).tolist()
    rows = common_mlx.all_gather(mx.full((rank + 1, 2), rank, dtype=mx.float32)).tolist()
    result = {"rank_generator": inside, "global": mx.random.uniform(shape=(3,)).tolist(), "rows": rows,
              "sum": common_mlx.all_reduce_sum({"a": rank + 1, "b": 0.5})}
    with open(os.path.join(out_dir, f"helpers_rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    for script, flags, fixed in json.loads(sys.argv[1]):
        run(script, flags, fixed)
    check_helpers(sys.argv[2])
    with open(os.path.join(sys.argv[2], f"done_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"world_size": os.environ["WORLD_SIZE"]}, f)
    raise SystemExit


# ----------------------------------------------------------------------------- the tests

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from test_distributed import assert_same_metrics  # noqa: E402
from test_scripts import SEVENS, common_flags, rows  # noqa: E402

import harness  # noqa: E402

GRPO = ["--n-steps", "2", "--warmstart-steps", "0", "--reward", SEVENS, "--lr", "1e-3", "--eval-every", "0"]
JOBS = {  # name: script, flags (each run in one process and in two)
    "sft": ("sft_mlx", ["--n-steps", "3", "--batch-size", "8", "--grad-accum", "2", "--lr", "3e-3"]),
    "sft_packed": ("sft_mlx", ["--n-steps", "2", "--batch-size", "4", "--grad-accum", "4", "--lr", "3e-3",
                               "--packed", "--seq-length", "24"]),
    # several optimizer steps and epochs per rollout batch (shuffled), old and reference log-probs
    "grpo": ("grpo_mlx", GRPO + ["--rollout-batch-size", "8", "--group-size", "2", "--batch-size", "4",
                                 "--grad-accum", "2", "--epochs-per-rollout", "2", "--beta", "0.1"]),
    # normalized per microbatch and by the batch's std; groups dropped and sampled again (uneven shares)
    "grpo_bnpo": ("grpo_mlx", GRPO + ["--rollout-batch-size", "12", "--group-size", "3", "--grad-accum", "2",
                                      "--loss-type", "bnpo", "--scale-rewards", "batch", "--dynamic-sampling"]),
}
RESUMED = ("sft", "grpo")  # from the one-process run's step-1 checkpoint, in two processes


def flags(name, model_dir, out_dir, root):
    """The job's flags, on small --train-data / --eval-data files (little task to generate)."""
    pairs, questions = root / "pairs.jsonl", root / "questions.jsonl"
    if not pairs.exists():
        harness.write_jsonl(pairs, [{"prompt": f"{i}+1=", "response": f"{i + 1}"} for i in range(32)])
        harness.write_jsonl(questions, [{"question": f"{i}+2", "answer": f"{i + 2}"} for i in range(32)])
    script, extra = JOBS[name]
    train = pairs if script == "sft_mlx" else questions
    return (common_flags(model_dir, out_dir) + ["--train-data", str(train), "--eval-data", str(questions)] + extra
            + ["--save-every", "1"])


def free_port():
    """A port, and the one after it, that nothing listens on now: mlx.launch's ring takes both."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port


@pytest.fixture(scope="module")
def runs(char_model_dir, tmp_path_factory):
    """Every job in one process (here), then all of them in two (one mlx.launch launch)."""
    root = tmp_path_factory.mktemp("mlx_distributed")
    jobs = []
    for name, (script, _) in JOBS.items():
        run(script, flags(name, char_model_dir, root / "one" / name, root))
        jobs.append((script, flags(name, char_model_dir, root / "two" / name, root), True))
    for name in RESUMED:
        checkpoint = "checkpoints/step_000001"
        shutil.copytree(root / "one" / name / checkpoint, root / "resumed" / name / checkpoint)
        jobs.append((JOBS[name][0], flags(name, char_model_dir, root / "resumed" / name, root) + ["--resume"], True))
    jobs.append(("grpo_mlx", flags("grpo", char_model_dir, root / "sampled" / "grpo", root), False))  # the real sampler
    launch = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    command = [launch, "-n", "2", "--backend", "ring", "-p", str(free_port()), "--", sys.executable,
               os.path.abspath(__file__), json.dumps(jobs), str(root)]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    finished = [json.load(open(root / f"done_rank{r}.json")) for r in (0, 1) if (root / f"done_rank{r}.json").exists()]
    assert done.returncode == 0 and finished == [{"world_size": "2"}] * 2, done.stdout[-3000:] + done.stderr[-5000:]
    return root


def assert_same_weights(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_take_the_one_process_steps(runs, name):
    one, two = runs / "one" / name, runs / "two" / name
    assert_same_weights(one / "final", two / "final")
    assert_same_metrics(rows(one / "metrics.jsonl"), rows(two / "metrics.jsonl"))
    assert sorted(os.listdir(two / "checkpoints")) == sorted(os.listdir(one / "checkpoints"))
    assert os.path.exists(two / "checkpoints" / "step_000001" / "train_state.pkl")


@pytest.mark.slow
def test_one_microbatch_per_process_gives_the_same_weights_up_to_rounding(runs):
    # sft: grad_accum 2 in 2 processes, so the sum of the two gradients is the one-process sum.
    # Bit for bit where the BLAS rounds a product the same whatever its operands' layout (seen
    # on AMD EPYC); OpenBLAS's AVX-512 kernels on an Intel Xeon left last-bit differences at ~10%
    # of the weights after 3 steps (at most 3.7e-9, half an ulp of the largest weight). A real
    # difference (a microbatch lost, a sum scaled) moves weights by ~lr = 3e-3.
    a, b = (load_file(runs / d / "sft" / "final" / "model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        rounding = 2 * np.spacing(np.abs(a[k]).max())  # two ulps of the tensor's largest weight
        assert np.abs(a[k].astype(np.float64) - b[k]).max() <= rounding, k


@pytest.mark.slow
def test_each_process_samples_half_the_rollouts(runs):
    def calls(path):
        return [int(n) for n in open(path).read().split()]

    one = calls(runs / "one" / "grpo" / "sampled_rank0.txt")
    two = [calls(runs / "two" / "grpo" / f"sampled_rank{r}.txt") for r in (0, 1)]
    assert two[0] == two[1] == [n // 2 for n in one]


@pytest.mark.slow
@pytest.mark.parametrize("name", RESUMED)
def test_two_processes_resume_a_one_process_checkpoint(runs, name):
    one, resumed = runs / "one" / name, runs / "resumed" / name
    assert_same_weights(one / "final", resumed / "final")
    assert_same_metrics([r for r in rows(one / "metrics.jsonl") if r["step"] > 1], rows(resumed / "metrics.jsonl"))


@pytest.mark.slow
def test_two_processes_sample_independently_from_one_global_rng(runs):
    run_dir = runs / "sampled" / "grpo"
    assert [r["step"] for r in rows(run_dir / "metrics.jsonl") if "reward" in r] == [1, 2]
    helpers = [json.load(open(runs / f"helpers_rank{r}.json")) for r in (0, 1)]
    assert helpers[0]["rank_generator"] != helpers[1]["rank_generator"]
    assert helpers[0]["global"] == helpers[1]["global"]
    # all_gather joins arrays of different lengths in rank order; all_reduce_sum sums
    assert helpers[0]["rows"] == helpers[1]["rows"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert helpers[0]["sum"] == helpers[1]["sum"] == {"a": 3.0, "b": 1.0}


@pytest.mark.parametrize("script", ["sft_mlx", "grpo_mlx"])
def test_grad_accum_must_split_evenly_among_the_processes(script, monkeypatch):
    # mlx.launch sets no WORLD_SIZE before parse_args: main checks once init_distributed has set it
    module = importlib.import_module(script)
    args = module.parse_args(["--task", "chain_sum", "--grad-accum", "2", "--batch-size", "8"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit, match=r"--grad-accum \(2\) must be a multiple of the number of processes \(4\)"):
        module.main(args)
