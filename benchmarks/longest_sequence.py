"""The longest sequence one training step fits within a memory budget per process, on the path a TRL user runs
(SFTTrainer's fused LM head, which never builds the logits), set-up by set-up: one process or several under
DeepSpeed's Ulysses sequence parallelism (ALST), S2-Attn or dense attention, with or without LongLoRA's tiled
MLP; and where the memory per token goes.

    python benchmarks/longest_sequence.py [--budget-gib 2.5] [--lengths 16384 32768 ...]
        [--setups 1:s2:logits 1:s2 1:s2:tiled 2:s2:tiled ...] [--mlp-tile-size 4096]

A set-up is PROCESSES:ATTENTION[:OPTION...] with ATTENTION `s2` or `dense` and the options `tiled` (LongLoRA's
`mlp_tile_size`) and `logits` (the model's own loss over the full logits, instead of TRL's fused LM head).

The model is the bundled demo model (a 4-layer Llama, hidden 256, MLP 688, vocabulary 4096, 8 heads, 4 key-value
heads) with the LongLoRA adapter (LoRA+ embeddings and norms, position interpolation to the length trained) and
gradient checkpointing, float32, batch 1. Each trial runs one training step (forward, backward, SGD update) in
fresh processes: one process with two threads, or two processes of one thread each under `torchrun` (gloo), each
holding its share of the sequence, so every set-up uses the machine's two cores. A trial fits when the peak
resident set of every process (Python, torch, TRL, DeepSpeed and the model included) stays within the budget. For
each set-up the lengths are tried in increasing order until one does not fit; the table prints the longest that
did and its seconds per step (the step alone, after a short warm-up step), in one run on one machine.

The memory per token is printed twice: estimated from the model's shapes, part by part, and measured (the growth
of the peak between the two longest lengths a set-up fitted; and, at a length every one-process set-up fitted, the
difference an option makes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


SETUPS = ["1:s2:logits", "1:s2", "1:s2:tiled", "1:dense:tiled", "2:s2:tiled", "2:dense:tiled"]
LENGTHS = [16384, 32768, 49152, 65536, 81920, 98304, 131072, 163840, 196608, 262144]
OPTIONS = ("tiled", "logits")


@dataclass(frozen=True)
class Setup:
    processes: int
    attention: str  # "s2" or "dense"
    tiled: bool = False  # LongLoRA's mlp_tile_size
    logits: bool = False  # the model's own loss over the full logits (not TRL's fused LM head)

    @classmethod
    def parse(cls, text: str) -> Setup:
        parts = text.split(":")
        if len(parts) < 2 or not parts[0].isdigit() or int(parts[0]) < 1 or parts[1] not in ("s2", "dense"):
            raise argparse.ArgumentTypeError(
                f"set-up {text!r}: write PROCESSES:ATTENTION[:OPTION...], ATTENTION s2 or dense, e.g. 1:s2:tiled"
            )
        unknown = [option for option in parts[2:] if option not in OPTIONS]
        if unknown:
            raise argparse.ArgumentTypeError(f"set-up {text!r}: unknown option(s) {unknown}; known: {list(OPTIONS)}")
        return cls(int(parts[0]), parts[1], "tiled" in parts[2:], "logits" in parts[2:])

    def __str__(self) -> str:
        return ":".join([str(self.processes), self.attention] + [o for o in OPTIONS if getattr(self, o)])

    def describe(self) -> str:
        processes = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        if self.processes > 1:
            processes += " (SP)"
        return f"{processes}, {self.attention}, {'full logits' if self.logits else 'fused loss'}" + (
            ", tiled MLP" if self.tiled else ""
        )


def watch_budget(budget_mib: float, report: Path) -> None:
    """Stop this process as soon as its resident set passes `budget_mib` (a trial over the budget need not run to
    its end), writing {"over_mib": ...} to `report`."""
    import threading

    page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20

    def watch():
        while True:
            with open("/proc/self/statm") as statm:
                resident = int(statm.read().split()[1]) * page_mib
            if resident > budget_mib:
                report.write_text(json.dumps({"over_mib": resident}))
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def trial(length: int, setup: Setup, tile_size: int, budget_mib: float, out: Path) -> None:
    """One training step at `length` tokens in this process (a rank of torchrun when WORLD_SIZE > 1); writes
    OUT/rank<r>.json with this process's peak resident set and the step's seconds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from longlora_hf import LongLoraConfig
    from longlora_hf.demo import ASSETS

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    watch_budget(budget_mib, out / f"rank{rank}.json")
    model = AutoModelForCausalLM.from_pretrained(ASSETS, dtype=torch.float32)
    if not setup.logits:
        add_fused_lm_head(model)  # what SFTTrainer does to the model it trains
    config = LongLoraConfig(
        target_context_length=max(length, 256),
        lora_dropout=0.0,
        use_s2_attn=setup.attention == "s2",
        mlp_tile_size=tile_size if setup.tiled else None,
    )
    model = get_peft_model(model, config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    group = None
    if processes > 1:
        import deepspeed.comm as ds_comm
        import torch.distributed as dist
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        assert dist.get_rank() == rank
        core = model.get_base_model().config._attn_implementation
        mpu = UlyssesSPAttentionHF.register_with_transformers(model, core, processes, 1, seq_length_is_variable=True)
        group = mpu.get_sequence_parallel_group()

    def step(tokens: int) -> float:
        ids = torch.randint(3, 4096, (1, tokens), generator=torch.Generator().manual_seed(tokens))
        labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]  # shifted, as under SP
        share = tokens // processes
        mine = slice(rank * share, (rank + 1) * share)
        start = time.perf_counter()
        inputs = dict(input_ids=ids[:, mine], position_ids=torch.arange(tokens)[None, mine])
        if setup.logits:
            out = model(**inputs, labels=labels[:, mine], shift_labels=labels[:, mine])
        else:
            out = model(**inputs, shift_labels=labels[:, mine], fused_lm_head=True)
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


