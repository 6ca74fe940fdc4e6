"""`longlora-hf convert-reference` and `longlora-hf merge`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from longlora_hf import LongLoraConfig
from longlora_hf.cli import main as cli_main
from support.helpers import shadow_longlora_hf, tiny_model, trained


def ids():
    return torch.randint(4, 128, (2, 40), generator=torch.Generator().manual_seed(2))


# The LoRA targets the reference code (dvlab-research/LongLoRA, fine-tune.py) puts on each architecture.
REFERENCE_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt-neox": ["query_key_value", "dense"],
    "gpt-j": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
# GPT-J names its input embedding `wte` and its norms `ln_1`, `ln_f`: nothing of it has "embed" or "norm" in its name.
GPT_J = dict(
    vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256, bos_token_id=2, eos_token_id=3
)


def base_model(architecture, **overrides):
    if architecture == "gpt-j":
        return transformers.GPTJForCausalLM(transformers.GPTJConfig(**GPT_J, **overrides)).eval()
    return tiny_model(architecture, **overrides)


# Parameter names the reference's transformers (4.34) used where today's differ: GPT-NeoX's output head was
# `embed_out` (so the reference trained it: its name contains "embed"), today it is `lm_head`.
TRANSFORMERS_4_NAMES = {"gpt-neox": {"base_model.model.lm_head.": "base_model.model.embed_out."}}


def write_reference_checkpoint(tmp_path, architecture="llama", trainable_params=("embed", "norm"), **overrides):
    """A checkpoint in the reference layout: a LoRA adapter (.bin) plus trainable_params.bin, the parameters
    whose names (transformers 4.34 names) contain one of `trainable_params` (the reference's --trainable_params,
    "embed,norm" by default), as the reference writes it. The base is loaded from a directory, so the adapter
    records it as `base_model_name_or_path`, as the reference's does. Returns the base, the checkpoint, and the
    trainable tensors under today's names."""
    base_dir = tmp_path / "base"
    base_model(architecture, **overrides).save_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=REFERENCE_TARGETS[architecture]))
    trained(model)
    checkpoint = tmp_path / "reference"
    model.save_pretrained(checkpoint, safe_serialization=False)
    old_names = TRANSFORMERS_4_NAMES.get(architecture, {})

    def reference_name(name):
        return next((old + name.removeprefix(new) for new, old in old_names.items() if name.startswith(new)), name)

    generator = torch.Generator().manual_seed(3)
    trainable = {  # named_parameters: a tied weight appears once, under the input embedding's name
        name: value.detach() + 0.05 * torch.randn(value.shape, generator=generator)
        for name, value in model.named_parameters()
        if any(part in reference_name(name) for part in trainable_params)
    }
    torch.save({reference_name(name): value for name, value in trainable.items()}, checkpoint / "trainable_params.bin")
    return base_dir, checkpoint, trainable


def reference_way_logits(base_dir, checkpoint, trainable, context=None):
    """The reference code's loading: RoPE scaled for the context, trainable_params into the base, then the adapter."""
    config = transformers.AutoConfig.from_pretrained(base_dir)
    if context:
        config.rope_parameters = {
            **config.rope_parameters,
            "rope_type": "linear",
            "factor": float(-(-context // config.max_position_embeddings)),
        }
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, config=config)
    missing, unexpected = base.load_state_dict(
        {k.removeprefix("base_model.model."): v for k, v in trainable.items()}, strict=False
    )
    assert not unexpected
    return PeftModel.from_pretrained(base, checkpoint).eval()(ids()).logits


def convert(checkpoint, out, *args):
    return cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(out), *map(str, args)])


