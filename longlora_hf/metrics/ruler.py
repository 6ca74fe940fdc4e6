"""RULER-style synthetic long-context evaluation (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), written from the paper's description of the protocol.

Each task builds prompts of a chosen length in tokens (the model's tokenizer measures them, its chat template
wraps them when it has one), the model answers by greedy decoding after a fixed answer prefix, and an answer
scores the fraction of the expected strings it contains (case-insensitive): RULER's "all" string match. A task's
score at a length is that fraction's mean over the samples, times 100; the average over tasks at each length
decides the *effective length*: the longest length at which the average, and the average at every shorter
length evaluated, is at or above a threshold (85.6 by default: Llama-2-7B's score at 4K, RULER's reference).

Tasks (RULER's names in brackets):
- `niah_single_noise` [S-NIAH-1]: one needle ("one of the special magic numbers for KEY is: VALUE") in a
  haystack of one repeated noise passage.
- `niah_single_text` [S-NIAH-2]: the same in a haystack of real text (the `haystack` documents).
- `niah_multikey` [MK-NIAH-1]: the needle and three distractor needles with other keys, in real text.
- `niah_multivalue` [MV-NIAH]: four needles with the same key and four values, all four asked for.
- `niah_multiquery` [MQ-NIAH]: four needles with four keys, all four asked for.
- `variable_tracking` [VT]: a chain of five assignments (VAR A = 12345, VAR B = VAR A, ...) in noise; every name
  that holds the value is asked for.
- `common_words` [CWE]: a numbered list of words; ten appear 30 times, the others 3 times; the ten asked for. At
  a length too short for 30 (RULER starts at 4K), the ten appear 20, 10 or 6 times: the most that fits.
- `frequent_words` [FWE]: "coded" nonsense words with Zipf (alpha 2) frequencies; the three most frequent asked.
Keys are two words of the haystack joined by a hyphen, values 7-digit numbers; needles sit at random depths.
The question-answering tasks of RULER (SQuAD, HotpotQA) need those datasets and are not included.
"""

from __future__ import annotations

import functools
import random
import re
import string
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .passkey import greedy_continuation
from .perplexity import check_context_lengths


DEFAULT_THRESHOLD = 85.6
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASKS = (
    "niah_single_noise",
    "niah_single_text",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
)
TEXT_TASKS = ("niah_single_text", "niah_multikey", "niah_multivalue", "niah_multiquery")
"""The tasks whose haystack is real text: they need `haystack` documents."""

NEEDLE_ANSWER_TOKENS = 128
MAX_NEW_TOKENS = {"variable_tracking": 30, "common_words": 120, "frequent_words": 50}
"""Tokens generated per answer (RULER's budgets); the needle tasks get NEEDLE_ANSWER_TOKENS."""

NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)
NEEDLES = 4  # needles of the multi-key (1 asked + 3 distractors), multi-value and multi-query tasks
CHAIN = 5  # variables of the variable-tracking chain (4 hops)
COMMON, COMMON_TIMES, RARE_TIMES = 10, 30, 3
FREQUENT, ZIPF_ALPHA = 3, 2.0


@dataclass(frozen=True)
class RulerSample:
    """One prompt as the model sees it (chat template included; it ends with the answer prefix, which the model
    continues), the strings a correct answer contains, and the generation budget."""

    task: str
    context_length: int
    prompt: str
    answer_prefix: str
    references: tuple[str, ...]
    max_new_tokens: int


def string_match_all(prediction: str, references) -> float:
    """The fraction of `references` found in `prediction`, case-insensitive (RULER's score of one answer)."""
    references = list(references)
    if not references:
        raise ValueError("references is empty: an answer needs at least one expected string.")
    found = sum(reference.lower() in prediction.lower() for reference in references)
    return found / len(references)


def task_score(predictions, references) -> float:
    """100 x the mean of `string_match_all` over paired predictions and reference lists."""
    predictions, references = list(predictions), list(references)
    if not predictions or len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions and {len(references)} reference lists: pair them, one each."
        )
    return 100 * sum(string_match_all(p, r) for p, r in zip(predictions, references)) / len(predictions)


def effective_length(averages: dict[int, float], threshold: float = DEFAULT_THRESHOLD) -> int | None:
    """The longest length whose average, and the average of every shorter length, is at or above `threshold`;
    None when the shortest length is already below it."""
    best = None
    for length in sorted(averages):
        if averages[length] < threshold:
            break
        best = length
    return best


