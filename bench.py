"""Benchmarks, one independent section each, printed as one table per section.

Every measurement runs in a fresh subprocess, so what one section loads (a BLAS, a
framework, its threads) never leaks into another.

    python bench.py                          # every section
    python bench.py --only blas              # MLX matmul: bundled reference BLAS vs load_fast_blas()
    python bench.py --only blas --sizes 256 1024 --repeats 50
    python bench.py --only rollouts          # our samplers vs transformers' generate and mlx_lm.batch_generate
    python bench.py --only grpo sft          # a GRPO / SFT step vs TRL's trainers, fp32 and bf16
    python bench.py --only twins             # the same SFT / GRPO step in torch and in MLX
    python bench.py --only logprobs          # training forward + backward: LM head everywhere vs from the response on
    python bench.py --only gpu               # CUDA: a GRPO step vs TRL and the sampler, random weights (results/speed)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

import harness
import machine
import tasks

ROOT = os.path.dirname(os.path.abspath(__file__))

# ---- defaults (every one a --flag) ----
sizes = [1024]  # blas: square fp32 matmul sizes
warmup = 3
repeats = 20  # timings are the median of this many runs
n_prompts = 8  # rollouts: r1_zero chain_sum prompts, each sampled to exactly max_new_tokens
max_new_tokens = 64
train_steps = 4  # grpo / sft / gpu: steps per run (the first is dropped as warm-up)
gpu_model = ""  # gpu: config + tokenizer directory (default: the embedded model's)
gpu_device = "cuda"  # gpu: cpu for a smoke test
gpu_prompts, gpu_group, gpu_tokens = 8, 8, 256  # gpu: one GRPO step's questions x completions x new tokens


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), help="sections to run (default: all)")
    p.add_argument("--cache-dir", default=None, help="nanoalign cache (default: $NANOALIGN_CACHE or ~/.cache/nanoalign)")
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=int, default=warmup)
    g.add_argument("--repeats", type=int, default=repeats)
    g = p.add_argument_group("blas")
    g.add_argument("--sizes", type=int, nargs="+", default=sizes)
    g = p.add_argument_group("rollouts")
    g.add_argument("--n-prompts", type=int, default=n_prompts)
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g = p.add_argument_group("grpo / sft (vs TRL)")
    g.add_argument("--train-steps", type=int, default=train_steps)
    g = p.add_argument_group("gpu (random weights of the model's shape: the lent GPU machine reaches no hub)")
    g.add_argument("--gpu-model", default=gpu_model, help="a directory with config.json and the tokenizer "
                   "(default: the embedded model's; its weights are not read)")
    g.add_argument("--gpu-device", default=gpu_device)
    g.add_argument("--gpu-prompts", type=int, default=gpu_prompts)
    g.add_argument("--gpu-group", type=int, default=gpu_group)
    g.add_argument("--gpu-tokens", type=int, default=gpu_tokens)
    return p.parse_args(argv)


def run_child(call, env=None):
    """Run `bench.<call>` in a fresh interpreter and return the JSON it prints last."""
    out = subprocess.run(
        [sys.executable, "-c", f"import bench; bench.{call}"], cwd=ROOT, env={**os.environ, **(env or {})},
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(title, header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


# ----------------------------------------------------------------------------- blas


def mlx_matmul_gflops(sizes, warmup, repeats, fast, cache=None):
    """Child process: fp32 MLX matmul GFLOP/s per size, with or without load_fast_blas()."""
    lib = machine.load_fast_blas(cache) if fast else None
    import mlx.core as mx

    threads = None
    if lib:
        import ctypes

        threads = ctypes.CDLL(lib).openblas_get_num_threads()
    gflops = {}
    for n in sizes:
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))  # (n, n) fp32
        for _ in range(warmup):
            mx.eval(a @ b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mx.eval(a @ b)
            times.append(time.perf_counter() - t0)
        gflops[n] = 2 * n**3 / statistics.median(times) / 1e9
    print(json.dumps({"lib": lib, "threads": threads, "gflops": gflops}))


def bench_blas(args):
    if sys.platform != "linux":
        print("\nblas: only Linux swaps MLX's BLAS (macOS uses Accelerate)")
        return
    cores = len(os.sched_getaffinity(0))
    variants = [  # (label, fast, env)
        ("bundled reference BLAS", False, {}),
        ("load_fast_blas() (OpenBLAS, every core)", True, {}),
        ("  with OPENBLAS_NUM_THREADS=1", True, {"OPENBLAS_NUM_THREADS": "1"}),
    ]
    call = f"mlx_matmul_gflops({args.sizes}, {args.warmup}, {args.repeats}, {{fast}}, {args.cache_dir!r})"
    results = [run_child(call.format(fast=fast), env) for _, fast, env in variants]
    base = results[0]["gflops"]
    header = ["MLX fp32 matmul", "threads"]
    for n in args.sizes:
        header += [f"GFLOP/s@{n}", "speed-up"]
    rows = []
    for (label, _, _), r in zip(variants, results):
        row = [label, r["threads"] or "-"]
        for n in map(str, args.sizes):  # JSON made the keys strings
            row += [f"{r['gflops'][n]:.1f}", f"{r['gflops'][n] / base[n]:.1f}x"]
        rows.append(row)
    print_table(f"blas: median of {args.repeats} after {args.warmup} warm-up, {cores} cores", header, rows)
    print(f"fast library: {results[1]['lib']}")


# ----------------------------------------------------------------------------- rollouts


def median_rate(fn, repeats):
    """Median of fn()'s count per second over repeats runs, after one warm-up run."""
    fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def mlx_rollout_tokens_per_s(n_prompts, max_new_tokens, repeats, cache=None):
    """Child process: generated tokens/s of our MLX sampler and of mlx_lm.batch_generate on
    the same prompts and model, both at temperature 1 with EOS banned (equal work)."""
    import common_mlx
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = common_mlx.load_model(machine.DEFAULT_MODEL, common_mlx.pick_device("cpu"), mx.float32, cache)
    prompts = [tasks.r1_zero_prompt(ex["question"]) for ex in tasks.task_split("chain_sum", "eval", n_prompts)]
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    eos = list(tokenizer.eos_token_ids)

    def ban_eos(tokens, logits):
        logits[:, eos] = -float("inf")
        return logits

    def ours():
        out = common_mlx.generate(model, tokenizer, prompts,
                                  harness.Sampling(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens))
        return sum(len(o["response_ids"]) for o in out)

    def theirs():
        out = mlx_lm.batch_generate(model, tokenizer, prompt_ids, max_tokens=max_new_tokens, return_token_ids=True,
                                    sampler=make_sampler(temp=1.0), logits_processors=[ban_eos])
        return sum(len(ids) for ids in out.token_ids)

    # the floor: the same tokens' matmuls alone (every 2-D weight, the tied embedding as the head)
    from mlx.utils import tree_flatten

    weights = [w for name, w in tree_flatten(model.parameters()) if name.endswith("weight") and w.ndim == 2]
    inputs = {w.shape[1]: mx.random.normal((n_prompts, w.shape[1])) for w in weights}

    def matmuls_alone():
        for _ in range(max_new_tokens):
            mx.eval([inputs[w.shape[1]] @ w.T for w in weights])
        return n_prompts * max_new_tokens

    print(json.dumps({"ours": median_rate(ours, repeats), "mlx_lm": median_rate(theirs, repeats),
                      "floor": median_rate(matmuls_alone, repeats)}))


