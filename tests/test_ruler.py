"""RULER-style evaluation: scoring against hand-computed cases, every task's prompt checked by an independent reading
of it (needles parsed, assignment chains resolved, words counted), the evaluate module and `eval --ruler`."""

from __future__ import annotations

import collections
import json
import os
import random
import re

import evaluate
import pytest
import torch

import longlora_hf
from longlora_hf.cli import main as cli_main
from longlora_hf.metrics.ruler import (
    MAX_NEW_TOKENS,
    TASKS,
    effective_length,
    make_sample,
    ruler_evaluation,
    string_match_all,
    task_score,
)


@pytest.fixture(scope="module")
def demo():
    """The bundled demo model (a real byte-level BPE tokenizer, English) and its held-out documents."""
    from longlora_hf.demo.corpus import read_split
    from longlora_hf.demo.run import ASSETS, load_base

    model, tokenizer = load_base()
    return model, tokenizer, [record["text"] for record in read_split(ASSETS / "eval.jsonl.gz")][:4]


# Scoring: RULER's "all" string match, by hand.


@pytest.mark.parametrize(
    "prediction, references, expected",
    [
        ("The numbers are 1234567 and 7654321.", ["1234567", "7654321"], 1.0),
        ("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"], 2 / 3),
        ("nothing here", ["1234567"], 0.0),
        ("They are: ABCDE, fghij", ["abcde", "FGHIJ"], 1.0),  # case-insensitive both ways
        ("12345678", ["1234567"], 1.0),  # a substring counts, as in RULER
    ],
)
def test_one_answer_scores_the_fraction_of_references_it_contains(prediction, references, expected):
    assert string_match_all(prediction, references) == pytest.approx(expected)


def test_a_task_score_is_100_times_the_mean_over_samples():
    predictions = ["a b c d", "a b", "nothing"]
    references = [["a", "b", "c", "d"], ["a", "b", "c", "d"], ["a"]]
    # (4/4 + 2/4 + 0/1) / 3 * 100 = 50
    assert task_score(predictions, references) == pytest.approx(50.0)


@pytest.mark.parametrize(
    "averages, threshold, expected",
    [
        ({4096: 95.0, 8192: 86.0, 16384: 80.0}, 85.6, 8192),
        ({4096: 95.0, 8192: 85.6, 16384: 80.0}, 85.6, 8192),  # at the threshold counts
        ({4096: 80.0, 8192: 90.0}, 85.6, None),  # the shortest is already below
        ({2048: 90.0, 4096: 80.0, 8192: 90.0}, 85.6, 2048),  # a later recovery does not count
        ({4096: 95.0, 8192: 86.0, 16384: 80.0}, 70.0, 16384),
        ({16384: 99.0, 4096: 99.0}, 85.6, 16384),  # lengths in any order
    ],
)
def test_the_effective_length_is_the_longest_length_whose_average_stays_above_the_threshold(
    averages, threshold, expected
):
    assert effective_length(averages, threshold) == expected


def test_scoring_refuses_unpaired_or_empty_inputs():
    with pytest.raises(ValueError, match="references is empty"):
        string_match_all("x", [])
    with pytest.raises(ValueError, match="2 predictions and 1 reference lists"):
        task_score(["a", "b"], [["a"]])


# Each task's prompt, read independently of the code that wrote it.

NEEDLE = re.compile(r"One of the special magic numbers for ([\w-]+) is: (\d+)\.")


def tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt)["input_ids"])


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [2048, 3000])
def test_every_prompt_fills_its_length_less_the_answer_budget(demo, task, length):
    _, tokenizer, haystack = demo
    sample = make_sample(task, tokenizer, length, random.Random(1), haystack)
    budget = length - MAX_NEW_TOKENS.get(task, 128)
    used = tokens(tokenizer, sample.prompt)
    assert sample.max_new_tokens == MAX_NEW_TOKENS.get(task, 128)
    assert 0.9 * budget <= used <= budget
    assert sample.prompt.endswith(sample.answer_prefix)


