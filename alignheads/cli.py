"""The `alignheads` command line: run, world, query, merge, generate.

Every verb takes `--config F` and `--set key=value` (repeatable), so `--set store=DIR`
points any verb at a store, and `--verbose`.

Errors that are the user's to fix (`alignheads.errors.USER_ERRORS`: a bad row, a bad config, a
mismatched head or cache, a store that cannot be written, a missing file) end the command with
one line, `error: <message>`; for `run`, Prefect's own line with the flow run's final state
comes before it, and the tracebacks Prefect's task and flow engines log for such an error are
kept off the terminal (the Prefect API, and so the UI, still receives them). `--verbose` shows
every traceback. Any other exception is a bug, and its traceback is always shown.

Why about 540 lines: one argparse tree for every verb keeps the help texts and the shared
options (`--config`, `--set`, `--verbose`) in one place; each verb's work is a call into the
package. How errors reach the terminal (the console filter below) is the command line's concern
too, so it lives here and not in the flows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from alignheads.config import ConfigError, RunConfig, load_config


def _prefect_defaults() -> None:
    """Offline-friendly Prefect settings, unless the user set them."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


# The loggers Prefect's task and flow engines log a run's failure to, with the traceback
# ("Task run failed with exception: …", "Encountered exception during execution: …").
_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class QuietUserErrors(logging.Filter):
    """A console handler's filter that drops, for user errors only, what Prefect logs on
    `prefect.task_runs` / `prefect.flow_runs` about a failed run beyond its final state.

    Dropped: a record carrying a user error's traceback (`exc_info`), and the "Finished in state
    Failed(…)" line of a *task* run that failed with one (it repeats the message). Kept: every
    other record, the flow run's final-state line, and everything about other exceptions.
    """

    def __init__(self, errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.errors = errors
        self.failed_task_runs: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name not in _RUN_LOGGERS:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        task_run = getattr(record, "task_run_id", None) if record.name == "prefect.task_runs" else None
        if exc is not None and isinstance(exc, self.errors):
            if task_run is not None:
                self.failed_task_runs.add(str(task_run))
            return False
        if task_run is not None and str(task_run) in self.failed_task_runs:
            return not str(record.msg).startswith("Finished in state")
        return True


@contextlib.contextmanager
def quiet_user_errors_on_console() -> Iterator[QuietUserErrors]:
    """Install `QuietUserErrors` on the console handlers Prefect logs run records through (the root
    logger's and those of the run loggers and their parents), for the duration; Prefect's logging
    is otherwise left as it is, and its API handler (the UI's logs) is not touched."""
    from prefect.logging.configuration import ensure_logging_setup

    from alignheads.errors import USER_ERRORS

    ensure_logging_setup()  # the handlers to filter exist once Prefect configured its logging
    quiet = QuietUserErrors(USER_ERRORS)
    handlers: list[logging.Handler] = []
    for name in (*_RUN_LOGGERS, "prefect", ""):
        for handler in logging.getLogger(name).handlers:
            is_console = isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            )
            if is_console and handler not in handlers:
                handlers.append(handler)
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield quiet
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", type=Path, default=None, help="run config YAML (default: configs/tiny.yaml)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set tokenize.max_prompt_length=256 (repeatable)",
    )
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        default=argparse.SUPPRESS,  # keeps `alignheads --verbose VERB` when not repeated here
        help="show full tracebacks, also for errors in the input or the config",
    )