def torch_rollout_tokens_per_s(n_prompts, max_new_tokens, repeats, dtype, cache=None):
    """Child process: generated tokens/s of common.generate and of transformers' generate on
    the same prompts and weights, sampling at temperature 1, exactly max_new_tokens each.
    dtype bfloat16: ours keeps fp32 weights under autocast, HF gets bf16 weights."""
    import torch

    import common

    device = torch.device("cpu")
    model, tokenizer = common.load_model(machine.DEFAULT_MODEL, device, getattr(torch, dtype), cache)
    hf_model = common.load_model(machine.DEFAULT_MODEL, device, torch.float32, cache)[0].to(getattr(torch, dtype))
    prompts = [tasks.r1_zero_prompt(ex["question"]) for ex in tasks.task_split("chain_sum", "eval", n_prompts)]
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def ours():
        out = common.generate(model, tokenizer, prompts,
                              harness.Sampling(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens))
        return sum(len(o["response_ids"]) for o in out)

    def theirs():
        with torch.no_grad():
            out = hf_model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)
        return (out.shape[1] - encoded["input_ids"].shape[1]) * out.shape[0]

    # the floor: the same tokens' matmuls alone (every weight read once per token, at HF's dtype)
    weights = [m.weight.detach() for m in hf_model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(n_prompts, w.shape[1], dtype=w.dtype) for w in weights}

    def matmuls_alone():
        with torch.no_grad():
            for _ in range(max_new_tokens):
                for w in weights:
                    torch.nn.functional.linear(inputs[w.shape[1]], w)
        return n_prompts * max_new_tokens

    print(json.dumps({"ours": median_rate(ours, repeats), "hf": median_rate(theirs, repeats),
                      "floor": median_rate(matmuls_alone, repeats)}))


