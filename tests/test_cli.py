"""`longlora-hf`: one registry of commands, each registered by the module that runs it."""

from __future__ import annotations

import argparse
import contextlib

import pytest

from longlora_hf import cli


def registered() -> dict[str, tuple[object, argparse.ArgumentParser]]:
    """command name -> (the registry module that added it, its parser)."""
    commands = {}
    for module in cli.COMMANDS:
        subparsers = argparse.ArgumentParser().add_subparsers()
        module.register(subparsers)
        for name, parser in subparsers.choices.items():
            assert name not in commands, f"{name} registered twice"
            commands[name] = (module, parser)
    return commands


def test_a_command_runs_its_registered_function_with_the_parsed_arguments(monkeypatch):
    from longlora_hf.training import cli as training_cli

    seen = []
    monkeypatch.setattr(training_cli, "run", lambda args: seen.append(args) or 7)
    assert cli.main(["format", "--style", "longqa", "--input", "in.jsonl", "--output", "out.jsonl"]) == 7
    assert (seen[0].command, seen[0].style, seen[0].input) == ("format", "longqa", "in.jsonl")


def test_sft_gets_every_argument_after_its_name_for_trls_parser(monkeypatch):
    from longlora_hf import sft

    seen = []

    def parse_arguments(argv):
        seen.append(argv)
        raise ValueError("parsed")

    monkeypatch.setattr(sft, "parse_arguments", parse_arguments)
    argv = ["--config", "recipe.yaml", "--group_size_ratio", "0.5", "--help"]
    assert cli.main(["sft", *argv]) == 2
    assert seen == [argv]


def test_an_error_during_sft_training_keeps_its_traceback(monkeypatch):
    """Bad input found before training is one line (tests/test_training_sft.py); a failure inside training
    is not bad input, and the user needs its traceback."""
    from longlora_hf import sft

    monkeypatch.setattr(sft, "parse_arguments", lambda argv: (None,) * 5)
    monkeypatch.setattr(sft, "check_arguments", lambda *args: None)
    monkeypatch.setattr(sft, "check_run_state", lambda *args: None)
    monkeypatch.setattr(sft, "claimed_output_dir", lambda training_args: contextlib.nullcontext())
    monkeypatch.setattr(sft, "training_data", lambda *args: "dataset")

    def train(*args):
        raise ValueError("inside the trainer")

    monkeypatch.setattr(sft, "train", train)
    with pytest.raises(ValueError, match="inside the trainer"):
        cli.main(["sft", "--config", "recipe.yaml"])


@pytest.mark.parametrize("command", [["format", "--style", "longqa", "--input", "a", "--output", "b"], ["example"]])
def test_an_unknown_argument_of_any_other_command_is_refused(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--bogus", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err


def test_bad_input_ends_with_one_line_naming_the_command_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert (
        cli.main(["format", "--style", "longqa", "--input", str(missing), "--output", str(tmp_path / "out.jsonl")])
        == 2
    )
    error = capsys.readouterr().err
    assert error.startswith("longlora-hf format: error:") and str(missing) in error and error.count("\n") == 1


def test_every_flag_of_the_commands_is_snake_case_as_in_transformers_and_trl():
    for name, (_, parser) in registered().items():
        for action in parser._actions:
            shown = [flag for flag in action.option_strings if action.help is not argparse.SUPPRESS]
            assert all("-" not in flag.lstrip("-") for flag in shown), f"{name}: {shown}"


@pytest.mark.parametrize(
    "command, old, new, value, expected",
    [
        ("format", "--max-length", "max_length", "128", 128),
        ("format", "--too-long", "too_long", "drop", "drop"),
        ("eval", "--batch-size", "batch_size", "4", 4),
        ("eval", "--passkey-depths", "passkey_depths", "0.5", [0.5]),
        ("merge", "--push-to-hub", "push_to_hub", "alice/m", "alice/m"),
        ("convert-reference", "--target-context-length", "target_context_length", "1024", 1024),
    ],
)
def test_the_kebab_case_spellings_of_0_1_still_work_with_a_deprecation_warning(command, old, new, value, expected):
    parser = registered()[command][1]
    required = {
        "format": ["--style", "longqa", "--input", "i", "--output", "o"],
        "eval": ["--model", "m", "--data", "d", "--lengths", "8"],
        "merge": ["--base", "b", "--adapter", "a", "--out", "o"],
        "convert-reference": ["--checkpoint", "c", "--out", "o"],
    }[command]
    with pytest.warns(FutureWarning, match=f"{old} is deprecated .* use --{new}"):
        args = parser.parse_args([*required, old, value])
    assert getattr(args, new) == expected
    assert getattr(parser.parse_args([*required, f"--{new}", value]), new) == expected
