"""Long-context evaluation: perplexity by context length and passkey retrieval, as `evaluate` modules.

import evaluate, longlora_hf
ppl = evaluate.load(longlora_hf.metrics.PERPLEXITY)   # a local module: works offline
key = evaluate.load(longlora_hf.metrics.PASSKEY)
"""

from pathlib import Path

from .passkey import passkey_prompt, passkey_retrieval
from .perplexity import compute_perplexity, longlora_window_starts


PERPLEXITY = str(Path(__file__).parent / "longlora_perplexity")
PASSKEY = str(Path(__file__).parent / "longlora_passkey")

__all__ = [
    "PASSKEY",
    "PERPLEXITY",
    "compute_perplexity",
    "longlora_window_starts",
    "passkey_prompt",
    "passkey_retrieval",
]