def bench_rollouts(args):
    repeats = max(1, min(args.repeats, 3))
    rows = []
    for dtype in ("float32", "bfloat16"):
        r = run_child(f"torch_rollout_tokens_per_s({args.n_prompts}, {args.max_new_tokens}, {repeats}, {dtype!r}, "
                      f"{args.cache_dir!r})")
        rows += [[f"common.generate {dtype}", f"{r['ours']:.0f}", f"{r['ours'] / r['hf']:.2f}x"],
                 [f"transformers generate {dtype}", f"{r['hf']:.0f}", "1.00x"],
                 [f"  its matmuls alone {dtype} (a bound)", f"{r['floor']:.0f}", f"{r['floor'] / r['hf']:.2f}x"]]
    r = run_child(f"mlx_rollout_tokens_per_s({args.n_prompts}, {args.max_new_tokens}, {repeats}, {args.cache_dir!r})")
    rows += [["common_mlx.generate float32", f"{r['ours']:.0f}", f"{r['ours'] / r['mlx_lm']:.2f}x"],
             ["mlx_lm.batch_generate float32", f"{r['mlx_lm']:.0f}", "1.00x"],
             ["  its matmuls alone float32 (a bound)", f"{r['floor']:.0f}", f"{r['floor'] / r['mlx_lm']:.2f}x"]]
    print_table(f"rollouts: SmolLM2-135M, {args.n_prompts} chain_sum prompts x exactly {args.max_new_tokens} new "
                f"tokens, T=1, median of {repeats}", ["sampler", "tokens/s", "vs the library's"], rows)

# ----------------------------------------------------------------------------- training steps vs TRL


def _step_times_from_metrics(path):
    """step_s of every training row of a metrics.jsonl, first (warm-up) step dropped."""
    rows = [json.loads(line) for line in open(path)]
    return [r["step_s"] for r in rows if "step_s" in r][1:]


