"""Long-context evaluation: perplexity by context length, passkey retrieval and RULER, as `evaluate` modules.

import evaluate, longlora_hf
ppl = evaluate.load(longlora_hf.metrics.PERPLEXITY)   # a local module: works offline
key = evaluate.load(longlora_hf.metrics.PASSKEY)
ruler = evaluate.load(longlora_hf.metrics.RULER)
"""

from pathlib import Path

from .passkey import passkey_prompt, passkey_retrieval
from .perplexity import compute_perplexity, longlora_window_starts
from .ruler import effective_length, ruler_evaluation, string_match_all


PERPLEXITY = str(Path(__file__).parent / "longlora_perplexity")
PASSKEY = str(Path(__file__).parent / "longlora_passkey")
RULER = str(Path(__file__).parent / "longlora_ruler")

__all__ = [
    "PASSKEY",
    "PERPLEXITY",
    "RULER",
    "compute_perplexity",
    "effective_length",
    "longlora_window_starts",
    "passkey_prompt",
    "passkey_retrieval",
    "ruler_evaluation",
    "string_match_all",
]