def run_trial(setup: Setup, length: int, args: argparse.Namespace) -> dict | str:
    """Peak MiB (the largest over the processes) and seconds of one trial, or why it did not finish."""
    import tempfile

    script = str(Path(__file__).resolve())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, 2 // setup.processes))}
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    timeout = args.timeout
    with tempfile.TemporaryDirectory() as out:
        budget = str(args.budget_gib * 1024)
        arguments = [script, "--trial", str(length), str(setup), str(args.mlp_tile_size), budget, out]
        if setup.processes == 1:
            command = [sys.executable, *arguments]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(setup.processes)]
            command += arguments
        # on a timeout, SIGTERM: torchrun passes it to its ranks (they run in sessions of their own, out of reach of a
        # kill of the launcher); the output goes to a file, which ranks left behind cannot hold open as a pipe
        log = Path(out) / "trial.log"
        with open(log, "w") as output:
            trial_process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
            try:
                trial_process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                trial_process.terminate()
                try:
                    trial_process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    trial_process.kill()
                    trial_process.wait()
                return f"over {timeout:.0f} s"
        stderr = log.read_text()
        lines = [json.loads(path.read_text()) for path in sorted(Path(out).glob("rank*.json"))]
    over = [line["over_mib"] for line in lines if "over_mib" in line]
    if over:
        return f"over budget (stopped at {max(over):.0f})"
    if trial_process.returncode != 0 or len(lines) != setup.processes:
        return "failed: " + (stderr.strip().splitlines() or ["no output"])[-1][:120]
    return {"peak_mib": max(line["peak_mib"] for line in lines), "seconds": max(line["seconds"] for line in lines)}