def _use_chat(tokenizer, chat: bool | None) -> bool:
    """Whether prompts go through the chat template: as asked, else when the tokenizer has one."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat


def check_ruler_prompts(tokenizer, context_lengths, tasks, haystack=(), chat: bool | None = None) -> None:
    """Build one prompt of each task at the shortest length: refuses, naming the task, a length too short for it.
    For commands that check before loading a model (the tokenizer alone measures prompts)."""
    chat = _use_chat(tokenizer, chat)
    for task in tasks:
        make_sample(task, tokenizer, min(context_lengths), random.Random(0), list(haystack), chat)


def check_ruler_options(
    tasks, samples: int, threshold: float, haystack, max_new_tokens: int | None = None
) -> list[str]:
    """The tasks as a list, checked with the other options before any prompt is built."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"tasks is empty: choose from {', '.join(TASKS)}.")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"Unknown RULER task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)}.")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer; got {samples!r}.")
    if not 0 <= threshold <= 100:
        raise ValueError(f"threshold is a score in [0, 100]; got {threshold!r}.")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive integer or None; got {max_new_tokens!r}.")
    needs_text = [task for task in tasks if task in TEXT_TASKS]
    if needs_text and not any(text.strip() for text in haystack or []):
        raise ValueError(
            f"Tasks {', '.join(needs_text)} hide needles in real text: pass haystack documents (a list of texts)."
        )
    return tasks


def _sentences(texts) -> list[str]:
    """The haystack documents as sentences (split after '.', '!', '?' followed by whitespace)."""
    found = []
    for text in texts:
        found.extend(part.strip() for part in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if part.strip())
    return found