@pytest.mark.parametrize(
    "task, needles, asked, values_asked",
    [
        ("niah_single_noise", 1, 1, 1),
        ("niah_single_text", 1, 1, 1),
        ("niah_multikey", 4, 1, 1),
        ("niah_multivalue", 4, 1, 4),
        ("niah_multiquery", 4, 4, 4),
    ],
)
def test_needle_prompts_ask_for_exactly_the_values_of_the_asked_keys(demo, task, needles, asked, values_asked):
    _, tokenizer, haystack = demo
    sample = make_sample(task, tokenizer, 2048, random.Random(2), haystack)
    found = NEEDLE.findall(sample.prompt)
    assert len(found) == needles
    question = sample.prompt.rsplit("\n", 2)[-2]
    asked_keys = {key for key, _ in found if key in question}
    assert len(asked_keys) == asked
    expected = sorted(value for key, value in found if key in asked_keys)
    assert sorted(sample.references) == expected and len(expected) == values_asked
    if task == "niah_single_noise":
        assert "The grass is green." in sample.prompt
    elif task.startswith("niah"):
        sentences = re.split(r"(?<=[.!?])\s+", " ".join(" ".join(haystack).split()))
        assert "The grass is green." not in sample.prompt
        assert sum(sentence in sample.prompt for sentence in sentences if len(sentence) > 40) >= 10


def test_prompts_are_the_same_in_another_process_with_another_hash_seed(demo):
    import subprocess
    import sys

    code = "\n".join(
        [
            "import random",
            "from transformers import PreTrainedTokenizerFast",
            "from longlora_hf.demo import ASSETS",
            "from longlora_hf.metrics.ruler import make_sample",
            "tokenizer = PreTrainedTokenizerFast.from_pretrained(ASSETS)",
            "for task in ('variable_tracking', 'common_words', 'frequent_words', 'niah_single_noise'):",
            "    print(make_sample(task, tokenizer, 2048, random.Random(task), ['Some text. More text.']).prompt)",
        ]
    )
    outputs = {
        seed: subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed}
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs["1"] and outputs["1"] == outputs["2"]


def test_needles_sit_at_different_depths_across_samples(demo):
    _, tokenizer, haystack = demo
    rng = random.Random(3)
    depths = set()
    for _ in range(6):
        prompt = make_sample("niah_single_noise", tokenizer, 2048, rng, haystack).prompt
        depths.add(round(NEEDLE.search(prompt).start() / len(prompt), 1))
    assert len(depths) >= 3


def test_variable_tracking_references_are_the_chain_resolved_independently(demo):
    _, tokenizer, haystack = demo
    sample = make_sample("variable_tracking", tokenizer, 2048, random.Random(4), haystack)
    assignments = re.findall(r"VAR (\w+) = (VAR (\w+)|\d+)\.", sample.prompt)
    values = {}
    for name, right, source in assignments:  # the chain appears in order: each source is known before use
        values[name] = values[source] if source else right
    asked = re.search(r"assigned the value (\d+) in the text above", sample.prompt).group(1)
    assert sorted(name for name, value in values.items() if value == asked) == sorted(sample.references)
    assert len(sample.references) == 5


def test_common_words_references_are_the_ten_most_frequent_by_count(demo):
    _, tokenizer, haystack = demo
    sample = make_sample("common_words", tokenizer, 3000, random.Random(5), haystack)
    counts = collections.Counter(re.findall(r"\d+\. (\w+)", sample.prompt))
    ranked = counts.most_common()
    top = {word for word, _ in ranked[:10]}
    assert top == set(sample.references)
    assert ranked[9][1] > ranked[10][1]  # strictly more frequent than any other word
    assert {count for word, count in ranked if word in top} == {30}


def test_at_a_length_too_short_for_30_repetitions_the_common_words_appear_fewer_times_than_30(demo):
    _, tokenizer, haystack = demo
    sample = make_sample("common_words", tokenizer, 1200, random.Random(5), haystack)
    counts = collections.Counter(re.findall(r"\d+\. (\w+)", sample.prompt))
    common = {counts[word] for word in sample.references}
    assert len(common) == 1 and common.pop() in (20, 10, 6)
    assert all(count == 3 for word, count in counts.items() if word not in sample.references)


def test_frequent_words_references_are_the_three_most_frequent_by_count(demo):
    _, tokenizer, haystack = demo
    sample = make_sample("frequent_words", tokenizer, 3000, random.Random(6), haystack)
    text = sample.prompt.split("Coded text:\n", 1)[1].split("\n", 1)[0]
    ranked = collections.Counter(text.split()).most_common()
    assert [word for word, _ in ranked[:3]] == list(sample.references)
    assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]


