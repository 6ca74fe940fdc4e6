"""`longlora-hf eval`: perplexity by context length, passkey retrieval and RULER for a model (and adapter)."""

from __future__ import annotations

from pathlib import Path

from ..flags import add_flag
from ..paths import check_input_file
from .perplexity import BEYOND_CONTEXT, PROTOCOLS
from .ruler import DEFAULT_THRESHOLD, TASKS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="Perplexity by context length, passkey retrieval and RULER; tables, JSON, PNG."
    )
    parser.add_argument(
        "--model",
        required=True,
        action="append",
        help=(
            "Model path or Hub id (safetensors, no remote code). Repeat to compare models: one line each in the plot."
        ),
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="A LongLoRA or LoRA adapter for the model at the same position; use 'none' for a model without one.",
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="Texts: .txt (one document), .json/.jsonl (records with a 'text' field), or .bin (uint16 token ids).",
    )
    parser.add_argument(
        "--lengths", required=True, type=int, nargs="+", help="Evaluation context lengths, e.g. 2048 4096 8192."
    )
    parser.add_argument("--protocol", default="longlora", choices=PROTOCOLS)
    parser.add_argument("--stride", type=int, default=256)
    add_flag(parser, "--batch_size", type=int, default=1)
    add_flag(
        parser,
        "--beyond_context",
        default="warn",
        choices=BEYOND_CONTEXT,
        help="Lengths beyond the model's context: warn or refuse.",
    )
    add_flag(
        parser,
        "--passkey_depths",
        type=float,
        nargs="*",
        default=[],
        help="Also run passkey retrieval at these depths (fractions in [0, 1]).",
    )
    add_flag(parser, "--passkey_trials", type=int, default=5)
    parser.add_argument(
        "--ruler",
        action="store_true",
        help="Also run the RULER-style tasks: accuracy per task and length, and the effective length.",
    )
    parser.add_argument(
        "--ruler_lengths",
        type=int,
        nargs="+",
        help="RULER prompt lengths in tokens (default: --lengths).",
    )
    parser.add_argument("--ruler_tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK")
    parser.add_argument("--ruler_samples", type=int, default=5, help="Prompts per RULER task and length.")
    parser.add_argument(
        "--ruler_threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="The average score (0-100) an effective length reaches (RULER's 85.6: Llama-2-7B at 4K).",
    )
    parser.add_argument(
        "--ruler_max_new_tokens",
        type=int,
        help="Cap the tokens generated per RULER answer (default: RULER's budgets, 128 for the needle tasks).",
    )
    parser.add_argument(
        "--ruler_haystack",
        type=Path,
        help="Texts for the real-text haystacks (.txt/.json/.jsonl as --data; default: the --data texts).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("eval_results"),
        help="Directory for results.json and the plots (replaced as a whole when an earlier eval wrote it).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace what eval writes in an --out that holds files it did not write (the others are kept).",
    )
    parser.set_defaults(run=run_eval)


def read_texts(path: Path, flag: str = "--data") -> list[str]:
    """Documents from a .txt file (one document), or .json/.jsonl records with a 'text' field."""
    from ..training.formatting import read_records

    check_input_file(path, flag)
    if path.suffix in (".json", ".jsonl"):
        records = read_records(path)
        for index, record in enumerate(records):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{flag} {path} record {index}: expected a JSON object with a 'text' string field.")
        return [record["text"] for record in records]
    raw = path.read_bytes()
    try:
        return [raw.decode("utf-8")]
    except UnicodeDecodeError as error:
        raise ValueError(f"{flag} {path} is not UTF-8 text (byte {error.start}); convert it to UTF-8.") from error


def check_adapter_against_config(model: str, adapter: str) -> None:
    """A local adapter checked against its local model's architecture, built from config.json on the meta device
    (no weights read), so that an adapter made for another base is refused before any model is evaluated."""
    if not (Path(model).expanduser().is_dir() and Path(adapter).expanduser().is_dir()):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..tuner import check_adapter_fits

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    check_adapter_fits(skeleton, adapter, "--adapter")


def ruler_haystack(args) -> list[str]:
    """The documents RULER's real-text haystacks are cut from: --ruler_haystack, else the --data texts."""
    if args.ruler_haystack is not None:
        return read_texts(args.ruler_haystack, "--ruler_haystack")
    if args.data.suffix == ".bin":
        raise ValueError(
            f"--ruler needs texts for its haystacks and --data {args.data} holds token ids: pass --ruler_haystack "
            "FILE (.txt, .json or .jsonl)."
        )
    return read_texts(args.data)


def run_eval(args) -> int:
    """Everything is checked before a model is loaded: the options, the models and adapters, --out, the data
    (read once for every model). --out is written by the rule of `longlora_hf.paths`."""
    from ..paths import check_model_source, check_output_directory, output_directory
    from .passkey import check_passkey_options
    from .perplexity import check_context_lengths, check_perplexity_options
    from .ruler import check_ruler_options, check_ruler_prompts

    adapters = args.adapter or ["none"] * len(args.model)
    if len(adapters) != len(args.model):
        raise ValueError(
            f"Got {len(args.model)} --model and {len(adapters)} --adapter: give one --adapter per --model "
            "(use --adapter none for a model without one), or none at all."
        )
    check_perplexity_options(args.protocol, args.stride, args.batch_size, args.beyond_context)
    check_context_lengths(args.lengths)
    if args.passkey_depths:
        check_passkey_options(args.passkey_depths, args.passkey_trials)
    haystack = None
    if args.ruler:
        haystack = ruler_haystack(args)
        check_context_lengths(args.ruler_lengths or args.lengths)
        check_ruler_options(
            args.ruler_tasks, args.ruler_samples, args.ruler_threshold, haystack, args.ruler_max_new_tokens
        )
    for path, adapter in zip(args.model, adapters):
        check_model_source(path, "--model", "model")
        if adapter != "none":
            check_model_source(adapter, "--adapter", "adapter")
            check_adapter_against_config(path, adapter)
    if args.ruler:  # the tokenizer alone measures the prompts: a length too short for a task, before any model
        from transformers import AutoTokenizer

        for path in dict.fromkeys(path for path in args.model if Path(path).expanduser().is_dir()):
            tokenizer = AutoTokenizer.from_pretrained(path)
            check_ruler_prompts(tokenizer, args.ruler_lengths or args.lengths, args.ruler_tasks, haystack)
    inputs = {"--model": args.model, "--adapter": [a for a in adapters if a != "none"], "--data": args.data}
    if args.ruler_haystack is not None:
        inputs["--ruler_haystack"] = args.ruler_haystack
    check_output_directory(args.out, "--out", inputs, args.overwrite)
    data = (
        {"token_file": check_input_file(args.data, "--data")}
        if args.data.suffix == ".bin"
        else {"predictions": read_texts(args.data)}
    )
    with output_directory(args.out, "--out", inputs, args.overwrite) as partial:
        written = evaluate_models(args, adapters, data, partial, haystack)
    print(written)
    return 0


def evaluate_models(args, adapters: list[str], data: dict, out: Path, haystack: list[str] | None = None) -> str:
    """Evaluate each model (and adapter) of `args`, print the tables, write results.json and the plots in `out`;
    returns the line that says what was written (under the final --out)."""
    from .passkey import passkey_retrieval
    from .perplexity import compute_perplexity, load_model_and_tokenizer
    from .report import (
        NO_PLOTS,
        context_length_table,
        plot_passkey,
        plot_perplexity,
        plot_ruler,
        plots_available,
        regression_lines,
        ruler_table,
        write_json,
    )
    from .ruler import ruler_evaluation

    rows, reports = {}, []
    for index, (path, adapter) in enumerate(zip(args.model, adapters)):
        adapter = None if adapter == "none" else adapter
        model, tokenizer = load_model_and_tokenizer(path, adapter=adapter)
        result = compute_perplexity(
            model,
            tokenizer,
            context_lengths=args.lengths,
            protocol=args.protocol,
            stride=args.stride,
            batch_size=args.batch_size,
            beyond_context=args.beyond_context,
            **data,
        )
        name = path if adapter is None else f"{path} + {adapter}"
        rows[name] = {length: row["perplexity"] for length, row in result["by_context_length"].items()}
        report = {"model": path, "adapter": adapter, "name": name, "perplexity": result}
        if args.passkey_depths:
            passkey = passkey_retrieval(
                model, tokenizer, args.lengths, args.passkey_depths, args.passkey_trials, args.seed
            )
            report["passkey"] = passkey
            if plots_available():
                plot_passkey(passkey["accuracy"], out / f"passkey_{index}.png", title=f"passkey retrieval: {name}")
            print(f"passkey accuracy of {name} (rows: depth, columns: context length)")
            for depth in args.passkey_depths:
                print(
                    f"{depth:>6.2f}"
                    + "".join(f"{passkey['accuracy'][length][depth]:>10.2f}" for length in args.lengths)
                )
        if args.ruler:
            report["ruler"] = ruler_evaluation(
                model,
                tokenizer,
                args.ruler_lengths or args.lengths,
                tasks=args.ruler_tasks,
                samples=args.ruler_samples,
                haystack=haystack,
                threshold=args.ruler_threshold,
                max_new_tokens=args.ruler_max_new_tokens,
                seed=args.seed,
            )
            print(f"RULER of {name} (score 0-100, {args.ruler_samples} prompts per task and length)")
            print(ruler_table(report["ruler"]))
            if plots_available():
                plot_ruler(report["ruler"], out / f"ruler_{index}.png", title=f"RULER: {name}")
        reports.append(report)
    print(f"perplexity ({args.protocol} protocol, stride {args.stride})")
    print(context_length_table(rows))
    for line in regression_lines(reports):
        print(line)
    write_json({"models": reports}, out / "results.json")
    if plots_available():
        plot_perplexity(rows, out / "perplexity.png")
        return f"wrote {args.out / 'results.json'} and PNG plots in {args.out}"
    return f"wrote {args.out / 'results.json'}; {NO_PLOTS}"
