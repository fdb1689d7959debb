"""Command-line jobs of the embedding servers: serve a shard, and administer running shards."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from embedding_server.core.config import EmbeddingConfig, GlobalConfig, JobType, SecurityConfig
from embedding_server.core.errors import ConfigError, InvalidRequestError
from embedding_server.modelroot.hotload import FollowOptions, HotloadError
from embedding_server.rpc.security import (
    ClientSecurity,
    ServerSecurity,
    read_token_file,
    resolve_admin_token,
    resolve_token,
)
from embedding_server.storage.base import StorageError
from embedding_server.store.cpus import format_cpu_list, parse_cpu_list, pin_process, placement_supported, usable_cpus


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embedding-server",
        help="serve one shard of the embedding tables over gRPC",
        description="Serve one shard of the embedding tables over gRPC until SIGTERM or Ctrl-C.",
    )
    p.add_argument("--embedding-config", required=True, help="embedding_config.yml (features and tables)")
    p.add_argument("--global-config", required=True, help="global_config.yml (capacity, optimizer, job type)")
    p.add_argument("--shard-index", type=int, default=0, help="this server's shard (default 0)")
    p.add_argument(
        "--num-shards",
        type=int,
        help="number of shards (default: in an infer job, the count of common_config.infer_config.servers when "
        "given; else 1)",
    )
    p.add_argument("--port", type=int, default=0, help="gRPC port (default 0: pick a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--mode", type=JobType, choices=list(JobType), help="override common_config.job_type")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: pick one)")
    p.add_argument("--workers", type=int, default=8, help="gRPC worker threads (default 8)")
    p.add_argument(
        "--load",
        metavar="CHECKPOINT",
        help="load this checkpoint directory before serving (an infer job's default: common_config.infer_config."
        "embedding_checkpoint; a trainer's checkpoint directory loads its sparse/ part)",
    )
    p.add_argument(
        "--local-socket",
        default="auto",
        metavar="PATH|auto|off",
        help="also answer lookups on this Unix socket; clients on this machine find it through Info and use it "
        "instead of gRPC, whose own machinery is most of a small lookup's cost. auto (default): a fresh path in a "
        "private per-user directory; off: gRPC only",
    )
    p.add_argument(
        "--ready-file", help="write {address, port, metrics_port, pid, local_socket} as JSON here once serving"
    )
    p.add_argument(
        "--model-root",
        metavar="URL",
        help="infer mode: load the newest checkpoint under this model root (path, file://, s3://, hdfs://), replay "
        "newer packets, then follow new ones; ready only once loaded. s3/hdfs options: global config 'storage' "
        "section or the environment (CTRSERVE_S3_ENDPOINT, AWS_ACCESS_KEY_ID, ...)",
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between listings of s3:// and hdfs:// model roots (default 1)",
    )
    p.add_argument(
        "--rescan-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between safety rescans of a local model root watched by inotify (default 10)",
    )
    p.add_argument(
        "--gap-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a missing packet is waited for before the gap alarm goes off (default 30)",
    )
    p.add_argument(
        "--unreadable-retry",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds an unreadable packet (incomplete, corrupt, not a regular file, ...) is retried with backoff "
        "before it is declared bad; its training shard is then held there, gap alarm up, until a newer checkpoint "
        "includes it or an operator skips it with 'embedding-admin skip-packet' (default 60)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="a read of one packet file that takes longer counts as unreadable (default 60)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="packets pending and none applied for this long make the follower stalled: health service "
        "ctrserve.embedding.v1.Hotload answers NOT_SERVING, stats and metrics say why (default 120)",
    )
    p.add_argument(
        "--apply-niceness",
        type=int,
        default=10,
        choices=range(20),
        metavar="N",
        help="once ready, apply packets N nice levels below the server, so applies use the CPU lookups "
        "leave over (0..19, default 10; 0: same priority)",
    )
    cpu = p.add_argument_group(
        "CPU placement",
        "Linux; CPU lists as taskset takes them, e.g. 0-3,8. Keeping packet applies and lookups on "
        "CPUs of their own keeps the lookup tail flat while big packets apply",
    )
    cpu.add_argument(
        "--apply-cpus",
        type=_cpu_list,
        metavar="LIST",
        help="with --model-root: once ready, apply packets only on these CPUs; the serving threads keep off "
        "them (unless --serve-cpus says otherwise)",
    )
    cpu.add_argument(
        "--serve-cpus",
        type=_cpu_list,
        metavar="LIST",
        help="run the serving threads (gRPC, local socket, metrics) only on these CPUs (default: every CPU "
        "this process may use, less --apply-cpus)",
    )
    sec = p.add_argument_group(
        "security",
        "TLS, the read and admin tokens, and where Dump and Load may go (default: the global config's 'security' "
        "section: TLS off, reads without a token, admin calls refused). Tokens are never flags: give a file, or "
        "set CTRSERVE_EMBEDDING_TOKEN / CTRSERVE_EMBEDDING_ADMIN_TOKEN in the environment",
    )
    sec.add_argument("--tls-cert", metavar="PEM", help="certificate the server presents (enables TLS; needs --tls-key)")
    sec.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    sec.add_argument("--tls-client-ca", metavar="PEM", help="demand client certificates signed by this CA (mutual TLS)")
    sec.add_argument(
        "--token-file", metavar="FILE", help="file holding the read token callers must send (Lookup, Info, Stats)"
    )
    sec.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="file holding the admin token callers must send for Dump, Load, SetOptimizer and PushGradients",
    )
    sec.add_argument(
        "--admin-root",
        action="append",
        metavar="DIR|URL",
        help="a directory, or an s3:// or hdfs:// URL prefix, that Dump may write and Load may read (repeatable; "
        "replaces security.admin_roots; none: Dump and Load are refused)",
    )
    sec.add_argument(
        "--allow-unauthenticated-admin",
        action="store_true",
        default=None,
        help="without an admin token, serve admin calls to every caller; only with a loopback --host, on a machine "
        "whose local users may all load, dump and train this server",
    )
    p.set_defaults(func=run_server)

    a = sub.add_parser(
        "embedding-admin",
        help="stats, dump, load or skip-packet of running embedding servers",
        description="Administer a running set of embedding servers (addresses in shard order).",
    )
    a.add_argument(
        "action",
        choices=["stats", "dump", "load", "skip-packet"],
        help="what to do (dump, load and skip-packet are admin calls: they need the admin token, and the directory "
        "of dump and load must lie in the servers' admin roots)",
    )
    a.add_argument("--servers", required=True, help="comma-separated host:port of shard 0, 1, ...")
    a.add_argument("--embedding-config", required=True, help="embedding_config.yml the servers run with")
    a.add_argument("--directory", help="checkpoint directory for dump and load")
    skip = a.add_argument_group(
        "skip-packet",
        "servers following a model root: give up on the packet a training shard is held at (unreadable after "
        "--unreadable-retry, or missing while later ones exist); its rows are not applied and stats and handler "
        "responses list the seq as skipped. Every replica of every serving shard is asked. An admin call",
    )
    skip.add_argument("--training-shard", type=int, metavar="S", help="the training shard (packet stream)")
    skip.add_argument("--training-shards", type=int, metavar="N", help="the training shard count")
    skip.add_argument("--seq", type=int, help="the packet's sequence number (the one the stream is held at)")
    tls = a.add_argument_group(
        "security",
        "for secured servers; the token comes from --token-file, else the environment: for dump and load "
        "CTRSERVE_EMBEDDING_ADMIN_TOKEN(_FILE) first, for stats CTRSERVE_EMBEDDING_TOKEN(_FILE) first",
    )
    tls.add_argument("--tls-ca", metavar="PEM", help="CA that signed the servers' certificates (enables TLS)")
    tls.add_argument("--tls-cert", metavar="PEM", help="client certificate, for servers demanding mutual TLS")
    tls.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    tls.add_argument("--tls-server-name", metavar="NAME", help="name to verify in the servers' certificates")
    tls.add_argument(
        "--token-file", metavar="FILE", help="file holding the token to send (the admin token for dump and load)"
    )
    a.set_defaults(func=run_admin)


def run_server(args: argparse.Namespace) -> int:
    from embedding_server.rpc.service import start_server

    emb = EmbeddingConfig.load(args.embedding_config)
    glob = GlobalConfig.load(args.global_config)
    if args.mode:
        glob = dataclasses.replace(glob, common_config=dataclasses.replace(glob.common_config, job_type=args.mode))
    problem = _persia_job(args, glob)
    if problem:
        print(f"ctrserve embedding-server: error: {problem}", file=sys.stderr)
        return 2
    follow = _follow_options(args, glob)
    if follow is None and args.model_root:
        return 2
    problem = _place_serving_threads(args)
    if problem:
        print(f"ctrserve embedding-server: error: {problem}", file=sys.stderr)
        return 2
    try:
        security = ServerSecurity.from_settings(_security_settings(args, glob))
        server = start_server(
            emb,
            glob,
            args.shard_index,
            args.num_shards,
            args.port,
            args.host,
            args.metrics_port,
            args.workers,
            model_root=args.model_root,
            follow_options=follow,
            security=security,
            local_socket=None if args.local_socket == "off" else args.local_socket,
        )
    except (HotloadError, ConfigError) as exc:
        print(f"ctrserve embedding-server: error: {exc}", file=sys.stderr)
        return 2
    if args.load:
        from embedding_server.modelroot.checkpoint import embedding_checkpoint, load_store

        try:
            rows = load_store(server.store, embedding_checkpoint(args.load, glob.server.storage))
        except (InvalidRequestError, StorageError) as exc:
            server.stop()
            print(f"ctrserve embedding-server: error: cannot load {args.load}: {exc}", file=sys.stderr)
            return 2
        logging.getLogger("ctrserve.embedding_server").info("loaded %d rows from %s", rows, args.load)
    pusher = _metrics_pusher(server, glob, args.shard_index)
    stopping = threading.Event()

    def on_signal(signum, frame):
        logging.getLogger("ctrserve.embedding_server").info("received %s, draining", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.ready_file:
        info = {
            "address": server.address,
            "port": server.port,
            "metrics_port": server.metrics_port,
            "pid": os.getpid(),
            "local_socket": server.local.path if server.local else None,
        }
        tmp = Path(args.ready_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, args.ready_file)
    stopping.wait()
    server.stop()
    if pusher is not None:
        pusher.stop()
    # Stopped cleanly: a late signal must not turn the exit into a kill (while Python shuts down
    # it puts back the default action of signals it handled; it keeps SIG_IGN).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    logging.getLogger("ctrserve.embedding_server").info("stopped")
    return 0


def _persia_job(args: argparse.Namespace, glob: GlobalConfig) -> str:
    """Apply what PERSIA's ``common_config`` asks of an embedding server: an infer job's
    ``infer_config`` (its checkpoint becomes ``args.load``, its server count ``args.num_shards``
    unless given). Returns what is wrong, or "" (after logging what the job type means here)."""
    log = logging.getLogger("ctrserve.embedding_server")
    infer = glob.common_config.infer_config
    if args.num_shards is None:
        args.num_shards = len(infer.servers) if glob.mode is JobType.INFER and infer.servers else 1
    elif glob.mode is JobType.INFER and infer.servers and args.num_shards != len(infer.servers):
        return (
            f"--num-shards {args.num_shards} disagrees with the {len(infer.servers)} servers of "
            "common_config.infer_config.servers (clients route ids over that many shards)"
        )
    if glob.mode is JobType.INFER and infer.embedding_checkpoint:
        if args.load or args.model_root:
            flag = "--load" if args.load else "--model-root"
            return f"{flag} and common_config.infer_config.embedding_checkpoint both say what to serve: give one"
        args.load = infer.embedding_checkpoint
        log.info("infer job: serving the checkpoint %s (common_config.infer_config.embedding_checkpoint)", args.load)
    if glob.mode is JobType.EVAL:
        log.info("eval job: lookups insert nothing and gradients are refused (the store is read-only)")
    if glob.mode is not JobType.TRAIN and glob.server.enable_incremental_update and not args.model_root:
        log.info(
            "enable_incremental_update in a %s job publishes nothing; to apply a trainer's packets as they come, "
            "serve with --model-root (the folder above its incremental_dir)",
            glob.mode,
        )
    return ""


def _metrics_pusher(server, glob: GlobalConfig, shard_index: int):
    """A started :class:`~embedding_server.rpc.metrics.MetricsPusher` when PERSIA's
    ``metrics_config.enable_metrics`` is on and ``PERSIA_METRICS_GATEWAY_ADDR`` names a
    Pushgateway (as PERSIA's servers read it); else None."""
    from embedding_server.rpc.metrics import MetricsPusher

    metrics = glob.common_config.metrics_config
    gateway = os.environ.get("PERSIA_METRICS_GATEWAY_ADDR", "")
    if not (metrics.enable_metrics and gateway):
        return None
    logging.getLogger("ctrserve.embedding_server").info(
        "pushing metrics to the Pushgateway at %s every %d s as job %s",
        gateway,
        metrics.push_interval_seconds,
        metrics.job_name,
    )
    return MetricsPusher(
        server.metrics.registry,
        gateway,
        metrics.job_name,
        metrics.push_interval_seconds,
        {"instance": f"rep_{shard_index}"},
    ).start()


def _security_settings(args: argparse.Namespace, glob: GlobalConfig) -> SecurityConfig:
    """The global config's ``security`` section with the command line's flags replacing its keys.

    Raises:
        ConfigError: the combination is invalid (e.g. a certificate without its key).
    """
    flags = {
        "tls_cert_file": args.tls_cert,
        "tls_key_file": args.tls_key,
        "tls_client_ca_file": args.tls_client_ca,
        "token_file": args.token_file,
        "admin_token_file": args.admin_token_file,
        "admin_roots": tuple(args.admin_root) if args.admin_root else None,
        "allow_unauthenticated_admin": args.allow_unauthenticated_admin,
    }
    try:
        return dataclasses.replace(glob.security, **{k: v for k, v in flags.items() if v})
    except ValueError as exc:
        raise ConfigError(f"security settings: {exc}") from None


def _follow_options(args: argparse.Namespace, glob: GlobalConfig) -> FollowOptions | None:
    """The --model-root settings; None (after saying why) when they are invalid."""
    if not args.model_root:
        return None
    problem = ""
    if glob.mode is not JobType.INFER:
        problem = "--model-root needs infer mode (--mode infer or common_config.job_type: infer)"
    elif args.load:
        problem = "--model-root and --load exclude each other: the model root's newest checkpoint is loaded"
    else:
        intervals = {
            "--poll-interval": args.poll_interval,
            "--rescan-interval": args.rescan_interval,
            "--gap-timeout": args.gap_timeout,
            "--unreadable-retry": args.unreadable_retry,
            "--read-timeout": args.read_timeout,
            "--stall-timeout": args.stall_timeout,
        }
        problem = next(
            (
                f"{flag} must be a positive number of seconds, got {value}"
                for flag, value in intervals.items()
                if not 0 < value < float("inf")
            ),
            "",
        )
        if not problem:
            return FollowOptions(
                poll_interval_s=args.poll_interval,
                rescan_interval_s=args.rescan_interval,
                gap_timeout_s=args.gap_timeout,
                unreadable_retry_s=args.unreadable_retry,
                read_timeout_s=args.read_timeout,
                stall_timeout_s=args.stall_timeout,
                apply_niceness=args.apply_niceness,
                apply_cpus=args.apply_cpus,
            )
    print(f"ctrserve embedding-server: error: {problem}", file=sys.stderr)
    return None


def _cpu_list(text: str) -> frozenset[int]:
    try:
        return parse_cpu_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _place_serving_threads(args: argparse.Namespace) -> str:
    """Pin the process to its serving CPUs (``--serve-cpus``, by default those left by
    ``--apply-cpus``; the follower thread moves itself onto the apply CPUs once ready). Returns
    what is wrong with the flags, or "" once placed (or when no placement was asked for)."""
    apply, serve = args.apply_cpus, args.serve_cpus
    if apply is None and serve is None:
        return ""
    if apply is not None and not args.model_root:
        return "--apply-cpus needs --model-root: only a server that follows a model root applies packets"
    if not placement_supported():
        return "--apply-cpus and --serve-cpus need Linux: this platform cannot pin threads to CPUs"
    usable = usable_cpus()
    for flag, cpus in (("--apply-cpus", apply), ("--serve-cpus", serve)):
        if cpus is not None and not cpus <= usable:
            return (
                f"{flag} {format_cpu_list(cpus)}: CPU {format_cpu_list(cpus - usable)} is not available to this "
                f"process (it may use CPUs {format_cpu_list(usable)})"
            )
    if serve is None:
        serve = usable - apply
        if not serve:
            return (
                f"--apply-cpus {format_cpu_list(apply)} leaves no CPU to serve on (this process may use CPUs "
                f"{format_cpu_list(usable)}): give it fewer CPUs, or name the serving ones with --serve-cpus"
            )
    pin_process(serve)
    logging.getLogger("ctrserve.embedding_server").info(
        "serving threads run on CPUs %s%s",
        format_cpu_list(serve),
        f", packet applies (once ready) on CPUs {format_cpu_list(apply)}" if apply is not None else "",
    )
    return ""


def _client_security(args: argparse.Namespace) -> ClientSecurity | None:
    """TLS and token settings of ``embedding-admin`` (None when none is given or in the environment):
    the token of ``--token-file``, else, for dump and load, the admin token of the environment
    before the read token, and for stats the reverse.

    Raises:
        ConfigError: an unreadable token or an incomplete certificate setting.
    """
    token: str | None
    if args.token_file:
        token = read_token_file(args.token_file)
    elif args.action in ("dump", "load", "skip-packet"):
        token = resolve_admin_token() or resolve_token(None)
    else:
        token = resolve_token(None) or resolve_admin_token()
    if not (args.tls_ca or args.tls_cert or token):
        return None
    return ClientSecurity(
        tls_ca_file=args.tls_ca,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_server_name=args.tls_server_name,
        token=token,
    )


def run_admin(args: argparse.Namespace) -> int:
    from embedding_server.rpc.remote import RemoteEmbeddingClient

    emb = EmbeddingConfig.load(args.embedding_config)
    try:
        security = _client_security(args)
    except ConfigError as exc:
        print(f"ctrserve embedding-admin: error: {exc}", file=sys.stderr)
        return 2
    with RemoteEmbeddingClient(
        emb, [s.strip() for s in args.servers.split(",") if s.strip()], security=security
    ) as client:
        if args.action == "stats":
            json.dump(client.stats(), sys.stdout, indent=2)
            print()
            return 0
        if args.action == "skip-packet":
            return _skip_packet(client, args)
        if not args.directory:
            print(f"embedding-admin {args.action}: --directory is required", file=sys.stderr)
            return 2
        (client.dump if args.action == "dump" else client.load)(args.directory)
        print(
            f"{args.action} of {client.num_shards} shard(s) {'to' if args.action == 'dump' else 'from'} {args.directory}: done"
        )
    return 0


def _skip_packet(client, args: argparse.Namespace) -> int:
    """``embedding-admin skip-packet``: print every replica's answer as JSON; 0 when all skipped
    (or had skipped) the packet, 1 when one refused, 2 for missing flags."""
    missing = [
        flag
        for flag, value in (
            ("--training-shard", args.training_shard),
            ("--training-shards", args.training_shards),
            ("--seq", args.seq),
        )
        if value is None
    ]
    if missing:
        print(f"embedding-admin skip-packet: {', '.join(missing)} required", file=sys.stderr)
        return 2
    answers = client.skip_packet(args.training_shard, args.training_shards, args.seq)
    json.dump(answers, sys.stdout, indent=2)
    print()
    refused = [a for shard in answers for a in shard if not a["ok"]]
    for answer in refused:
        print(f"embedding-admin skip-packet: {answer['address']}: {answer['error']}", file=sys.stderr)
    return 1 if refused else 0
