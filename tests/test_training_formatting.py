"""LongQA and LongAlpaca records as TRL prompt/completion data, with the loss on the answer only."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from longlora_hf.demo import ASSETS
from longlora_hf.training import (
    LongAlpacaFields,
    LongQAFields,
    format_longalpaca,
    format_longqa,
    format_records,
    read_records,
)
from support.helpers import tiny_model


RECORD = {"material_type": "a book", "material_content": "Once upon a time.", "question": "Who?", "answer": "Nobody."}


@pytest.fixture(scope="module")
def tokenizer():
    return PreTrainedTokenizerFast.from_pretrained(ASSETS)


def test_longqa_uses_the_papers_prompt_and_the_answer_as_completion():
    assert format_longqa(RECORD) == {
        "prompt": "Below is a book. Memorize the content and answer my question after the a book. Once upon a time.\n"
        " Now the material ends. Who?",
        "completion": "Nobody.",
    }


def test_longalpaca_uses_the_llama2_inst_prompt():
    example = format_longalpaca(
        {"instruction": "Summarize the paper.", "output": "It is short.", "input": "Paper text"}
    )
    assert example["prompt"].startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.")
    assert example["prompt"].endswith("<</SYS>> \n\n Summarize the paper. \nPaper text [/INST]")
    assert example["completion"] == "It is short."
    assert format_longalpaca({"instruction": "Hi", "output": "Hello"})["prompt"].endswith("\n\n Hi [/INST]")


def test_field_names_are_configurable():
    record = {"kind": "a paper", "text": "Body.", "q": "Why?", "a": "Because."}
    fields = LongQAFields(material_type="kind", material_content="text", question="q", answer="a")
    assert format_longqa(record, fields)["completion"] == "Because."
    assert (
        format_longalpaca({"ask": "X", "reply": "Y"}, LongAlpacaFields(instruction="ask", output="reply"))[
            "completion"
        ]
        == "Y"
    )


def test_the_loss_is_on_the_answer_only(tmp_path, tokenizer):
    examples, _ = format_records([RECORD, {**RECORD, "answer": "Everybody, in the end."}], "longqa")
    arguments = SFTConfig(output_dir=str(tmp_path), max_length=256, report_to=[], use_cpu=True, max_steps=1)
    trainer = SFTTrainer(
        model=tiny_model("llama", vocab_size=len(tokenizer)),
        args=arguments,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
    )
    for example, processed in zip(examples, trainer.train_dataset):
        ids, labels = processed["input_ids"], processed["labels"]
        assert tokenizer.decode([t for t, label in zip(ids, labels) if label == -100]) == example["prompt"]
        assert (
            tokenizer.decode([label for label in labels if label != -100])
            == example["completion"] + tokenizer.eos_token
        )


def test_the_formatters_map_a_datasets_dataset_into_trls_prompt_completion_columns():
    records = [RECORD, {**RECORD, "answer": "Everybody."}]
    dataset = Dataset.from_list(records)
    mapped = dataset.map(format_longqa, remove_columns=dataset.column_names)
    assert mapped.column_names == ["prompt", "completion"] and mapped.to_list() == format_records(records, "longqa")[0]


def test_a_record_missing_a_field_is_named_before_training():
    with pytest.raises(
        ValueError,
        match=r"LongQA record 1 has no field 'question' \(it has \['answer', 'material_content', 'material_type'\]\)",
    ):
        format_records([RECORD, {k: v for k, v in RECORD.items() if k != "question"}], "longqa")


def test_an_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dataset is empty"):
        format_records([], "longqa")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no records"):
        read_records(tmp_path / "empty.jsonl")


def test_malformed_and_non_utf8_files_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORD) + "\n{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl line 2 is not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "latin1.json").write_bytes('[{"answer": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json is not UTF-8 \\(byte 16 is 0xe9\\)"):
        read_records(tmp_path / "latin1.json")
    (tmp_path / "object.json").write_text(json.dumps(RECORD))
    with pytest.raises(ValueError, match="must hold a JSON list of records"):
        read_records(tmp_path / "object.json")


def test_materials_longer_than_the_context_are_truncated_or_dropped_and_counted(tokenizer):
    long_record = {**RECORD, "material_content": "The grass is green. " * 200}
    records = [RECORD, long_record]
    kept, counts = format_records(records, "longqa", tokenizer, max_length=128, too_long="truncate")
    assert counts == {"kept": 1, "truncated": 1, "dropped": 0}
    truncated = kept[1]
    assert len(tokenizer(truncated["prompt"] + truncated["completion"])["input_ids"]) + 1 <= 128
    assert truncated["prompt"].endswith("\n Now the material ends. Who?") and truncated["completion"] == "Nobody."
    kept, counts = format_records(records, "longqa", tokenizer, max_length=128, too_long="drop")
    assert counts == {"kept": 1, "truncated": 0, "dropped": 1} and kept == [format_longqa(RECORD)]


def test_the_format_command_writes_prompt_completion_jsonl_and_reports_counts(tmp_path, capsys):
    from longlora_hf.cli import main as cli_main

    long_record = {**RECORD, "material_content": "The grass is green. " * 200}
    (tmp_path / "qa.jsonl").write_text(json.dumps(RECORD) + "\n" + json.dumps(long_record) + "\n")
    args = [
        "format",
        "--style",
        "longqa",
        "--input",
        str(tmp_path / "qa.jsonl"),
        "--output",
        str(tmp_path / "out.jsonl"),
        "--tokenizer",
        str(ASSETS),
        "--max_length",
        "128",
        "--too_long",
        "drop",
    ]
    assert cli_main(args) == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert lines == [format_longqa(RECORD)]
    assert "1 kept as they were, 0 truncated to fit 128 tokens, 1 dropped" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "?"}) + "\n")
    assert (
        cli_main(
            ["format", "--style", "longqa", "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "x")]
        )
        == 2
    )
    assert "LongQA record 0 has no field 'material_type'" in capsys.readouterr().err


def test_continued_pretraining_packs_plain_text_into_full_rows_with_the_loss_on_every_token(tmp_path, tokenizer):
    """The paper's RedPajama stage, as the paper recipes set it up: packing=True, packing_strategy='wrapped'."""
    from longlora_hf import LongLoraConfig
    from longlora_hf.training import LongLoraSFTTrainer

    documents = [" ".join(f"word{i} number {j}." for j in range(40 + 30 * i)) for i in range(6)]
    arguments = SFTConfig(
        output_dir=str(tmp_path),
        max_length=128,
        packing=True,
        packing_strategy="wrapped",
        dataset_text_field="text",
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        max_steps=1,
        bf16=False,
    )
    trainer = LongLoraSFTTrainer(
        model=tiny_model("llama", vocab_size=len(tokenizer)),
        args=arguments,
        train_dataset=Dataset.from_dict({"text": documents}),
        processing_class=tokenizer,
        peft_config=LongLoraConfig(target_context_length=512),
    )
    total = sum(len(tokenizer(d)["input_ids"]) + 1 for d in documents)  # + EOS per document
    rows = [row["input_ids"] for row in trainer.train_dataset]
    assert all(len(row) == 128 for row in rows[:-1]) and len(rows) == -(
        -total // 128
    )  # full rows, the rest in the last
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].numel() == 2 * 128
    assert (batch["labels"] == batch["input_ids"]).all()  # loss on every token: nothing masked
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0


def test_the_format_command_without_max_length_says_nothing_was_checked_for_length(tmp_path, capsys):
    from longlora_hf.cli import main as cli_main

    (tmp_path / "qa.jsonl").write_text(json.dumps(RECORD) + "\n")
    assert (
        cli_main(
            [
                "format",
                "--style",
                "longqa",
                "--input",
                str(tmp_path / "qa.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1 kept as they were, none checked for length (no --max_length)" in out and "None tokens" not in out