def test_a_converted_reference_checkpoint_gives_the_reference_logits(tmp_path):
    base_dir, checkpoint, trainable = write_reference_checkpoint(tmp_path)
    assert (
        cli_main(
            [
                "convert-reference",
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(tmp_path / "converted"),
                "--target_context_length",
                "1024",
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LONGLORA" and config["target_context_length"] == 1024
    converted = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "converted").eval()
    expected = reference_way_logits(base_dir, checkpoint, trainable, 1024)
    torch.testing.assert_close(converted(ids()).logits, expected, atol=1e-5, rtol=0)


def test_convert_reference_never_writes_into_the_checkpoint_or_the_base(tmp_path, capsys):
    """Before, `--out` = the checkpoint replaced its adapter_config.json with the converted one."""
    base_dir, checkpoint, _ = write_reference_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in [*checkpoint.iterdir(), *base_dir.iterdir()]}
    for out, extra in (
        (checkpoint, []),
        (checkpoint / "converted", []),
        (base_dir, ["--base", base_dir]),
        (checkpoint, ["--overwrite"]),
    ):
        assert convert(checkpoint, out, *extra) == 2
        assert "never writes into its own inputs" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in [*checkpoint.iterdir(), *base_dir.iterdir()]} == before


def test_files_that_are_not_what_they_claim_are_refused(tmp_path, capsys):
    _, checkpoint, _ = write_reference_checkpoint(tmp_path)
    (checkpoint / "trainable_params.bin").write_bytes(b"not a checkpoint")
    assert cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err
    torch.save({"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 32)}, checkpoint / "trainable_params.bin")
    assert cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert (
        "model.layers.0.mlp.up_proj (Linear)" in error
        and "neither the input embedding nor a normalization layer" in error
    )

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model.norm.weight": Payload()}, checkpoint / "trainable_params.bin")
    assert cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "trainable_params.bin holds code, not only tensors" in error and "it was not loaded" in error, error
    assert "weights_only" not in error and "will likely succeed" not in error  # torch's advice: run the code
    assert len(error.strip().splitlines()) == 1 and "torch.save(" in error


def test_merge_writes_a_model_plain_transformers_loads_with_the_same_logits(tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    model = get_peft_model(tiny_model("llama"), LongLoraConfig(target_context_length=1024))
    trained(model)
    model.save_pretrained(tmp_path / "adapter")
    expected = model.eval()(ids()).logits
    assert (
        cli_main(
            [
                "merge",
                "--base",
                str(base_dir),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    torch.save({"ids": ids(), "expected": expected}, tmp_path / "check.pt")
    script = textwrap.dedent(f"""
        try:
            import longlora_hf
            raise SystemExit("longlora_hf must not be importable")
        except ImportError:
            pass
        import torch, transformers
        check = torch.load({str(tmp_path / "check.pt")!r}, weights_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r})
        assert model.config._attn_implementation == "sdpa" and model.config.rope_parameters["factor"] == 4.0
        torch.testing.assert_close(model(check["ids"]).logits, check["expected"], atol=1e-5, rtol=0)
    """)
    env = {**os.environ, "PYTHONPATH": shadow_longlora_hf(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda t: t.__setitem__("base_model.model.model.norm.weight", torch.ones(31)),
            r"model.norm.weight has shape \(31,\); \S*base has \(32,\)",
        ),
        (
            lambda t: t.__setitem__("base_model.model.model.embed_tokens.weight", torch.ones(128)),
            r"embed_tokens.weight has shape \(128,\); \S*base has \(128, 32\)",
        ),
    ],
    ids=["norm-width", "embedding-not-a-matrix"],
)
def test_tensors_of_the_wrong_shape_are_refused_with_the_name_and_shape(tmp_path, capsys, damage, message):
    _, checkpoint, trainable = write_reference_checkpoint(tmp_path)
    damage(trainable)
    torch.save(trainable, checkpoint / "trainable_params.bin")
    assert cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_lora_factors_of_another_rank_are_refused(tmp_path, capsys):
    _, checkpoint, _ = write_reference_checkpoint(tmp_path)
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    (checkpoint / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    assert cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    assert re.search(r"lora_A\.weight has shape \(8, 32\); lora_A of rank r=4", capsys.readouterr().err)


def test_with_base_every_tensor_is_checked_against_the_base_model(tmp_path, capsys):
    base_dir, checkpoint, trainable = write_reference_checkpoint(tmp_path)
    other = tmp_path / "other_base"
    tiny_model("llama", vocab_size=64).save_pretrained(other)
    args = ["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--base"]
    assert cli_main([*args, str(other)]) == 2
    assert re.search(
        r"embed_tokens.weight has shape \(128, 32\); .*other_base has \(64, 32\)", capsys.readouterr().err
    )
    assert cli_main([*args, str(base_dir)]) == 0


def test_a_tied_embedding_checkpoint_loads_with_every_peft_loader_and_merges(tmp_path):
    # The reference trains the input embedding, which the output head shares: loading trainable_params.bin
    # into the base changes both.
    base_dir, checkpoint, trainable = write_reference_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    assert "base_model.model.model.embed_tokens.weight" in trainable and not any(
        "lm_head" in name for name in trainable
    )
    out = tmp_path / "converted"
    assert convert(checkpoint, out, "--target_context_length", 1024) == 0
    expected = reference_way_logits(base_dir, checkpoint, trainable, 1024)

    def base():
        return transformers.AutoModelForCausalLM.from_pretrained(base_dir)

    peft_model = PeftModel.from_pretrained(base(), out).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(out).eval()  # the base is the one the checkpoint records
    with_adapter = base()
    with_adapter.load_adapter(str(out))
    for model in (peft_model, auto, with_adapter.eval()):
        torch.testing.assert_close(model(ids()).logits, expected, atol=1e-5, rtol=0)

    assert cli_main(["merge", "--base", str(base_dir), "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.tie_word_embeddings
    torch.testing.assert_close(merged(ids()).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_base", [True, False], ids=["--base", "recorded-base"])
def test_reference_gpt_neox_names_map_to_todays_with_the_output_head_kept(tmp_path, with_base):
    base_dir, checkpoint, trainable = write_reference_checkpoint(tmp_path, "gpt-neox")
    written = torch.load(checkpoint / "trainable_params.bin", weights_only=True)
    assert {
        "base_model.model.embed_out.weight",
        "base_model.model.gpt_neox.embed_in.weight",
        "base_model.model.gpt_neox.final_layer_norm.bias",
        "base_model.model.gpt_neox.layers.1.input_layernorm.bias",
    } <= set(written)
    out = tmp_path / "converted"
    assert convert(checkpoint, out, "--target_context_length", 1024, *(["--base", base_dir] if with_base else [])) == 0
    saved = load_file(out / "adapter_model.safetensors")
    torch.testing.assert_close(saved["base_model.model.lm_head.weight"], trainable["base_model.model.lm_head.weight"])
    assert not any("embed_out" in name for name in saved)
    expected = reference_way_logits(base_dir, checkpoint, trainable, 1024)
    converted = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    torch.testing.assert_close(converted(ids()).logits, expected, atol=1e-5, rtol=0)


def test_the_embedding_and_norms_are_told_by_the_bases_modules_not_by_their_names(tmp_path):
    # Trained with the reference's --trainable_params "wte,ln_", since GPT-J's names hold no "embed" or "norm".
    base_dir, checkpoint, trainable = write_reference_checkpoint(tmp_path, "gpt-j", trainable_params=("wte", "ln_"))
    assert {name.rsplit(".", 2)[-2] for name in trainable} == {"wte", "ln_1", "ln_f"}
    assert convert(checkpoint, tmp_path / "converted") == 0
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (
        config["trainable_embeddings"]
        and config["trainable_norms"]
        and config["modules_to_save"] == ["ln_1", "ln_f", "wte"]
    )
    converted = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "converted"
    ).eval()
    torch.testing.assert_close(
        converted(ids()).logits, reference_way_logits(base_dir, checkpoint, trainable), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "architecture,file,name,message",
    [
        (
            "llama",
            "trainable_params.bin",
            "base_model.model.model.layers.0.extra_layernorm.weight",
            "is not a weight of",
        ),
        (
            "llama",
            "trainable_params.bin",
            "base_model.model.embed_out.weight",
            "is not a weight of",
        ),  # GPT-NeoX's name only
        ("gpt-neox", "trainable_params.bin", "base_model.model.gpt_neox.embed_out.weight", "is not a weight of"),
        (
            "llama",
            "adapter_model.bin",
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight",
            "is not a module of",
        ),
        (
            "llama",
            "trainable_params.bin",
            "base_model.model.lm_head.weight",
            "neither the input embedding nor a normalization",
        ),
    ],
    ids=[
        "unknown-norm",
        "embed_out-outside-gpt-neox",
        "embed_out-misplaced",
        "lora-on-a-missing-module",
        "untied-llama-head",
    ],
)
def test_a_tensor_that_maps_to_nothing_is_refused_by_name(tmp_path, capsys, architecture, file, name, message):
    base_dir, checkpoint, _ = write_reference_checkpoint(tmp_path, architecture)
    tensors = torch.load(checkpoint / file, weights_only=True)
    width = 32 if file == "trainable_params.bin" and "norm" in name else None
    tensors[name] = torch.ones(width) if width else (torch.ones(8, 32) if "lora_A" in name else torch.ones(128, 32))
    torch.save(tensors, checkpoint / file)
    for args in ([], ["--base", base_dir]):
        assert convert(checkpoint, tmp_path / "x", *args) == 2
        error = capsys.readouterr().err
        assert name in error and message in error, error
        assert not (tmp_path / "x").exists()


def test_without_a_readable_base_config_the_conversion_is_refused_with_the_fix(tmp_path, capsys):
    # Whether the output head shares the trained input embedding, and which names exist, is the base's to say.
    _, checkpoint, _ = write_reference_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    (checkpoint / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")})
    )
    assert convert(checkpoint, tmp_path / "x") == 2
    error = capsys.readouterr().err
    assert "gone" in error and "--base" in error, error
    assert not (tmp_path / "x").exists()
    assert convert(checkpoint, tmp_path / "x", "--base", tmp_path / "base") == 0


# ---------------------------------------------------------------------------------------------------------
# A full disk during merge


def write_base_and_adapter(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    adapter = get_peft_model(tiny_model("llama"), LongLoraConfig(target_context_length=512))
    adapter.save_pretrained(tmp_path / "adapter")
    return ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]


def assert_one_line_naming_the_space(capsys, out):
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("longlora-hf ")]
    assert len(lines) == 1 and "Traceback" not in error and "SafetensorError" not in error, error
    assert lines[0].startswith(f"longlora-hf merge: error: --out {out}: no space left on the device"), lines[0]
    assert re.search(r"it needs about [\d.]+ (kB|MB); [\d.]+ (bytes|kB|MB|GB) free there", lines[0]), lines[0]
    assert not out.exists() and not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_a_full_disk_during_merge_is_one_line_naming_the_output_and_the_space(tmp_path, capsys, monkeypatch):
    """Before, a raw `SafetensorError: ... No space left on device (os error 28)` traceback."""
    from safetensors import SafetensorError

    def save_until_the_disk_is_full(tensors, filename, metadata=None):  # what safetensors raises on ENOSPC
        with open(filename, "wb") as half:
            half.write(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    args = write_base_and_adapter(tmp_path)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_until_the_disk_is_full)
    assert cli_main([*args, "--out", str(tmp_path / "merged")]) == 2
    assert_one_line_naming_the_space(capsys, tmp_path / "merged")


def test_a_really_full_disk_during_merge_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """The same on a real full file system: a 64 kB tmpfs (mounting needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]
    mounted = subprocess.run(command, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        args = write_base_and_adapter(tmp_path)
        assert cli_main([*args, "--out", str(disk / "merged")]) == 2
        assert_one_line_naming_the_space(capsys, disk / "merged")
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
