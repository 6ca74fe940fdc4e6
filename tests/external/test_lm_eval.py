"""lm-evaluation-harness, the client users run next: `lm_eval --model hf` loads a merged LongLoRA model
(`pretrained=`) and a plain-LoRA export (`peft=`) and scores a local task offline. Its scores are checked against
log-likelihoods computed here by hand from the merged model, and the two loading paths against each other."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model

from longlora_hf import LongLoraConfig, save_as_plain_lora
from support.helpers import tiny_model, trained


pytest.importorskip("lm_eval", reason="lm-eval is in the test extra")

TASK = """task: local_text_perplexity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""


def lm_eval(model_args: str, tmp_path, name: str) -> dict:
    """`lm_eval --model hf` on the local task, offline, in a fresh process; its results for the task."""
    out = tmp_path / f"results-{name}"
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"{model_args},dtype=float32",
        "--tasks",
        "local_text_perplexity",
        "--include_path",
        str(tmp_path / "tasks"),
        "--device",
        "cpu",
        "--batch_size",
        "1",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"]["local_text_perplexity"]


def bits_per_byte_by_hand(model, tokenizer, texts: list[str]) -> float:
    """lm-eval's rolling log-likelihood for texts shorter than the model's context: each text's tokens scored after
    the beginning-of-sequence token, in one forward; bits per UTF-8 byte over all texts."""
    total, size = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        inputs = torch.tensor([[tokenizer.bos_token_id, *ids[:-1]]])
        with torch.no_grad():
            logits = model(inputs).logits[0].double()
        total += logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).sum().item()
        size += len(text.encode("utf-8"))
    return -total / size / math.log(2)


def test_a_merged_model_and_a_plain_lora_export_score_the_same_in_lm_eval(tmp_path):
    from longlora_hf.demo import ASSETS
    from longlora_hf.demo.corpus import read_split
    from longlora_hf.demo.run import load_base

    _, tokenizer = load_base()
    texts = [record["text"][:1500] for record in read_split(ASSETS / "eval.jsonl.gz")[:2]]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))

    # An untied Llama with the demo tokenizer's vocabulary, extended 256 -> 1024 by LongLoRA (LoRA+), weights moved.
    base = tiny_model("llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = trained(get_peft_model(base, LongLoraConfig(target_context_length=1024)))
    save_as_plain_lora(model, tmp_path / "plain")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    # The export's position interpolation is in its config.json: the base it loads on carries that config.
    shutil.copytree(tmp_path / "base", tmp_path / "base-extended")
    shutil.copy(tmp_path / "plain" / "config.json", tmp_path / "base-extended" / "config.json")

    from_merged = lm_eval(f"pretrained={tmp_path / 'merged'}", tmp_path, "merged")
    from_export = lm_eval(f"pretrained={tmp_path / 'base-extended'},peft={tmp_path / 'plain'}", tmp_path, "export")

    assert from_merged["sample_len"] == from_export["sample_len"] == 2
    expected = bits_per_byte_by_hand(merged.eval(), tokenizer, texts)
    assert from_merged["bits_per_byte,none"] == pytest.approx(expected, rel=1e-5)
    assert from_export["bits_per_byte,none"] == pytest.approx(expected, rel=1e-5)
    untrained = bits_per_byte_by_hand(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, texts)
    assert abs(untrained - expected) > 1e-3  # the adapter changed what lm-eval scored
