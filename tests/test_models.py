"""The embedded model: converted once, loads in transformers and in mlx-lm with the same logits."""

import json
import os

import numpy as np
import pytest
import torch

import machine
import tasks

pytestmark = pytest.mark.slow


def test_cached_dir_is_a_plain_hf_directory(smollm2_dir):
    files = set(os.listdir(smollm2_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.load(open(os.path.join(smollm2_dir, "config.json")))
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # mlx-lm reads the top-level key


def test_resolve_model_reuses_the_cache(smollm2_dir):
    mtime = os.path.getmtime(os.path.join(smollm2_dir, "model.safetensors"))
    assert machine.resolve_model(machine.DEFAULT_MODEL) == smollm2_dir
    assert os.path.getmtime(os.path.join(smollm2_dir, "model.safetensors")) == mtime
    assert machine.resolve_model(smollm2_dir) == smollm2_dir  # a local dir passes through
    assert machine.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_cache_dir_follows_env_and_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOALIGN_CACHE", str(tmp_path / "env"))
    assert machine.cache_dir() == tmp_path / "env"
    assert machine.cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"


def test_transformers_and_mlx_give_the_same_next_token_logits(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer(tasks.r1_zero_prompt("What is 12 + 30?"), add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        torch_logits = model(torch.tensor([ids])).logits[0, -1].numpy()

    import mlx.core as mx
    import mlx_lm

    mlx_model, _ = mlx_lm.load(smollm2_dir)
    mlx_logits = np.array(mlx_model(mx.array([ids]))[0, -1])
    assert np.abs(torch_logits - mlx_logits).max() < 1e-3
    assert torch_logits.argmax() == mlx_logits.argmax()


def test_concurrent_first_uses_do_not_corrupt_the_cache(tmp_path):
    """Two processes convert into an empty cache at once: both end with the same complete
    directory and no temp dirs are left behind."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import machine; print(machine.resolve_model(machine.DEFAULT_MODEL))"
    env = {**os.environ, "NANOALIGN_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(tmp_path / "SmolLM2-135M-Instruct")
    assert sorted(os.listdir(tmp_path)) == ["SmolLM2-135M-Instruct"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(outs[0])  # complete and loadable
