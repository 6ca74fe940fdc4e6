"""`longlora-hf sft` / `python -m longlora_hf.sft`: TRL's SFT script with LongLoRA, single process and launched."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
import trl
from peft import AutoPeftModelForCausalLM

from longlora_hf.cli import main as cli_main


ROOT = Path(__file__).resolve().parents[1]
RECIPE = "trainer_configs/recipes/tiny_cpu.yaml"


def test_the_tiny_recipe_trains_a_longlora_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert (
        cli_main(
            ["sft", "--config", RECIPE, "--output_dir", str(tmp_path), "--max_steps", "2", "--disable_tqdm", "true"]
        )
        == 0
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LONGLORA" and config["position_interpolation_factor"] == 4.0
    assert config["target_context_length"] == 1024 and set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    assert config["base_model_name_or_path"] == str(
        ROOT / "longlora_hf" / "demo" / "assets"
    )  # the recipe's is relative
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert model.get_base_model().config.max_position_embeddings == 1024
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_a_run_shows_a_progress_bar_the_trainer_logs_and_the_report_once(tmp_path):
    result = run(
        [
            "-m",
            "longlora_hf.sft",
            "--config",
            RECIPE,
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "2",
            "--logging_steps",
            "1",
        ]
    )
    output = result.stdout + result.stderr
    assert re.search(r"2/2 \[[0-9:]+<", output)  # tqdm's bar reached the last step
    assert len(re.findall(r"'loss': '?[0-9.]+", output)) == 2  # the Trainer's usual log lines, one per step
    assert output.count("LongLoRA: S2-Attn on: group size 256, 4 groups at max_length 1024") == 1


def test_bf16_autocast_on_a_cpu_without_native_bf16_is_warned_and_the_report_names_the_precision(
    tmp_path, monkeypatch, caplog
):
    from longlora_hf.training import precision

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    common = ["sft", "--config", RECIPE, "--max_steps", "1", "--max_length", "256", "--disable_tqdm", "true"]
    with caplog.at_level("WARNING"):
        assert cli_main([*common, "--output_dir", str(tmp_path / "bf16"), "--bf16", "true"]) == 0
    assert "has no native bf16" in caplog.text and "Pass --bf16 false" in caplog.text
    assert "precision: bf16 autocast, float32 weights (emulated on this CPU: slow, see --bf16)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert cli_main([*common, "--output_dir", str(tmp_path / "fp32")]) == 0  # the recipe's bf16: false
    assert "has no native bf16" not in caplog.text and "precision: no autocast, float32 weights" in caplog.text


def test_longlora_flags_override_the_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [
        "sft",
        "--config",
        RECIPE,
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "1",
        "--disable_tqdm",
        "true",
        "--group_size_ratio",
        "0.5",
        "--lora_r",
        "4",
        "--trainable_embeddings",
        "false",
    ]
    assert cli_main(args) == 0
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["group_size_ratio"], config["r"], config["trainable_embeddings"]) == (0.5, 4, False)
    assert "embed_tokens" not in config["modules_to_save"]


def refused(args: list[str], capsys) -> str:
    """The one-line error of a `longlora-hf` command that exits 2."""
    assert cli_main(args) == 2
    return capsys.readouterr().err


def test_an_unknown_flag_is_refused(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert "--group_size_ration" in refused(["sft", "--config", RECIPE, "--group_size_ration", "0.5"], capsys)


def module_namespaces() -> dict[str, dict]:
    """The globals of the libraries a run goes through. TRL's and transformers' are lazy modules: the names
    TRL's SFT script uses are resolved first, so they are in the namespace to compare."""
    import datasets
    import peft

    for name in ("SFTTrainer", "SFTConfig", "TrlParser", "get_dataset", "get_peft_config", "get_quantization_config"):
        getattr(trl, name)
    return {module.__name__: dict(vars(module)) for module in (trl, datasets, peft, transformers)}


