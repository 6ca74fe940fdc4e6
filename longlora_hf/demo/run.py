"""`longlora-hf demo`: extend the bundled 256-token Llama to 8x its context on the CPU, end to end.

1. measure the base model at 1x, 2x, 4x and 8x its training context (perplexity on held-out documents
   with the `evaluate` metric, and passkey accuracy);
2. apply position interpolation without fine-tuning and measure again (the paper's "train-free" row);
3. fine-tune with LongLoRA (S2-Attn + LoRA+) to 8x through TRL's SFTTrainer and LongLoraCallback;
4. measure again; print one table, write it as JSON and PNG, save the adapter with its model card.

`--ablations` adds small-scale counterparts of the paper's Tables 1, 3 and 11, printed next to the
paper's figures.
"""

from __future__ import annotations

import json
import resource
import time
import warnings
from pathlib import Path

import evaluate
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from .. import metrics
from ..metrics.passkey import passkey_retrieval
from ..metrics.perplexity import token_stream
from ..metrics.report import NO_PLOTS, context_length_table, plot_perplexity, plots_available
from ..model_card import render_model_card
from ..paths import output_directory
from ..tuner import LongLoraConfig, apply_position_interpolation
from . import ASSETS
from .corpus import read_split


PAPER = {
    "table1": {"Full attention": 8.02, "Short attention, no shift": 8.29, "S2-Attn": 8.04},
    "table3": {"LoRA": 11.44, "LoRA + norms": 10.49, "LoRA + norms + embeddings": 8.12},
    "table11": {"1/2": 8.04, "1/4": 8.04, "1/8": 8.16},
}
PAPER_NOTES = {
    "table1": "Llama-2 7B fully fine-tuned to 8192 (PG19 perplexity at 8192)",
    "table3": "Llama-2 7B, S2-Attn, to 32768 (PG19 perplexity)",
    "table11": "Llama-2 7B, LongLoRA to 8192 (PG19 perplexity)",
}


def load_base(assets: Path = ASSETS):
    model = AutoModelForCausalLM.from_pretrained(assets, dtype=torch.float32, use_safetensors=True)
    return model, PreTrainedTokenizerFast.from_pretrained(assets)


def training_rows(tokenizer, length: int, assets: Path = ASSETS) -> list[list[int]]:
    """Continued pre-training data: the fine-tuning documents packed into rows of `length` tokens."""
    stream = token_stream(tokenizer, [document["text"] for document in read_split(assets / "finetune.jsonl.gz")])
    return [stream[i : i + length].tolist() for i in range(0, stream.numel() - length + 1, length)]


def evaluation_texts(assets: Path = ASSETS, documents: int = 3) -> list[str]:
    return [d["text"] for d in read_split(assets / "eval.jsonl.gz")[:documents]]


def measure(model, tokenizer, texts, lengths, stride, passkey_trials, seed=0) -> dict:
    ppl = evaluate.load(metrics.PERPLEXITY)
    with warnings.catch_warnings():
        # the demo measures beyond the model's context on purpose
        warnings.filterwarnings("ignore", message="context length .* is beyond the model's context")
        result = ppl.compute(
            model=model,
            tokenizer=tokenizer,
            predictions=texts,
            context_lengths=lengths,
            stride=stride,
            batch_size=4,
            progress=False,
        )
    row = {"perplexity": {length: result["by_context_length"][length]["perplexity"] for length in lengths}}
    if passkey_trials:
        passkey = passkey_retrieval(
            model, tokenizer, lengths, depths=(0.0, 0.5, 1.0), trials=passkey_trials, seed=seed, progress=False
        )
        row["passkey"] = {
            length: sum(by_depth.values()) / len(by_depth) for length, by_depth in passkey["accuracy"].items()
        }
    return row


