"""Probe: what the two recomputations of the training forward cost in time, in one process,
the four settings interleaved (the machine's drift hits them alike): the LM head in chunks
(_HeadLogProbs, its logits recomputed in the backward) or through the model's logits, and the
shared prefix replayed in the backward (_prefix_replayed_in_backward) or kept in one graph.
One GRPO microbatch as the default run makes it (16 rollouts, 64 response tokens, the r1_zero
prefix shared), forward + backward, checkpointing on. Prints the median seconds per setting:

    uv run python results/speed/probe_recompute_ab.py runs/grpo/warmstart/final [repeats]
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
from probe_checkpointing import microbatch  # noqa: E402


def one_graph(model, prefix_ids):  # the prefix's pass kept in the graph, as before commit 0066175
    from transformers import DynamicCache

    cache = DynamicCache()
    with common._no_checkpointing(model):
        model.get_decoder()(prefix_ids, past_key_values=cache, use_cache=True)
    return cache


def main(model_dir, repeats=4):
    model, ids, mask, labels, where = microbatch(model_dir, [])
    print(f"{tuple(ids.shape)} tokens, {where}, {torch.get_num_threads()} threads, {model.compute_dtype}")
    plain, replay = common._PLAIN_HEAD_MODELS, common._prefix_replayed_in_backward
    settings = {"head in chunks + prefix replayed": (plain, replay), "head in chunks, one graph": (plain, one_graph),
                "logits + prefix replayed": ((), replay), "logits, one graph (cfaa2c2)": ((), one_graph)}
    seconds = {name: [] for name in settings}
    for repeat in range(repeats + 1):  # the first round warms up, not counted
        for name, (heads, prefix) in settings.items():
            common._PLAIN_HEAD_MODELS, common._prefix_replayed_in_backward = heads, prefix
            t = time.perf_counter()
            out = common.get_response_log_probs(model, ids, labels, True, **where)
            (-(out["log_probs"] * mask).sum() / mask.sum()).backward()
            model.zero_grad(set_to_none=True)
            if repeat:
                seconds[name].append(time.perf_counter() - t)
    for name, s in seconds.items():
        print(f"{name:36s} median {statistics.median(s):.2f} s   ({' '.join(f'{x:.2f}' for x in s)})")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
