"""The `alignheads` command line: run, world, query (and later generate, merge).

Every verb takes `--config F` and `--set key=value` (repeatable), so `--set store=DIR`
points any verb at a store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from alignheads.config import ConfigError, RunConfig, load_config


def _prefect_defaults() -> None:
    """Offline-friendly Prefect settings, unless the user set them."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


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


def _config(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def cmd_run(args: argparse.Namespace) -> int:
    _prefect_defaults()
    from alignheads.flows.pipeline import pipeline
    from alignheads.report import print_run_summary

    cfg = _config(args)
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
    from alignheads.report import print_arrow_table
    from alignheads.storage.query import run_query

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
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"merged IAV head at alpha={args.alpha:g} into a plain Hugging Face checkpoint: {out}")
    print(f"  load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignheads",
        description="Test-time alignment of a frozen causal LM with IAV and CALM logit heads.",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from alignheads.errors import USER_ERRORS

        if isinstance(exc, USER_ERRORS):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
