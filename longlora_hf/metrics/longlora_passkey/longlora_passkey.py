"""Passkey retrieval accuracy by context length and depth, for `evaluate.load`."""

import datasets
import evaluate

from longlora_hf.metrics.passkey import passkey_retrieval


_DESCRIPTION = """Passkey retrieval (Landmark Attention, LongLoRA): a random 5-digit key hidden at a chosen depth of
filler text; the model must recall it by greedy decoding. Accuracy by context length and depth."""

_KWARGS = """Args: model, tokenizer, context_lengths, depths (fractions in [0, 1]), trials, seed.
Returns: accuracy {context_length: {depth: accuracy}}, trials (each prompt's key, answer, correctness)."""

_CITATION = """@article{mohtashami2023landmark, title={Landmark Attention: Random-Access Infinite Context Length for
Transformers}, author={Mohtashami, Amirkeivan and Jaggi, Martin}, year={2023}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class LongloraPasskey(evaluate.Metric):
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
        # Passkey prompts are generated, not given: evaluate's own compute would insist on predictions.
        return self._compute(**kwargs)

    def _compute(self, predictions=None, model=None, tokenizer=None, **kwargs):
        return passkey_retrieval(model, tokenizer, **kwargs)