def ours_grpo_step(n_steps, n_prompts, group_size, max_new_tokens, dtype, cache=None, model=None, device="auto",
                   data=None, script="grpo"):
    """Child process: grpo.py seconds per step, exactly max_new_tokens per completion, beta 0.
    model: a model directory (default: the embedded model); data: a question/answer JSONL
    used for training and evaluation (default: basic_arithmetic from reasoning-gym);
    script: "grpo_mlx" times the MLX twin with the same flags."""
    import importlib
    import tempfile

    grpo = importlib.import_module(script)

    out = tempfile.mkdtemp(prefix="bench-grpo-")
    argv = ["--n-steps", str(n_steps), "--rollout-batch-size", str(n_prompts * group_size), "--group-size",
            str(group_size), "--grad-accum", "1", "--max-new-tokens", str(max_new_tokens), "--min-new-tokens",
            str(max_new_tokens), "--warmstart-steps", "0", "--eval-every", "0", "--save-every", "0", "--n-eval", "1",
            "--dtype", dtype, "--device", device, "--out-dir", out,
            "--no-dynamic-sampling"]  # one generation batch a step, as TRL's (dynamic sampling would resample)
    argv += ["--train-data", data, "--eval-data", data] if data else ["--task", "basic_arithmetic"]
    argv += ["--model", model] if model else []
    grpo.main(grpo.parse_args(argv + (["--cache-dir", cache] if cache else [])))
    print(json.dumps({"step_s": _step_times_from_metrics(os.path.join(out, "metrics.jsonl")),
                      "peak_rss_gb": harness.peak_rss_gb(),
                      "peak_gpu_gb": _peak_gpu_gb() if script == "grpo" else 0.0}))  # MLX: no torch import


def _peak_gpu_gb():
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def trl_grpo_step(n_steps, n_prompts, group_size, max_new_tokens, dtype, cache=None, model=None, device="auto",
                  data=None):
    """Child process: TRL GRPOTrainer seconds per step on the same model, questions, prompt,
    reward and sizes (one generation batch and one optimizer step per step, beta 0)."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import common
    import rewards

    path = model or machine.resolve_model(machine.DEFAULT_MODEL, cache)
    examples = tasks.read_jsonl(data) if data else tasks.task_split("basic_arithmetic", "train", 64)
    dataset = Dataset.from_list([{"prompt": tasks.r1_zero_prompt(ex["question"]), "answer": ex["answer"]}
                                 for ex in examples])

    def reward(completions, answer, **kwargs):
        return [rewards.r1_zero_reward_fn(c, a)["reward"] for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        ends = []

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=n_prompts * group_size,
        num_generations=group_size, max_completion_length=max_new_tokens, max_steps=n_steps, learning_rate=1e-5,
        gradient_accumulation_steps=1, beta=0.0, bf16=dtype == "bfloat16",
        use_cpu=common.pick_device(device).type != "cuda", report_to=[],
        logging_steps=1000, save_strategy="no", generation_kwargs={"min_new_tokens": max_new_tokens}, seed=0)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    ends = [start] + Clock.ends
    print(json.dumps({"step_s": [b - a for a, b in zip(ends, ends[1:])][1:], "peak_rss_gb": harness.peak_rss_gb(),
                      "peak_gpu_gb": _peak_gpu_gb()}))


def ours_sft_step(n_steps, batch_size, dtype, cache=None, script="sft"):
    """Child process: sft.py seconds per step, completion-only, gsm_symbolic traces
    (script "sft_mlx": the MLX twin with the same flags)."""
    import importlib
    import tempfile

    sft = importlib.import_module(script)

    out = tempfile.mkdtemp(prefix="bench-sft-")
    argv = ["--n-steps", str(n_steps), "--batch-size", str(batch_size), "--grad-accum", "1", "--task", "gsm_symbolic",
            "--warmup-steps", "0", "--n-eval", "1", "--max-new-tokens", "1", "--dtype", dtype, "--out-dir", out]
    sft.main(sft.parse_args(argv + (["--cache-dir", cache] if cache else [])))
    print(json.dumps({"step_s": _step_times_from_metrics(os.path.join(out, "metrics.jsonl")),
                      "peak_rss_gb": harness.peak_rss_gb()}))


def trl_sft_step(n_steps, batch_size, dtype, cache=None):
    """Child process: TRL SFTTrainer seconds per step on the same (prompt, completion) pairs,
    completion-only loss, max length 512."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    path = machine.resolve_model(machine.DEFAULT_MODEL, cache)
    args = types.SimpleNamespace(train_data="", task="gsm_symbolic", n_train=batch_size * (n_steps + 1))
    data = Dataset.from_list([{"prompt": p, "completion": r} for p, r in tasks.sft_pairs(args)])

    class Clock(TrainerCallback):
        ends = []

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    config = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-sft-"), per_device_train_batch_size=batch_size,
                       max_steps=n_steps, learning_rate=5e-5, completion_only_loss=True, max_length=512,
                       bf16=dtype == "bfloat16", use_cpu=True, report_to=[], logging_steps=1000, save_strategy="no",
                       seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(path), callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    ends = [start] + Clock.ends
    print(json.dumps({"step_s": [b - a for a, b in zip(ends, ends[1:])][1:], "peak_rss_gb": harness.peak_rss_gb()}))