def fine_tune(
    base, tokenizer, config: LongLoraConfig, rows, steps: int, learning_rate: float, out_dir: Path, seed: int = 0
):
    """LongLoRA fine-tuning through TRL's SFTTrainer with the callback; returns (model, trainer, seconds, peak RSS)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ..training import LongLoraCallback
    from ..training.precision import cpu_has_native_bf16

    length = len(rows[0])
    arguments = SFTConfig(
        output_dir=str(out_dir),
        max_length=length,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=learning_rate,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, steps // 20),
        max_steps=steps,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=cpu_has_native_bf16(),  # TRL's default bf16 autocast is ~15x slower on a CPU that emulates it
        seed=seed,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=base,
        args=arguments,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[LongLoraCallback()],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return trainer.model, trainer, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_demo_options(
    steps: int, learning_rate: float, passkey_trials: int, eval_documents: int, stride: int
) -> None:
    """The demo's numbers, checked before anything is loaded or written."""

    def whole(value, minimum):
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    for name, value, ok, rule in (
        ("--steps", steps, whole(steps, 1), "a whole number of fine-tuning steps, at least 1"),
        (
            "learning_rate",
            learning_rate,
            isinstance(learning_rate, (int, float)) and learning_rate > 0,
            "a positive number",
        ),
        ("passkey_trials", passkey_trials, whole(passkey_trials, 0), "a whole number, 0 for no passkey test"),
        ("eval_documents", eval_documents, whole(eval_documents, 1), "a whole number of documents, at least 1"),
        ("stride", stride, whole(stride, 1), "a whole number of tokens, at least 1"),
    ):
        if not ok:
            raise ValueError(f"{name} must be {rule}; got {value!r}.")


def run_demo(
    out_dir: str | Path = "longlora_demo",
    steps: int = 100,
    learning_rate: float = 1e-3,
    passkey_trials: int = 2,
    eval_documents: int = 3,
    stride: int = 512,
    ablations: bool = False,
    overwrite: bool = False,
) -> dict:
    """The demo (module docstring). `out_dir` is written by the rule of `longlora_hf.paths`: an earlier demo's
    directory is replaced as a whole (no new adapter next to an old results.json), one holding files the demo
    did not write is refused unless `overwrite`, and an interrupted run leaves the earlier directory or none."""
    check_demo_options(steps, learning_rate, passkey_trials, eval_documents, stride)
    with output_directory(out_dir, "--out", overwrite=overwrite) as partial:
        results = _run_demo(partial, steps, learning_rate, passkey_trials, eval_documents, stride, ablations)
    written = ["results.json"] + (["perplexity.png"] if plots_available() else [])
    print(
        f"wrote {', '.join(str(Path(out_dir) / name) for name in written)} and the adapter in "
        f"{Path(out_dir) / 'adapter'}"
    )
    return results


def _run_demo(out_dir: Path, steps, learning_rate, passkey_trials, eval_documents, stride, ablations) -> dict:
    torch.manual_seed(0)
    base, tokenizer = load_base()
    trained_context = base.config.max_position_embeddings
    lengths = [trained_context * k for k in (1, 2, 4, 8)]
    target = lengths[-1]
    texts = evaluation_texts(documents=eval_documents)
    print(
        f"bundled model: Llama, {sum(p.numel() for p in base.parameters()):,} parameters, trained at "
        f"{trained_context} tokens"
    )
    print(f"evaluating at {lengths} tokens on {eval_documents} held-out documents")

    results = {"lengths": lengths, "rows": {}}
    started = time.perf_counter()
    print("1/4 base model ...")
    results["rows"]["base"] = measure(base, tokenizer, texts, lengths, stride, passkey_trials)
    print("2/4 position interpolation only (no fine-tuning) ...")
    interpolated, _ = load_base()
    apply_position_interpolation(interpolated, target)
    results["rows"]["PI only"] = measure(interpolated, tokenizer, texts, lengths, stride, passkey_trials)
    del interpolated

    print(f"3/4 LongLoRA fine-tuning to {target} tokens ({steps} steps, S2-Attn + LoRA+) ...")
    rows = training_rows(tokenizer, target)
    model, trainer, seconds, peak = fine_tune(
        base, tokenizer, LongLoraConfig(target_context_length=target), rows, steps, learning_rate, out_dir / "trainer"
    )
    results["fine_tuning"] = {
        "steps": steps,
        "seconds": seconds,
        "tokens_per_second": steps * target / seconds,
        "peak_rss_bytes": peak,
    }
    print(f"   {steps * target / seconds:,.0f} tokens/s, peak memory {peak / 2**20:,.0f} MiB")
    print("4/4 LongLoRA model ...")
    results["rows"]["LongLoRA"] = measure(model, tokenizer, texts, lengths, stride, passkey_trials)
    model.save_pretrained(out_dir / "adapter")
    results["learning_rate"] = learning_rate
    card = model_card(results, steps, target, trained_context, model.peft_config["default"])
    (out_dir / "adapter" / "README.md").write_text(card)

    if ablations:
        results["ablations"] = run_ablations(tokenizer, rows, steps, learning_rate, texts, target, stride, out_dir)
    results["minutes"] = (time.perf_counter() - started) / 60

    table = {name: row["perplexity"] for name, row in results["rows"].items()}
    print("\nperplexity on held-out documents (rows: model, columns: evaluation context length)")
    print(context_length_table(table))
    if passkey_trials:
        print("\npasskey accuracy (mean over depths 0, 0.5, 1)")
        print(context_length_table({name: row["passkey"] for name, row in results["rows"].items()}))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if plots_available():
        plot_perplexity(table, out_dir / "perplexity.png")
    else:
        print(NO_PLOTS)
    longlora, pi_only = table["LongLoRA"][target], table["PI only"][target]
    print(f"\nat {target} tokens: LongLoRA {longlora:.2f} vs PI only {pi_only:.2f} ({pi_only / longlora:.2f}x lower)")
    return results


