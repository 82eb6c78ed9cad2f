import resource, time, torch, common, harness, tasks
torch.set_num_threads(1)
dev = torch.device("cpu")
m, tok = common.load_model("smollm2-135m-instruct", dev, common.pick_dtype("auto", dev))
prompts = [tasks.r1_zero_prompt(e["question"]) for e in tasks.task_split("chain_sum", "eval", 64)]
s = harness.Sampling(max_new_tokens=24, min_new_tokens=24)
common.generate(m, tok, prompts[:8], s)
for i in range(2):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t = time.perf_counter()
    common.generate(m, tok, prompts, s, generator=torch.Generator().manual_seed(0))
    print(f"gen {time.perf_counter() - t:.1f} s, minor faults {resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20:.2f} GB", flush=True)
