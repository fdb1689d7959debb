"""``ctrserve health``: exit 0 when a role answers healthy, 1 (with one line saying why) otherwise.

Written for container ``HEALTHCHECK``s (``deploy/docker/Dockerfile``) and probes; every check is
one short call with a timeout:

* ``health embedding-server --address HOST:PORT``: the standard gRPC health service says SERVING
  (overall by default; ``--service`` names one, e.g. ``ctrserve.embedding.v1.Hotload``). Health
  needs no token; ``--tls-ca-file`` (and a client certificate for mutual TLS) for TLS servers.
* ``health torchserve --management URL --model NAME``: the management API answers and every
  worker of each named model's default version is ``READY`` (at least its minimum number):
  TorchServe's ``/ping`` says Healthy while a worker crash-loops. Without ``--model``: the
  management API answers.
* ``health http --url URL``: a GET answers 2xx (e.g. a trainer's ``/metrics`` port).

Example:
    ctrserve health embedding-server --address 127.0.0.1:8500
"""

from __future__ import annotations

import argparse
import sys

from archiver.cli import DEFAULT_MANAGEMENT
from handler.torchserve_keys import add_key_arguments, key_from_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "health",
        help="exit 0 when a role answers healthy (container health checks)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    checks = p.add_subparsers(dest="check", metavar="CHECK", required=True)

    e = checks.add_parser("embedding-server", help="the gRPC health service says SERVING")
    e.add_argument("--address", default="127.0.0.1:8500", help="HOST:PORT (default 127.0.0.1:8500)")
    e.add_argument("--service", default="", help="health service name (default: the server's overall health)")
    e.add_argument("--tls-ca-file", help="PEM CA bundle of the server's certificate (enables TLS)")
    e.add_argument("--tls-cert-file", help="client certificate, for servers that demand mutual TLS")
    e.add_argument("--tls-key-file", help="private key of --tls-cert-file")
    e.add_argument("--tls-server-name", help="name to verify in the server's certificate")
    e.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    e.set_defaults(func=check_embedding_server)

    t = checks.add_parser("torchserve", help="every worker of the named models READY (management API)")
    t.add_argument(
        "--management",
        default=DEFAULT_MANAGEMENT,
        help=f"http://host:port (REST) or grpc://host:port (gRPC) (default {DEFAULT_MANAGEMENT})",
    )
    t.add_argument(
        "--model",
        action="append",
        default=[],
        help="model whose default version must have all workers READY (repeatable; none: the API answers)",
    )
    add_key_arguments(t, "management")
    t.add_argument("--timeout", type=float, default=5.0, help="seconds per call (default 5)")
    t.set_defaults(func=check_torchserve)

    h = checks.add_parser("http", help="a GET of the URL answers 2xx")
    h.add_argument("--url", required=True, help="e.g. http://127.0.0.1:9400/metrics")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    h.set_defaults(func=check_http)


def _verdict(ok: bool, what: str) -> int:
    print(("healthy: " if ok else "unhealthy: ") + what, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def check_embedding_server(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from embedding_server.rpc.security import ClientSecurity, make_channel

    security = None
    if args.tls_ca_file:
        security = ClientSecurity(
            tls_ca_file=args.tls_ca_file,
            tls_cert_file=args.tls_cert_file,
            tls_key_file=args.tls_key_file,
            tls_server_name=args.tls_server_name,
        )
    channel = make_channel(args.address, security=security)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        return _verdict(False, f"{args.address}: {exc.code().name}: {exc.details()}")
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    service = args.service or "overall"
    return _verdict(reply.status == health_pb2.HealthCheckResponse.SERVING, f"{args.address} {service}: {status}")


def check_torchserve(args: argparse.Namespace) -> int:
    from archiver.management import ManagementClient, ManagementError

    try:
        with ManagementClient(
            args.management, timeout=args.timeout, token=key_from_arguments(args, "management")
        ) as client:
            if not args.model:
                client.list_models()
                return _verdict(True, f"{args.management} answers")
            states = {}
            for name in args.model:
                description = client.describe(name)[0]
                workers = [w.get("status") for w in description.get("workers", [])]
                ready = len(workers) >= max(1, description.get("minWorkers", 1)) and all(s == "READY" for s in workers)
                states[name] = (ready, f"{name} v{description.get('modelVersion')} workers {workers}")
    except ManagementError as exc:
        return _verdict(False, f"{args.management}: {exc}")
    except OSError as exc:  # connection refused, timeouts (requests' errors are OSErrors)
        return _verdict(False, f"{args.management}: {type(exc).__name__}: {exc}")
    return _verdict(all(ok for ok, _ in states.values()), "; ".join(text for _, text in states.values()))


def check_http(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as response:  # noqa: S310 (operator's URL)
            return _verdict(200 <= response.status < 300, f"{args.url}: HTTP {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        return _verdict(False, f"{args.url}: {exc}")
