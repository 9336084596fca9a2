"""The `laneswitch` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from proxy.client import add_client_commands

DEFAULT_CONFIG = "config/laneswitch.yaml"

DEMO_HELP = """\
Starts blue (127.0.0.1:9001) and green (127.0.0.1:9002; any free ports where these are taken), the
proxy on 127.0.0.1:8080 and the admin API with the web console on 127.0.0.1:9901 (--port and
--admin-port pick others, 0 any free ones; the first line printed is the console's URL), sends
about 50 requests/s through the proxy itself (so the rollout's analysis has something to
measure), and rolls green out as a canary: 10 %, 25 %, 50 %, one step every 5 s while green
answers well, then promoted. Then it makes green fail 30 % of its requests and rolls it out
again: the proxy rolls it back on its own. About a minute in all; watch it with `laneswitch
status --watch`. To replay the failing case by hand:

  curl -X POST 'http://127.0.0.1:9002/demo/fail?rate=0.3'   # green fails 30 % (rate=0 heals)
  laneswitch rollback shop && laneswitch rollout start shop
"""


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
    from proxy.config.loader import ConfigError, parse_config, read_config_text

    _setup_logging()
    path = str(args.config)
    try:
        text = read_config_text(path)
        config = parse_config(text, source=path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    from proxy.runtime import run_forever
    from proxy.server import ListenError, run
    from proxy.workers.supervisor import WorkerStartError

    try:
        return run_forever(run(config, config_path=path, config_text=text, workers=args.workers))
    except ListenError as exc:
        hint = (
            f" (stop what listens there, or change `{exc.field}` in {path})" if exc.in_use else ""
        )
        print(f"laneswitch: cannot start: {exc}{hint}", file=sys.stderr)
        return 1
    except (OSError, WorkerStartError) as exc:
        print(f"laneswitch: cannot start: {exc}", file=sys.stderr)
        return 1


def workers_arg(text: str) -> int | str:
    """`--workers`: an integer >= 1 or "auto" (one per usable CPU)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be an integer >= 1 or "auto", got {text!r}')
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging()
    from proxy.demo import DemoStartError, demo
    from proxy.runtime import run_forever

    if args.fleet:
        from proxy.demo_fleet import fleet_demo

        main = fleet_demo(args.fail_rate, args.port, args.admin_port)
    else:
        main = demo(args.fail_rate, args.port, args.admin_port)
    try:
        return run_forever(main)
    except DemoStartError as exc:
        print(f"laneswitch demo: {exc}", file=sys.stderr)
        return 1


def port_arg(text: str) -> int:
    """`demo --port/--admin-port`: a TCP port, 0 for any free one."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, got {text!r}")
    return port


def fail_rate_arg(text: str) -> float:
    """`demo --fail-rate`: a share of requests, 0 to 1."""
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return rate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laneswitch",
        description="A traffic splitter for safe releases (blue/green, canary).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy until SIGTERM/SIGINT")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (YAML)")
    run.add_argument(
        "--workers",
        type=workers_arg,
        default=None,
        metavar="N|auto",
        help="data-plane processes (overrides the file's `workers`; auto = one per usable CPU)",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config file and print a summary")
    check.add_argument("-c", "--config", required=True, help="config file (YAML)")
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser(
        "demo",
        help="two demo upstreams (blue, green) behind a proxy, and a canary rollout to watch",
        description=DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--fail-rate",
        type=fail_rate_arg,
        default=None,
        metavar="R",
        help="green fails this share of its requests (0..1) from the start, and the tour is one "
        "rollout of it (e.g. 0.3: rolled back within about 10 s)",
    )
    demo.add_argument(
        "--port",
        type=port_arg,
        default=8080,
        metavar="N",
        help="the proxy's port on 127.0.0.1 (default 8080; 0 = any free port, printed)",
    )
    demo.add_argument(
        "--admin-port",
        type=port_arg,
        default=9901,
        metavar="N",
        help="the admin API's and console's port on 127.0.0.1 (default 9901; 0 = any free port)",
    )
    demo.add_argument(
        "--fleet",
        action="store_true",
        help="three replicas (laneswitch run processes) sharing one redis-server that the demo "
        "starts itself (it must be on PATH); ports N, N+1, N+2 of --port and --admin-port",
    )
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