def test_a_run_reassigns_nothing_in_trl_datasets_peft_or_transformers(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = module_namespaces()
    seen_during_training = {}

    class Snapshot(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen_during_training.update(module_namespaces())

    from longlora_hf.training import LongLoraSFTTrainer

    monkeypatch.setattr(LongLoraSFTTrainer, "__init__", with_callback(LongLoraSFTTrainer.__init__, Snapshot()))
    assert (
        cli_main(
            ["sft", "--config", RECIPE, "--output_dir", str(tmp_path), "--max_steps", "1", "--disable_tqdm", "true"]
        )
        == 0
    )
    assert seen_during_training
    for name, namespace in seen_during_training.items():
        changed = sorted(
            key for key, value in before[name].items() if key in namespace and namespace[key] is not value
        )
        assert not changed, f"{name}: {changed} reassigned during the run"


def with_callback(init, callback):
    def init_with_callback(self, *args, callbacks=None, **kwargs):
        init(self, *args, callbacks=[*(callbacks or []), callback], **kwargs)

    return init_with_callback


def test_trls_lora_flags_reach_the_longlora_config():
    from longlora_hf.training.arguments import longlora_config, parse_arguments

    args = parse_arguments(
        ["--config", str(ROOT / RECIPE), "--use_rslora", "true", "--use_dora", "true", "--lora_r", "4"]
    )
    config = longlora_config(args)
    assert (config.use_rslora, config.use_dora, config.r, config.peft_type) == (True, True, 4, "LONGLORA")


@pytest.mark.parametrize(
    "flags,expected",
    [
        ([], (8, 16)),
        (["--longlora", "false"], (16, 32)),
        (["--lora_r", "16"], (16, 16)),
        (["--lora_alpha", "32"], (8, 32)),
    ],
    ids=["longlora-paper-defaults", "plain-trl-defaults", "flag-r", "flag-alpha"],
)
def test_lora_rank_and_alpha_default_to_the_papers_under_longlora_and_to_trls_without(flags, expected):
    from longlora_hf.training.arguments import parse_arguments

    _, _, model_args, _, _ = parse_arguments(["--config", str(ROOT / RECIPE), *flags])
    assert (model_args.lora_r, model_args.lora_alpha) == expected


def test_a_recipes_lora_rank_and_alpha_win_over_the_defaults(tmp_path):
    import yaml

    from longlora_hf.training.arguments import parse_arguments

    recipe = yaml.safe_load((ROOT / RECIPE).read_text())
    recipe.update(lora_r=32, lora_alpha=64)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _, _, model_args, _, _ = parse_arguments(["--config", str(path)])
    assert (model_args.lora_r, model_args.lora_alpha) == (32, 64)


def test_trl_sft_and_longlora_false_train_the_same_plain_lora_adapter(tmp_path):
    """The same recipe through `trl sft` (TRL's own script, launched by TRL's CLI) and through `longlora-hf sft
    --longlora false`: the same adapter, bit for bit, so `longlora-hf sft` drifting from TRL's script is caught."""
    import yaml
    from safetensors.torch import load_file

    recipe = yaml.safe_load((ROOT / RECIPE).read_text())
    for key in ("target_context_length", "group_size_ratio"):  # LongLoRA keys, unknown to `trl sft`
        del recipe[key]
    recipe.update(use_peft=True, max_length=256, max_steps=2, logging_steps=1, disable_tqdm=True)
    plain = tmp_path / "plain_lora.yaml"
    plain.write_text(yaml.safe_dump(recipe))
    trl_cli = Path(sys.executable).with_name("trl")
    # `trl sft` launches through accelerate with the user's default accelerate config: an empty HF_HOME has none,
    # so it runs one process, as `longlora-hf sft` does.
    run_command(
        [str(trl_cli), "sft", "--config", str(plain), "--output_dir", str(tmp_path / "trl")],
        HF_HOME=str(tmp_path / "hf_home"),
    )
    run_command(
        [
            sys.executable,
            "-m",
            "longlora_hf.cli",
            "sft",
            "--config",
            str(plain),
            "--longlora",
            "false",
            "--output_dir",
            str(tmp_path / "ours"),
        ]
    )
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("trl", "ours")]
    for config in configs:  # a set, written in each process's hash order
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0]["peft_type"] == "LORA" and configs[0] == configs[1]
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("trl", "ours"))
    assert theirs.keys() == ours.keys()
    for name in theirs:
        assert torch.equal(theirs[name], ours[name]), name
    assert any(theirs[name].abs().sum() > 0 for name in theirs if "lora_B" in name)  # trained, not the initial zeros


