"""The `laneswitch` command (SPEC §1)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from proxy.client import add_client_commands

DEFAULT_CONFIG = "config/laneswitch.yaml"


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.config.loader import ConfigError, load_config, summarize

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        print(f"{args.config}: invalid ({len(exc.errors)} error(s))", file=sys.stderr)
        return 1
    print(summarize(config))
    print(f"{args.config}: valid")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from proxy.config.loader import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from proxy.config.loader import ConfigError, parse_config

    _setup_logging()
    path = str(args.config)
    try:
        text = Path(path).read_text(encoding="utf-8")
        config = parse_config(text, source=path)
    except OSError as exc:
        print(f"{path}: cannot read the config file: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    from proxy.runtime import run_forever
    from proxy.server import run

    return run_forever(run(config, config_path=path, config_text=text))


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging()
    from proxy.demo import demo
    from proxy.runtime import run_forever

    return run_forever(demo())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laneswitch",
        description="A traffic splitter for safe releases (blue/green, canary).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy until SIGTERM/SIGINT")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (YAML)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config file and print a summary")
    check.add_argument("-c", "--config", required=True, help="config file (YAML)")
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="two demo upstreams (blue, green) behind a proxy")
    demo.set_defaults(func=cmd_demo)

    add_client_commands(sub)

    schema = sub.add_parser("schema", help="print the JSON Schema of the config file")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
