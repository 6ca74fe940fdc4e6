"""Perplexity by evaluation context length (LongLoRA's protocol or the strided one), for `evaluate.load`."""

import datasets
import evaluate

from longlora_hf.metrics.perplexity import compute_perplexity


_DESCRIPTION = """Perplexity of a causal LM at each evaluation context length. protocol="longlora": windows of the
evaluation length every `stride` (256) tokens, loss over all tokens of each window, exp(mean loss), as the
LongLoRA reference evaluation; protocol="strided": the usual sliding-window perplexity scoring only new tokens."""

_KWARGS = """Args: model (object or path/id), tokenizer, predictions (texts) or input_ids or token_file (uint16),
context_lengths, protocol, stride, batch_size, adapter (path), beyond_context ('warn'|'error'),
progress (a bar counting windows, with tokens per second).
Returns: perplexities (one per context length), mean_perplexity, by_context_length."""

_CITATION = (
    "@inproceedings{chen2024longlora, "
    "title={LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models},\n"
    "author={Chen, Yukang and Qian, Shengju and Tang, Haotian and Lai, Xin and Liu, Zhijian and "
    "Han, Song and Jia, Jiaya},\n"
    "booktitle={ICLR}, year={2024}}"
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class LongloraPerplexity(evaluate.Metric):
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
        # Token ids and token files need no `predictions`; evaluate's own compute insists on some.
        if predictions is None:
            return self._compute(**kwargs)
        return super().compute(predictions=predictions, **kwargs)

    def _compute(self, predictions=None, model=None, **kwargs):
        return compute_perplexity(model, predictions=list(predictions) if predictions else None, **kwargs)