def longqa_recipe(tmp_path: Path, records: list[dict] | str, suffix: str = ".jsonl") -> str:
    """The tiny recipe on LongQA records (rows up to 256 tokens) written to a data file in `tmp_path`."""
    import yaml

    data = tmp_path / f"longqa{suffix}"
    if isinstance(records, str):
        data.write_text(records)
    else:
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = yaml.safe_load((ROOT / RECIPE).read_text())
    recipe.update(
        datasets=[{"path": "json", "data_files": str(data)}],
        packing=False,
        max_length=256,
        target_context_length=512,
        output_dir=str(tmp_path / "out"),
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def longqa_record(words: int, question: str = "What is it about?") -> dict:
    return {
        "material_type": "a text",
        "context": " ".join(["python"] * words),
        "question": question,
        "answer": "Python.",
    }


def test_longqa_records_are_formatted_inside_the_run_with_the_too_long_ones_counted(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    recipe = longqa_recipe(tmp_path, [longqa_record(20), longqa_record(2000), longqa_record(30)])
    args = [
        "sft",
        "--config",
        recipe,
        "--max_steps",
        "2",
        "--disable_tqdm",
        "true",
        "--record_format",
        "longqa",
        "--record_fields",
        "material_content=context",
        "--too_long",
        "drop",
    ]
    with caplog.at_level("WARNING", logger="longlora_hf.training.data"):
        assert cli_main(args) == 0
    assert "LongLoRA longqa formatting of split 'train': 2 kept, 0 truncated, 1 dropped (max_length 256" in caplog.text
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "records,suffix,message",
    [
        (
            [longqa_record(5), {"material_type": "a text", "context": "x", "answer": "y"}],
            ".jsonl",
            "LongQA record 1 has no field 'question'",
        ),
        ('{"material_type": "a text"}\n{"broken": \n', ".jsonl", "longqa.jsonl line 2 is not valid JSON"),
        ("", ".jsonl", "holds no records: the dataset is empty"),
        (b"\xff\xfe{}".decode("latin-1"), ".json", "is not UTF-8"),
    ],
    ids=["missing-field", "malformed-jsonl", "empty", "not-utf8"],
)
def test_bad_records_stop_the_run_before_training_with_the_record_and_field_named(
    tmp_path, monkeypatch, capsys, records, suffix, message
):
    monkeypatch.chdir(ROOT)
    recipe = longqa_recipe(tmp_path, records, suffix)
    if isinstance(records, str) and records.startswith("\xff"):
        (tmp_path / f"longqa{suffix}").write_bytes(b"\xff\xfe{}")
    args = [
        "sft",
        "--config",
        recipe,
        "--max_steps",
        "1",
        "--record_format",
        "longqa",
        "--record_fields",
        "material_content=context",
    ]
    assert message in refused(args, capsys)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_plain_trl_sft_formats_records_too(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    recipe = longqa_recipe(tmp_path, [longqa_record(20), longqa_record(30)])
    args = [
        "sft",
        "--config",
        recipe,
        "--max_steps",
        "1",
        "--disable_tqdm",
        "true",
        "--record_format",
        "longqa",
        "--record_fields",
        "material_content=context",
        "--longlora",
        "false",
    ]
    with caplog.at_level("WARNING", logger="longlora_hf.training.data"):
        assert cli_main(args) == 0
    assert "2 kept, 0 truncated, 0 dropped" in caplog.text
    assert "LongLoRA: S2-Attn" not in caplog.text  # plain TRL: no LongLoRA trainer, no LongLoRA adapter
    assert (
        not (tmp_path / "out" / "adapter_config.json").exists()
        or json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] != "LONGLORA"
    )


def test_an_unknown_too_long_policy_is_refused(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    error = refused(["sft", "--config", RECIPE, "--record_format", "longqa", "--too_long", "cut"], capsys)
    assert "--too_long must be one of 'truncate', 'drop'; got 'cut'" in error


def test_an_unknown_record_field_role_is_refused(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    error = refused(
        ["sft", "--config", RECIPE, "--record_format", "longqa", "--record_fields", "material=context"], capsys
    )
    assert (
        "--record_fields 'material=context': 'material=context' is not role=column with a role of longqa records"
        in error
    )


LAUNCHES = {
    "cpu_deepspeed_zero2": "launch: DEEPSPEED, 2 processes (this is rank 0), data-parallel 2, ZeRO stage 2",
    "cpu_deepspeed_zero3": "launch: DEEPSPEED, 2 processes (this is rank 0), data-parallel 2, ZeRO stage 3",
    "cpu_deepspeed_zero3_offload": (
        "launch: DEEPSPEED, 2 processes (this is rank 0), data-parallel 2, ZeRO stage 3 "
        "(offload: optimizer cpu, parameters cpu)"
    ),
    "cpu_ddp": "launch: MULTI_CPU, 2 processes (this is rank 0), data-parallel 2",
}


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["cpu_deepspeed_zero2"])  # DDP and ZeRO-3: the tests comparing with one process
def test_accelerate_launch_with_two_processes_trains_and_saves_a_loadable_adapter(launcher, tmp_path):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"tests/configs/{launcher}.yaml",
        "-m",
        "longlora_hf.sft",
        "--config",
        RECIPE,
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "3",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        result.stderr.count("LongLoRA: S2-Attn on") + result.stdout.count("LongLoRA: S2-Attn on") == 1
    )  # main process only
    output = result.stderr + result.stdout
    assert LAUNCHES[launcher] in output  # the report says what ran
    assert re.search(r"trainable parameters: LoRA 57,344, embeddings 1,048,576, norms 2,304", output), output[
        -2000:
    ]  # whole sizes, also under ZeRO-3
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 4096, (1, 64), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(ids).logits).all()
    trained = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert trained and any(p.abs().sum() > 0 for p in trained.values())  # LoRA B starts at zero: it was trained


@pytest.mark.distributed
def test_the_fsdp_config_on_a_cpu_stops_before_training_instead_of_running_plain_data_parallelism(tmp_path):
    """accelerate runs FSDP only on accelerators: on this machine trainer_configs/accelerate/fsdp.yaml starts two
    MULTI_CPU processes that would each train the whole model. Both stop before loading anything."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "trainer_configs/accelerate/fsdp.yaml",
        "--num_processes",
        "2",
        "-m",
        "longlora_hf.cli",
        "sft",
        "--config",
        RECIPE,
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "1",
    ]
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    refusal = (
        "longlora-hf sft: error: the accelerate config asks for FSDP (ACCELERATE_USE_FSDP=true), "
        "but accelerate runs MULTI_CPU with 2 process(es)"
    )
    assert output.count(refusal) == 1, output[-3000:]  # one line for the launch, by the main process
    assert "longlora_hf/" not in output  # no traceback through this package on any rank
    assert "Loading weights" not in output and not (tmp_path / "out").exists()


def identical_rows_dataset(path: Path) -> Path:
    """Eight identical documents: any data order or split across processes gives the same batches."""
    text = (ROOT / "trainer_configs" / "data" / "tiny_text.jsonl").read_text().splitlines()[0]
    document = json.loads(text)["text"][:1500]
    path.write_text("".join(json.dumps({"text": document}) + "\n" for _ in range(8)))
    return path


def sft_command(data: Path, out: Path, extra: list[str]) -> list[str]:
    """The tiny recipe on `data` (rows of at most 256 tokens, unpacked), with `extra` flags."""
    import yaml

    recipe = yaml.safe_load((ROOT / RECIPE).read_text())
    recipe.update(
        datasets=[{"path": "json", "data_files": str(data)}], packing=False, max_length=256, target_context_length=512
    )
    recipe_path = out.parent / f"{out.name}_recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    return [
        "-m",
        "longlora_hf.sft",
        "--config",
        str(recipe_path),
        "--output_dir",
        str(out),
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1",
        *extra,
    ]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return run_command([sys.executable, *args])


def run_command(command: list[str], **environment: str) -> subprocess.CompletedProcess:
    # One thread: runs of the same computation in different processes then reduce in the same order.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **environment}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def two_machines(sft_args: list[str]) -> None:
    """`sft_args` launched as two machines of one process each on this one (tests/configs/cpu_two_machines.yaml):
    two `accelerate launch` commands, --machine_rank 0 and 1, the main process on 127.0.0.1."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    machines = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                "tests/configs/cpu_two_machines.yaml",
                "--machine_rank",
                str(rank),
                "--main_process_port",
                port,
                *sft_args,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "launch: DEEPSPEED, 2 processes (this is rank 0), data-parallel 2, ZeRO stage 3" in outputs[0]


