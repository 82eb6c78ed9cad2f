"""Benchmarks, one independent section each, printed as one table per section.

Every measurement runs in a fresh subprocess, so what one section loads (a BLAS, a
framework, its threads) never leaks into another.

    python bench.py                          # every section
    python bench.py --only blas              # MLX matmul: bundled reference BLAS vs load_fast_blas()
    python bench.py --only blas --sizes 256 1024 --repeats 50
    python bench.py --only rollouts          # MLX sampler (common_mlx.generate) vs mlx_lm.batch_generate
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

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
        ("load_fast_blas() (OpenBLAS)", True, {}),
        (f"  with OPENBLAS_NUM_THREADS={cores}", True, {"OPENBLAS_NUM_THREADS": str(cores)}),
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

    result = {}
    for name, fn in (("ours", ours), ("mlx_lm", theirs)):
        fn()  # warm-up
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            n = fn()
            rates.append(n / (time.perf_counter() - t0))
        result[name] = statistics.median(rates)
    print(json.dumps(result))


def bench_rollouts(args):
    repeats = max(1, min(args.repeats, 3))
    r = run_child(f"mlx_rollout_tokens_per_s({args.n_prompts}, {args.max_new_tokens}, {repeats}, {args.cache_dir!r})")
    rows = [["common_mlx.generate", f"{r['ours']:.0f}", f"{r['ours'] / r['mlx_lm']:.2f}x"],
            ["mlx_lm.batch_generate", f"{r['mlx_lm']:.0f}", "1.00x"]]
    print_table(f"rollouts: SmolLM2-135M fp32, {args.n_prompts} prompts x {args.max_new_tokens} new tokens, "
                f"median of {repeats}", ["MLX sampler", "tokens/s", "vs mlx_lm"], rows)


SECTIONS = {"blas": bench_blas, "rollouts": bench_rollouts}


def main(args):
    for name in args.only or SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    main(parse_args())