def word_pool(texts, size: int = 2000) -> list[str]:
    """Distinct lowercase alphabetic words of 4-10 letters in `texts`, in order of first appearance, extended to at
    least `size` words with pronounceable nonsense words (so a long list of rare words never runs out)."""
    seen = dict.fromkeys(word for word in re.findall(r"[a-z]+", " ".join(texts).lower()) if 4 <= len(word) <= 10)
    pool = list(seen)
    rng = random.Random(0)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    while len(pool) < size:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(3 + len(pool) // 100_000))
        if word not in seen:
            seen[word] = None
            pool.append(word)
    return pool


class _Builder:
    """Builds one task's prompt for a length: a body of `units` haystack units with the task's insertions, wrapped
    as the model will see it, the number of units found by bisection so that prompt + answer fit the length."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer = tokenizer
        self.chat = chat

    def wrap(self, text: str, answer_prefix: str) -> str:
        if self.chat:
            messages = [{"role": "user", "content": text}]
            head = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return head + answer_prefix
        return f"{text}\n{answer_prefix}"

    def tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"])

    def fit(self, render, budget: int, most: int, what: str, answer: int) -> str:
        """The prompt `render(units)` with the most units in [0, most] whose tokens stay within `budget`."""
        low, high = 0, most
        shortest = self.tokens(render(0))
        if shortest > budget:
            raise ValueError(
                f"{what}: the shortest prompt of this task takes {shortest} tokens, more than the {budget} tokens the "
                f"length leaves after the answer's {answer}: evaluate lengths of at least {shortest + answer} tokens."
            )
        while low < high:
            middle = (low + high + 1) // 2
            if self.tokens(render(middle)) <= budget:
                low = middle
            else:
                high = middle - 1
        return render(low)


def _insert(units: list[str], insertions: list[str], rng: random.Random) -> list[str]:
    """`units` with each insertion placed at a random depth (between units), insertions kept in their order."""
    places = sorted(rng.randint(0, len(units)) for _ in insertions)
    result, start = [], 0
    for place, insertion in zip(places, insertions):
        result.extend(units[start:place])
        result.append(insertion)
        start = place
    result.extend(units[start:])
    return result


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def make_sample(
    task: str, tokenizer, context_length: int, rng: random.Random, haystack=(), chat: bool = False
) -> RulerSample:
    """One sample of `task` at `context_length` tokens.

    Args:
        task (`str`):
            One of `TASKS`.
        tokenizer:
            The model's tokenizer: it measures the prompt (and wraps it with its chat template when `chat`).
        context_length (`int`):
            Tokens of prompt and answer together.
        rng (`random.Random`):
            The source of keys, values, words and depths.
        haystack (list of `str`):
            Real-text documents, for the text-haystack tasks and the word pool.
        chat (`bool`, defaults to False):
            Wrap the task's text in the tokenizer's chat template.

    Returns:
        `RulerSample`: its prompt takes at most `context_length` minus the task's generation budget tokens.

    Raises:
        `ValueError`: for an unknown task, or a length too short for the task's fixed text.
    """
    builder = _Builder(tokenizer, chat)
    answer = MAX_NEW_TOKENS.get(task, NEEDLE_ANSWER_TOKENS)
    budget = context_length - answer
    # Enough words for the longest list: each rare word of common_words takes at least one token, 3 times.
    words = word_pool(haystack, COMMON + budget // RARE_TIMES)
    sentences = _sentences(haystack) if task in TEXT_TASKS else []

    def key() -> str:
        return f"{rng.choice(words)}-{rng.choice(words)}"

    if task.startswith("niah"):
        keys = [key() for _ in range(NEEDLES)]
        while len(set(keys)) < NEEDLES:
            keys = [key() for _ in range(NEEDLES)]
        values = [str(value) for value in rng.sample(range(1_000_000, 10_000_000), NEEDLES)]
        if task in ("niah_single_noise", "niah_single_text"):
            needles, asked, references = [_needle(keys[0], values[0])], [keys[0]], [values[0]]
        elif task == "niah_multikey":
            needles, asked, references = [_needle(k, v) for k, v in zip(keys, values)], [keys[0]], [values[0]]
        elif task == "niah_multivalue":
            needles, asked, references = [_needle(keys[0], v) for v in values], [keys[0]], values
        else:
            needles, asked, references = [_needle(k, v) for k, v in zip(keys, values)], keys, values
        rng.shuffle(needles)
        start = rng.randrange(len(sentences)) if sentences else 0
        seed = rng.random()

        def units(count: int) -> list[str]:
            if task == "niah_single_noise":
                return [NOISE] * count
            return [sentences[(start + index) % len(sentences)] for index in range(count)]

        plural = len(references) > 1
        question = (
            f"What are all the special magic numbers for {', '.join(asked)} mentioned in the provided text?"
            if plural
            else f"What is the special magic number for {asked[0]} mentioned in the provided text?"
        )
        prefix = (
            f"The special magic numbers for {', '.join(asked)} mentioned in the provided text are"
            if plural
            else f"The special magic number for {asked[0]} mentioned in the provided text is"
        )

        def render(count: int) -> str:
            body = " ".join(_insert(units(count), needles, random.Random(seed)))
            return builder.wrap(f"{NIAH_INTRO}\n{body}\n{question}", prefix)

        most = budget
    elif task == "variable_tracking":
        names = []
        while len(names) < CHAIN:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10_000, 99_999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, CHAIN)]
        references = names
        seed = rng.random()
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = (
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{CHAIN} variables are assigned the value {value}, they are:"
        )

        def render(count: int) -> str:
            body = " ".join(_insert([NOISE] * count, chain, random.Random(seed)))
            intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."
            return builder.wrap(f"{intro}\n\n{body}\n{question}", prefix)

        most = budget
    elif task == "common_words":
        chosen = rng.sample(words, min(len(words), COMMON + budget))
        common, rare = chosen[:COMMON], chosen[COMMON:]
        references = common
        seed = rng.random()
        intro = "Below is a numbered list of words. Memorize the ones that appear most often."
        question = (
            f"What are the {COMMON} most common words in the above list? Answer with the words, one after another."
        )
        prefix = f"Answer: The top {COMMON} words that appear most often in the list are:"

        def render(count: int, times: int = COMMON_TIMES) -> str:
            listed = common * times + rare[:count] * RARE_TIMES
            random.Random(seed).shuffle(listed)
            numbered = " ".join(f"{index + 1}. {word}" for index, word in enumerate(listed))
            return builder.wrap(f"{intro}\n{numbered}\n{question}", prefix)

        # RULER's 30 repetitions of each common word take ~1,000-2,000 tokens: at a length too short for them the
        # common words appear fewer times (still twice the rare words' count), the first of these that fits.
        times = next((t for t in (COMMON_TIMES, 20, 10) if builder.tokens(render(0, t)) <= budget), 2 * RARE_TIMES)
        render = functools.partial(render, times=times)
        most = len(rare)
    elif task == "frequent_words":
        coded, seen = [], set()
        while len(coded) < FREQUENT + 1 + budget:
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
            if word not in seen:
                seen.add(word)
                coded.append(word)
        seed = rng.random()
        references = coded[:FREQUENT]
        question = (
            "What are the three most frequently appearing coded words in the above text? "
            "Answer with the words, one after another."
        )
        prefix = "Answer: According to the coded text above, the three most frequently appearing words are:"
        intro = (
            "Read the following coded text and track how often each coded word appears. "
            "Find the three most frequent ones. Coded text:"
        )

        def render(count: int) -> str:
            # `count` more words than the top three and the fourth; the i-th word appears top // i**alpha times
            # (at least once), top growing with the text. top >= 32 keeps the top three's counts strictly above
            # every other word's.
            used = coded[: FREQUENT + 1 + count]
            top = max(32, len(used) // 2)
            occurrences = [word for i, word in enumerate(used, 1) for _ in range(max(1, int(top // i**ZIPF_ALPHA)))]
            random.Random(seed).shuffle(occurrences)
            return builder.wrap(f"{intro}\n{' '.join(occurrences)}\n{question}", prefix)

        most = len(coded) - FREQUENT - 1
    else:
        raise ValueError(f"Unknown RULER task {task!r}: choose from {', '.join(TASKS)}.")
    return RulerSample(
        task=task,
        context_length=context_length,
        prompt=builder.fit(render, budget, most, f"RULER task {task} at {context_length} tokens", answer),
        answer_prefix=prefix,
        references=tuple(references),
        max_new_tokens=answer,
    )


@torch.no_grad()
def ruler_evaluation(
    model,
    tokenizer,
    context_lengths,
    tasks=TASKS,
    samples: int = 5,
    haystack=(),
    threshold: float = DEFAULT_THRESHOLD,
    chat: bool | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """RULER-style scores of `model` by task and length, their average per length, and the effective length.

    Args:
        model (`transformers.PreTrainedModel`):
            A causal LM; put in evaluation mode for the run, then back in its mode.
        tokenizer:
            Its tokenizer.
        context_lengths:
            The prompt lengths (prompt and answer), in tokens.
        tasks (defaults to `TASKS`):
            The tasks to run.
        samples (`int`, defaults to 5):
            Prompts per task and length.
        haystack (list of `str`):
            Real-text documents for the text-haystack tasks and the word pool.
        threshold (`float`, defaults to 85.6):
            The average score an effective length reaches.
        chat (`bool`, *optional*):
            Wrap prompts in the tokenizer's chat template; by default, when the tokenizer has one.
        max_new_tokens (`int`, *optional*):
            Cap the tokens generated per answer below RULER's budgets (`MAX_NEW_TOKENS`, 128 for the needle
            tasks); generation stops at the end-of-sequence token anyway. The prompts keep their lengths.
        seed (`int`, defaults to 0):
            Seed of every random choice.
        progress (`bool`, defaults to True):
            Show a progress bar.

    Returns:
        `dict`: `scores` ({task: {length: score in [0, 100]}}), `average` ({length: mean over tasks}),
        `effective_length` (or None), `threshold`, `chat`, and `samples` (one record per prompt: task, length,
        prompt tokens, references, `max_new_tokens` (the task's answer budget, which the prompt leaves room for),
        `new_tokens_allowed` (that budget or `max_new_tokens` if lower), prediction, score).

    Raises:
        `ValueError`: for invalid lengths, tasks, samples or threshold, or text tasks without a haystack, before any
            prompt is built.
    """
    context_lengths = check_context_lengths(context_lengths)
    tasks = check_ruler_options(tasks, samples, threshold, haystack, max_new_tokens)
    haystack = list(haystack)
    chat = _use_chat(tokenizer, chat)
    # Every prompt is built before the first generation: a length too short for a task is refused before any work.
    # Each task and length has its own seeded source: a prompt does not depend on which other lengths are asked.
    prompts = {}
    for length in context_lengths:
        for task in tasks:
            rng = random.Random(f"{seed}:{task}:{length}")
            prompts[task, length] = [make_sample(task, tokenizer, length, rng, haystack, chat) for _ in range(samples)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores, records = {}, []
    try:
        for (task, length), built in tqdm(prompts.items(), desc="RULER", disable=not progress):
            predictions, references = [], []
            for sample in built:
                ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=not chat)["input_ids"].to(
                    device
                )
                budget = min(sample.max_new_tokens, max_new_tokens or sample.max_new_tokens)
                prediction = greedy_continuation(model, tokenizer, ids, budget)
                predictions.append(prediction)
                references.append(sample.references)
                record = asdict(sample)
                del record["prompt"]
                record.update(
                    prompt_tokens=ids.shape[1],
                    new_tokens_allowed=budget,  # the task's max_new_tokens (the prompt's room), or the cap if lower
                    prediction=prediction,
                    score=100 * string_match_all(prediction, sample.references),
                )
                records.append(record)
            scores.setdefault(task, {})[length] = task_score(predictions, references)
    finally:
        model.train(was_training)
    average = {length: sum(scores[task][length] for task in tasks) / len(tasks) for length in context_lengths}
    return {
        "scores": scores,
        "average": average,
        "effective_length": effective_length(average, threshold),
        "threshold": threshold,
        "chat": chat,
        "samples": records,
    }