def test_a_chat_template_wraps_the_task_and_the_answer_prefix_follows_the_assistant_turn(demo):
    _, tokenizer, haystack = demo
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"
    sample = make_sample("niah_single_noise", tokenizer, 2048, random.Random(7), haystack, chat=True)
    assert sample.prompt.startswith("<|user|>Some special magic numbers")
    assert sample.prompt.endswith("<|end|><|assistant|>" + sample.answer_prefix)
    assert len(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]) <= 2048 - 128


# The whole evaluation, on the demo model.


class Oracle(torch.nn.Module):
    """Stands in for a model: answers each prompt with its references, or with the first `knows` of them; a
    hand-written check of the scoring path from generation to the score."""

    def __init__(self, tokenizer, knows: dict[str, int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.knows, self.current = tokenizer, knows, None

    def generate(self, input_ids, max_new_tokens, **kwargs):
        prompt = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
        references = self.current(prompt)
        answer = " " + ", ".join(references[: self.knows[self.task_of(prompt)]])
        answer_ids = self.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, answer_ids[:, :max_new_tokens]], dim=1)

    @staticmethod
    def task_of(prompt: str) -> str:
        if "VAR " in prompt:
            return "variable_tracking"
        return "niah_multivalue" if "What are all" in prompt else "niah_single_noise"


def test_the_scores_of_a_model_that_knows_some_answers_are_computed_by_hand(demo, monkeypatch):
    import sys

    ruler_module = sys.modules["longlora_hf.metrics.ruler"]
    _, tokenizer, haystack = demo
    made = {}
    original = ruler_module.make_sample

    def remembering(*args, **kwargs):
        sample = original(*args, **kwargs)
        made[sample.prompt] = list(sample.references)
        return sample

    monkeypatch.setattr(ruler_module, "make_sample", remembering)
    oracle = Oracle(tokenizer, {"niah_single_noise": 1, "niah_multivalue": 2, "variable_tracking": 0})
    oracle.current = lambda prompt: next(refs for text, refs in made.items() if text.endswith(prompt[-200:]))
    result = ruler_evaluation(
        oracle,
        tokenizer,
        [1024, 2048],
        tasks=["niah_single_noise", "niah_multivalue", "variable_tracking"],
        samples=2,
        haystack=haystack,
        threshold=50,
        progress=False,
    )
    # single: every answer right (100); multi-value: 2 of 4 values (50); variable tracking: nothing (0)
    for length in (1024, 2048):
        assert result["scores"]["niah_single_noise"][length] == pytest.approx(100.0)
        assert result["scores"]["niah_multivalue"][length] == pytest.approx(50.0)
        assert result["scores"]["variable_tracking"][length] == pytest.approx(0.0)
        assert result["average"][length] == pytest.approx(50.0)
    assert result["effective_length"] == 2048  # 50 >= 50 at both lengths
    assert len(result["samples"]) == 2 * 3 * 2 and {s["score"] for s in result["samples"]} == {0.0, 50.0, 100.0}


def test_the_evaluate_module_runs_the_demo_model_and_is_seeded(demo):
    model, tokenizer, haystack = demo
    metric = evaluate.load(longlora_hf.metrics.RULER)
    kwargs = dict(
        context_lengths=[1024],
        tasks=["niah_single_text", "frequent_words"],
        samples=1,
        haystack=haystack,
        max_new_tokens=4,
        progress=False,
    )
    first = metric.compute(model=model, tokenizer=tokenizer, **kwargs)
    again = metric.compute(model=model, tokenizer=tokenizer, **kwargs)
    assert set(first["scores"]) == {"niah_single_text", "frequent_words"}
    assert all(0 <= score <= 100 for by_length in first["scores"].values() for score in by_length.values())
    assert first["samples"] == again["samples"]
    assert all(sample["prompt_tokens"] <= 1024 - sample["max_new_tokens"] for sample in first["samples"])
    assert all(len(tokenizer(s["prediction"], add_special_tokens=False)["input_ids"]) <= 5 for s in first["samples"])
    # the record says what each answer was allowed: the cap, not only the task's budget the prompt left room for
    assert [(s["max_new_tokens"], s["new_tokens_allowed"]) for s in first["samples"]] == [(128, 4), (50, 4)]


