"""S2-Attn under DeepSpeed's Ulysses sequence parallelism (ALST) equals S2-Attn in one process.

Each rank holds 1/P of the sequence and, inside attention, the whole sequence for 1/P of the heads; S2 must
shift the heads by their index in the whole model. The multi-process runs (tests/support/sp_worker.py under
`torchrun`, gloo on the CPU) are compared with the same model trained here in one process, without sequence
parallelism: loss, gradients (the worker divides out the factor P its loss combination gives), evaluation
logits and the saved adapter. The Trainer's own path (`longlora-hf sft --sp_size 2` under ZeRO-2 and ZeRO-3)
is in test_training_sft.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from longlora_hf.attention.sequence_parallel import check_sequence_parallel_heads, heads_held, valid_sp_sizes
from support.helpers import tiny_config
from support.sp_cases import (
    CASES,
    THREE_PROCESS_CASES,
    TWO_PROCESS_CASES,
    build_model,
    eval_batches,
    reference_inputs,
    sgd_step,
    train_batch,
)
from test_training_sft import accelerate


ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "support" / "sp_worker.py"


def launch(out: Path, processes: int, cases: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        str(WORKER),
        str(out),
        *cases,
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The worker's results: the two-process cases in one launch, the three-process one in another."""
    out = tmp_path_factory.mktemp("sequence_parallel")
    launch(out, 2, TWO_PROCESS_CASES)
    launch(out, 3, THREE_PROCESS_CASES)
    return out


