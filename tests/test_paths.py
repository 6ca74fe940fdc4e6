"""Nothing lost, nothing silently wrong: what every command reads is checked before any work, and what it
writes never lands in its inputs, never replaces files it did not write without --overwrite, and is
either the earlier result or the new one after an interruption, never a mix."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longlora_hf import LongLoraConfig
from longlora_hf.cli import main as cli_main
from longlora_hf.demo import ASSETS
from longlora_hf.paths import (
    MANIFEST,
    PARTIAL,
    check_model_source,
    claimed_directory,
    output_directory,
    output_file,
    remove_abandoned_partials,
)


ROOT = Path(__file__).resolve().parents[1]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones too) -> a hash of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if PARTIAL in p.name or "longlora-hf-previous" in p.name]


def refused(args: list[str], capsys) -> str:
    """The one-line error of a `longlora-hf` command that exits 2."""
    assert cli_main(args) == 2
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("longlora-hf ")]
    assert len(lines) == 1 and "Traceback" not in error, error  # (transformers may draw a loading bar first)
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# The rule, on the helpers every command uses


def test_a_directory_is_written_whole_and_records_what_was_written(tmp_path):
    with output_directory(tmp_path / "out", "--out") as partial:
        (partial / "a.txt").write_text("new")
        assert not (tmp_path / "out").exists()  # nothing at the destination until the end
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert list(json.loads((tmp_path / "out" / MANIFEST).read_text())["written"]) == ["a.txt"]
    assert leftovers(tmp_path) == []


def test_an_earlier_result_of_the_command_is_replaced_as_a_whole(tmp_path):
    with output_directory(tmp_path / "out", "--out") as partial:
        (partial / "old_plot.png").write_text("old")
        (partial / "results.json").write_text("old")
    with output_directory(tmp_path / "out", "--out") as partial:
        (partial / "results.json").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        MANIFEST,
        "results.json",
    ]  # no stale plot beside new results
    assert (tmp_path / "out" / "results.json").read_text() == "new"


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_write_leaves_the_earlier_result_untouched_and_no_partial_files(tmp_path, interruption):
    with output_directory(tmp_path / "out", "--out") as partial:
        (partial / "adapter").mkdir()
        (partial / "adapter" / "weights").write_text("old")
        (partial / "results.json").write_text("old")
    before = snapshot(tmp_path / "out")
    with pytest.raises(interruption):
        with output_directory(tmp_path / "out", "--out") as partial:
            (partial / "adapter").mkdir()
            (partial / "adapter" / "weights").write_text("new")
            raise interruption()
    assert snapshot(tmp_path / "out") == before
    assert leftovers(tmp_path) == []
    with pytest.raises(interruption):  # and with no earlier result: none
        with output_directory(tmp_path / "fresh", "--out") as partial:
            (partial / "x").write_text("new")
            raise interruption()
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path) == []


def test_a_file_edited_since_the_command_wrote_it_is_someone_elses(tmp_path):
    with output_directory(tmp_path / "out", "--out") as partial:
        (partial / "README.md").write_text("card")
    (tmp_path / "out" / "README.md").write_text("the card, rewritten by hand")
    with pytest.raises(FileExistsError, match=r"holds files longlora-hf did not write \(README.md\)"):
        with output_directory(tmp_path / "out", "--out"):
            pass


def test_an_interruption_between_the_two_renames_puts_the_earlier_result_back(tmp_path, monkeypatch):
    from longlora_hf import paths

    with output_directory(tmp_path / "out", "--out") as partial:
        (partial / "results.json").write_text("earlier")
    rename = paths.os.rename

    def interrupted_after_moving_the_earlier_result_aside(source, target):
        if PARTIAL in str(source):
            raise KeyboardInterrupt
        rename(source, target)

    monkeypatch.setattr(paths.os, "rename", interrupted_after_moving_the_earlier_result_aside)
    with pytest.raises(KeyboardInterrupt):
        with output_directory(tmp_path / "out", "--out") as partial:
            (partial / "results.json").write_text("new")
    monkeypatch.setattr(paths.os, "rename", rename)
    assert (tmp_path / "out" / "results.json").read_text() == "earlier" and leftovers(tmp_path) == []


def test_files_someone_else_wrote_are_replaced_only_with_overwrite_and_the_others_are_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my own notes")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(
        FileExistsError, match=r"--out .* holds files longlora-hf did not write \(README.md, notes.txt\).*--overwrite"
    ):
        with output_directory(out, "--out"):
            pytest.fail("the check comes before any work")
    assert (out / "README.md").read_text() == "my own notes"
    with output_directory(out, "--out", overwrite=True) as partial:
        (partial / "README.md").write_text("card")
    assert (out / "README.md").read_text() == "card" and (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["is", "inside", "holds"])
def test_an_output_never_is_holds_or_lies_inside_an_input_even_with_overwrite(tmp_path, where):
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    out = {"is": source, "inside": source / "merged", "holds": tmp_path}[where]
    with pytest.raises(ValueError, match="never writes into its own inputs"):
        with output_directory(out, "--out", {"--base": source}, overwrite=True):
            pytest.fail("refused before any work")
    assert sorted(p.name for p in source.iterdir()) == ["config.json"]


def test_a_file_is_written_through_a_sibling_never_over_its_input_or_an_existing_file(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("input")
    with pytest.raises(ValueError, match="never writes into its own inputs"):
        with output_file(source, "--output", {"--input": source}, overwrite=True):
            pass
    (tmp_path / "out.jsonl").write_text("earlier")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with output_file(tmp_path / "out.jsonl", "--output"):
            pass
    with pytest.raises(KeyboardInterrupt):
        with output_file(tmp_path / "out.jsonl", "--output", overwrite=True) as partial:
            partial.write_text("half")
            raise KeyboardInterrupt
    assert (tmp_path / "out.jsonl").read_text() == "earlier" and source.read_text() == "input"
    assert leftovers(tmp_path) == []


def test_an_output_that_cannot_be_created_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file, so .* cannot be created"):
        with output_directory(tmp_path / "afile" / "out", "--out"):
            pytest.fail("refused before any work")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        with output_directory(tmp_path / "afile", "--out"):
            pytest.fail("refused before any work")


@pytest.mark.parametrize(
    "failure,outcome",
    [(OSError(errno.ENOLCK, "No locks available"), "warned"), (PermissionError(errno.EACCES, "denied"), "refused")],
    ids=["file-system-without-locks", "lock-file-not-writable"],
)
def test_a_claim_is_skipped_with_a_warning_only_where_the_file_system_has_no_locks(
    tmp_path, monkeypatch, failure, outcome
):
    import filelock

    def acquire(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(filelock.FileLock, "acquire", acquire)
    if outcome == "warned":
        with pytest.warns(UserWarning, match="two runs into it at once would not be refused"):
            with claimed_directory(tmp_path / "run", "--output_dir"):
                pass
    else:
        with pytest.raises(PermissionError):
            with claimed_directory(tmp_path / "run", "--output_dir"):
                pytest.fail("a claim that could not be made is not skipped")


def test_a_second_claim_on_a_directory_is_refused_and_a_dead_holder_leaves_no_stale_claim(tmp_path):
    out = tmp_path / "run"
    with claimed_directory(out, "--output_dir"):
        with pytest.raises(FileExistsError, match=r"--output_dir .*run: another run is writing to it \(process \d+"):
            with claimed_directory(out, "--output_dir"):
                pass
    with claimed_directory(out, "--output_dir"):  # released at the end
        pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from longlora_hf.paths import claimed_directory\n"
                f"with claimed_directory({str(out)!r}, '--output_dir'):\n    print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match="another run is writing to it"):
            with claimed_directory(out, "--output_dir"):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs
        holder.wait()
    out.mkdir()
    with claimed_directory(out, "--output_dir"):
        assert not any(out.iterdir())  # the claim's file is next to the directory, not in it
    assert not list(tmp_path.glob(".*lock"))  # and gone after


# A run killed outright (SIGKILL, OOM killer, power cut) runs no cleanup: its partial sibling stays. The next run
# for the same output removes it, and only what it can prove is an earlier run's, for that output, and abandoned.

PATHS = str(ROOT / "longlora_hf" / "paths.py")
WRITER = """
import importlib.util, os, signal, shutil, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("paths", sys.argv[4])  # alone: `import longlora_hf` takes long
paths = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paths)
output_directory, output_file = paths.output_directory, paths.output_file
out, kind, die = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rename, rmtree = os.rename, shutil.rmtree
def killed(call):  # the process dies (SIGKILL: nothing more runs) when `call` is reached
    def kill(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    return kill
if die == "second rename":  # between moving the earlier output aside and renaming the partial into place
    os.rename = lambda source, target: (killed(rename) if "-partial" in str(source) else rename)(source, target)
if die == "removing the earlier output":
    shutil.rmtree = lambda path, **kw: (killed(rmtree) if "longlora-hf-previous" in str(path) else rmtree)(path, **kw)
if kind == "directory":
    with output_directory(out, "--out") as partial:
        (partial / "weights").write_bytes(b"new" * 1000)
        if die == "writing":
            print("writing", flush=True)
            time.sleep(120)
else:
    with output_file(out, "--output") as partial:
        partial.write_text("new")
        print("writing", flush=True)
        time.sleep(120)
"""


def start_writer(out: Path, kind: str = "directory") -> subprocess.Popen:
    """A process writing `out` through `output_directory`/`output_file`, stopped while it writes (its partial
    exists); returns once it is there."""
    command = [sys.executable, "-c", WRITER, str(out), kind, "writing", PATHS]
    writer = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    return writer


def kill(writer: subprocess.Popen) -> None:
    writer.kill()  # SIGKILL: no cleanup runs
    writer.wait()
    writer.stdout.close()


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_the_partial_of_a_killed_run_is_removed_by_the_next_run_for_that_output(tmp_path, kind):
    """Before, a merge killed mid-write left `.merged.*.longlora-hf-partial` (GBs) for ever."""
    out = tmp_path / ("out" if kind == "directory" else "out.jsonl")
    kill(start_writer(out, kind))
    assert any(name.endswith(PARTIAL) for name in leftovers(tmp_path))  # what the killed run left
    writer = output_directory if kind == "directory" else output_file
    with writer(out, "--out") as partial:
        assert not [name for name in leftovers(tmp_path) if name not in (partial.name, partial.name + ".owner")]
        (partial / "a.txt").write_text("x") if kind == "directory" else partial.write_text("x")
    assert leftovers(tmp_path) == [] and out.exists()


def test_a_partial_another_run_is_still_writing_is_kept(tmp_path):
    out = tmp_path / "out"
    writer = start_writer(out)
    try:
        theirs = sorted(leftovers(tmp_path))
        assert len(theirs) == 2  # the partial and its marker
        with output_directory(out, "--out") as partial:
            (partial / "a.txt").write_text("mine")
        assert sorted(leftovers(tmp_path)) == theirs and (out / "a.txt").read_text() == "mine"
        assert remove_abandoned_partials(out) == [] and sorted(leftovers(tmp_path)) == theirs
    finally:
        kill(writer)
    assert remove_abandoned_partials(out) == [theirs[0]] and leftovers(tmp_path) == []


def test_what_cannot_be_proved_an_abandoned_partial_of_that_output_is_never_removed(tmp_path):
    out = tmp_path / "out"
    lookalike = tmp_path / f".out.abc123{PARTIAL}"  # no marker: someone else's, or an older version's
    lookalike.mkdir()
    (lookalike / "weights").write_text("keep")
    forged = tmp_path / f".out.def456{PARTIAL}"  # a marker that is no `_Marker`'s
    forged.mkdir()
    (tmp_path / f".out.def456{PARTIAL}.owner").write_text("not json")
    other = tmp_path / f".out.xyz789{PARTIAL}"  # a marker for another output
    other.mkdir()
    record = {"output": str(tmp_path / "elsewhere"), "partial": other.name, "pid": 1}
    (tmp_path / f"{other.name}.owner").write_text(json.dumps(record))
    kill(start_writer(tmp_path / "out.x.jsonl", "file"))  # another output whose name starts like this one's
    before = sorted(leftovers(tmp_path))
    with output_directory(out, "--out") as partial:
        (partial / "a.txt").write_text("x")
    assert sorted(leftovers(tmp_path)) == before and (lookalike / "weights").read_text() == "keep"
    with output_file(tmp_path / "out.x.jsonl", "--output") as partial:  # its own next run removes it
        partial.write_text("x")
    assert sorted(leftovers(tmp_path)) == sorted(name for name in before if ".out.x.jsonl." not in name)


def test_a_run_killed_while_replacing_the_earlier_output_leaves_it_for_the_next_run_to_finish(tmp_path):
    out = tmp_path / "out"
    with output_directory(out, "--out") as partial:
        (partial / "weights").write_text("earlier")
    dying = "second rename"
    result = subprocess.run([sys.executable, "-c", WRITER, str(out), "directory", dying, PATHS], capture_output=True)
    assert result.returncode == -9 and not out.exists()  # killed with the earlier output moved aside
    assert any("longlora-hf-previous" in name for name in leftovers(tmp_path))
    assert remove_abandoned_partials(out)  # the earlier result goes back, the unfinished new one goes
    assert (out / "weights").read_text() == "earlier" and leftovers(tmp_path) == []
    dying = "removing the earlier output"
    result = subprocess.run([sys.executable, "-c", WRITER, str(out), "directory", dying, PATHS], capture_output=True)
    assert result.returncode == -9 and (out / "weights").read_bytes() == b"new" * 1000
    assert any("longlora-hf-previous" in name for name in leftovers(tmp_path))  # the earlier output, not yet removed
    with output_directory(out, "--out") as partial:
        (partial / "weights").write_text("newer")
    assert (out / "weights").read_text() == "newer" and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# Local models and adapters, checked before loading


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The bundled base model, an adapter made for it, and adapters made for a wider, a deeper and a
    shallower model of the same family."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("models")
    shutil.copytree(ASSETS, root / "base", ignore=shutil.ignore_patterns("*.gz", "MODEL_CARD.md"))
    variants = {
        "adapter": {},
        "wider": dict(hidden_size=512, head_dim=64),
        "deeper": dict(num_hidden_layers=6),
        "shallower": dict(num_hidden_layers=2),
    }
    for name, changes in variants.items():
        config = AutoConfig.from_pretrained(root / "base")
        for key, value in changes.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = (
            AutoModelForCausalLM.from_config(config)
            if changes
            else AutoModelForCausalLM.from_pretrained(root / "base")
        )
        get_peft_model(model, LongLoraConfig(target_context_length=512)).save_pretrained(root / name)
    return {name: root / name for name in ["base", *variants]}


def damaged(models, tmp_path, what: str) -> tuple[str, Path]:
    """A copy of the base or the adapter with one thing wrong: (flag, path)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(models["base"], base)
    shutil.copytree(models["adapter"], adapter)
    if what == "missing base":
        return "--base", tmp_path / "no" / "such" / "model"
    if what == "garbage config.json":
        (base / "config.json").write_text("{'not': json")
        return "--base", base
    if what == "truncated safetensors":
        weights = (base / "model.safetensors").read_bytes()
        (base / "model.safetensors").write_bytes(weights[: len(weights) // 2])
        return "--base", base
    if what == "a file for the base":
        return "--base", base / "config.json"
    if what == "garbage adapter_config.json":
        (adapter / "adapter_config.json").write_text("[1, 2]")
        return "--adapter", adapter
    if what == "truncated adapter":
        weights = (adapter / "adapter_model.safetensors").read_bytes()
        (adapter / "adapter_model.safetensors").write_bytes(weights[:100])
        return "--adapter", adapter
    raise AssertionError(what)


BAD_SOURCES = {
    "missing base": "no such directory",
    "garbage config.json": "config.json is not valid JSON",
    "truncated safetensors": "model.safetensors is not a readable safetensors file",
    "a file for the base": "is a file; give the model's directory",
    "garbage adapter_config.json": "adapter_config.json has no 'peft_type' string",
    "truncated adapter": "adapter_model.safetensors is not a readable safetensors file",
}


@pytest.mark.parametrize("what", BAD_SOURCES)
def test_merge_names_the_bad_model_or_adapter_in_one_line(models, tmp_path, capsys, what):
    flag, bad = damaged(models, tmp_path, what)
    args = {"--base": str(tmp_path / "base"), "--adapter": str(tmp_path / "adapter"), flag: str(bad)}
    error = refused(
        ["merge", "--base", args["--base"], "--adapter", args["--adapter"], "--out", str(tmp_path / "merged")], capsys
    )
    assert f"{flag}" in error and str(bad) in error and BAD_SOURCES[what] in error, error
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "what", ["missing base", "garbage config.json", "truncated safetensors", "garbage adapter_config.json"]
)
def test_eval_names_the_bad_model_or_adapter_in_one_line(models, tmp_path, capsys, what):
    flag, bad = damaged(models, tmp_path, what)
    data = tmp_path / "data.txt"
    data.write_text("a few words " * 50)
    model = str(bad) if flag == "--base" else str(tmp_path / "base")
    adapter = str(bad) if flag == "--adapter" else "none"
    error = refused(
        [
            "eval",
            "--model",
            model,
            "--adapter",
            adapter,
            "--data",
            str(data),
            "--lengths",
            "32",
            "--out",
            str(tmp_path / "ev"),
        ],
        capsys,
    )
    assert str(bad) in error and BAD_SOURCES[what] in error, error
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize(
    "variant, message",
    [
        ("wider", r"has shape \(4096, 512\); the base model .* has \(4096, 256\)"),
        ("deeper", r"layers\.4\..* is not a weight of the base model"),
        ("shallower", r"no LoRA weights for 8 of the 16 linear layers .*first: model\.layers\.2\.self_attn"),
    ],
)
@pytest.mark.parametrize("command", ["merge", "eval"])
def test_an_adapter_made_for_another_base_is_refused_before_it_is_applied(
    models, tmp_path, capsys, variant, message, command
):
    """PEFT would load the shallower one silently, leaving half the layers untrained."""
    if command == "merge":
        args = [
            "merge",
            "--base",
            str(models["base"]),
            "--adapter",
            str(models[variant]),
            "--out",
            str(tmp_path / "out"),
        ]
    else:
        (tmp_path / "data.txt").write_text("a few words " * 50)
        args = [
            "eval",
            "--model",
            str(models["base"]),
            "--adapter",
            str(models[variant]),
            "--data",
            str(tmp_path / "data.txt"),
            "--lengths",
            "32",
            "--out",
            str(tmp_path / "out"),
        ]
    error = refused(args, capsys)
    assert f"--adapter {models[variant]}" in error
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


def test_a_local_path_that_does_not_exist_is_not_taken_for_a_hub_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--model /nope/model: no such directory"):
        check_model_source("/nope/model", "--model")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        check_model_source("./model", "--model")
    check_model_source("someone/some-model", "--model")  # a valid repo id: left to the Hub


# ---------------------------------------------------------------------------------------------------------
# Every command that writes: never into its inputs, never over files it did not write


def test_merge_never_writes_over_the_base_or_the_adapter(models, tmp_path, capsys):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(models["base"], base)
    shutil.copytree(models["adapter"], adapter)
    before = {"base": snapshot(base), "adapter": snapshot(adapter)}
    for out in (base, adapter, base / "merged"):
        for overwrite in ([], ["--overwrite"]):
            error = refused(
                ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *overwrite], capsys
            )
            assert "never writes into its own inputs" in error
    assert {"base": snapshot(base), "adapter": snapshot(adapter)} == before


def test_merge_keeps_a_hand_written_readme_unless_told_to_overwrite_it(models, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "README.md").write_text("my card")
    (out / "eval.txt").write_text("my numbers")
    args = ["merge", "--base", str(models["base"]), "--adapter", str(models["adapter"]), "--out", str(out)]
    assert "README.md" in refused(args, capsys) and (out / "README.md").read_text() == "my card"
    assert cli_main([*args, "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "eval.txt").read_text() == "my numbers"
    assert "LongLoRA" in (out / "README.md").read_text()
    again = [
        "merge",
        "--base",
        str(models["base"]),
        "--adapter",
        str(models["adapter"]),
        "--out",
        str(tmp_path / "again"),
    ]
    assert cli_main(again) == 0 and cli_main(again) == 0  # its own earlier output is replaced without asking


def test_format_never_writes_over_its_input_or_an_existing_file(tmp_path, capsys):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    for overwrite in ([], ["--overwrite"]):
        error = refused(
            ["format", "--style", "longalpaca", "--input", str(records), "--output", str(records), *overwrite], capsys
        )
        assert "is the --input" in error and records.read_text().startswith('{"instruction"')
    (tmp_path / "out.jsonl").write_text("mine")
    assert "--overwrite" in refused(
        ["format", "--style", "longalpaca", "--input", str(records), "--output", str(tmp_path / "out.jsonl")], capsys
    )
    assert (tmp_path / "out.jsonl").read_text() == "mine"
    assert (
        cli_main(
            [
                "format",
                "--style",
                "longalpaca",
                "--input",
                str(records),
                "--output",
                str(tmp_path / "out.jsonl"),
                "--overwrite",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "out.jsonl").read_text())["completion"] == "a"


def test_eval_never_writes_into_the_model_and_refuses_a_directory_for_data(models, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(models["base"], model)
    before = snapshot(model)
    (tmp_path / "data.txt").write_text("words " * 2000)
    error = refused(
        [
            "eval",
            "--model",
            str(model),
            "--data",
            str(tmp_path / "data.txt"),
            "--lengths",
            "32",
            "--stride",
            "16",
            "--out",
            str(model / "eval"),
        ],
        capsys,
    )
    assert "lies inside the --model" in error and snapshot(model) == before
    error = refused(["eval", "--model", str(model), "--data", str(tmp_path), "--lengths", "32"], capsys)
    assert f"--data {tmp_path} is a directory; give a file" in error


def test_demo_refuses_an_out_holding_other_files_and_bad_step_counts_before_any_work(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("x")
    assert "mine.txt" in refused(["demo", "--out", str(tmp_path), "--steps", "1"], capsys)
    for steps in ("0", "-1"):
        assert f"--steps must be a whole number of fine-tuning steps, at least 1; got {steps}" in refused(
            ["demo", "--out", str(tmp_path / "d"), "--steps", steps], capsys
        )
    assert not (tmp_path / "d").exists()


def test_a_demo_interrupted_after_saving_its_adapter_leaves_the_earlier_run_whole(tmp_path, monkeypatch):
    """`--ablations` interrupted: before, the new adapter sat next to the earlier results.json and plot."""
    from longlora_hf.demo import run as demo

    out = tmp_path / "demo"
    with output_directory(out, "--out") as partial:  # an earlier demo run's directory
        (partial / "adapter").mkdir()
        (partial / "adapter" / "adapter_config.json").write_text('{"earlier": true}')
        (partial / "results.json").write_text('{"earlier": true}')
    before = snapshot(out)

    def quick_measure(model, tokenizer, texts, lengths, *args, **kwargs):
        return {"perplexity": dict.fromkeys(lengths, 1.0), "passkey": dict.fromkeys(lengths, 1.0)}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "measure", quick_measure)
    monkeypatch.setattr(demo, "run_ablations", interrupted)
    monkeypatch.setattr(demo, "training_rows", lambda tokenizer, length: [[5] * length])
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, steps=1, ablations=True)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []
