"""The demo's corpus: the Python 3.11 documentation sources, as Debian's `python3.11-doc` ships them.

Long English prose under the PSF licence (https://docs.python.org/3/license.html). The documents are
split once, deterministically, into pretraining, fine-tuning and held-out evaluation sets, so the
documents the demo evaluates on are never seen in pretraining or fine-tuning.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path


DEFAULT_SOURCE = Path("/usr/share/doc/python3.11/html/_sources")
LONG_DOCUMENT_CHARS = 30_000
EVAL_DOCUMENTS = 12
FINETUNE_DOCUMENTS = 30


def load_documents(source: Path = DEFAULT_SOURCE) -> dict[str, str]:
    """Every `*.rst.txt` under `source`, keyed by its path relative to `source`."""
    source = Path(source)
    files = sorted(source.rglob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(
            f"No documentation sources (*.rst.txt) under {source}. Install them with "
            "`apt-get install python3.11-doc` (Debian/Ubuntu) or pass --source DIR."
        )
    return {str(f.relative_to(source)): f.read_text(encoding="utf-8") for f in files}


def split_documents(documents: dict[str, str]) -> dict[str, list[str]]:
    """Names of the documents in each split. Held-out and fine-tuning documents are long ones,
    chosen by a hash of their name (stable across machines and Python versions)."""
    long = sorted(
        (name for name, text in documents.items() if len(text) >= LONG_DOCUMENT_CHARS),
        key=lambda name: hashlib.sha256(name.encode()).hexdigest(),
    )
    held_out = sorted(long[:EVAL_DOCUMENTS])
    finetune = sorted(long[EVAL_DOCUMENTS : EVAL_DOCUMENTS + FINETUNE_DOCUMENTS])
    taken = set(held_out) | set(finetune)
    return {
        "pretrain": sorted(name for name in documents if name not in taken),
        "finetune": finetune,
        "eval": held_out,
    }


def write_split(path: Path, documents: dict[str, str], names: list[str]) -> None:
    """Write documents as gzipped JSON lines {"name", "text"}."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for name in names:
            f.write(json.dumps({"name": name, "text": documents[name]}) + "\n")


def read_split(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
