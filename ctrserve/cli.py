"""``ctrserve``: one command line for every job (embedding servers, demo, config reference).

The sub-commands live in the modules named by :data:`COMMANDS`, and their modules import torch,
numba, grpc or pyarrow. Only the chosen command's module is imported: ``ctrserve --help`` and
``ctrserve --version`` import none of them and answer at once. A new command is one line in
:data:`COMMANDS` (``tests/test_packaging.py`` checks the table against the modules' parsers).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: command -> (module, its function that adds the command's parser to the sub-parsers, one-line help).
#: A module's function may add several commands (each listed here with the same module and function).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "embedding-server": ("embedding_server.cli", "add_parsers", "serve one shard of the embedding tables over gRPC"),
    "embedding-admin": (
        "embedding_server.cli",
        "add_parsers",
        "stats, dump, load or skip-packet of running embedding servers",
    ),
    "archive": ("archiver.cli", "add_parsers", "build deepctr.mar from an exported dense version"),
    "register": ("archiver.cli", "add_parsers", "register a .mar (synchronously, with workers)"),
    "set-default": ("archiver.cli", "add_parsers", "make a registered version the default"),
    "unregister": ("archiver.cli", "add_parsers", "unregister a model version"),
    "list": ("archiver.cli", "add_parsers", "list registered models, or the versions of one"),
    "publish": ("archiver.cli", "add_parsers", "watch a model root and roll new dense versions into TorchServe"),
    "predict": (
        "ctrserve.predict",
        "add_parsers",
        "score a Criteo TSV/CSV, Parquet or ORC file through TorchServe (gRPC or REST)",
    ),
    "train": ("trainer.job", "add_parser", "train a model from a job.yml"),
    "demo": ("ctrserve.demo", "add_parser", "train, publish, hot-load and serve fresh predictions, end to end"),
    "config-reference": ("ctrserve.reference", "add_parser", "print every config key with its default"),
    "health": ("ctrserve.health", "add_parser", "exit 0 when a role answers healthy (container health checks)"),
    "plan": ("ctrserve.plan", "add_parser", "embedding shards and memory per pod for N rows"),
}


def version() -> str:
    """The installed distribution's version (``0+unknown`` when ctrserve is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ctrserve")
    except PackageNotFoundError:
        return "0+unknown"


class _VersionAction(argparse.Action):
    """``--version``: like argparse's, but the version is read only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"ctrserve {version()}")
        parser.exit()


def build_parser(command: str | None = None, full: bool = True) -> argparse.ArgumentParser:
    """The command line. ``full``: every command's real parser (imports every command module);
    else only ``command``'s (None: none), the others as placeholders that carry their help line."""
    parser = argparse.ArgumentParser(
        prog="ctrserve",
        description="Train, publish and serve huge sparse CTR models (PERSIA-style) on TorchServe.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = set(COMMANDS) if full else {command} & set(COMMANDS)
    for module, function in dict.fromkeys((m, f) for name, (m, f, _) in COMMANDS.items() if name in wanted):
        getattr(importlib.import_module(module), function)(sub)
    for name, (_, _, text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # First pass with placeholders: finds the command (or answers --help / --version) cheaply.
    command = build_parser(full=False).parse_known_args(argv)[0].command
    args = build_parser(command, full=False).parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from embedding_server.core.errors import ConfigError, InvalidRequestError, ShardUnavailableError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, InvalidRequestError, ShardUnavailableError) as exc:
        print(f"ctrserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