def run_ablations(tokenizer, rows, steps, learning_rate, texts, target, stride, out_dir) -> dict:
    """Small-scale Tables 1, 3 and 11: same data and steps, evaluated with dense attention at 8x."""
    from peft import get_peft_model

    def train_and_measure(name, **config):
        base, _ = load_base()
        model = get_peft_model(base, LongLoraConfig(target_context_length=target, **config))
        model, _, seconds, peak = fine_tune(model, tokenizer, None, rows, steps, learning_rate, out_dir / "ablation")
        ppl = measure(model, tokenizer, texts, [target], stride, 0)["perplexity"][target]
        speed = steps * target / seconds
        print(f"   {name}: perplexity {ppl:.2f} at {target}; {speed:,.0f} tokens/s, peak {peak / 2**20:,.0f} MiB")
        return {"perplexity": ppl, "tokens_per_second": speed, "peak_rss_bytes": peak}

    print("ablations (each a fresh fine-tuning run with the same data and steps, evaluated densely at the target)")
    table1 = {
        "Full attention": train_and_measure("Full attention", use_s2_attn=False),
        "Short attention, no shift": train_and_measure("Short attention, no shift", shift=False),
        "S2-Attn": train_and_measure("S2-Attn"),
    }
    table3 = {
        "LoRA": train_and_measure("LoRA", trainable_embeddings=False, trainable_norms=False),
        "LoRA + norms": train_and_measure("LoRA + norms", trainable_embeddings=False),
        "LoRA + norms + embeddings": table1["S2-Attn"],
    }
    table11 = {
        "1/2": train_and_measure("group 1/2", group_size_ratio=0.5),
        "1/4": table1["S2-Attn"],
        "1/8": train_and_measure("group 1/8", group_size_ratio=0.125),
    }
    ablations = {"table1": table1, "table3": table3, "table11": table11}
    for key, table in ablations.items():
        print(f"\n{key} (ours: tiny model at {target} tokens | paper: {PAPER_NOTES[key]})")
        for name, row in table.items():
            print(f"  {name:<28}{row['perplexity']:>10.2f}{PAPER[key][name]:>10.2f}")
        ours = sorted(table, key=lambda name: table[name]["perplexity"])
        paper = sorted(PAPER[key], key=PAPER[key].get)
        print(f"  ordering {'matches' if ours == paper else 'differs from'} the paper's: ours {ours}, paper {paper}")
    dense, s2 = table1["Full attention"], table1["S2-Attn"]
    print(
        f"\nfine-tuning at {target} tokens: S2-Attn {s2['tokens_per_second']:,.0f} tokens/s, peak "
        f"{s2['peak_rss_bytes'] / 2**20:,.0f} MiB; "
        f"dense {dense['tokens_per_second']:,.0f} tokens/s, peak {dense['peak_rss_bytes'] / 2**20:,.0f} MiB; "
        f"speed ratio S2/dense {s2['tokens_per_second'] / dense['tokens_per_second']:.2f}"
    )
    return ablations


def model_card(results: dict, steps: int, target: int, trained_context: int, config: LongLoraConfig) -> str:
    """The adapter's README, from the template in `model_cards/`."""
    return render_model_card(
        config,
        base_model="longlora_hf/demo/assets (the bundled demo Llama)",
        title=f"LongLoRA demo adapter: {trained_context} to {target} tokens",
        training_data="30 long Python 3.11 documentation files (PSF licence), packed into rows of "
        f"{target} tokens (longlora_hf/demo/assets/finetune.jsonl.gz)",
        training_steps=f"{steps} (batch 1, lr {results.get('learning_rate', 'see results.json')})",
        evaluation={name: row["perplexity"] for name, row in results["rows"].items()},
    )
