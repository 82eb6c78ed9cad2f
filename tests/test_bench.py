"""bench.py's GPU section, run on the CPU with a tiny model: what it times is real work on
the right inputs (its speed is measured by bench.py itself, never asserted here)."""

import json
import re

import bench
import tasks


def _printed_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_arithmetic_jsonl_holds_true_sums_that_the_trainers_read():
    rows = tasks.read_jsonl(bench.arithmetic_jsonl(20, seed=3))
    assert len(rows) == 20
    for row in rows:
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", row["question"]).groups())
        assert row["answer"] == str(a + b)
    assert rows == tasks.read_jsonl(bench.arithmetic_jsonl(20, seed=3))  # deterministic per seed


def test_random_model_dir_keeps_the_shape_and_tokenizer_not_the_weights(tiny_model_dir, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bench.random_model_dir(tiny_model_dir, seed=1)
    path = _printed_json(capsys)["path"]
    source, made = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (tiny_model_dir, path))
    assert made.config.to_diff_dict() | {"_name_or_path": None} == source.config.to_diff_dict() | {"_name_or_path": None}
    assert AutoTokenizer.from_pretrained(path).get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    same = [torch.equal(a, b) for a, b in zip(source.state_dict().values(), made.state_dict().values())
            if a.ndim == 2]
    assert len(same) > 0 and not any(same)  # every matrix drawn anew


def test_grpo_step_timing_runs_on_given_model_and_questions(tiny_model_dir, capsys):
    bench.ours_grpo_step(3, 2, 2, 5, "float32", model=tiny_model_dir, device="cpu", data=bench.arithmetic_jsonl(8))
    out = _printed_json(capsys)
    assert len(out["step_s"]) == 2 and all(s > 0 for s in out["step_s"])  # 3 steps, the first dropped
    assert out["peak_gpu_gb"] == 0.0


def test_grpo_step_timing_runs_the_mlx_twin_on_the_same_flags(tiny_model_dir, capsys, monkeypatch):
    # bench.py --only twins: the same call with script="grpo_mlx" times grpo_mlx.py
    import grpo_mlx

    ran = []
    monkeypatch.setattr(grpo_mlx, "main", lambda args, _main=grpo_mlx.main: ran.append(args) or _main(args))
    bench.ours_grpo_step(3, 2, 2, 5, "float32", model=tiny_model_dir, device="cpu", data=bench.arithmetic_jsonl(8),
                         script="grpo_mlx")
    out = _printed_json(capsys)
    assert len(ran) == 1 and ran[0].n_steps == 3 and ran[0].max_new_tokens == 5
    assert len(out["step_s"]) == 2 and all(s > 0 for s in out["step_s"])
    assert out["peak_gpu_gb"] == 0.0 and out["peak_rss_gb"] > 0
