"""The longest sequence one training step fits within a memory budget per process: one process versus two
under DeepSpeed's Ulysses sequence parallelism (ALST), S2-Attn versus dense attention, and seconds per step.

    python benchmarks/sequence_parallel.py [--budget-gib 2.5] [--lengths 4096 8192 ...]

The model is the bundled demo model (a 4-layer Llama, hidden 256, 8 heads, 4 key-value heads) with the LongLoRA
adapter (LoRA+ embeddings and norms, position interpolation to the length trained) and gradient checkpointing,
float32, batch 1. Each trial runs one training step (forward, backward, SGD update) in fresh processes: one
process with two threads, or two processes of one thread each under `torchrun` (gloo), each holding half of the
sequence, so both use the machine's two cores. A trial fits when the peak resident set of every process (Python,
torch, DeepSpeed and the model included) stays within the budget. For each set-up the lengths are tried in
increasing order until one does not fit; the table prints the longest that did and its seconds per step (the
step alone, after a short warm-up step), in one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


SETUPS = [(1, "dense"), (1, "s2"), (2, "dense"), (2, "s2")]  # (processes, attention)
LENGTHS = [4096, 8192, 12288, 16384, 20480, 24576, 32768, 40960, 49152, 65536]


def trial(length: int, attention: str, out: Path) -> None:
    """One training step at `length` tokens in this process (a rank of torchrun when WORLD_SIZE > 1); writes
    OUT/rank<r>.json with this process's peak resident set and the step's seconds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from longlora_hf import LongLoraConfig
    from longlora_hf.demo import ASSETS

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    model = AutoModelForCausalLM.from_pretrained(ASSETS, dtype=torch.float32)
    config = LongLoraConfig(target_context_length=max(length, 256), lora_dropout=0.0, use_s2_attn=attention == "s2")
    model = get_peft_model(model, config)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.train()
    rank, group = 0, None
    if processes > 1:
        import deepspeed.comm as ds_comm
        import torch.distributed as dist
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        rank = dist.get_rank()
        core = model.get_base_model().config._attn_implementation
        mpu = UlyssesSPAttentionHF.register_with_transformers(model, core, processes, 1, seq_length_is_variable=True)
        group = mpu.get_sequence_parallel_group()

    def step(tokens: int) -> float:
        ids = torch.randint(3, 4096, (1, tokens), generator=torch.Generator().manual_seed(tokens))
        labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]
        share = tokens // processes
        mine = slice(rank * share, (rank + 1) * share)
        start = time.perf_counter()
        out = model(
            input_ids=ids[:, mine],
            position_ids=torch.arange(tokens)[None, mine],
            labels=labels[:, mine],
            shift_labels=labels[:, mine],
        )
        loss = out.loss
        if group is not None:  # the ranks hold equal numbers of tokens: their mean is the loss of the sequence
            losses = torch.stack(torch.distributed.nn.functional.all_gather(loss, group=group))
            loss = losses.mean()
        loss.backward()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.grad is not None:
                    if group is not None:
                        torch.distributed.all_reduce(parameter.grad, group=group)
                    parameter -= 1e-4 * parameter.grad
                    parameter.grad = None
        return time.perf_counter() - start

    step(1024 * processes)  # warm-up: lazy initialisation, first all-to-all
    seconds = step(length)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"rank{rank}.json").write_text(json.dumps({"peak_mib": peak_mib, "seconds": seconds}))


def run_trial(processes: int, attention: str, length: int, timeout: float) -> dict | None:
    """Peak MiB (the largest over the processes) and seconds of one trial, or None when it failed or timed out."""
    import tempfile

    script = str(Path(__file__).resolve())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(2 // processes)}
    with tempfile.TemporaryDirectory() as out:
        arguments = [script, "--trial", str(length), attention, out]
        if processes == 1:
            command = [sys.executable, *arguments]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *arguments]
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        lines = [json.loads(path.read_text()) for path in sorted(Path(out).glob("rank*.json"))]
    if result.returncode != 0 or len(lines) != processes:
        return None
    return {"peak_mib": max(line["peak_mib"] for line in lines), "seconds": max(line["seconds"] for line in lines)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-gib", type=float, default=2.5, help="memory budget per process (peak resident set)")
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="sequence lengths to try, increasing")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds a trial may take before it counts as not fitting"
    )
    parser.add_argument("--trial", nargs=3, metavar=("LENGTH", "ATTENTION", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trial:
        trial(int(args.trial[0]), args.trial[1], Path(args.trial[2]))
        return 0
    budget = args.budget_gib * 1024
    print(
        f"Longest sequence for one training step within {args.budget_gib:g} GiB per process (peak resident set), "
        f"demo model + LongLoRA, float32, gradient checkpointing, 2 CPU cores in all, one run"
    )
    print(f"{'set-up':34} {'longest':>8} {'peak MiB':>9} {'s/step':>8}   tried (length: peak MiB, s)")
    found = {}
    for processes, attention in SETUPS:
        name = (
            f"{processes} process{'es' if processes > 1 else ''}"
            + (" (Ulysses SP)" if processes > 1 else "")
            + f", {attention}"
        )
        tried, best = [], None
        for length in args.lengths:
            measured = run_trial(processes, attention, length, args.timeout)
            tried.append(
                f"{length}: "
                + ("failed" if measured is None else f"{measured['peak_mib']:.0f}, {measured['seconds']:.1f}")
            )
            if measured is None or measured["peak_mib"] > budget:
                break
            best = (length, measured)
        found[(processes, attention)] = best
        shown = (
            f"{best[0]:>8} {best[1]['peak_mib']:>9.0f} {best[1]['seconds']:>8.2f}"
            if best
            else f"{'none':>8} {'':>9} {'':>8}"
        )
        print(f"{name:34} {shown}   {'; '.join(tried)}", flush=True)
    for attention in ("dense", "s2"):
        one, two = found[(1, attention)], found[(2, attention)]
        if one and two:
            print(f"{attention}: 2 processes under SP reach {two[0] / one[0]:.2f}x the length of 1 process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
