"""Peak memory of perplexity scoring by window length: the old way (the whole window's logits as float64)
against the metric's chunked scoring, and the decoder's forward alone as the floor.

    python benchmarks/perplexity_memory.py [--lengths 4096 8192 16384]

The model has SmolLM2-135M's widths (vocabulary 49152, hidden 576, 9 heads, 3 key/value heads) and 2 layers,
float32, random weights. Each case runs in a fresh process on the CPU (Linux: /proc/self): after the model is
built and a short window has been scored once, the peak resident set is reset, and its growth while scoring
one window of the length is what the case needs. The old way needs about 20 GB at 16k tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


WAYS = ("decoder forward only", "old: full logits in float64", "new: chunked scoring")


def build_model(max_length: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=max_length,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def score(way: str, model, ids) -> float:
    """Mean next-token loss of the window `ids` (1, length) (nan for the forward alone)."""
    import torch

    from longlora_hf.metrics import compute_perplexity

    with torch.no_grad():
        if way == WAYS[0]:
            model.model(input_ids=ids, use_cache=False)
            return float("nan")
        if way == WAYS[1]:  # the metric before chunking, as it was
            logits = model(input_ids=ids).logits[:, :-1].double()  # (1, length - 1, vocab)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            return nll.mean().item()
    # The strided protocol with the stride at the length scores one window of it (the metric wants a token more
    # than the length; the one-token window it would leave is none).
    length, stream = ids.shape[1], torch.cat([ids[0], ids[0, :1]])
    result = compute_perplexity(
        model, input_ids=stream, context_lengths=[length], protocol="strided", stride=length, progress=False
    )
    return result["by_context_length"][length]["loss"]


def measure(way: str, length: int) -> dict:
    """In this (fresh) process: the peak resident set's growth, in MB, while scoring one window."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(length)
    ids = torch.randint(0, 49152, (1, length), generator=torch.Generator().manual_seed(1))
    score(way, model, ids[:, :64])  # warm-up
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak resident set to the current one: building the model's peak is not ours
    before = status_kib("VmRSS")
    started = time.perf_counter()
    loss = score(way, model, ids)
    seconds = time.perf_counter() - started
    return {"mb": (status_kib("VmHWM") - before) / 1024, "seconds": seconds, "loss": loss}


def status_kib(field: str) -> int:
    """A memory figure of /proc/self/status (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # way index and length, in the child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(WAYS[int(args.case[0])], int(args.case[1]))))
        return
    print(f"{'tokens':>7} {'way':<30} {'peak growth':>12} {'time':>8} {'loss':>12}")
    for length in args.lengths:
        results = []
        for index, way in enumerate(WAYS):
            child = [sys.executable, __file__, "--case", str(index), str(length)]
            results.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout))
            row = results[-1]
            figures = f"{row['mb']:>9.0f} MB {row['seconds']:>7.1f}s {row['loss']:>12.8f}"
            print(f"{length:>7} {way:<30} {figures}", flush=True)
        floor, old, new = (row["mb"] for row in results)
        print(
            f"{length:>7} old / new: {old / max(new, 1):.1f}x; beyond the forward: old {old - floor:.0f} MB, "
            f"new {new - floor:.0f} MB"
        )


if __name__ == "__main__":
    main()
