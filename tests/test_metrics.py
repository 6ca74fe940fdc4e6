"""Perplexity and passkey metrics, loaded with `evaluate.load`, and the `longlora-hf eval` report."""

from __future__ import annotations

import json
import math

import evaluate
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import longlora_hf
from longlora_hf.cli import main as cli_main
from longlora_hf.metrics import compute_perplexity, longlora_window_starts, passkey_prompt
from longlora_hf.metrics import perplexity as perplexity_module
from longlora_hf.metrics.passkey import FILLER, information_line, passkey_retrieval
from support.helpers import tiny_model


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """The bundled demo model's byte-level BPE tokenizer: it spells out digits, which passkeys need."""
    from transformers import PreTrainedTokenizerFast

    from longlora_hf.demo import ASSETS

    return PreTrainedTokenizerFast.from_pretrained(ASSETS)


STREAM = torch.randint(4, 128, (1500,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def perplexity_metric():
    return evaluate.load(longlora_hf.metrics.PERPLEXITY)


def by_hand_window_loss(model, window: torch.Tensor, scored_from: int = 1) -> tuple[float, int]:
    """Sum of -log p(token | prefix) over positions >= scored_from of one window, from the logits."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(window[None]).logits[0].double(), -1)
    total = sum(-log_probs[i - 1, window[i]].item() for i in range(scored_from, len(window)))
    return total, len(window) - scored_from


def test_longlora_windows_are_the_reference_definition():
    # eval.py: all_ix = range(0, len(data) - seq_length, 256); all_ix.pop()
    assert longlora_window_starts(1500, 300) == [0, 256, 512, 768]
    assert longlora_window_starts(1000, 300, stride=256) == [0, 256]
    assert longlora_window_starts(600, 300) == [0]
    assert longlora_window_starts(300, 300) == []


def test_longlora_protocol_equals_mean_window_cross_entropy_by_hand(perplexity_metric):
    model = tiny_model("llama").double()
    result = perplexity_metric.compute(model=model, input_ids=STREAM, context_lengths=[200, 300], progress=False)
    for length, perplexity in zip([200, 300], result["perplexities"]):
        losses = []
        for start in list(range(0, 1500 - length, 256))[:-1]:
            total, count = by_hand_window_loss(model, STREAM[start : start + length])
            losses.append(total / count)
        assert perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), abs=1e-6)
    assert result["mean_perplexity"] == pytest.approx(sum(result["perplexities"]) / 2)


def test_strided_protocol_scores_each_token_once_by_hand(perplexity_metric):
    model = tiny_model("llama").double()
    length, stride = 300, 200
    result = perplexity_metric.compute(
        model=model,
        input_ids=STREAM[:1000],
        context_lengths=[length],
        protocol="strided",
        stride=stride,
        progress=False,
    )
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, 1000, stride):
        end = min(begin + length, 1000)
        window_total, window_count = by_hand_window_loss(
            model, STREAM[begin:end], scored_from=max(1, previous_end - begin)
        )
        total, count, previous_end = total + window_total, count + window_count, end
        if end == 1000:
            break
    assert count == 999
    assert result["perplexities"][0] == pytest.approx(math.exp(total / count), abs=1e-6)


def test_texts_and_a_uint16_token_file_give_the_same_result_as_ids(perplexity_metric, tiny_tokenizer, tmp_path):
    model = tiny_model("llama")
    texts = [" ".join(f"w{(i * 7 + j) % 90}" for j in range(400)) for i in range(2)]
    ids = []
    for text in texts:
        ids += tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    np.array(ids, dtype=np.uint16).tofile(tmp_path / "tokens.bin")
    from_texts = perplexity_metric.compute(
        predictions=texts, model=model, tokenizer=tiny_tokenizer, context_lengths=[128], progress=False
    )
    from_file = perplexity_metric.compute(
        model=model, token_file=str(tmp_path / "tokens.bin"), context_lengths=[128], progress=False
    )
    from_ids = perplexity_metric.compute(model=model, input_ids=ids, context_lengths=[128], progress=False)
    assert from_texts["perplexities"] == from_file["perplexities"] == from_ids["perplexities"]


def test_an_adapter_path_and_the_model_object_give_the_same_result(perplexity_metric, tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    model = get_peft_model(
        tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    as_object = perplexity_metric.compute(model=model, input_ids=STREAM, context_lengths=[128], progress=False)
    as_paths = perplexity_metric.compute(
        model=str(base_dir), adapter=str(tmp_path / "adapter"), input_ids=STREAM, context_lengths=[128], progress=False
    )
    plain = perplexity_metric.compute(model=str(base_dir), input_ids=STREAM, context_lengths=[128], progress=False)
    assert as_paths["perplexities"][0] == pytest.approx(as_object["perplexities"][0], abs=1e-6)
    assert plain["perplexities"][0] != pytest.approx(as_object["perplexities"][0], abs=1e-3)


def test_a_longlora_adapter_path_restores_its_context(perplexity_metric, tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    model = get_peft_model(tiny_model("llama"), longlora_hf.LongLoraConfig(target_context_length=1024))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.warns(UserWarning, match="beyond the model's context"):
        perplexity_metric.compute(model=str(base_dir), input_ids=STREAM, context_lengths=[512], progress=False)
    model.eval()
    expected = perplexity_metric.compute(
        model=model, input_ids=STREAM, context_lengths=[512], beyond_context="error", progress=False
    )
    reloaded = perplexity_metric.compute(
        model=str(base_dir),
        adapter=str(tmp_path / "adapter"),
        input_ids=STREAM,
        context_lengths=[512],
        beyond_context="error",
        progress=False,
    )
    assert reloaded["perplexities"][0] == pytest.approx(expected["perplexities"][0], abs=1e-6)


def test_evaluation_leaves_a_training_model_in_training_mode_and_runs_dense(perplexity_metric):
    model = tiny_model("llama")
    longlora_hf.use_s2_attention(model)
    model.train()
    s2 = perplexity_metric.compute(model=model, input_ids=STREAM, context_lengths=[128], progress=False)
    model.set_attn_implementation("sdpa")
    dense = perplexity_metric.compute(model=model, input_ids=STREAM, context_lengths=[128], progress=False)
    assert model.training and s2["perplexities"] == dense["perplexities"]


def test_a_context_length_longer_than_the_data_is_refused(perplexity_metric):
    with pytest.raises(ValueError, match="context length 2048 needs more than 2048 tokens, but the data has 1500"):
        perplexity_metric.compute(model=tiny_model("llama"), input_ids=STREAM, context_lengths=[2048], progress=False)


def test_a_context_length_beyond_the_model_can_be_refused(perplexity_metric):
    with pytest.raises(ValueError, match="context length 512 is beyond the model's context of 256 tokens"):
        perplexity_metric.compute(
            model=tiny_model("llama"), input_ids=STREAM, context_lengths=[512], beyond_context="error", progress=False
        )


def test_an_empty_text_list_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="predictions is empty"):
        compute_perplexity(tiny_model("llama"), tiny_tokenizer, predictions=[], context_lengths=[64])


NO_MODEL = "no/such/model"  # not a model: loading it raises OSError, so a ValueError shows the check came first


@pytest.mark.parametrize(
    "option, message",
    [
        ({"protocol": "sliding"}, r"protocol must be one of \('longlora', 'strided'\); got 'sliding'"),
        ({"beyond_context": "ignore"}, r"beyond_context must be one of \('warn', 'error'\); got 'ignore'"),
        ({"stride": 0}, "stride must be a positive integer; got 0"),
        ({"batch_size": 0}, "batch_size must be a positive integer; got 0"),
    ],
)
def test_a_bad_perplexity_option_is_refused_before_the_model_is_loaded(option, message):
    with pytest.raises(ValueError, match=message):
        compute_perplexity(NO_MODEL, input_ids=STREAM, context_lengths=[64], **option)


@pytest.mark.parametrize(
    "metric",
    [
        lambda lengths: compute_perplexity(NO_MODEL, input_ids=STREAM, context_lengths=lengths),
        lambda lengths: passkey_retrieval(None, None, lengths),
    ],
    ids=["perplexity", "passkey"],
)
@pytest.mark.parametrize(
    "lengths, message",
    [([], "context_lengths is empty"), ([1], "context lengths must be integers of at least 2 tokens; got 1")],
)
def test_both_metrics_refuse_bad_context_lengths_by_the_same_rule(metric, lengths, message):
    with pytest.raises(ValueError, match=message):
        metric(lengths)


def test_a_token_file_with_ids_beyond_the_vocabulary_is_refused(perplexity_metric, tmp_path):
    np.array([5, 9, 300, 7] * 100, dtype=np.uint16).tofile(tmp_path / "tokens.bin")
    with pytest.raises(ValueError, match="token ids go up to 300, but the model's vocabulary has 128 tokens"):
        perplexity_metric.compute(
            model=tiny_model("llama"), token_file=str(tmp_path / "tokens.bin"), context_lengths=[64], progress=False
        )


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_the_passkey_sits_at_the_asked_depth(bpe_tokenizer, depth):
    prompt = passkey_prompt(bpe_tokenizer, 1000, depth, "12345")
    assert prompt.count(information_line("12345")) == 1
    before, after = prompt.split(information_line("12345"))
    sentences_before, sentences_after = before.count(FILLER), after.count(FILLER)
    assert sentences_before + sentences_after > 10
    assert abs(sentences_before / (sentences_before + sentences_after) - depth) <= 1 / (
        sentences_before + sentences_after
    )
    assert prompt.endswith("What is the pass key? The pass key is")


class AnswersWithTheKey(torch.nn.Module):
    """A stand-in model whose greedy answer is whatever key its prompt holds (scoring test only)."""

    def __init__(self, tokenizer, wrong=False):
        super().__init__()
        self.tokenizer, self.wrong, self.weight = tokenizer, wrong, torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, max_new_tokens, **kwargs):
        prompt = self.tokenizer.decode(input_ids[0])
        key = prompt.split("The pass key is ")[1][:5].replace(" ", "")
        if self.wrong:
            key = str(int(key) + 1)
        answer = self.tokenizer(" " + key + ".", add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, answer], dim=1)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"depths": [0.5, 1.5]}, r"depth must be in \[0, 1\] \(a fraction of the filler before the key\); got 1.5"),
        ({"depths": []}, "depths is empty"),
        ({"trials": 0}, "trials must be a positive integer; got 0"),
    ],
)
def test_a_bad_passkey_option_is_refused_before_the_first_prompt(option, message):
    with pytest.raises(ValueError, match=message):
        passkey_retrieval(None, None, [200], **option)  # no model, no tokenizer: nothing is generated


def test_passkey_scoring_counts_right_and_wrong_answers(bpe_tokenizer):
    right = passkey_retrieval(
        AnswersWithTheKey(bpe_tokenizer), bpe_tokenizer, [200], [0.0, 0.5], trials=3, progress=False
    )
    wrong = passkey_retrieval(
        AnswersWithTheKey(bpe_tokenizer, wrong=True), bpe_tokenizer, [200], [0.0, 0.5], trials=3, progress=False
    )
    assert right["accuracy"] == {200: {0.0: 1.0, 0.5: 1.0}}
    assert wrong["accuracy"] == {200: {0.0: 0.0, 0.5: 0.0}}


def test_passkey_metric_runs_a_real_model_end_to_end_and_is_seeded(bpe_tokenizer):
    metric = evaluate.load(longlora_hf.metrics.PASSKEY)
    model = tiny_model("llama", vocab_size=len(bpe_tokenizer))
    first = metric.compute(
        model=model, tokenizer=bpe_tokenizer, context_lengths=[120], depths=[0.5], trials=2, seed=3, progress=False
    )
    again = metric.compute(
        model=model, tokenizer=bpe_tokenizer, context_lengths=[120], depths=[0.5], trials=2, seed=3, progress=False
    )
    assert first["accuracy"] == {120: {0.5: 0.0}}  # a random tiny model does not recall the key
    assert [t["key"] for t in first["trials"]] == [t["key"] for t in again["trials"]]
    assert all(100 <= t["prompt_tokens"] <= 120 for t in first["trials"])


def test_the_eval_command_prints_a_table_and_writes_json_and_pngs(tmp_path, tiny_tokenizer, capsys):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    (tmp_path / "data.txt").write_text(" ".join(f"w{i % 90}" for i in range(1200)))
    other_dir = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other_dir)
    tiny_tokenizer.save_pretrained(other_dir)
    code = cli_main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--model",
            str(other_dir),
            "--data",
            str(tmp_path / "data.txt"),
            "--lengths",
            "64",
            "128",
            "--passkey_depths",
            "0",
            "1",
            "--passkey_trials",
            "1",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert str(model_dir) in printed and str(other_dir) in printed and "perplexity" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [set(m["perplexity"]["by_context_length"]) for m in results["models"]] == [{"64", "128"}] * 2
    for name in ("perplexity.png", "passkey_0.png", "passkey_1.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_eval_command_names_a_malformed_jsonl_line(tmp_path, tiny_tokenizer, capsys):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    (tmp_path / "data.jsonl").write_text('{"text": "w1 w2"}\n{"txt": "w3"}\n')
    assert (
        cli_main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "data.jsonl"), "--lengths", "64"]) == 2
    )
    assert "data.jsonl record 1: expected a JSON object with a 'text' string field" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch_size", "0"], "batch_size must be a positive integer; got 0"),
        (["--stride", "-1"], "stride must be a positive integer; got -1"),
        (["--lengths", "1"], "context lengths must be integers of at least 2 tokens; got 1"),
        (["--passkey_depths", "1.5"], "1.5"),
    ],
    ids=["batch-size", "stride", "length", "passkey-depth"],
)
def test_the_eval_command_checks_its_options_before_loading_any_model(tmp_path, capsys, flags, message):
    (tmp_path / "data.txt").write_text("w1 w2 w3")
    missing_model = tmp_path / "no_model_here"  # loading it first would fail with another error
    args = ["eval", "--model", str(missing_model), "--data", str(tmp_path / "data.txt"), "--lengths", "64", *flags]
    assert cli_main(args) == 2
    error = capsys.readouterr().err
    assert message in error and str(missing_model) not in error, error


class LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any torch operation returns while active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.bytes = max(self.bytes, tensor.numel() * tensor.element_size())
        return out


def test_scoring_never_holds_a_window_of_logits(monkeypatch):
    # The full logits of one window (window x vocabulary in float32) are what grows with the window: 16k tokens
    # of a 49k vocabulary are 3 GB, 6 GB as float64. Scoring holds SCORING_TOKENS positions of them at a time.
    monkeypatch.setattr(perplexity_module, "SCORING_TOKENS", 32)
    window, vocab = 256, 1024
    model = tiny_model("llama", vocab_size=vocab)
    stream = torch.randint(4, vocab, (window + 600,), generator=torch.Generator().manual_seed(0))
    with LargestTensor() as largest:
        compute_perplexity(model, input_ids=stream, context_lengths=[window], batch_size=2, progress=False)
    one_window_of_logits = window * vocab * 4  # float32; the old scoring made batch x window x vocab in float64
    assert largest.bytes < one_window_of_logits, f"a {largest.bytes}-byte tensor while scoring"


def by_hand_perplexity(model, stream: torch.Tensor, length: int, protocol: str, stride: int) -> float:
    """Either protocol's perplexity from `by_hand_window_loss`, window by window."""
    if protocol == "longlora":
        starts = longlora_window_starts(len(stream), length, stride)
        sums_and_counts = [by_hand_window_loss(model, stream[start : start + length]) for start in starts]
        return math.exp(sum(total / count for total, count in sums_and_counts) / len(starts))
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(stream), stride):
        end = min(begin + length, len(stream))
        window_total, window_count = by_hand_window_loss(model, stream[begin:end], max(1, previous_end - begin))
        total, count, previous_end = total + window_total, count + window_count, end
        if end == len(stream):
            break
    return math.exp(total / count)


def lora_llama():
    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    return get_peft_model(tiny_model("llama"), config).eval()


SCORED_MODELS = {
    "llama": lambda: tiny_model("llama"),
    "peft-lora-on-the-head": lora_llama,
    "gemma3-softcapped": lambda: tiny_model("gemma3", final_logit_softcapping=0.5),  # caps the tiny logits hard
    "granite-scaled": lambda: tiny_model("granite", logits_scaling=0.25),
}


@pytest.mark.parametrize("protocol", ["longlora", "strided"])
@pytest.mark.parametrize("name", SCORED_MODELS)
def test_chunked_scoring_from_hidden_states_equals_cross_entropy_by_hand(monkeypatch, recwarn, name, protocol):
    # 48 positions at a time over windows of 200 (float32): chunks end mid-window, and a batch of 2 splits them.
    monkeypatch.setattr(perplexity_module, "SCORING_TOKENS", 48)
    model, stream = SCORED_MODELS[name](), STREAM[:700]
    result = compute_perplexity(
        model, input_ids=stream, context_lengths=[200], protocol=protocol, stride=96, batch_size=2, progress=False
    )
    assert result["perplexities"][0] == pytest.approx(by_hand_perplexity(model, stream, 200, protocol, 96), rel=1e-5)
    assert not [w for w in recwarn if "full logits" in str(w.message)]  # scored from the decoder's output


class WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes input ids only."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids)


def with_doubled_logits():
    """A model whose logits are not its head's projection of its decoder's output (a transform we don't know)."""
    model = tiny_model("llama")
    model.register_forward_hook(lambda module, args, output: type(output)(**{**output, "logits": 2 * output.logits}))
    return model


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: WithoutLogitsToKeep(tiny_model("llama")), "its forward takes no logits_to_keep"),
        (with_doubled_logits, "its logits are not the LM head's projection of the decoder's output"),
    ],
    ids=["no-logits_to_keep", "unknown-logit-transform"],
)
def test_a_model_that_cannot_be_scored_from_its_decoder_is_scored_from_its_logits(monkeypatch, make, reason):
    monkeypatch.setattr(perplexity_module, "SCORING_TOKENS", 48)
    model = make()
    with pytest.warns(UserWarning, match=f"scored from the model's full logits \\({reason}\\)"):
        result = compute_perplexity(
            model, input_ids=STREAM[:700], context_lengths=[200], stride=96, batch_size=2, progress=False
        )
    expected = by_hand_perplexity(model, STREAM[:700], 200, "longlora", 96)
    assert result["perplexities"][0] == pytest.approx(expected, rel=1e-5)


def test_the_progress_bar_counts_windows_and_shows_tokens_per_second(capsys):
    # Context lengths 128 and 200 over 1500 tokens: 5 windows each; a bar of context lengths would count 2.
    compute_perplexity(tiny_model("llama"), input_ids=STREAM, context_lengths=[128, 200])
    bar = capsys.readouterr().err.rsplit("\r", 1)[-1]
    assert "perplexity at 200" in bar and "10/10" in bar and "window/s" in bar and "tokens/s" in bar, bar