def test_a_chat_model_is_prompted_through_its_template_without_a_second_set_of_special_tokens(demo):
    model, tokenizer, haystack = demo
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}<s><|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        result = ruler_evaluation(
            model, tokenizer, [512], tasks=["niah_single_noise"], samples=1, max_new_tokens=1, progress=False
        )
    finally:
        handle.remove()
    assert result["chat"] is True
    ids = seen[0]["input_ids"][0].tolist()
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id  # the template's one <s>
    assert result["samples"][0]["prompt_tokens"] == len(ids) <= 512 - 128


def test_a_training_model_is_evaluated_in_eval_mode_and_handed_back_training(demo):
    model, tokenizer, haystack = demo
    model.train()
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        ruler_evaluation(
            model, tokenizer, [512], tasks=["niah_single_noise"], samples=1, max_new_tokens=2, progress=False
        )
    finally:
        handle.remove()
        trained_after = model.training
        model.eval()
    assert seen and not any(seen) and trained_after


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tasks": ["haystack_soup"]}, "Unknown RULER task"),
        ({"tasks": []}, "tasks is empty"),
        ({"samples": 0}, "samples must be a positive integer"),
        ({"threshold": 101}, r"threshold is a score in \[0, 100\]"),
        ({"tasks": ["niah_multikey"], "haystack": []}, "niah_multikey hide needles in real text"),
        ({"context_lengths": []}, "context_lengths"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ],
)
def test_bad_options_are_refused_before_any_prompt(demo, kwargs, message):
    _, tokenizer, haystack = demo

    class Untouchable(torch.nn.Module):
        def parameters(self, recurse=True):
            raise AssertionError("the model was used before the options were checked")

    options = {"context_lengths": [1024], "haystack": haystack, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        ruler_evaluation(Untouchable(), tokenizer, **options)


def test_a_length_too_short_for_the_task_says_so(demo):
    _, tokenizer, haystack = demo
    with pytest.raises(ValueError, match="shortest prompt of this task takes"):
        make_sample("common_words", tokenizer, 200, random.Random(0), haystack)


def test_eval_ruler_refuses_a_length_too_short_for_a_task_before_loading_any_model(
    demo, tmp_path, capsys, monkeypatch
):
    from longlora_hf.demo import ASSETS
    from longlora_hf.metrics import perplexity

    _, _, haystack = demo
    (tmp_path / "data.txt").write_text(haystack[0])
    monkeypatch.setattr(perplexity, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["eval", "--model", str(ASSETS), "--data", str(tmp_path / "data.txt"), "--lengths", "256", "--ruler"]
    assert cli_main([*argv, "--ruler_lengths", "300", "--out", str(tmp_path / "out")]) == 2
    assert "RULER task niah_multikey at 300 tokens: the shortest prompt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_ruler_prints_tables_the_effective_length_a_regression_line_and_writes_heat_maps(demo, tmp_path, capsys):
    from longlora_hf.demo import ASSETS

    _, _, haystack = demo
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": haystack[0][:4000]}) + "\n")
    code = cli_main(
        [
            "eval",
            "--model",
            str(ASSETS),
            "--model",
            str(ASSETS),
            "--data",
            str(data),
            "--lengths",
            "256",
            "--ruler",
            "--ruler_lengths",
            "448",
            "512",
            "--ruler_tasks",
            "niah_single_noise",
            "niah_multiquery",
            "--ruler_samples",
            "1",
            "--ruler_max_new_tokens",
            "3",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "niah_single_noise" in printed and "niah_multiquery" in printed and "average" in printed
    assert "effective length:" in printed
    assert f"short-context regression of {ASSETS} against {ASSETS} at 256 tokens: perplexity" in printed
    assert "at 448 tokens: RULER average" in printed and "(+0.0 points)" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for report in results["models"]:
        assert set(report["ruler"]["scores"]) == {"niah_single_noise", "niah_multiquery"}
        assert set(report["ruler"]["average"]) == {"448", "512"}
    for name in ("ruler_0.png", "ruler_1.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_ruler_refuses_token_id_data_without_a_haystack_before_loading(tmp_path, capsys):
    from longlora_hf.demo import ASSETS

    (tmp_path / "ids.bin").write_bytes(b"\x01\x00" * 600)
    argv = ["eval", "--model", str(ASSETS), "--data", str(tmp_path / "ids.bin"), "--lengths", "256", "--ruler"]
    assert cli_main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "--ruler_haystack" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