def logits_of(adapter_dir: Path) -> torch.Tensor:
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    ids = torch.randint(0, 4096, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


ZERO3_RUN = [
    *["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "2e-3"],
    *["--per_device_train_batch_size", "1"],
]


def accelerate(config: str) -> list[str]:
    """`python -m accelerate.commands.launch` with tests/configs/<config>.yaml."""
    return ["-m", "accelerate.commands.launch", "--config_file", f"tests/configs/{config}.yaml"]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """One 2-process ZeRO-3 run of 4 steps with a checkpoint every 2, on identical rows, launched once for the two
    tests below (each launch costs two processes' start-up): its data, its output_dir and what it printed."""
    directory = tmp_path_factory.mktemp("zero3")
    data = identical_rows_dataset(directory / "data.jsonl")
    result = run([*accelerate("cpu_deepspeed_zero3"), *sft_command(data, directory / "zero3", ZERO3_RUN)])
    return data, directory / "zero3", result.stdout + result.stderr


@pytest.mark.distributed
def test_zero3_checkpoint_and_adapter_match_a_single_process_run(zero3_run, tmp_path):
    data, zero3_dir, zero3_output = zero3_run
    assert LAUNCHES["cpu_deepspeed_zero3"] in zero3_output  # two ranks ran together
    assert zero3_output.count("LongLoRA: S2-Attn on") == 1  # the report comes from the main process only
    assert "trainable parameters: LoRA 57,344, embeddings 1,048,576, norms 2,304" in zero3_output  # whole sizes
    two_machines(sft_command(data, tmp_path / "two_machines", ZERO3_RUN))
    offloaded = run([*accelerate("cpu_deepspeed_zero3_offload"), *sft_command(data, tmp_path / "offload", ZERO3_RUN)])
    assert LAUNCHES["cpu_deepspeed_zero3_offload"] in offloaded.stdout + offloaded.stderr
    # one process accumulating two micro-batches of 1: the same global batch, summed the same way
    run(
        sft_command(
            data,
            tmp_path / "single",
            [*ZERO3_RUN, "--gradient_accumulation_steps", "2"],
        )
    )

    state = json.loads((zero3_dir / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    checkpoint = zero3_dir / "checkpoint-2"
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert (
        any("embed_tokens" in k for k in saved)
        and any("layernorm" in k for k in saved)
        and any("lora_A" in k for k in saved)
    )
    assert all(v.numel() > 0 for v in saved.values())  # gathered, not ZeRO-3 shards
    zero3, single = logits_of(zero3_dir), logits_of(tmp_path / "single")
    from transformers import AutoModelForCausalLM

    from longlora_hf.demo import ASSETS
    from longlora_hf.tuner import apply_position_interpolation

    base = AutoModelForCausalLM.from_pretrained(ASSETS)
    apply_position_interpolation(base, 512)
    with torch.no_grad():
        before = base(torch.randint(0, 4096, (1, 96), generator=torch.Generator().manual_seed(0))).logits
    moved = (single - before).norm()
    assert moved > 1.0
    # float32 throughout (the recipe sets bf16 false) and no LoRA dropout, so both runs compute the same
    # thing. What remains is float32 rounding: ZeRO-3's partitioned kernels, and gradient clipping
    # computed from a float32 norm by torch but more exactly by DeepSpeed (1e-4 apart here).
    # Measured: the difference is 3e-6 of how far training moved the logits, at most 1.05e-5 per logit.
    assert (zero3 - single).norm() < 1e-4 * moved, ((zero3 - single).norm(), moved)
    torch.testing.assert_close(zero3, single, atol=1e-4, rtol=0)
    # two machines of one process each (two launches, machine_rank 0 and 1) run the 2-process ZeRO-3 launch
    machines = logits_of(tmp_path / "two_machines")
    torch.testing.assert_close(machines, zero3, atol=1e-6, rtol=0)
    # ZeRO-3 with the optimizer and the parameters offloaded to the CPU computes the same steps as ZeRO-3
    offload = logits_of(tmp_path / "offload")
    assert (offload - zero3).norm() < 1e-4 * moved, ((offload - zero3).norm(), moved)
    print(
        f"ZeRO-3 offload vs ZeRO-3: max {(offload - zero3).abs().max():.3g} per logit; two machines vs ZeRO-3: max "
        f"{(machines - zero3).abs().max():.3g}; ZeRO-3 vs one process: max {(zero3 - single).abs().max():.3g}"
    )


@pytest.mark.distributed
def test_a_zero3_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_adapter(zero3_run, tmp_path):
    """The run stopped after its checkpoint at step 2 (that checkpoint, alone in an output_dir) and resumed with
    `--resume_from_checkpoint true` ends with the adapter of the run that went on."""
    data, straight, _ = zero3_run
    checkpoint = straight / "checkpoint-2"
    assert any(p.name.startswith("global_step") for p in checkpoint.iterdir())  # DeepSpeed's optimizer shards
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    command = sft_command(data, tmp_path / "resumed", [*ZERO3_RUN, "--resume_from_checkpoint", "true"])
    resumed = run([*accelerate("cpu_deepspeed_zero3"), *command])
    assert LAUNCHES["cpu_deepspeed_zero3"] in resumed.stdout + resumed.stderr  # two ranks ran together
    torch.testing.assert_close(logits_of(tmp_path / "resumed"), logits_of(straight), atol=1e-6, rtol=0)
    assert not torch.allclose(logits_of(checkpoint), logits_of(straight))


def distinct_rows_dataset(path: Path) -> Path:
    """Eight different documents of different lengths: a rank that did not train changes the result."""
    lines = (ROOT / "trainer_configs" / "data" / "tiny_text.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    path.write_text(
        "".join(json.dumps({"text": texts[i % len(texts)][i * 50 : i * 50 + 700 + 100 * i]}) + "\n" for i in range(8))
    )
    return path


@pytest.mark.distributed
def test_ddp_runs_two_ranks_and_gives_the_adapter_of_one_process_training_both_ranks_batches(tmp_path):
    """Before, tests/configs/cpu_ddp.yaml (MULTI_CPU) started one process: the test compared a single process
    with a single process. Now two ranks train (the report says so) on different rows, and one process with
    both ranks' rows in each batch gives the same adapter to float32 rounding; one process with one rank's
    share of the batches does not."""
    data = distinct_rows_dataset(tmp_path / "data.jsonl")
    steps = ["--max_steps", "3", "--learning_rate", "2e-3", "--seed", "3"]
    ddp = run(
        [
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "tests/configs/cpu_ddp.yaml",
            *sft_command(data, tmp_path / "ddp", [*steps, "--per_device_train_batch_size", "1"]),
        ]
    )
    assert "launch: MULTI_CPU, 2 processes (this is rank 0), data-parallel 2" in ddp.stdout + ddp.stderr
    run(sft_command(data, tmp_path / "single", [*steps, "--per_device_train_batch_size", "2"]))
    run(sft_command(data, tmp_path / "one_rank", [*steps, "--per_device_train_batch_size", "1"]))
    together, single = logits_of(tmp_path / "ddp"), logits_of(tmp_path / "single")
    moved = (single - logits_of(tmp_path / "one_rank")).abs().max()
    difference = (together - single).abs().max()
    print(f"DDP vs one process: {difference:.3g}; one rank's share: {moved:.3g}")
    assert difference < 1e-4 and moved > 100 * difference, (difference, moved)


def test_a_resumed_run_ends_with_the_same_adapter_as_an_uninterrupted_one(tmp_path):
    """The run stopped after its checkpoint at step 2 (that checkpoint, alone in an output_dir) and resumed from it
    by path ends with the adapter of the run that went on."""
    data = identical_rows_dataset(tmp_path / "data.jsonl")
    common = ["--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "5e-3", "--seed", "7"]
    run(sft_command(data, tmp_path / "straight", ["--max_steps", "4", *common]))
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", checkpoint)
    run(
        sft_command(
            data, tmp_path / "resumed", ["--max_steps", "4", *common, "--resume_from_checkpoint", str(checkpoint)]
        )
    )
    torch.testing.assert_close(logits_of(tmp_path / "resumed"), logits_of(tmp_path / "straight"), atol=1e-6, rtol=0)
    assert not torch.allclose(logits_of(checkpoint), logits_of(tmp_path / "straight"))


# ---------------------------------------------------------------------------------------------------------
# Bad input found before training: numbers, paths, data, the output_dir, checkpoints


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_length", "0"], "--max_length must be a positive number of tokens (or unset: no truncation); got 0"),
        (["--max_length", "-5"], "--max_length must be a positive number of tokens (or unset: no truncation); got -5"),
        (["--target_context_length", "0"], "target_context_length must be a positive integer number of tokens; got 0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1; got 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1; got 0"),
        (["--max_steps", "0"], "--max_steps must be a positive number of steps, or -1"),
        (
            ["--max_steps", "-1", "--num_train_epochs", "0"],
            "--num_train_epochs must be positive (or set --max_steps); got 0.0",
        ),
        (["--learning_rate=-1e-3"], "--learning_rate must be 0 or more; got -0.001"),
        (
            ["--save_strategy", "steps", "--save_steps", "0"],
            "--save_steps must be positive with --save_strategy steps",
        ),
        (["--lora_r", "0"], "--lora_r must be at least 1; got 0"),
        (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1); got 1.5"),
        (["--group_size_ratio", "0"], "group_size_ratio"),
        (["--mlp_tile_size", "0"], "mlp_tile_size=0 is not a number of tokens"),
        (["--target_context_length", "100"], "--target_context_length 100 is below --max_length 1024"),
    ],
    ids=lambda value: "_".join(value) if isinstance(value, list) else None,
)
def test_every_numeric_flag_is_checked_before_anything_is_loaded(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(ROOT)
    error = refused(["sft", "--config", RECIPE, "--output_dir", str(tmp_path / "out"), *flags], capsys)
    assert error.startswith("longlora-hf sft: error:") and message in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.accelerator.current_accelerator() is not None, reason="offloading works where a GPU is")
def test_activation_offloading_without_a_gpu_is_refused_before_anything_is_loaded(tmp_path, monkeypatch, capsys):
    """TRL's offloader cannot be built where torch sees no accelerator: it would fail once the model is loaded."""
    monkeypatch.chdir(ROOT)
    flags = ["--activation_offloading", "true", "--output_dir", str(tmp_path / "out")]
    error = refused(["sft", "--config", RECIPE, *flags], capsys)
    assert "--activation_offloading moves saved activations from the GPU to CPU memory" in error, error
    assert "--mlp_tile_size" in error and not (tmp_path / "out").exists()


def plain_recipe(tmp_path: Path, content: bytes, suffix: str = ".jsonl") -> str:
    """The tiny recipe on a plain-text data file holding `content` (no --record_format)."""
    import yaml

    data = tmp_path / f"data{suffix}"
    data.write_bytes(content)
    recipe = yaml.safe_load((ROOT / RECIPE).read_text())
    builder = "text" if suffix == ".txt" else "json"
    recipe.update(datasets=[{"path": builder, "data_files": str(data)}], output_dir=str(tmp_path / "out"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "recipe.yaml")


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        (b"", ".jsonl", "data.jsonl holds no records: the dataset is empty"),
        (
            b'{"content": "some text"}\n',
            ".jsonl",
            "data.jsonl record 1 has fields content; TRL's SFT needs a 'text' string",
        ),
        (b'{"text": "a"}\n{"body": "b"}\n', ".jsonl", "data.jsonl record 2 has fields body"),
        (b'{"text": "caf\xe9"}\n', ".jsonl", "data.jsonl is not UTF-8 (byte 13 is 0xe9)"),
        (b'{"text": "a"}\n{"text": \n', ".jsonl", "data.jsonl line 2 is not valid JSON"),
        (b'[{"text": "a"}, ', ".json", "data.json is not valid JSON"),
        (b'{"text": 5}\n', ".jsonl", "data.jsonl record 1: 'text' is a int, not a string"),
        (b"\n  \n", ".txt", "data.txt is empty: the dataset has no text"),
        (b"caf\xe9 au lait", ".txt", "data.txt is not UTF-8 (byte 3 is 0xe9)"),
        (b'{"text": ""}\n{"text": "  "}\n', ".jsonl", "data.jsonl: every record is empty"),
        (b'{"messages": [{"role": "user", "content": ""}]}\n', ".jsonl", "data.jsonl: every record is empty"),
    ],
    ids=[
        "empty",
        "no-text-field",
        "field-missing-later",
        "not-utf8",
        "malformed-jsonl",
        "malformed-json",
        "text-not-a-string",
        "empty-txt",
        "not-utf8-txt",
        "all-records-blank",
        "all-messages-blank",
    ],
)
def test_plain_text_data_is_checked_before_training_with_the_file_and_record_named(
    tmp_path, monkeypatch, capsys, content, suffix, message
):
    monkeypatch.chdir(ROOT)
    error = refused(["sft", "--config", plain_recipe(tmp_path, content, suffix), "--max_steps", "1"], capsys)
    assert message in error, error
    assert not (tmp_path / "out").exists()


def test_a_plain_data_file_in_json_lines_under_a_json_name_is_read_as_datasets_reads_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = json.loads((ROOT / "trainer_configs" / "data" / "tiny_text.jsonl").read_text().splitlines()[0])["text"]
    recipe = plain_recipe(tmp_path, (json.dumps({"text": text}) + "\n").encode() * 2, ".json")
    assert cli_main(["sft", "--config", recipe, "--max_steps", "1", "--disable_tqdm", "true"]) == 0


@pytest.mark.parametrize("where", ["the model", "around the data", "a file"])
def test_an_output_dir_that_is_an_input_or_a_file_is_refused(tmp_path, monkeypatch, capsys, where):
    monkeypatch.chdir(ROOT)
    recipe = plain_recipe(tmp_path, b'{"text": "a b c"}\n')
    (tmp_path / "afile").write_text("x")
    output_dir = {
        "the model": ROOT / "longlora_hf" / "demo" / "assets",
        "around the data": tmp_path,
        "a file": tmp_path / "afile",
    }[where]
    before = sorted(p.name for p in Path(output_dir).parent.iterdir())
    error = refused(
        [
            "sft",
            "--config",
            recipe,
            "--output_dir",
            str(output_dir),
            "--max_steps",
            "1",
            "--overwrite_output_dir",
            "true",
        ],
        capsys,
    )
    assert ("never writes into its own inputs" in error) if where != "a file" else ("is a file" in error)
    assert sorted(p.name for p in Path(output_dir).parent.iterdir()) == before


def test_a_missing_local_model_is_named_as_a_missing_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    error = refused(
        [
            "sft",
            "--config",
            RECIPE,
            "--output_dir",
            str(tmp_path / "out"),
            "--model_name_or_path",
            str(tmp_path / "nope"),
        ],
        capsys,
    )
    assert f"--model_name_or_path {tmp_path / 'nope'}: no such directory" in error


def test_an_output_dir_holding_files_is_refused_unless_the_run_resumes_or_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    args = ["sft", "--config", RECIPE, "--output_dir", str(out), "--max_steps", "1", "--disable_tqdm", "true"]
    error = refused(args, capsys)
    assert f"--output_dir {out} already holds files (notes.md)" in error and "--resume_from_checkpoint true" in error
    assert cli_main([*args, "--overwrite_output_dir", "true"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "notes.md").read_text() == "mine"
    assert [
        p.name for p in (*out.iterdir(), *tmp_path.iterdir()) if "longlora-hf" in p.name
    ] == []  # no partial or lock file left


def test_a_second_run_into_the_output_dir_of_a_running_one_is_refused(tmp_path, monkeypatch, capsys):
    """Before, both reported success and one run was silently gone."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "longlora_hf.cli",
            "sft",
            "--config",
            RECIPE,
            "--output_dir",
            str(out),
            "--max_steps",
            "500",
            "--disable_tqdm",
            "true",
        ],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        import time

        deadline = time.monotonic() + 300
        while "LongLoRA: S2-Attn" not in (tmp_path / "first.log").read_text():  # the first run is training
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        error = refused(["sft", "--config", RECIPE, "--output_dir", str(out), "--max_steps", "1"], capsys)
        assert f"--output_dir {out}: another run is writing to it (process {first.pid} on" in error
    finally:
        first.kill()
        first.wait()
        log.close()


def test_resuming_skips_a_checkpoint_torn_by_a_kill_and_says_so(tmp_path, monkeypatch, capsys, caplog):
    """A SIGKILL while the Trainer saves leaves checkpoint-N without trainer_state.json (written last)."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    common = [
        "sft",
        "--config",
        RECIPE,
        "--output_dir",
        str(out),
        "--disable_tqdm",
        "true",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
    ]
    assert cli_main([*common, "--max_steps", "2"]) == 0
    torn = out / "checkpoint-3"
    torn.mkdir()
    (torn / "README.md").write_text("card")
    (torn / "tmpq1w2e3").write_bytes((out / "checkpoint-2" / "adapter_model.safetensors").read_bytes()[:1000])
    error = refused([*common, "--max_steps", "3", "--resume_from_checkpoint", str(torn)], capsys)
    assert f"--resume_from_checkpoint {torn} cannot be resumed from: no trainer_state.json" in error
    assert f"Resume from {out / 'checkpoint-2'} (the newest complete one)" in error
    with caplog.at_level("WARNING", logger="longlora_hf.training.checkpoints"):
        assert cli_main([*common, "--max_steps", "3", "--resume_from_checkpoint", "true"]) == 0
    assert f"skipping the incomplete checkpoint {torn}: no trainer_state.json" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert json.loads((torn / "trainer_state.json").read_text())["global_step"] == 3  # trained on from step 2


def test_a_model_s2_cannot_train_is_refused_before_loading_and_the_advice_given_trains_it(
    tmp_path, monkeypatch, capsys
):
    """Gemma 2's attention logit soft-capping: refused from the model's config in one line before the output_dir is
    claimed (nothing loaded, nothing written); `--use_s2_attn false`, the way out the refusal names, trains it."""
    monkeypatch.chdir(ROOT)
    assets = ROOT / "longlora_hf" / "demo" / "assets"
    demo = json.loads((assets / "config.json").read_text())
    model_dir = tmp_path / "gemma2"
    config = transformers.Gemma2Config(
        vocab_size=demo["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        pad_token_id=demo["pad_token_id"],
        bos_token_id=demo["bos_token_id"],
        eos_token_id=demo["eos_token_id"],
    )
    transformers.Gemma2ForCausalLM(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets / name, model_dir / name)
    common = [
        "sft",
        "--config",
        RECIPE,
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "1",
        "--max_length",
        "256",
        "--disable_tqdm",
        "true",
    ]
    capsys.readouterr()  # save_pretrained's progress bar
    error = refused(common, capsys)
    assert error.count("\n") == 1 and "attn_logit_softcapping=" in error and "--use_s2_attn false" in error, error
    assert not (tmp_path / "out").exists()
    assert cli_main([*common, "--use_s2_attn", "false"]) == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_s2_attn"] is False


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, monkeypatch, capsys):
    """The Trainer, resumed from the last checkpoint of a finished run, trains one step past max_steps and saves
    over the adapter; `sft` stops before loading anything."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    common = [
        "sft",
        "--config",
        RECIPE,
        "--output_dir",
        str(out),
        "--disable_tqdm",
        "true",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
        "--max_steps",
        "2",
    ]
    assert cli_main(common) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli_main([*common, "--resume_from_checkpoint", "true"]) == 0
    said = capsys.readouterr().out
    assert (
        f"nothing to train: the run in {out / 'checkpoint-2'} has finished (it is at step 2 of --max_steps 2)" in said
    )
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_first_ctrl_c_asks_the_trainer_to_stop_after_its_step_and_a_second_interrupts_at_once():
    """The first SIGINT raises nothing (a KeyboardInterrupt raised inside a finalizer would be lost and training
    would go on): it sets should_training_stop at the next step end. The second one interrupts."""
    import signal

    from transformers import TrainerControl

    from longlora_hf.training.interrupt import StopOnInterrupt, stop_on_interrupt

    callback = StopOnInterrupt()
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (an xdist worker ignores it)
    with stop_on_interrupt(callback, notice=False):
        os.kill(os.getpid(), signal.SIGINT)
        assert callback.requested
        control = callback.on_step_end(None, None, TrainerControl())
        assert control.should_training_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, outer)


def test_sigint_during_training_stops_with_one_line_and_the_run_resumes_from_its_last_checkpoint(tmp_path):
    """Ctrl-C in the middle of training: exit 130 with one line naming the checkpoint to resume from, no traceback,
    no final adapter, the claim on output_dir released; resuming finishes the run."""
    import signal
    import time

    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "longlora_hf.sft",
        "--config",
        RECIPE,
        "--output_dir",
        str(out),
        "--max_steps",
        "200",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
        "--disable_tqdm",
        "true",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-2" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("longlora-hf sft:")]
    assert len(lines) == 1 and "interrupted; the newest complete checkpoint is" in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr and not (out / "adapter_model.safetensors").exists()
    from longlora_hf.training.checkpoints import last_complete_checkpoint

    newest, _ = last_complete_checkpoint(out)
    assert str(newest) in lines[0]
    steps = str(int(newest.name.split("-")[1]) + 1)
    result = run(
        [
            "-m",
            "longlora_hf.sft",
            "--config",
            RECIPE,
            "--output_dir",
            str(out),
            "--max_steps",
            steps,
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
            "--disable_tqdm",
            "true",
            "--resume_from_checkpoint",
            "true",
        ]
    )
    assert (out / "adapter_model.safetensors").exists(), result.stderr[-2000:]


def test_resuming_with_no_complete_checkpoint_explains_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    error = refused(
        ["sft", "--config", RECIPE, "--output_dir", str(out), "--max_steps", "2", "--resume_from_checkpoint", "true"],
        capsys,
    )
    assert f"no complete checkpoint in --output_dir {out}; checkpoint-1: no trainer_state.json" in error


def test_a_local_dataset_directory_is_checked_file_by_file_but_not_its_metadata(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(ROOT)
    data = tmp_path / "data"
    (data / ".cache").mkdir(parents=True)
    text = json.loads((ROOT / "trainer_configs" / "data" / "tiny_text.jsonl").read_text().splitlines()[0])["text"]
    (data / "part-1.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (data / "dataset_infos.json").write_text('{"default": {"description": "not records"}}')
    (data / ".cache" / "old.jsonl").write_text('{"body": "hidden: datasets does not read it"}\n')
    (data / "part-2.jsonl").write_text('{"body": "no text field"}\n')
    recipe = yaml.safe_load((ROOT / RECIPE).read_text())
    del recipe["datasets"]
    recipe.update(dataset_name=str(data), output_dir=str(tmp_path / "out"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    args = ["sft", "--config", str(tmp_path / "recipe.yaml"), "--max_steps", "1", "--disable_tqdm", "true"]
    assert f"{data / 'part-2.jsonl'} record 1 has fields body" in refused(args, capsys)
    (data / "part-2.jsonl").unlink()
    assert cli_main(args) == 0  # dataset_infos.json is datasets' metadata, .cache/ is hidden: neither is read


# A dataset card whose YAML names the data files, as a clone of a Hub dataset has: datasets reads those only.
README_WITH_CONFIG = "---\nconfigs:\n- config_name: default\n  data_files: data/*.jsonl\n---\n"


@pytest.mark.parametrize(
    "files,data_files,checked",
    [
        (["train.jsonl", "notes.jsonl", "test.jsonl"], None, ["test.jsonl", "train.jsonl"]),
        (["a.jsonl", "b.jsonl", ".hidden/c.jsonl", "dataset_infos.json"], None, ["a.jsonl", "b.jsonl"]),
        (["a.jsonl", "b.jsonl", "c.json"], "*.jsonl", ["a.jsonl", "b.jsonl"]),
        (["README.md", "data/x.jsonl", "other.jsonl"], None, ["data/x.jsonl"]),
    ],
    ids=["split-names", "hidden-and-metadata", "data-files-glob", "config-in-readme"],
)
def test_the_data_files_checked_are_those_datasets_reads(tmp_path, files, data_files, checked):
    """A local directory's files are found by `datasets`' own rules (split names, hidden and metadata files, a
    glob in `data_files`), so a file the run will not read is not refused and one it will read is not missed:
    the files checked are the files whose rows `datasets.load_dataset` returns."""
    from datasets import load_dataset

    from longlora_hf.training.arguments import parse_arguments
    from longlora_hf.training.data import local_data_files

    data = tmp_path / "data"
    for name in files:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        content = {"dataset_infos.json": "{}", "README.md": README_WITH_CONFIG}.get(
            name, json.dumps({"text": name}) + "\n"
        )
        (data / name).write_text(content)
    mixture = [{"path": str(data), **({"data_files": data_files} if data_files else {})}]
    config = tmp_path / "recipe.yaml"
    config.write_text(json.dumps({"datasets": mixture, "output_dir": "out", "model_name_or_path": "m"}))
    args = parse_arguments(["--config", str(config), "--use_cpu"])
    assert sorted(path.relative_to(data).as_posix() for path in local_data_files(args)) == checked
    loaded = load_dataset(str(data), data_files=data_files, cache_dir=str(tmp_path / "cache"))
    assert sorted(text for split in loaded.values() for text in split["text"]) == checked


def test_data_a_run_reads_from_elsewhere_is_left_to_datasets(tmp_path):
    """Remote `data_files` and Hub datasets are not resolved before training (no network, no refusal)."""
    from longlora_hf.training.arguments import parse_arguments
    from longlora_hf.training.data import local_data_files

    config = tmp_path / "recipe.yaml"
    mixture = [
        {"path": "json", "data_files": "https://example.invalid/train.jsonl"},
        {"path": "someone/some-dataset"},
    ]
    config.write_text(json.dumps({"datasets": mixture, "output_dir": "out", "model_name_or_path": "m"}))
    assert local_data_files(parse_arguments(["--config", str(config), "--use_cpu"])) == []