def _config(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def cmd_run(args: argparse.Namespace) -> int:
    _prefect_defaults()
    from alignheads.flows.pipeline import pipeline
    from alignheads.tasks.reporting.printing import print_run_summary

    cfg = _config(args)
    verbose = getattr(args, "verbose", False)
    quiet = contextlib.nullcontext() if verbose else quiet_user_errors_on_console()
    with quiet:
        outcomes = pipeline(config=cfg)
    print_run_summary(cfg, outcomes)
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from alignheads.tasks.world import run_world
    from alignheads.world.build import format_report

    cfg = _config(args)
    result = run_world(cfg.store, cfg.world)
    print(format_report(result.manifest.info))
    state = "built" if result.computed else "already in the store, reused"
    print(f"world {result.key}: {state}\n  model + tokenizer: {result.path / 'model'}")
    print(f"  pairs: {result.path / 'train.jsonl'}, {result.path / 'test.jsonl'}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from alignheads.storage.query import run_query
    from alignheads.tasks.reporting.printing import print_arrow_table

    cfg = _config(args)
    table = run_query(cfg.store, args.sql)
    if args.format == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(table.column_names)
        for row in table.to_pylist():
            writer.writerow(["" if v is None else v for v in row.values()])
    elif args.format == "json":
        for row in table.to_pylist():
            print(json.dumps(row, default=str, ensure_ascii=False))
    else:
        print_arrow_table(table, max_rows=args.max_rows)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from alignheads.models.merge import merge_iav

    cfg = _config(args)
    try:
        out = merge_iav(
            args.heads,
            args.alpha,
            args.out,
            base_model=args.base,
            dtype=args.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            ignore_base_id=args.ignore_base_id,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:  # wrong head type, mismatched base, output taken
        return _user_error(exc, getattr(args, "verbose", False), 1)
    print(f"merged IAV head at alpha={args.alpha:g} into a plain Hugging Face checkpoint: {out}")
    print(f"  load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _newest_head(store: Path, kind: str | None) -> Path:
    """The head directory of the newest trained head (of `kind`, when given) in the store."""
    from alignheads.storage.artifacts import list_artifacts
    from alignheads.storage.manifest import read_manifest

    found = []
    for directory in list_artifacts(store, "train"):
        manifest = read_manifest(directory)
        if (kind is None or manifest.info.get("kind") == kind) and (directory / "head").is_dir():
            found.append((manifest.created_at, directory / "head"))
    if not found:
        what = f"{kind} head" if kind else "head"
        raise FileNotFoundError(
            f"no trained {what} in {Path(store) / 'train'}; run the pipeline or pass --heads DIR"
        )
    return max(found)[1]


def _decoding(args: argparse.Namespace, cfg: RunConfig) -> dict:
    """Hugging Face generate options from the flags, defaulting to the config's sweep settings."""
    sweep = cfg.sweep
    settings = {"max_new_tokens": args.max_new_tokens or sweep.max_new_tokens}
    if args.greedy or not sweep.do_sample:
        settings["do_sample"] = False
    else:
        top_p = args.top_p if args.top_p is not None else sweep.top_p
        temperature = args.temperature if args.temperature is not None else sweep.temperature
        settings |= {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    return settings


def _print_pair(base: str, aligned: str, head_type: str, alpha: float) -> None:
    print("--- base (plain LM) ---")
    print(base)
    print(f"--- aligned ({head_type} head, alpha={alpha:g}) ---")
    print(aligned)


def _interactive(aligned, tokenizer, args, settings: dict, seed: int) -> int:
    """Prompt loop on stdin: commands `:alpha X`, `:compare`, `:info`, `:help`, `:q` (also without
    the colon); any other line is a prompt. Aligned responses stream token by token."""
    from transformers import TextStreamer

    from alignheads import inference

    class _Streamer(TextStreamer):
        """Prints tokens as they come, without the response's leading whitespace."""

        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            super().on_finalized_text(text, stream_end)

    alpha, compare = args.alpha, args.compare
    head_type = aligned.head.head_type
    help_text = "commands: :alpha X (set alpha), :compare (toggle base comparison), :info, :help, :q (quit)"
    print(f"alignheads generate: {head_type} head, alpha={alpha:g}. {help_text}", flush=True)
    while True:
        try:
            line = input(f"[alpha={alpha:g}]> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        words = text.removeprefix(":").split()
        command = words[0].lower()
        if command in ("q", "quit", "exit") and len(words) == 1:
            return 0
        if command == "alpha" and len(words) == 2:
            try:
                alpha = float(words[1])
            except ValueError:
                print(f"not a number: {words[1]!r}", flush=True)
                continue
            print(f"alpha = {alpha:g}", flush=True)
            continue
        if command == "compare" and len(words) == 1:
            compare = not compare
            print(f"compare with base: {'on' if compare else 'off'}", flush=True)
            continue
        if command == "info" and len(words) == 1:
            info = inference.head_info(aligned) | {"alpha": alpha, "compare": compare, "decoding": settings}
            print(json.dumps(info, default=str), flush=True)
            continue
        if command == "help" and len(words) == 1:
            print(help_text, flush=True)
            continue
        if text.startswith(":"):
            print(f"unknown command {text!r}; {help_text}", flush=True)
            continue
        prompt = inference.format_prompt(tokenizer, line, raw=args.raw)
        if compare:
            base = inference.generate_base(aligned, tokenizer, [prompt], seed=seed, **settings)[0]
            print("--- base (plain LM) ---")
            print(base, flush=True)
            print(f"--- aligned ({head_type} head, alpha={alpha:g}) ---", flush=True)
        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        _, info = _responses(
            aligned, tokenizer, [prompt], alpha, seed, args.steering_info, streamer=streamer, **settings
        )
        if args.steering_info:
            print("steering: " + json.dumps(info[0]), flush=True)
        sys.stdout.flush()


def _responses(aligned, tokenizer, texts: list[str], alpha: float, seed: int, steering: bool, **settings):
    """(responses, per-response steering statistics or None) at ``alpha``; the responses are the
    same with or without the statistics (recording reads the logits, it does not change them)."""
    from alignheads import inference

    if not steering:
        return inference.generate(aligned, tokenizer, texts, alpha, seed=seed, **settings), [None] * len(
            texts
        )
    rows = inference.generate_with_steering_info(aligned, tokenizer, texts, alpha, seed=seed, **settings)
    return [r["response"] for r in rows], [r["steering"] for r in rows]


def cmd_generate(args: argparse.Namespace) -> int:
    from alignheads import inference
    from alignheads.tasks.prompts import load_prompts_file
    from alignheads.tasks.sampling import batch_seed

    cfg = _config(args)
    if args.prompt is None and not args.interactive and args.prompts_file is None:
        print("error: give a prompt, --interactive or --prompts-file F", file=sys.stderr)
        return 2
    prompts = []
    if args.prompts_file is not None:
        try:
            prompts = load_prompts_file(args.prompts_file)
        except ValueError as exc:  # malformed rows, no prompts
            return _user_error(exc, getattr(args, "verbose", False), 1)
    heads = args.heads if args.heads is not None else _newest_head(cfg.store, args.head)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    aligned, tokenizer = inference.load_for_generation(
        heads,
        base=args.base,
        device=args.device,
        ignore_base_id=args.ignore_base_id,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    settings = _decoding(args, cfg)
    seed = args.seed if args.seed is not None else cfg.sweep.seed
    head_type = aligned.head.head_type
    print(f"head: {heads} ({head_type})", file=sys.stderr)

    if args.interactive:
        return _interactive(aligned, tokenizer, args, settings, seed)

    if args.prompts_file is not None:
        rows = []
        bs = args.batch_size or cfg.sweep.batch_size
        for index, start in enumerate(range(0, len(prompts), bs)):
            chunk = prompts[start : start + bs]
            texts = [inference.format_prompt(tokenizer, t, raw=args.raw) for _, t in chunk]
            batch = batch_seed(seed, 0, index)
            out, info = _responses(
                aligned, tokenizer, texts, args.alpha, batch, args.steering_info, **settings
            )
            base = (
                inference.generate_base(aligned, tokenizer, texts, seed=batch, **settings)
                if args.compare
                else [None] * len(chunk)
            )
            for (pid, text), response, b, steering in zip(chunk, out, base, info, strict=True):
                row = {
                    "id": pid,
                    "prompt": text,
                    "head": head_type,
                    "alpha": args.alpha,
                    "response": response,
                }
                if args.compare:
                    row["base"] = b
                if args.steering_info:
                    row["steering"] = steering
                rows.append(row)
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        if args.output is None:
            print("\n".join(lines))
        else:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            if args.output.suffix.lower() == ".json":
                args.output.write_text(
                    json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
                )
            else:
                args.output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            print(f"wrote {len(rows)} responses to {args.output}", file=sys.stderr)
        return 0

    prompt = inference.format_prompt(tokenizer, args.prompt, raw=args.raw)
    out, info = _responses(aligned, tokenizer, [prompt], args.alpha, seed, args.steering_info, **settings)
    response = out[0]
    if args.compare:
        base = inference.generate_base(aligned, tokenizer, [prompt], seed=seed, **settings)[0]
        print(f"prompt: {args.prompt}")
        _print_pair(base, response, head_type, args.alpha)
    else:
        print(response)
    if args.steering_info:
        print("steering: " + json.dumps(info[0]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignheads",
        description="Test-time alignment of a frozen causal LM with IAV and CALM logit heads.",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show full tracebacks, also for errors in the input or the config",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("run", help="run the pipeline flow on a config", description="Run the pipeline flow.")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "world",
        help="build the embedded default world (tokenizer, tiny LM, pairs, reward)",
        description="Build (or reuse) the tiny world in the store and print its build report.",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser(
        "query",
        help="read-only SQL (DuckDB) over the store's tables",
        description="Run a read-only DuckDB query over the store's views: "
        "pairs, rejects, tokenized, refcache, generations, scores, summary.",
    )
    p.add_argument("sql", help='e.g. "SELECT split, count(*) FROM pairs GROUP BY split"')
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown in table format")
    _add_config_args(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser(
        "merge",
        help="fold a trained IAV head into a plain Hugging Face checkpoint at one alpha",
        description="Write a plain Hugging Face checkpoint (model + tokenizer) whose lm_head is "
        "W_b + alpha * W_a; it decodes at exactly the base model's cost in any engine.",
    )
    p.add_argument("--heads", type=Path, required=True, help="trained IAV head directory (head_config.json)")
    p.add_argument("--alpha", type=float, required=True, help="alignment strength to bake in")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument(
        "--base", default=None, help="base model id or directory (default: the one the head records)"
    )
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="export dtype")
    p.add_argument(
        "--ignore-base-id", action="store_true", help="accept a base whose id differs from the head's"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_config_args(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "generate",
        help="generate with a trained head (one prompt, --interactive, --compare, --prompts-file)",
        description="Generate with a trained IAV or CALM head on its base model. Plain prompt text is "
        "wrapped in the tokenizer's chat template (unless --raw); decoding defaults come from the "
        "config's sweep section.",
    )
    p.add_argument("prompt", nargs="?", default=None, help="a single prompt")
    p.add_argument("--heads", type=Path, default=None, help="trained head directory (head_config.json)")
    p.add_argument(
        "--head",
        choices=("iav", "calm"),
        default=None,
        help="without --heads: use the newest trained head of this kind in the store",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="alignment strength (default 1.0)")
    p.add_argument("--interactive", "-i", action="store_true", help="prompt loop on stdin (:alpha X, :q)")
    p.add_argument("--compare", action="store_true", help="also show the plain base model's response")
    p.add_argument("--prompts-file", type=Path, default=None, help="prompts: .txt, .jsonl or .json")
    p.add_argument(
        "--output", "-o", type=Path, default=None, help="with --prompts-file: JSONL (or .json) output file"
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: sweep.max_new_tokens")
    p.add_argument("--temperature", type=float, default=None, help="default: sweep.temperature")
    p.add_argument("--top-p", type=float, default=None, help="default: sweep.top_p")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=None, help="default: sweep.seed")
    p.add_argument(
        "--batch-size", type=int, default=None, help="prompts per batch (default: sweep.batch_size)"
    )
    p.add_argument(
        "--steering-info",
        action="store_true",
        help="also report what the head did per response (KL to base; CALM strength, IAV alignment norm)",
    )
    p.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    p.add_argument("--base", default=None, help="base model id or directory (default: the head's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--ignore-base-id", action="store_true", help="accept a base whose id differs from the head's"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_generate)
    return parser


def _user_error(exc: BaseException, verbose: bool, code: int) -> int:
    """Report an error the user must fix: its traceback first with --verbose, then one line."""
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {exc}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except ConfigError as exc:
        return _user_error(exc, verbose, 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from alignheads.errors import USER_ERRORS

        if isinstance(exc, USER_ERRORS):
            return _user_error(exc, verbose, 1)
        raise


if __name__ == "__main__":
    sys.exit(main())
