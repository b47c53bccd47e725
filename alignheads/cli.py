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
import math
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from alignheads.config import ConfigError, RunConfig, load_config
from alignheads.models.methods import METHODS


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
    if args.tuned is not None:  # the search's best trials: the pipeline reuses their trainings
        from alignheads.flows.tuned import find_search, tuned_line, with_tuned

        search = find_search(cfg.store, args.tuned)  # "latest" resolved once, for both
        cfg = with_tuned(cfg, str(search))
        print(tuned_line(search))
    verbose = getattr(args, "verbose", False)
    quiet = contextlib.nullcontext() if verbose else quiet_user_errors_on_console()
    with quiet:
        outcomes = pipeline(config=cfg)  # the flow silences transformers' own progress bars
    print_run_summary(cfg, outcomes)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    _prefect_defaults()
    from alignheads.config import load_search_space, space_trials
    from alignheads.flows.tune import trials_table, tune

    cfg = _config(args)
    space = load_search_space(args.space)
    space_trials(space)  # a space that gives methods unequal trials fails before any flow run
    verbose = getattr(args, "verbose", False)
    quiet = contextlib.nullcontext() if verbose else quiet_user_errors_on_console()
    with quiet:
        outcome = tune(space=space, config=cfg)
    print(trials_table(outcome))
    if outcome.search is not None:
        key = outcome.search.key
        print(f"search: {outcome.search.path} (run with its best trials: alignheads run --tuned {key})")
    if outcome.mlflow_run:
        print(f"MLflow: parent run {outcome.mlflow_run} (experiment {cfg.name}), one child run per trial")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from alignheads.loading import library_progress_bars_off
    from alignheads.tasks.world import run_world
    from alignheads.world.build import format_report

    cfg = _config(args)
    with library_progress_bars_off():
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
        shown = table if args.full_precision else rounded_table(table, SIGNIFICANT_DIGITS)
        print_arrow_table(shown, max_rows=args.max_rows)
    return 0


# Digits `query --format table` shows of a float (`--full-precision` shows every digit).
SIGNIFICANT_DIGITS = 4


def round_float(value: float, digits: int = SIGNIFICANT_DIGITS) -> str:
    """``value`` to ``digits`` significant digits (0.3333, 8.6, 0.00304, 1.5e-07); a number of
    ``10**digits`` or more shows its whole integer part instead (123457), never an exponent."""
    if math.isfinite(value) and 10**digits <= abs(value) < 1e16:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def rounded_table(table, digits: int = SIGNIFICANT_DIGITS):
    """The Arrow table with every float (also inside lists and structs) as its rounded text;
    other values, and NULLs, as they were."""
    import pyarrow as pa

    def has_float(t: pa.DataType) -> bool:
        if pa.types.is_floating(t):
            return True
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return has_float(t.value_type)
        if pa.types.is_struct(t):
            return any(has_float(t.field(i).type) for i in range(t.num_fields))
        return False

    def text(v):
        if isinstance(v, float):
            return round_float(v, digits)
        if isinstance(v, list):
            return "[" + ", ".join("NULL" if x is None else text(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k!r}: {'NULL' if x is None else text(x)}" for k, x in v.items()) + "}"
        return str(v)

    columns = [
        pa.array([None if v is None else text(v) for v in column.to_pylist()], pa.string())
        if has_float(column.type)
        else column
        for column in table.columns
    ]
    return pa.Table.from_arrays(columns, names=table.column_names) if columns else table