def result(runs: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((runs / f"{name}.json").read_text()), load_file(runs / f"{name}.safetensors")


def single_process(name: str) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss and gradients of the first step in one process, and for a `trains` case the evaluation logits of each
    of `eval_batches` after two SGD steps."""
    case = CASES[name]
    model = build_model(case, reference=True)
    loss = grads = None
    for step in range(2 if case.trains else 1):
        step_loss = model(**reference_inputs(train_batch(case))).loss
        step_loss.backward()
        if step == 0:
            loss = step_loss.item()
            grads = {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        sgd_step(model)
    return loss, grads, evaluated(model.eval(), case) if case.trains else {}


def evaluated(model, case) -> dict[str, torch.Tensor]:
    """The logits of the real tokens of each of `eval_batches`, in one process (a padded batch has its mask)."""
    logits = {}
    with torch.no_grad():
        for kind, rows in eval_batches(case).items():
            out = model(**reference_inputs(rows)).logits
            logits[kind] = out[rows["attention_mask"].bool()] if "attention_mask" in rows else out
    return logits


def worker_logits(tensors: dict[str, torch.Tensor], case) -> dict[str, torch.Tensor]:
    logits = {}
    for kind, rows in eval_batches(case).items():
        out = tensors[f"eval_logits.{kind}"]
        logits[kind] = out[rows["attention_mask"].bool()] if "attention_mask" in rows else out
    return logits


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", [n for n in TWO_PROCESS_CASES + THREE_PROCESS_CASES if not CASES[n].ignore_head_offset]
)
def test_s2_under_sequence_parallelism_gives_the_single_process_loss_and_gradients(runs, name):
    """MHA, GQA, MQA; one whole row, packed documents, right padding; reentrant gradient checkpointing, also with
    LongLoRA's tiled MLP (against one process untiled); and 6 heads over 3 ranks, where rank 1 holds one unshifted
    and one shifted head."""
    facts, tensors = result(runs, name)
    assert facts["processes"] == (3 if name in THREE_PROCESS_CASES else 2)  # the ranks really ran together
    if CASES[name].mlp_tile_size:  # the MLPs really ran in tiles
        assert facts["largest_mlp_call"] <= CASES[name].mlp_tile_size
    loss, grads, _ = single_process(name)
    assert abs(facts["loss"] - loss) < 1e-5 * abs(loss)
    assert set(grads) <= set(tensors)
    for key, expected in grads.items():
        torch.testing.assert_close(tensors[key], expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


@pytest.mark.distributed
def test_ignoring_the_global_head_offset_gives_another_result(runs):
    """The negative control: each rank splitting its own heads into halves (as "s2" did before) is caught."""
    facts, tensors = result(runs, "gqa-packed-ignoring-head-offset")
    loss, grads, _ = single_process("gqa-packed")
    assert abs(facts["loss"] - loss) > 1e-4
    worst = max(((tensors[k] - g).norm() / g.norm()).item() for k, g in grads.items() if g.norm() > 0)
    assert worst > 0.05


@pytest.mark.distributed
def test_the_s2_layout_is_built_once_per_forward_under_sequence_parallelism(runs):
    """DeepSpeed drops the mask and hands each layer a newly gathered position-id tensor; the layout is still
    built by the first layer only, also when reentrant checkpointing recomputes the layers in the backward."""
    for name in TWO_PROCESS_CASES + THREE_PROCESS_CASES:
        facts, _ = result(runs, name)
        assert facts["layouts_per_step"] == [1] * len(facts["layouts_per_step"]), name


@pytest.mark.distributed
@pytest.mark.parametrize("rows", ["padded", "packed"])
def test_evaluation_with_sequence_parallelism_on_is_dense_and_equals_one_process(runs, rows):
    """After two training steps, the model evaluated while DeepSpeed's wrapper is registered (it drops the mask;
    accelerate's disable_in_eval runs each rank's own whole rows) gives the single-process logits: dense
    attention within each document of a packed row, padding left out."""
    case = CASES["gqa-trains"]
    _, tensors = result(runs, "gqa-trains")
    _, _, expected = single_process("gqa-trains")
    torch.testing.assert_close(worker_logits(tensors, case)[rows], expected[rows], rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
def test_the_adapter_of_a_sequence_parallel_run_loads_without_it_with_the_trained_logits(runs):
    from peft import PeftModel

    from support.helpers import tiny_model

    case = CASES["gqa-trains"]
    _, tensors = result(runs, "gqa-trains")
    model = PeftModel.from_pretrained(tiny_model(case.architecture, **case.overrides), runs / "gqa-trains-adapter")
    loaded, trained = evaluated(model.eval(), case), worker_logits(tensors, case)
    for kind in loaded:
        torch.testing.assert_close(loaded[kind], trained[kind], rtol=1e-4, atol=1e-5)


# Real models' head counts (num_attention_heads, num_key_value_heads) and the sp_size values that split them.
SHAPES = {
    "Llama-3.1-8B": (32, 8, [2, 4, 8, 16, 32]),
    "Qwen2.5-7B": (28, 4, [2, 4, 28]),
    "Gemma-3-4B": (8, 4, [2, 4, 8]),
    "demo": (8, 4, [2, 4, 8]),
}


@pytest.mark.parametrize("model", SHAPES)
def test_valid_sp_sizes_are_those_that_split_query_and_key_value_heads(model):
    heads, kv_heads, valid = SHAPES[model]
    assert valid_sp_sizes(heads, kv_heads) == valid


@pytest.mark.parametrize("model,sp_size", [("Llama-3.1-8B", 3), ("Qwen2.5-7B", 8), ("demo", 16)])
def test_an_sp_size_that_cannot_split_the_heads_is_refused_naming_the_sizes_and_the_valid_ones(model, sp_size):
    heads, kv_heads, valid = SHAPES[model]
    config = tiny_config("llama", num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * 8)
    with pytest.raises(ValueError) as error:
        check_sequence_parallel_heads(config, sp_size)
    message = str(error.value)
    assert f"sp_size {sp_size}" in message and f"num_attention_heads={heads}" in message
    assert f"num_key_value_heads={kv_heads}" in message
    assert "Valid sp_size values: " + ", ".join(map(str, valid)) in message


def test_a_share_of_the_heads_without_a_sequence_parallel_group_is_refused():
    """S2 cannot place heads another kind of split (tensor parallelism) hands it: an error, not wrong shifts."""
    with pytest.raises(
        ValueError, match="received 4 of the model's 8 query heads, with no DeepSpeed sequence-parallel group"
    ):
        heads_held(SimpleNamespace(num_attention_heads=8), 4)
    assert heads_held(SimpleNamespace(num_attention_heads=8), 8) == (0, 8)


# --- `longlora-hf sft --sp_size 2`: the Trainer's path (accelerate prepares DeepSpeed with the Ulysses wrapper,
# DeepSpeed's data adapter slices each batch, transformers combines the ranks' losses) ---

SFT_RECIPE = dict(
    model_name_or_path="longlora_hf/demo/assets",
    dtype="float32",
    bf16=False,
    lora_dropout=0.0,
    dataset_text_field="text",
    packing=False,
    max_length=256,
    target_context_length=512,
    learning_rate=2.0e-3,
    lr_scheduler_type="constant",
    per_device_train_batch_size=2,
    per_device_eval_batch_size=1,
    max_steps=3,
    logging_steps=1,
    eval_strategy="steps",
    eval_steps=3,
    save_strategy="steps",
    save_steps=3,
    max_grad_norm=0,
    use_cpu=True,
    report_to="none",
    disable_tqdm=True,
)


def rows_of_different_lengths(directory: Path) -> Path:
    """A local dataset directory: 8 training rows of 500 to 1130 characters (batches of 2 pad the shorter row),
    4 test rows."""
    lines = (ROOT / "trainer_configs" / "data" / "tiny_text.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    rows = [texts[i % len(texts)][i * 50 : i * 50 + 500 + 90 * i] for i in range(12)]
    directory.mkdir()
    (directory / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[:8]))
    (directory / "test.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[8:]))
    return directory


def sft(
    tmp_path: Path, name: str, launch: list[str], extra: list[str] = (), recipe: dict | None = None
) -> tuple[subprocess.CompletedProcess, Path]:
    import yaml

    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(recipe or {**SFT_RECIPE, "dataset_name": str(tmp_path / "data")}))
    out = tmp_path / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        *launch,
        "-m",
        "longlora_hf.sft",
        "--config",
        str(config),
        "--output_dir",
        str(out),
        *extra,
    ]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600), out


def history(out: Path) -> tuple[list[dict], dict]:
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    evaluation = next(entry for entry in state["log_history"] if "eval_loss" in entry)
    return steps, evaluation


@pytest.mark.distributed
def test_sft_with_sp_size_2_under_zero2_and_zero3_trains_as_one_process(tmp_path):
    """The same batches of 2 rows (one padded) trained by one process and by two processes each holding half of
    every row: the same loss at every step, the same evaluation, the same adapter. The gradient is the same up to
    DeepSpeed's factor: 2x under ZeRO-2 (seen in the logged gradient norm), 1x under ZeRO-3. The ZeRO-3 run also
    tiles the MLP (tiles of 64 of each rank's 256 tokens, under TRL's gradient checkpointing), against the one
    process untiled."""
    from test_training_sft import logits_of

    rows_of_different_lengths(tmp_path / "data")
    single, single_out = sft(tmp_path, "single", [])
    assert single.returncode == 0, single.stderr[-3000:]
    expected_steps, expected_eval = history(single_out)
    expected_logits = logits_of(single_out)
    for zero, factor in (("zero2", 2.0), ("zero3", 1.0)):
        tiles = ["--mlp_tile_size", "64"] if zero == "zero3" else []
        result, out = sft(tmp_path, zero, accelerate(f"cpu_deepspeed_{zero}"), ["--sp_size", "2", *tiles])
        assert result.returncode == 0, result.stderr[-3000:]
        report = result.stdout + result.stderr
        assert f"2 processes (this is rank 0), data-parallel 1, ZeRO stage {zero[-1]}, sequence-parallel 2" in report
        assert ("MLP in tiles of 64 tokens (4 layers)" in report) == bool(tiles)
        steps, evaluation = history(out)
        assert len(steps) == len(expected_steps) == 3
        for step, expected in zip(steps, expected_steps):
            assert step["loss"] == pytest.approx(expected["loss"], rel=1e-5)
            assert step["grad_norm"] == pytest.approx(
                factor * expected["grad_norm"], rel=1e-3
            )  # summed in another order
        assert evaluation["eval_loss"] == pytest.approx(expected_eval["eval_loss"], rel=1e-5)
        if zero == "zero3":
            # ZeRO-2's gradient is 2.0003x (its norm, at every step; the same with dense attention: DeepSpeed's, not
            # S2's), and Adam turns that into a 0.025 logit difference after 3 steps: README, sequence parallelism
            torch.testing.assert_close(logits_of(out), expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.distributed
def test_zero3_over_two_data_parallel_ranks_with_rows_of_other_lengths_runs_the_tiled_mlp(tmp_path):
    """Each rank trains its own row, of another length than the other's, so its MLPs would run another number of
    tiles; ZeRO-3 gathers a layer's weights at every call, collectively, so the ranks agree on the number of tiles
    (without it they wait for each other's gathers). Tiles of 16 tokens over rows of ~100-260 tokens."""
    rows_of_different_lengths(tmp_path / "data")
    flags = ["--per_device_train_batch_size", "1", "--mlp_tile_size", "16", "--eval_strategy", "no"]
    result, out = sft(tmp_path, "zero3", accelerate("cpu_deepspeed_zero3"), flags)
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout + result.stderr
    assert "2 processes (this is rank 0), data-parallel 2, ZeRO stage 3" in report
    assert "MLP in tiles of 16 tokens (4 layers)" in report
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


@pytest.mark.distributed
def test_sft_refuses_an_sp_size_that_cannot_split_the_heads_before_loading_anything(tmp_path):
    from support.helpers import tiny_model

    model_dir = tmp_path / "six-heads"
    tiny_model("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=48).save_pretrained(model_dir)
    rows_of_different_lengths(tmp_path / "data")
    recipe = {**SFT_RECIPE, "dataset_name": str(tmp_path / "data"), "model_name_or_path": str(model_dir)}
    result, out = sft(tmp_path, "refused", accelerate("cpu_deepspeed_zero2"), ["--sp_size", "2"], recipe=recipe)
    assert result.returncode != 0
    assert "sp_size 2 cannot split the attention of --model_name_or_path" in result.stderr
    assert "num_key_value_heads=3" in result.stderr and "Valid sp_size values: 3, 6." in result.stderr
    assert "Loading weights" not in result.stderr and not out.exists()


@pytest.mark.parametrize(
    "value,deepspeed,processes,message",
    [
        (0, False, 1, "--sp_size must be a whole number of ranks, at least 1"),
        (2, False, 2, "--sp_size 2 runs DeepSpeed's sequence parallelism: launch with `accelerate launch"),
        (2, True, 3, "--sp_size 2 must divide the number of processes (3)"),
    ],
)
def test_sp_size_is_checked_against_the_launch(value, deepspeed, processes, message, monkeypatch):
    """The launch as accelerate knows it (`PartialState().num_processes`, stood in for here: a launch of 3 needs
    3 processes) and the config the launcher was given (ACCELERATE_USE_DEEPSPEED)."""
    from longlora_hf.training import checks
    from longlora_hf.training.arguments import parse_arguments

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", str(deepspeed).lower())
    monkeypatch.setattr(checks, "launched_processes", lambda: processes)
    args = parse_arguments(
        ["--output_dir", "out", "--model_name_or_path", "unused/hub-id", "--sp_size", str(value), "--use_cpu"]
    )
    with pytest.raises(ValueError) as error:
        checks.check_sp_size(args)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "configured,model_runs,wrapped",
    [
        (None, "s2", "s2"),
        ("sdpa", "s2", "s2"),
        (None, "sdpa", "sdpa"),
        ("flash_attention_2", "sdpa", "flash_attention_2"),
    ],
)
def test_deepspeed_wraps_the_attention_the_model_runs(configured, model_runs, wrapped):
    """accelerate's sequence-parallel config refuses "s2" by name; LongLoraCallback sets it once the model runs S2
    (`longlora-hf sft` configures "sdpa", a user's ParallelismConfig none)."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    from longlora_hf.training.sequence_parallel import use_model_attention_under_sp

    with pytest.raises(ValueError, match="Invalid sp_attn_implementation: s2"):
        DeepSpeedSequenceParallelConfig(sp_attn_implementation="s2")  # the refusal this works around
    config = ParallelismConfig(
        sp_size=2,
        sp_backend="deepspeed",
        sp_handler=DeepSpeedSequenceParallelConfig(sp_attn_implementation=configured),
    )
    use_model_attention_under_sp(config, model_runs)
    assert config.sp_handler.sp_attn_implementation == wrapped


@pytest.mark.parametrize("recipe", ["llama3_1_8b_256k_sp8.yaml", "llama3_1_8b_1m_sp8.yaml"])
def test_the_long_recipes_split_llama_3_1_8b_over_their_ranks(recipe):
    import yaml

    recipe = yaml.safe_load((ROOT / "trainer_configs" / "recipes" / recipe).read_text())
    llama_3_1_8b = tiny_config("llama", num_attention_heads=32, num_key_value_heads=8, hidden_size=32 * 8)
    check_sequence_parallel_heads(llama_3_1_8b, recipe["sp_size"])
    assert (
        recipe["max_length"] % recipe["sp_size"] == 0 and recipe["max_length"] > 131072
    )  # past the model's own context