def estimated_kib_per_token(setup: Setup, config, bytes_per_value: int = 4) -> dict[str, float]:
    """Where the memory of one training step grows with the tokens, estimated from the model's shapes, in KiB per
    token of the sequence, per process. Gradient checkpointing keeps each layer's input for the whole step; the rest
    exists one phase at a time (the loss, or one recomputed layer's attention or MLP), so the estimated growth is the
    kept part plus the largest phase. Under Ulysses SP a process holds 1/P of the tokens and, in attention, every
    token for 1/P of the heads. The fixed part (code, weights, optimizer) is not included."""
    hidden, mlp, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kib = bytes_per_value / 1024 / setup.processes
    parts = {
        # kept all step: each decoder layer's input, and the last hidden states with their gradient
        "checkpointed layer inputs": (config.num_hidden_layers + 2) * hidden * kib,
        # the loss phase: the logits, their log-softmax and its gradient; TRL's fused head: its float32 gradient to the
        # hidden states, and the gradient handed back
        "logits/loss": (3 * vocab if setup.logits else 2 * hidden) * kib,
        # one layer's MLP recomputed: gate, up, activation, product and their gradients (tiled: one tile's, fixed)
        "MLP intermediates": (0 if setup.tiled else 6 * mlp) * kib,
        # one layer's attention recomputed: q, k, v, output and their gradients, for the heads a process holds
        "attention": 2 * (2 * heads + 2 * kv_heads) * head_dim * kib,
        # the recomputed layer's other hidden-size tensors (norm, residual, projections) and their gradients
        "other hidden-size tensors": 4 * hidden * kib,
    }
    phases = max(parts["logits/loss"], parts["MLP intermediates"] + parts["other hidden-size tensors"])
    phases = max(phases, parts["attention"] + parts["other hidden-size tensors"])
    return {**parts, "estimated growth": parts["checkpointed layer inputs"] + phases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-gib", type=float, default=2.5, help="memory budget per process (peak resident set)")
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="sequence lengths to try, increasing")
    parser.add_argument(
        "--setups",
        type=Setup.parse,
        nargs="+",
        default=[Setup.parse(s) for s in SETUPS],
        help=f"PROCESSES:ATTENTION[:OPTION...] (options: {', '.join(OPTIONS)}); default: {' '.join(SETUPS)}",
    )
    parser.add_argument("--mlp-tile-size", type=int, default=4096, help="tokens per MLP tile for the `tiled` set-ups")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds a trial may take before it counts as not fitting"
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=65536,
        help="glibc's MALLOC_MMAP_THRESHOLD_ for the trials, in bytes: larger blocks are mapped and given back to the "
        "system when freed. glibc's default threshold grows up to 32 MiB as large blocks are freed, after which freed "
        "memory stays in the heap and counts in the resident set. 0: glibc's default.",
    )
    parser.add_argument(
        "--trial", nargs=5, metavar=("LENGTH", "SETUP", "TILE", "BUDGET", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.trial:
        length, setup, tile_size, budget_mib, out = args.trial
        trial(int(length), Setup.parse(setup), int(tile_size), float(budget_mib), Path(out))
        return 0
    if any(b <= a for a, b in zip(args.lengths, args.lengths[1:])):
        parser.error(f"--lengths must increase: got {args.lengths}")
    from transformers import AutoConfig

    from longlora_hf.demo import ASSETS

    config = AutoConfig.from_pretrained(ASSETS)
    budget = args.budget_gib * 1024
    print(
        f"Longest sequence for one training step within {args.budget_gib:g} GiB per process (peak resident set), "
        f"demo model + LongLoRA, float32, gradient checkpointing, MLP tiles of {args.mlp_tile_size} tokens where "
        "tiled, 2 CPU cores in all, "
        + (f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}, " if args.malloc_mmap_threshold else "")
        + "one run"
    )
    print(
        f"{'set-up':44} {'longest':>8} {'peak MiB':>9} {'s/step':>8} {'stopped by':>10}   tried (length: peak MiB, s)"
    )
    found, stopped = {}, {}
    for setup in args.setups:
        tried, fitted, reason = [], [], "lengths"  # the last length fitted: the list ran out, not the memory
        for length in args.lengths:
            measured = run_trial(setup, length, args)
            if isinstance(measured, str):
                tried.append(f"{length}: {measured}")
                reason = "failure" if measured.startswith("failed") else "memory" if "budget" in measured else "time"
                break
            tried.append(f"{length}: {measured['peak_mib']:.0f}, {measured['seconds']:.1f}")
            if measured["peak_mib"] > budget:
                reason = "memory"
                break
            fitted.append((length, measured))
        found[setup], stopped[setup] = fitted, reason
        best = fitted[-1] if fitted else None
        shown = (
            f"{best[0]:>8} {best[1]['peak_mib']:>9.0f} {best[1]['seconds']:>8.2f}"
            if best
            else f"{'none':>8} {'':>9} {'':>8}"
        )
        print(f"{setup.describe():44} {shown} {reason:>10}   {'; '.join(tried)}", flush=True)

    print(
        "\nMemory per token of the sequence, per process (KiB): estimated from the shapes (the growth: the kept part "
        "plus the largest phase), and measured (the growth of the peak between the two longest lengths fitted)"
    )
    parts = list(estimated_kib_per_token(args.setups[0], config))
    print(f"{'set-up':44} " + " ".join(f"{part[:16]:>16}" for part in parts) + f" {'measured':>9}")
    for setup in args.setups:
        estimate = estimated_kib_per_token(setup, config)
        fitted = found[setup]
        slope = (
            f"{(fitted[-1][1]['peak_mib'] - fitted[-2][1]['peak_mib']) * 1024 / (fitted[-1][0] - fitted[-2][0]):9.1f}"
            if len(fitted) >= 2
            else f"{'-':>9}"
        )
        print(f"{setup.describe():44} " + " ".join(f"{estimate[part]:16.1f}" for part in parts) + f" {slope}")
    print("\nWhat an option saves in one process, at the longest length both set-ups fitted (measured peaks):")
    one = [setup for setup in args.setups if setup.processes == 1]
    for option, saving in (("logits", "fused loss, against full logits"), ("tiled", "tiled MLP")):
        for with_it in one:
            without = Setup(1, with_it.attention, **{**_options(with_it), option: False})
            if not getattr(with_it, option) or without not in found:
                continue
            # full logits cost what the fused loss saves; tiling saves what it leaves out
            low, high = (without, with_it) if option == "logits" else (with_it, without)
            common = set(dict(found[low])) & set(dict(found[high]))
            if common:
                length = max(common)
                saved = dict(found[high])[length]["peak_mib"] - dict(found[low])[length]["peak_mib"]
                print(
                    f"  {saving:32} {str(high):>14} -> {str(low):14} at {length}: {saved:6.0f} MiB, "
                    f"{saved * 1024 / length:5.1f} KiB per token"
                )
    for attention in ("s2", "dense"):
        one_process = [s for s in args.setups if s.processes == 1 and s.attention == attention and found[s]]
        several = [s for s in args.setups if s.processes > 1 and s.attention == attention and found[s]]
        for a in one_process:
            for b in several:
                if _options(a) == _options(b):
                    # a set-up stopped by time or by the end of the lengths reached at least that far
                    ratio = found[b][-1][0] / found[a][-1][0]
                    exact = stopped[a] == stopped[b] == "memory"
                    print(
                        f"{b.describe()} reaches {'' if exact else 'at least '}{ratio:.2f}x the length of "
                        f"{a.describe()}" + ("" if exact else f" (stopped by {stopped[b]} and {stopped[a]})")
                    )
    return 0


def _options(setup: Setup) -> dict[str, bool]:
    return {option: getattr(setup, option) for option in OPTIONS}


if __name__ == "__main__":
    sys.exit(main())