def _vs_trl(title, calls, args, memory="peak_rss_gb"):
    """Run each (label, child call) in a fresh process, alternating, and print one table.
    memory: the peak to show, "peak_rss_gb" or "peak_gpu_gb"."""
    results = {label: run_child(call) for label, call in calls}
    trl_best = min(statistics.median(r["step_s"]) for label, r in results.items() if label.startswith("TRL"))
    rows = [[label, f"{statistics.median(r['step_s']):.1f}", f"{trl_best / statistics.median(r['step_s']):.2f}x",
             f"{r[memory]:.1f}"] for label, r in results.items()]
    header = {"peak_rss_gb": "peak RSS GB", "peak_gpu_gb": "peak GPU GB"}[memory]
    print_table(title, ["", "s/step (median)", "vs best TRL", header], rows)


def bench_grpo(args):
    n, p, g, t = args.train_steps, 2, 4, args.max_new_tokens
    calls = [(f"{who} {dtype}", f"{fn}({n}, {p}, {g}, {t}, {dtype!r}, {args.cache_dir!r})")
             for dtype in ("float32", "bfloat16") for who, fn in (("grpo.py", "ours_grpo_step"),
                                                                   ("TRL GRPOTrainer", "trl_grpo_step"))]
    calls.insert(0, ("grpo.py auto", f"ours_grpo_step({n}, {p}, {g}, {t}, 'auto', {args.cache_dir!r})"))
    _vs_trl(f"grpo: one step = {p} prompts x {g} completions x exactly {t} new tokens + one update, beta 0, "
            f"{n} steps, first dropped", calls, args)


def bench_sft(args):
    n, b = args.train_steps, 4
    calls = [(f"{who} {dtype}", f"{fn}({n}, {b}, {dtype!r}, {args.cache_dir!r})")
             for dtype in ("float32", "bfloat16") for who, fn in (("sft.py", "ours_sft_step"),
                                                                  ("TRL SFTTrainer", "trl_sft_step"))]
    _vs_trl(f"sft: one step = {b} gsm_symbolic traces, completion-only loss, {n} steps, first dropped", calls, args)


def bench_twins(args):
    """The same SFT and GRPO steps in torch and in MLX (fp32: the one dtype MLX's CPU runs
    fast on Linux; on a Mac both run where --dtype auto puts them)."""
    n, t = args.train_steps, args.max_new_tokens
    dtype = "float32" if sys.platform == "linux" else "auto"
    for title, calls in [
        (f"sft: one step = 4 gsm_symbolic traces, completion-only loss, {dtype}",
         [(script, f"ours_sft_step({n}, 4, {dtype!r}, {args.cache_dir!r}, script={script!r})")
          for script in ("sft", "sft_mlx")]),
        (f"grpo: one step = 2 prompts x 4 completions x exactly {t} new tokens + one update, {dtype}",
         [(script, f"ours_grpo_step({n}, 2, 4, {t}, {dtype!r}, {args.cache_dir!r}, script={script!r})")
          for script in ("grpo", "grpo_mlx")])]:
        results = {label: run_child(call) for label, call in calls}
        step_s = {label: statistics.median(r["step_s"]) for label, r in results.items()}
        torch_s = step_s[calls[0][0]]
        rows = [[f"{label}.py", f"{step_s[label]:.1f}", f"{torch_s / step_s[label]:.2f}x", f"{r['peak_rss_gb']:.1f}"]
                for label, r in results.items()]
        print_table(f"twins, {title}, {n} steps, first dropped", ["", "s/step (median)", "vs torch", "peak RSS GB"],
                    rows)


