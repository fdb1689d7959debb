"""Command-line jobs of packaging and publishing: archive, register, set-default, unregister,
list, publish. Management commands talk REST (``--management http://...``) or gRPC
(``--management grpc://...``), with TorchServe's management key from ``--key-file``,
``--token-file`` or the environment (:mod:`handler.torchserve_keys`), never from the command line."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable

from handler.torchserve_keys import add_key_arguments, key_from_arguments

DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser(
        "archive",
        help="build deepctr.mar from an exported dense version",
        description="Build a TorchServe .mar with torch-model-archiver from <model root>/dense/vN.",
    )
    a.add_argument("--model-dir", required=True, help="exported version folder holding model.pt and model.json")
    a.add_argument("--out", required=True, help="model store folder to write the .mar into")
    a.add_argument("--name", default="deepctr", help="model name (default deepctr)")
    a.add_argument("--serving-config", help="serving.yml to ship in the archive (embedding servers, limits)")
    a.add_argument("--file-name", help="archive file name without .mar (default: the model name)")
    a.set_defaults(func=run_archive)

    r = _management_parser(sub, "register", "register a .mar (synchronously, with workers)")
    r.add_argument("url", help=".mar file name in the model store, or a URL TorchServe accepts")
    r.add_argument("--name", help="model name (default: the one in the archive)")
    r.add_argument("--initial-workers", type=int, default=1, help="workers to start (default 1)")
    r.add_argument("--batch-size", type=int, default=1, help="server-side batch size (default 1)")
    r.add_argument("--max-batch-delay-ms", type=int, default=5, help="server-side batch wait (default 5 ms)")
    r.add_argument("--no-wait", action="store_true", help="return without waiting for the workers")
    r.set_defaults(func=run_register)

    d = _management_parser(sub, "set-default", "make a registered version the default")
    d.add_argument("name", help="model name")
    d.add_argument("version", help="version to serve by default")
    d.set_defaults(func=run_set_default)

    u = _management_parser(sub, "unregister", "unregister a model version")
    u.add_argument("name", help="model name")
    u.add_argument("version", nargs="?", help="version (default: the default version)")
    u.set_defaults(func=run_unregister)

    lst = _management_parser(sub, "list", "list registered models, or the versions of one")
    lst.add_argument("name", nargs="?", help="describe every version of this model")
    lst.set_defaults(func=run_list)

    p = _management_parser(sub, "publish", "watch a model root and roll new dense versions into TorchServe")
    p.add_argument("--watch", required=True, metavar="MODEL_ROOT", help="model root path or URL (dense/vN below it)")
    p.add_argument("--model-store", required=True, help="the folder TorchServe runs with as --model-store")
    p.add_argument("--name", default="deepctr", help="model name (default deepctr)")
    p.add_argument("--serving-config", help="serving.yml to ship in every archive")
    p.add_argument("--keep", type=int, default=2, help="registered versions to keep (default 2)")
    p.add_argument("--initial-workers", type=int, default=1, help="workers per new version (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="server-side batch size (default 1)")
    p.add_argument("--max-batch-delay-ms", type=int, default=5, help="server-side batch wait (default 5 ms)")
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between scans (default 5)")
    p.add_argument("--drain-s", type=float, default=2.0, help="seconds before retiring old versions (default 2)")
    p.add_argument("--once", action="store_true", help="publish what is new once and exit")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics (versions published, failures, last publish time) on this port (default off)",
    )
    p.add_argument("--metrics-address", default="127.0.0.1", help="address the metrics port binds (default 127.0.0.1)")
    p.set_defaults(func=run_publish)


def _reporting(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print TorchServe's refusals as one line (exit 1) instead of a traceback."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        from archiver.management import ManagementError

        try:
            return run(args)
        except (ManagementError, TimeoutError) as exc:
            print(f"ctrserve {args.command}: error: {exc}", file=sys.stderr)
            return 1

    return wrapper


def _management_parser(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + " (TorchServe management API).")
    p.add_argument(
        "--management",
        default=DEFAULT_MANAGEMENT,
        help=f"http://host:port (REST) or grpc://host:port (gRPC) (default {DEFAULT_MANAGEMENT})",
    )
    add_key_arguments(p, "management")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call (default 120)")
    return p


def _client(args: argparse.Namespace):
    from archiver.management import ManagementClient

    return ManagementClient(args.management, timeout=args.timeout, token=key_from_arguments(args, "management"))


def run_archive(args: argparse.Namespace) -> int:
    from archiver.build import archive_model

    print(archive_model(args.model_dir, args.out, args.name, args.serving_config, args.file_name))
    return 0


@_reporting
def run_register(args: argparse.Namespace) -> int:
    with _client(args) as mgmt:
        print(
            mgmt.register(
                args.url,
                args.name,
                args.initial_workers,
                args.batch_size,
                args.max_batch_delay_ms,
                synchronous=not args.no_wait,
            )
        )
    return 0


@_reporting
def run_set_default(args: argparse.Namespace) -> int:
    with _client(args) as mgmt:
        print(mgmt.set_default(args.name, args.version))
    return 0


@_reporting
def run_unregister(args: argparse.Namespace) -> int:
    with _client(args) as mgmt:
        print(mgmt.unregister(args.name, args.version))
    return 0


@_reporting
def run_list(args: argparse.Namespace) -> int:
    with _client(args) as mgmt:
        result = mgmt.describe(args.name, "all") if args.name else mgmt.list_models()
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


@_reporting
def run_publish(args: argparse.Namespace) -> int:
    from archiver.publish import Publisher, PublisherMetrics, PublishSettings

    settings = PublishSettings(
        args.watch,
        args.model_store,
        args.name,
        args.serving_config,
        args.keep,
        args.initial_workers,
        args.batch_size,
        args.max_batch_delay_ms,
        drain_s=args.drain_s,
        poll_s=args.poll_s,
    )
    with _client(args) as mgmt:
        metrics = None
        if args.metrics_port is not None:
            metrics = PublisherMetrics()
            port = metrics.serve_http(args.metrics_port, args.metrics_address)
            logging.getLogger("ctrserve.publish").info("metrics on http://%s:%d/metrics", args.metrics_address, port)
        publisher = Publisher(mgmt, settings, metrics)
        if args.once:
            version = publisher.poll_once()
            logging.getLogger("ctrserve.publish").info(
                "published %s", version if version is not None else "nothing new"
            )
        else:
            publisher.watch()
    return 0