def cmd_merge(args: argparse.Namespace) -> int:
    from alignheads.loading import library_progress_bars_off
    from alignheads.models.merge import merge_iav
    from alignheads.storage.atomic import follow_umask

    cfg = _config(args)
    if args.dials is not None or args.dial:
        return _merge_dials(args, cfg)
    if args.alpha is None:
        print("error: give --alpha A (or --dial NAME=A for dials)", file=sys.stderr)
        return 2
    if args.heads is None and args.head is None:
        print("error: give --heads DIR or --head iav (the newest IAV head in the store)", file=sys.stderr)
        return 2
    heads = args.heads if args.heads is not None else _newest_head(cfg.store, args.head)
    if args.out.exists() and not args.overwrite:
        print(
            f"error: {args.out} exists; choose another --out, or pass --overwrite to replace it",
            file=sys.stderr,
        )
        return 1
    try:
        with library_progress_bars_off():
            out = merge_iav(
                heads,
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
    follow_umask(out)  # readable like transformers' own files (safetensors writes 0600, mkdtemp 0700)
    print(f"merged IAV head at alpha={args.alpha:g} into a plain Hugging Face checkpoint: {out}")
    print(f"  load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    if args.mlflow:
        from alignheads.flows.tracking import log_merged_checkpoint

        done = log_merged_checkpoint(cfg, out, args.alpha, heads)
        print(f"  logged with mlflow.transformers: models:/{done.name}/{done.version} (alias newest)")
    return 0


def _merge_dials(args: argparse.Namespace, cfg: RunConfig) -> int:
    """`merge --dial NAME=A ...`: a dial set's IAV dials folded into one plain checkpoint at that α
    vector (`models.merge.merge_iav_dial_set`)."""
    from alignheads.loading import library_progress_bars_off
    from alignheads.models.merge import merge_iav_dial_set
    from alignheads.tasks.dial_set import find_dial_set, parse_dial_items, read_dial_set, vector_label

    if args.heads is not None or args.head is not None or args.alpha is not None:
        print(
            "error: give either dials (--dials / --dial NAME=A) or one head (--heads / --head, --alpha)",
            file=sys.stderr,
        )
        return 2
    try:
        alpha = parse_dial_items(args.dial)
        rows = read_dial_set(find_dial_set(args.dials if args.dials is not None else cfg.store))
        heads = {r["name"]: Path(r["train_path"]) / "head" for r in rows}
        with library_progress_bars_off():
            out = merge_iav_dial_set(
                heads, alpha, args.out, base_model=args.base, dtype=args.dtype,
                trust_remote_code=cfg.model.trust_remote_code, ignore_base_id=args.ignore_base_id,
                overwrite=args.overwrite,
            )  # fmt: skip
    except (ValueError, FileExistsError) as exc:  # a CALM dial, an unknown dial, output taken
        return _user_error(exc, getattr(args, "verbose", False), 1)
    label = vector_label({name: alpha.get(name, 0.0) for name in heads})
    print(f"merged IAV dials {', '.join(heads)} at {label} into a plain Hugging Face checkpoint: {out}")
    print(f"  load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        return _export(args, _config(args))
    except (ValueError, FileExistsError) as exc:  # CALM or a trained W_b for peft, output taken, bad key
        return _user_error(exc, getattr(args, "verbose", False), 1)


def _export(args: argparse.Namespace, cfg: RunConfig) -> int:
    from alignheads.tasks import export

    if args.format == "trl":
        done = export.export_trl(
            cfg.store, args.out, refpass_key=args.refpass, skip_truncated=args.skip_truncated,
            overwrite=args.overwrite,
        )  # fmt: skip
        print(f"wrote refpass {done.refpass_key} as TRL preference pairs: {done.rows} rows")
        files = {split: str(path) for split, path in done.files.items()}
        print(f"  load: datasets.load_dataset('parquet', data_files={files})")
        return 0
    heads = args.heads if args.heads is not None else _newest_head(cfg.store, "iav")
    rank = None if args.rank == "full" else int(args.rank)
    done = export.export_peft(
        heads, args.out, rank=rank, alpha=args.alpha, base_model=args.base,
        ignore_base_id=args.ignore_base_id, trust_remote_code=cfg.model.trust_remote_code,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(
        f"wrote {heads} as a LoRA adapter on {done.target_module}: rank {done.rank} of {done.full_rank}, "
        f"relative error of W_a {done.relative_error:.3g}, scaling lora_alpha/r = alpha = {done.alpha:g}"
    )
    print(f"  load: PeftModel.from_pretrained(base_model, {str(done.out)!r})")
    return 0


# The methods `generate --head` serves, and where each keeps its result (the registry's entries
# can be read without torch: their implementations are imported when one is called)
METHOD_NAMES = tuple(METHODS)
SAVED_AS = {name: entry.saved_as for name, entry in METHODS.items()}


def _newest_head(store: Path, kind: str | None) -> Path:
    """Where the newest trained method (of `kind`, when given; else any head) of the store keeps
    its result: `<store>/train/<key>/head` for a head, `<key>/model` for GenARM and DPO + DeRa."""
    from alignheads.storage.artifacts import list_artifacts
    from alignheads.storage.manifest import read_manifest

    saved = SAVED_AS.get(kind, "model") if kind is not None else "head"
    found = []
    for directory in list_artifacts(store, "train"):
        manifest = read_manifest(directory)
        if (kind is None or manifest.info.get("kind") == kind) and (directory / saved).is_dir():
            found.append((manifest.created_at, directory / saved))
    if not found:
        what = f"{kind} {saved}" if kind else "head"
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


def _label(method: str) -> str:
    """`calm head`, or a fine-tuned-LM method's name as it is (`genarm`, `dpo-dera`)."""
    return f"{method} head" if SAVED_AS.get(method) == "head" else method


def _alpha_text(aligned, alpha) -> str:
    """α as printed: `1.5`, or for dials their non-zero α (`helpful=1,concise=0.5`; `base`)."""
    from alignheads import inference
    from alignheads.tasks.dial_set import vector_label

    value = inference.alpha_value(aligned, alpha)
    return vector_label(value) if isinstance(value, dict) else f"{value:g}"


def _print_pair(base: str, aligned: str, head_type: str, alpha_text: str) -> None:
    print("--- base (plain LM) ---")
    print(base)
    print(f"--- aligned ({_label(head_type)}, alpha={alpha_text}) ---")
    print(aligned)


# The chat loop's commands, as its banner, `:help` and `generate --help` list them.
CHAT_COMMANDS = (
    ":alpha X (set alpha; with dials X sets every dial, or name=X ... sets those dials), :alpha (show it), "
    ":compare (toggle the base's reply), :info (head and settings), :help, :q (quit)"
)


def _interactive(aligned, tokenizer, args, settings: dict, seed: int) -> int:
    """Chat loop on stdin: the commands of `CHAT_COMMANDS` (also without the colon); any other
    line is a prompt. Lines are read with readline where the platform has it (editing, and the
    Up and Down arrows recall the session's earlier lines). Aligned responses stream token by
    token."""
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

    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401  (input() gets line editing, and Up/Down recall earlier lines)

    alpha, compare = _cli_alpha(aligned, args), args.compare
    head_type = inference.method_name(aligned)
    streams = isinstance(aligned, inference.AlignedLM)  # a two-model method prints its reply whole
    help_text = f"commands: {CHAT_COMMANDS}"
    print(
        f"alignheads generate: {_label(head_type)}, alpha={_alpha_text(aligned, alpha)}. {help_text}",
        flush=True,
    )
    turn = 0  # each prompt samples from its own seed, (seed, prompt, turn): a new draw every turn
    while True:
        try:
            line = input(f"[alpha={_alpha_text(aligned, alpha)}]> ")
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
        if command == "alpha" and len(words) == 1:
            print(f"alpha = {_alpha_text(aligned, alpha)}", flush=True)
            continue
        if command == "alpha":
            try:
                alpha = _chat_alpha(aligned, alpha, words[1:])
            except ValueError as exc:
                print(str(exc), flush=True)
                continue
            print(f"alpha = {_alpha_text(aligned, alpha)}", flush=True)
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
        seeds = inference.prompt_seeds(seed, [prompt], turn)
        turn += 1
        if compare:
            base = inference.generate_base(aligned, tokenizer, [prompt], seeds=seeds, **settings)[0]
            print("--- base (plain LM) ---")
            print(base, flush=True)
            print(f"--- aligned ({_label(head_type)}, alpha={_alpha_text(aligned, alpha)}) ---", flush=True)
        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        extra = {"streamer": streamer} if streams else {}
        out, info = _responses(
            aligned, tokenizer, [prompt], alpha, seeds, args.steering_info, **extra, **settings
        )
        if not streams:
            print(out[0], flush=True)
        if args.steering_info:
            print("steering: " + json.dumps(info[0]), flush=True)
        sys.stdout.flush()


def _cli_alpha(aligned, args: argparse.Namespace):
    """The α the flags ask for: `--alpha`, or with dials the `--dial name=α` items (every other dial
    at 0; none given: every dial at `--alpha`)."""
    from alignheads.tasks.dial_set import full_vector, parse_dial_items

    if not getattr(aligned, "dial_names", ()):
        return args.alpha
    if not args.dial:
        return dict.fromkeys(aligned.dial_names, float(args.alpha))
    return full_vector(aligned.dial_names, parse_dial_items(args.dial))


def _chat_alpha(aligned, current, words: list[str]):
    """The chat loop's new α from `:alpha X` (every dial at X) or `:alpha name=X ...` (those dials;
    the others keep theirs); ValueError with the message to print."""
    from alignheads.tasks.dial_set import full_vector, parse_dial_items

    names = getattr(aligned, "dial_names", ())
    if len(words) == 1 and "=" not in words[0]:
        try:
            value = float(words[0])
        except ValueError:
            raise ValueError(f"not a number: {words[0]!r}") from None
        return dict.fromkeys(names, value) if names else value
    if not names:
        raise ValueError("one number: this method has one dial (`:alpha 1.5`)")
    return full_vector(names, {**current, **parse_dial_items(words)})


def _responses(aligned, tokenizer, texts: list[str], alpha, seeds: list[int], steering: bool, **settings):
    """(responses, per-response steering statistics or None) at ``alpha``, each text sampled from
    its seed; the responses are the same with or without the statistics (recording reads the
    logits, it does not change them)."""
    from alignheads import inference

    if not steering:
        responses = inference.generate(aligned, tokenizer, texts, alpha, seeds=seeds, **settings)
        return responses, [None] * len(texts)
    rows = inference.generate_with_steering_info(aligned, tokenizer, texts, alpha, seeds=seeds, **settings)
    return [r["response"] for r in rows], [r["steering"] for r in rows]


def cmd_generate(args: argparse.Namespace) -> int:
    from alignheads import inference
    from alignheads.loading import library_progress_bars_off
    from alignheads.tasks.prompts import load_prompts_file

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
    dials = args.dials is not None or bool(args.dial)
    if dials and (args.heads is not None or args.head is not None):
        print("error: give either dials (--dials / --dial) or one method (--heads / --head)", file=sys.stderr)
        return 2
    options = {
        "base": args.base, "device": args.device, "dtype": cfg.model.dtype,
        "ignore_base_id": args.ignore_base_id, "trust_remote_code": cfg.model.trust_remote_code,
    }  # fmt: skip
    heads = (args.dials or cfg.store) if dials else args.heads or _newest_head(cfg.store, args.head)
    with library_progress_bars_off():
        if dials:
            aligned, tokenizer = inference.load_dials(heads, **options)
        else:
            aligned, tokenizer = inference.load_trained(heads, **options)
    try:
        alpha = _cli_alpha(aligned, args)
    except ValueError as exc:  # a malformed or unknown --dial
        return _user_error(exc, getattr(args, "verbose", False), 2)
    settings = _decoding(args, cfg)
    seed = args.seed if args.seed is not None else cfg.sweep.seed
    head_type = inference.method_name(aligned)
    where = f"{', '.join(aligned.dial_names)} from {heads}" if dials else heads
    print(f"{_label(head_type)}: {where}", file=sys.stderr)

    if args.interactive:
        return _interactive(aligned, tokenizer, args, settings, seed)

    if args.prompts_file is not None:
        rows = []
        bs = args.batch_size or cfg.sweep.batch_size
        for start in range(0, len(prompts), bs):
            chunk = prompts[start : start + bs]
            texts = [inference.format_prompt(tokenizer, t, raw=args.raw) for _, t in chunk]
            seeds = inference.prompt_seeds(seed, texts)  # per prompt: the same in any batch
            out, info = _responses(aligned, tokenizer, texts, alpha, seeds, args.steering_info, **settings)
            base = (
                inference.generate_base(aligned, tokenizer, texts, seeds=seeds, **settings)
                if args.compare
                else [None] * len(chunk)
            )
            for (pid, text), response, b, steering in zip(chunk, out, base, info, strict=True):
                row = {
                    "id": pid,
                    "prompt": text,
                    "head": head_type,
                    "alpha": inference.alpha_value(aligned, alpha),
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
    seeds = inference.prompt_seeds(seed, [prompt])
    out, info = _responses(aligned, tokenizer, [prompt], alpha, seeds, args.steering_info, **settings)
    response = out[0]
    if args.compare:
        base = inference.generate_base(aligned, tokenizer, [prompt], seeds=seeds, **settings)[0]
        print(f"prompt: {args.prompt}")
        _print_pair(base, response, head_type, _alpha_text(aligned, alpha))
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
    p.add_argument(
        "--tuned",
        nargs="?",
        const="latest",
        default=None,
        metavar="SEARCH",
        help="train each method the search tuned with its best trial's settings (reusing that trial's "
        "training): a search key, its directory, or 'latest' (the default without a value)",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "tune",
        help="search training settings: every method the same number of trials, scored on validation prompts",
        description="Run the tune flow: train every trial of a search space, score each at the α "
        "calibrated to a target KL on validation prompts, and tag the best per method in MLflow.",
    )
    p.add_argument(
        "--space",
        type=Path,
        default=None,
        help="search space YAML ({method: {setting: [values]}}); default: the embedded default's, "
        "configs/spaces/tiny.yaml (each of the four methods: its configured settings and 3 random draws)",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_tune)

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
        "pairs, rejects, tokenized, refcache, train_metrics, generations, scores, summary (each with an "
        "artifact column; train_metrics also with method).",
    )
    p.add_argument("sql", help='e.g. "SELECT split, count(*) FROM pairs GROUP BY split"')
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown in table format")
    p.add_argument(
        "--full-precision",
        action="store_true",
        help=f"table format: print floats with every digit (default: {SIGNIFICANT_DIGITS} significant digits)",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser(
        "merge",
        help="fold a trained IAV head into a plain Hugging Face checkpoint at one alpha",
        description="Write a plain Hugging Face checkpoint (model + tokenizer) whose lm_head is "
        "W_b + alpha * W_a; it decodes at exactly the base model's cost in any engine.",
    )
    p.add_argument("--heads", type=Path, default=None, help="trained IAV head directory (head_config.json)")
    p.add_argument(
        "--head",
        choices=("iav",),
        default=None,
        help="without --heads: the newest trained IAV head in the store",
    )
    p.add_argument("--alpha", type=float, default=None, help="alignment strength to bake in (one head)")
    _add_dial_args(p, "fold IAV dials instead: one dial's alpha")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument(
        "--base", default=None, help="base model id or directory (default: the one the head records)"
    )
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="export dtype")
    p.add_argument(
        "--ignore-base-id", action="store_true", help="accept a base whose id differs from the head's"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--mlflow", action="store_true", help="also log it with mlflow.transformers as <name>-iav-merged"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "export",
        help="write a head or the reference cache in another tool's format (PEFT adapter, TRL pairs)",
        description="--format peft: an IAV head as a PEFT LoRA adapter on the base model's lm_head "
        "(B A = truncated SVD of W_a; scaling lora_alpha / r = alpha). --format trl: the pairs of a "
        "reference cache with TRL's columns prompt, chosen, rejected, ref_chosen_logps, ref_rejected_logps.",
    )
    p.add_argument("--format", choices=("peft", "trl"), required=True, help="what to write")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument("--heads", type=Path, default=None, help="peft: IAV head directory (default: newest)")
    p.add_argument("--rank", default="full", help="peft: LoRA rank r, or 'full' (exact; default)")
    p.add_argument("--alpha", type=float, default=1.0, help="peft: the alpha the adapter applies (default 1)")
    p.add_argument("--base", default=None, help="peft: base model id or directory (default: the head's)")
    p.add_argument("--ignore-base-id", action="store_true", help="peft: accept a base with another id")
    p.add_argument("--refpass", default=None, help="trl: refpass key (default: the newest in the store)")
    p.add_argument("--skip-truncated", action="store_true", help="trl: leave out pairs the tokenizer cut")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_config_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "generate",
        help="generate with a trained method (one prompt, --interactive, --compare, --prompts-file)",
        description="Generate with a trained method on its base model: an IAV or CALM head, or the "
        "GenARM or DPO + DeRa fine-tuned LM decoded next to the base. Plain prompt text is wrapped in "
        "the tokenizer's chat template (unless --raw); decoding defaults come from the config's sweep "
        "section. Each prompt (and each chat turn) samples from its own seed, from --seed, the prompt "
        "and the turn; --compare samples the base with the same seeds.",
    )
    p.add_argument("prompt", nargs="?", default=None, help="a single prompt")
    p.add_argument(
        "--heads",
        type=Path,
        default=None,
        help="a trained head directory (head_config.json), or a train artifact <store>/train/<key> "
        "of any method",
    )
    p.add_argument(
        "--head",
        choices=METHOD_NAMES,
        default=None,
        help="without --heads: use the newest trained method of this kind in the store",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="alignment strength (default 1.0)")
    _add_dial_args(p, "one dial's alpha")
    p.add_argument(
        "--interactive", "-i", action="store_true", help=f"chat loop on the terminal; {CHAT_COMMANDS}"
    )
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


def _add_dial_args(p: argparse.ArgumentParser, what: str) -> None:
    """`--dials DIR` and the repeatable `--dial NAME=ALPHA` of the verbs that take dials."""
    p.add_argument(
        "--dials",
        type=Path,
        default=None,
        help="a dial set <store>/dials/<key> (several heads on one LM); default with --dial: the "
        "store's newest",
    )
    p.add_argument(
        "--dial",
        action="append",
        default=[],
        metavar="NAME=ALPHA",
        help=f"{what} (repeat it: --dial helpful=1.0 --dial concise=0.5; the others are 0)",
    )


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
