"""``vlm-service``: run the server (``serve``), probe one (``health``), or build built-in checkpoints (``build``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from vlm_service.config import ConfigError, add_arguments, load_settings
from vlm_service.observability import logs


def _serve(args: argparse.Namespace) -> int:
    from vlm_service.backends.registry import UnsupportedModel
    from vlm_service.server import StartupError, serve

    try:
        settings = load_settings(args)
    except ConfigError as exc:
        print(f"vlm-service: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (UnsupportedModel, StartupError) as exc:
        print(f"vlm-service: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from vlm_client import channel_credentials

    try:
        credentials = channel_credentials(args.tls, args.ca_cert, args.client_cert, args.client_key)
    except OSError as exc:
        print(f"vlm-service health: {exc}", file=sys.stderr)
        return 2
    channel = grpc.secure_channel(args.server, credentials) if credentials else grpc.insecure_channel(args.server)
    try:
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.server}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _build(args: argparse.Namespace) -> int:
    """Build built-in checkpoints now from the code (they are otherwise built on first use, or taken
    from the package where one is shipped; ``--shipped`` takes those too): by default the tiny ones; the
    real-size twins only when named."""
    import contextlib
    import time

    from vlm_checkpoints.builder import fresh_builds
    from vlm_service.backends.catalogue import BUILTINS

    try:
        cache_dir = load_settings(args).cache_dir
    except ConfigError as exc:
        print(f"vlm-service build: {exc}", file=sys.stderr)
        return 2
    logs.configure("warning")
    buildable = {name: builtin for name, builtin in BUILTINS.items() if builtin.build is not None}
    for name in args.names or [name for name, builtin in buildable.items() if not builtin.twin]:
        if name not in buildable:
            print(
                f"vlm-service build: {name!r} is not a buildable built-in (a tiny checkpoint or a real-size twin); "
                f"those are {', '.join(buildable)}",
                file=sys.stderr,
            )
            return 2
        builtin = buildable[name]
        if builtin.twin:
            start = time.monotonic()
            with fresh_builds():
                path = builtin.build(cache_dir)
            print(f"{name} (real size, random weights): {path} ({time.monotonic() - start:.0f} s)")
            continue
        for trained in (True, False) if args.random_twins else (True,):
            start = time.monotonic()
            with fresh_builds() if not args.shipped else contextlib.nullcontext():
                path = builtin.build(cache_dir, trained)
            print(f"{name}{'' if trained else ' (random weights)'}: {path} ({time.monotonic() - start:.0f} s)")
    return 0


def version_line() -> str:
    """This distribution's version and those it serves with (read from the installed metadata: nothing
    heavy is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    parts = ", ".join(f"{name} {of(name)}" for name in ("vlm-client", "grpcio", "torch", "transformers"))
    return f"vlm-service {of('vlm-service')} ({parts})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-service",
        description="Serve vision-language models over gRPC.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the version line unwrapped
    )
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server until SIGTERM/SIGINT")
    add_arguments(serve)
    serve.set_defaults(func=_serve)
    health = commands.add_parser("health", help="exit 0 if the server reports SERVING (for healthchecks)")
    health.add_argument("--server", default=os.environ.get("VLM_SERVER", "localhost:50051"), help="host:port")
    health.add_argument("--service", default="", help="service name to check; empty means the whole server")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds")
    health.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca-cert)")
    health.add_argument("--ca-cert", help="PEM CA bundle that signed the server's certificate")
    health.add_argument("--client-cert", help="PEM client certificate, for mutual TLS")
    health.add_argument("--client-key", help="PEM client private key, for mutual TLS")
    health.set_defaults(func=_health)
    build = commands.add_parser(
        "build",
        help="build built-in checkpoints from the code now (else each is built when first served, "
        "unless a current copy ships with the package)",
    )
    build.add_argument(
        "names", nargs="*", help="built-in names (default: every tiny one; real-size twins only when named)"
    )
    add_arguments(build, only=("cache_dir",))
    build.add_argument(
        "--random-twins",
        action="store_true",
        help="also build each tiny one's random-weights twin (the tests use them)",
    )
    build.add_argument(
        "--shipped",
        action="store_true",
        help="take a checkpoint shipped with the package as it is when its key is current (what serving "
        "does), instead of building it",
    )
    build.set_defaults(func=_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