# ----------------------------------------------------------------------------- training log-probs


def logprob_step_rates(n_rows, repeats, dtype, cache=None):
    """Child process: rows/s of a training forward + backward (common.get_response_log_probs on
    r1_zero chain_sum traces, shared prefix on) with the LM head on every position vs from the
    first response position only (score_from), alternating, same model and batch."""
    import torch

    import common

    torch.manual_seed(0)
    model, tokenizer = common.load_model(machine.DEFAULT_MODEL, torch.device("cpu"), getattr(torch, dtype), cache)
    examples = tasks.task_split("chain_sum", "train", n_rows)
    batch = common.tokenize_prompt_and_output([tasks.r1_zero_prompt(ex["question"]) for ex in examples],
                                              [tasks.r1_zero_trace("", ex["answer"]) for ex in examples], tokenizer)
    skip = harness.positions(batch["input_ids"].tolist(), batch["response_mask"].tolist())

    def step(score_from):
        out = common.get_response_log_probs(model, batch["input_ids"], batch["labels"], shared_prefix=skip["shared_prefix"],
                                            score_from=score_from)
        (out["log_probs"] * batch["response_mask"]).sum().backward()
        model.zero_grad(set_to_none=True)
        return n_rows

    every = lambda: step(0)  # noqa: E731
    response_only = lambda: step(skip["score_from"])  # noqa: E731
    rates = {"all_positions": [], "response_only": []}
    for _ in range(repeats):  # alternate, so that drift on a noisy machine hits both alike
        rates["all_positions"].append(median_rate(every, 1))
        rates["response_only"].append(median_rate(response_only, 1))
    print(json.dumps({k: statistics.median(v) for k, v in rates.items()} | {"tokens": batch["input_ids"].shape[1],
                                                                             **skip}))


def bench_logprobs(args):
    rows = []
    for dtype in ("float32", "bfloat16"):
        r = run_child(f"logprob_step_rates(16, {max(3, args.repeats)}, {dtype!r}, {args.cache_dir!r})")
        rows.append([dtype, f"{r['all_positions']:.2f}", f"{r['response_only']:.2f}",
                     f"{r['response_only'] / r['all_positions']:.2f}x"])
    print_table(f"training forward + backward, 16 chain_sum traces ({r['tokens']} tokens, shared prefix "
                f"{r['shared_prefix']}, first response position {r['score_from']}), rows/s",
                ["dtype", "LM head everywhere", "from the response on", "ratio"], rows)


# ----------------------------------------------------------------------------- GPU


