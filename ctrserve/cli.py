"""``ctrserve``: one command line for every job (embedding servers, demo, config reference)."""

from __future__ import annotations

import argparse
import logging
import sys

from embedding_server.core.errors import ConfigError, InvalidRequestError, ShardUnavailableError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrserve",
        description="Train, publish and serve huge sparse CTR models (PERSIA-style) on TorchServe.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from archiver import cli as archiver_cli
    from ctrserve import demo, predict, reference
    from embedding_server import cli as embedding_cli
    from trainer import job

    embedding_cli.add_parsers(sub)
    archiver_cli.add_parsers(sub)
    predict.add_parsers(sub)
    job.add_parser(sub)
    demo.add_parser(sub)
    reference.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, InvalidRequestError, ShardUnavailableError) as exc:
        print(f"ctrserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
