"""Tests of plot.py: PNGs per panel group from synthetic metrics.jsonl files, skipped panels, bad input;
and of --tensorboard's event files."""

import json
import os
import re
import subprocess
import sys

import pytest

import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(path, rows):
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def two_runs(tmp_path):
    """A GRPO-like run (rewards, a reward part, evaluations) and an SFT-like run (loss only);
    neither logs kl or clip_frac."""
    grpo = [{"step": 0, "eval_accuracy": 0.5, "eval_format_rate": 1.0}]
    for step in range(1, 31):  # more than SMOOTH_ABOVE points: the smoothed path runs too
        grpo.append({"step": step, "reward": step / 30, "format_reward": 1.0, "answer_reward": step / 30,
                     "reward/length": 0.1, "response_len": 20.0 + step, "entropy": 0.5, "loss": 0.01,
                     "grad_norm": 1.0, "rollout_tok_s": 100.0, "train_tok_s": 500.0, "step_s": 30.0})
    grpo.append({"step": 30, "eval_accuracy": 0.7, "eval_format_rate": 1.0, "eval_pass_at_k": 0.9})
    sft = [{"step": s, "loss": 1.0 / s, "grad_norm": 2.0, "lr": 1e-5, "train_tok_s": 400.0, "step_s": 6.0}
           for s in range(1, 6)]
    return [_write_run(tmp_path / "grpo_run" / "metrics.jsonl", grpo),
            _write_run(tmp_path / "sft_run" / "metrics.jsonl", sft)]


def test_plot_runs_writes_one_png_per_panel_and_skips_absent_ones(two_runs, tmp_path):
    out = tmp_path / "plots"
    written = plot.plot_runs(two_runs, str(out))
    names = [p.rsplit("/", 1)[-1] for p in written]
    assert names == ["reward.png", "accuracy.png", "response_len.png", "entropy.png", "loss.png", "throughput.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no kl.png, clip_frac.png, zero_std.png


def test_plot_cli_wall_axis_and_labels(two_runs, tmp_path, capsys):
    plot.main([*two_runs, "--out", str(tmp_path / "wall"), "--x", "wall", "--labels", "a,b"])
    printed = capsys.readouterr().out.split()
    assert len(printed) == 6 and all(open(p, "rb").read(8) == PNG_SIGNATURE for p in printed)
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        plot.plot_runs(two_runs, str(tmp_path / "x"), labels=["a"])


def test_wall_axis_is_cumulative_step_minutes(two_runs):
    rows = plot.read_metrics(two_runs[0])
    xs, ys = plot.series(rows, "eval_accuracy", "wall")
    assert xs == [0.0, 15.0] and ys == [0.5, 0.7]  # 30 steps of 30 s, the eval after the last one
    assert plot.series(rows, "eval_accuracy", "step") == ([0, 30], [0.5, 0.7])


def test_bad_input_is_one_line_naming_file_and_line(tmp_path):
    missing = str(tmp_path / "nope" / "metrics.jsonl")
    with pytest.raises(SystemExit) as e:
        plot.main([missing, "--out", str(tmp_path / "out")])
    assert str(e.value.code) == f"plot.py: {missing}: no such file"

    bad = tmp_path / "run" / "metrics.jsonl"
    _write_run(bad, [{"step": 1, "loss": 1.0}])
    bad.write_text(bad.read_text() + "\n{not json\n")
    with pytest.raises(SystemExit) as e:
        plot.main([str(bad), "--out", str(tmp_path / "out")])
    message = str(e.value.code)
    assert message.startswith(f"plot.py: {bad}:3: not JSON") and "\n" not in message

    bad.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: expected a JSON object")):
        plot.read_metrics(str(bad))


# ----------------------------------------------------------------------------- --tensorboard


def test_tensorboard_scalars_are_the_logged_numbers_at_their_steps(tmp_path):
    """In a fresh process, as an MLX script logs: no torch gets imported."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [{"step": 1, "reward": 0.25, "loss": -0.5, "tag": "text is skipped"},
            {"step": 2, "reward": 0.75, "zero_std_frac": 1}, {"step": 2, "eval_accuracy": 0.6}]
    code = ("import json, sys; import harness\n"
            "log = harness.MetricsLog(sys.argv[1], use_tensorboard=True)\n"
            "for row in json.loads(sys.argv[2]): log(row)\n"
            "assert 'torch' not in sys.modules, 'the MLX scripts log without torch'\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), json.dumps(rows)], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(plot.__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval_accuracy", "loss", "reward", "zero_std_frac"]
    assert [(e.step, e.value) for e in events.Scalars("reward")] == [(1, 0.25), (2, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, -0.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval_accuracy")] == [(2, pytest.approx(0.6))]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3  # metrics.jsonl as always