def random_model_dir(source, seed=0):
    """Child process: a randomly initialized model of source's shape (its config.json and
    tokenizer; no weights are read), saved to a temporary directory whose path it prints.
    Speed depends on the shape, not the weights, and the lent GPU machine reaches no hub."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import common

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    out = tempfile.mkdtemp(prefix="bench-random-model-")
    common.save_pretrained(model, AutoTokenizer.from_pretrained(source), out)
    print(json.dumps({"path": out}))


def arithmetic_jsonl(n, seed=0):
    """A question/answer JSONL of n two-term sums (no reasoning-gym needed), its path."""
    import random
    import tempfile

    rng, (fd, path) = random.Random(seed), tempfile.mkstemp(prefix="bench-sums-", suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return path


def gpu_rollout_tokens_per_s(model_dir, n_rows, max_new_tokens, repeats, device):
    """Child process: tokens/s sampling n_rows x exactly max_new_tokens (T = 1, bf16) with
    common.generate and with transformers' generate, with its dynamic KV cache and with its
    static cache, which transformers compiles on CUDA (torch.compile, CUDA graphs): how much of
    a decode step is kernel launches rather than arithmetic."""
    import torch

    import common

    device = common.pick_device(device)
    model, tokenizer = common.load_model(model_dir, device, common.pick_dtype("auto", device))
    hf_model = common.load_model(model_dir, device, torch.float32)[0].to(model.compute_dtype)
    prompts = [tasks.r1_zero_prompt(f"What is {10 + i} + {20 + i}?") for i in range(n_rows)]
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)

    def ours():  # returns Python lists: the GPU has finished
        sampling = harness.Sampling(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
        out = common.generate(model, tokenizer, prompts, sampling, batch_size=n_rows)
        return sum(len(o["response_ids"]) for o in out)

    def theirs(cache_implementation):  # median_rate's warm-up run compiles the static cache
        with torch.no_grad():
            out = hf_model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id, cache_implementation=cache_implementation)
        if device.type == "cuda":
            torch.cuda.synchronize()  # generate returns before the GPU has finished
        return (out.shape[1] - encoded["input_ids"].shape[1]) * out.shape[0]

    print(json.dumps({"common.generate": median_rate(ours, repeats),
                      "transformers generate, dynamic cache": median_rate(lambda: theirs(None), repeats),
                      "transformers generate, static cache (compiled on CUDA)": median_rate(lambda: theirs("static"),
                                                                                             repeats)}))


def bench_gpu(args):
    """The issue's GPU setting: SmolLM2-135M's shape with random weights, bf16, one GRPO step =
    8 prompts x 8 completions x exactly 256 new tokens + one update, ours vs TRL GRPOTrainer
    (no vLLM), and the sampling alone. Any CUDA machine; --gpu-device cpu for a smoke test."""
    source = args.gpu_model or machine.resolve_model(machine.DEFAULT_MODEL, args.cache_dir)
    model_dir = run_child(f"random_model_dir({source!r})")["path"]
    data = arithmetic_jsonl(64)
    n, p, g, t, dev = args.train_steps, args.gpu_prompts, args.gpu_group, args.gpu_tokens, args.gpu_device
    r = run_child(f"gpu_rollout_tokens_per_s({model_dir!r}, {p * g}, {t}, {max(1, min(args.repeats, 3))}, {dev!r})")
    dynamic = r["transformers generate, dynamic cache"]
    rows = [[name, f"{rate:.0f}", f"{rate / dynamic:.2f}x"] for name, rate in r.items()]
    print_table(f"gpu rollouts: {p * g} rows x exactly {t} new tokens, T=1, random weights of {source}'s shape",
                ["sampler", "tokens/s", "vs dynamic cache"], rows)
    calls = [(f"{who} bfloat16", f"{fn}({n}, {p}, {g}, {t}, 'bfloat16', model={model_dir!r}, device={dev!r}, "
                                 f"data={data!r})")
             for who, fn in (("grpo.py", "ours_grpo_step"), ("TRL GRPOTrainer", "trl_grpo_step"))]
    _vs_trl(f"gpu grpo: one step = {p} prompts x {g} completions x exactly {t} new tokens + one update, beta 0, "
            f"{n} steps, first dropped", calls, args, memory="peak_gpu_gb")


SECTIONS = {"blas": bench_blas, "rollouts": bench_rollouts, "grpo": bench_grpo, "sft": bench_sft,
            "twins": bench_twins, "logprobs": bench_logprobs,
            "gpu": bench_gpu}


def main(args):
    for name in args.only or SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    main(parse_args())
