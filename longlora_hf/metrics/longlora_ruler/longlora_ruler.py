"""RULER-style long-context scores by task and length, and the effective length, for `evaluate.load`."""

import datasets
import evaluate

from longlora_hf.metrics.ruler import ruler_evaluation


_DESCRIPTION = """RULER-style synthetic tasks (Hsieh et al., 2024): needle-in-a-haystack in noise and in real text
(single, multi-key, multi-value, multi-query), variable tracking, common- and frequent-words extraction. Prompts of
each length in tokens, greedy decoding, RULER's string-match score (0-100), the average per length and the
effective length: the longest length whose average, and every shorter length's, reaches the threshold (85.6)."""

_KWARGS = """Args: model, tokenizer, context_lengths, tasks, samples, haystack (texts), threshold, chat,
max_new_tokens, seed, progress.
Returns: scores {task: {length: score}}, average {length: score}, effective_length, threshold, chat, samples."""

_CITATION = """@article{hsieh2024ruler, title={RULER: What's the Real Context Size of Your Long-Context Language
Models?}, author={Hsieh, Cheng-Ping and Sun, Simeng and Kriman, Samuel and Acharya, Shantanu and Rekesh, Dima and
Jia, Fei and Zhang, Yang and Ginsburg, Boris}, journal={arXiv preprint arXiv:2404.06654}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class LongloraRuler(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute the metric (see the module description)."""
        # The prompts are generated, not given: evaluate's own compute would insist on predictions.
        return self._compute(**kwargs)

    def _compute(self, predictions=None, model=None, tokenizer=None, **kwargs):
        return ruler_evaluation(model, tokenizer, **kwargs)
