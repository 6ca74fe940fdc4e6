"""S2-Attn versus dense causal SDPA: forward+backward time and peak memory, in one run on one machine.

    python benchmarks/s2_attention.py [--lengths 4096 8192 16384] [--repeats 3] [--model-length 8192]

Prints, for each sequence length (batch 1, 8 heads, head dim 64, float32), the median forward+backward
time of dense causal SDPA and of S2-Attn (4 groups), timed alternately in one process, the ratio
dense/S2, and the peak memory of each; then the same for one training step of a small Llama. Peak
memory is measured in a fresh process per case: CUDA's allocator peak on a GPU; on the CPU, the growth
of the process's peak resident set during set-up and one step (inputs, and model weights, included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import longlora_hf  # noqa: F401  (registers "s2")
from longlora_hf.attention import S2ForwardMemo, s2_attention_forward


HEADS, HEAD_DIM = 8, 64


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _attention_step(kind: str, length: int, device):
    """Return a closure running one forward+backward of the attention alone."""
    # [batch, seq, heads, dim] viewed as [batch, heads, seq, dim]: the layout models hand to attention.
    query, key, value = (
        torch.randn(1, length, HEADS, HEAD_DIM, device=device).transpose(1, 2).requires_grad_() for _ in range(3)
    )
    module = SimpleNamespace(config=SimpleNamespace(s2_attention=None), training=True, is_causal=True)
    # One mask for every step, as the layers of one forward share theirs: the layout is computed in the
    # warm-up step, and the timed steps measure the attention alone.
    mask = S2ForwardMemo(None)

    def step():
        if kind == "dense":
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        else:
            out, _ = s2_attention_forward(module, query, key, value, mask)
        out.sum().backward()

    return step


def _llama_step(kind: str, length: int, device):
    """Return a closure running one training forward+backward of a small Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=length,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).train()
    if kind == "s2":
        longlora_hf.use_s2_attention(model)
    else:
        model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 1000, (1, length), device=device)

    def step():
        model(ids, labels=ids).loss.backward()

    return step


STEPS = {"attention": _attention_step, "llama": _llama_step}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _time(step: str, length: int, repeats: int) -> dict:
    """Median time of dense and of S2, run alternately (after one warm-up each) so drift hits both."""
    device = _device()
    runs = {kind: STEPS[step](kind, length, device) for kind in ("dense", "s2")}
    times = {kind: [] for kind in runs}
    for _ in range(repeats + 1):
        for kind, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(values[1:]) for kind, values in times.items()}


def _peak_memory(step: str, kind: str, length: int) -> int:
    """Peak memory of one step: CUDA's allocator peak, or on the CPU the growth of this process's peak RSS."""
    import resource

    device = _device()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run = STEPS[step](kind, length, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        run()
        return torch.cuda.max_memory_allocated()
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def _in_subprocess(function: str, *args) -> object:
    # A fresh process per measurement, so that one case's memory does not hide the next one's.
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import s2_attention as b; "
        "print(json.dumps(getattr(b, sys.argv[2])(*json.loads(sys.argv[3]))))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", code, here, function, json.dumps(args)], check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _row(step: str, length: int, repeats: int) -> dict:
    seconds = _in_subprocess("_time", step, length, repeats)
    memory = {kind: _in_subprocess("_peak_memory", step, kind, length) for kind in ("dense", "s2")}
    return {
        "step": step,
        "length": length,
        "seconds": seconds,
        "peak_bytes": memory,
        "ratio": seconds["dense"] / seconds["s2"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--model-length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    rows = [_row("attention", length, args.repeats) for length in args.lengths]
    rows.append(_row("llama", args.model_length, args.repeats))
    device = _device().type
    print(
        f"S2-Attn (4 groups) vs dense causal SDPA, forward+backward, float32, on {device} "
        f"({torch.get_num_threads()} threads), median of {args.repeats}, alternating"
    )
    print(f"{'case':<34}{'dense s':>9}{'S2 s':>9}{'dense/S2':>10}{'dense MiB':>11}{'S2 MiB':>9}")
    for row in rows:
        case = (
            f"attention N={row['length']} (1x{HEADS}x{HEAD_DIM})"
            if row["step"] == "attention"
            else f"Llama train step N={row['length']}"
        )
        print(
            f"{case:<34}{row['seconds']['dense']:>9.3f}{row['seconds']['s2']:>9.3f}{row['ratio']:>10.2f}"
            f"{row['peak_bytes']['dense'] / 2**20:>11.0f}{row['peak_bytes']['s2'] / 2**20:>9.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
