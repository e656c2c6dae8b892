"""``vlm-client``: stream captions and answers in a terminal.

vlm-client caption photo.jpg --length short
vlm-client query photo.jpg "What colour is the car?"
vlm-client models
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from .client import VLMClient, channel_credentials
from .errors import VLMError


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--language", default="", help="response language code, e.g. en, ja (default: en)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 means the model's default")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--usage", action="store_true", help="print finish reason and usage to stderr")


def _options(args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "language": args.language,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "stop": args.stop,
        "seed": args.seed,
    }


def _print_stream(stream, show_usage: bool) -> None:
    for text in stream:
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if show_usage:
        print(f"finish_reason={stream.finish_reason} usage={json.dumps(asdict(stream.usage))}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm-client", description="Talk to a vlm-service server.")
    parser.add_argument(
        "--server", default=os.environ.get("VLM_SERVER", "localhost:50051"), help="host:port [env VLM_SERVER]"
    )
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument("--token", default=os.environ.get("VLM_TOKEN"), help="bearer token [env VLM_TOKEN]")
    parser.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca-cert)")
    parser.add_argument("--ca-cert", help="PEM CA bundle that signed the server's certificate (implies --tls)")
    parser.add_argument("--client-cert", help="PEM client certificate, for mutual TLS")
    parser.add_argument("--client-key", help="PEM client private key, for mutual TLS")
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser("caption", help="stream a caption of an image")
    caption.add_argument("image", help="image file")
    caption.add_argument("--length", choices=("short", "normal", "long"), default=None)
    _add_generation_flags(caption)
    query = commands.add_parser("query", help="stream the answer to a question about an image")
    query.add_argument("image", help="image file")
    query.add_argument("question")
    _add_generation_flags(query)
    models = commands.add_parser("models", help="list the server's models")
    models.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    try:
        credentials = channel_credentials(args.tls, args.ca_cert, args.client_cert, args.client_key)
        with VLMClient(args.server, timeout=args.timeout, token=args.token, credentials=credentials) as client:
            if args.command == "caption":
                _print_stream(client.caption(args.image, length=args.length, **_options(args)), args.usage)
            elif args.command == "query":
                _print_stream(client.query(args.image, args.question, **_options(args)), args.usage)
            else:
                infos = client.models()
                if args.json:
                    print(json.dumps([asdict(info) for info in infos], indent=2))
                for info in [] if args.json else infos:
                    flags = ("default " if info.is_default else "") + ("ready" if info.ready else "not ready")
                    print(f"{info.name}\t{info.family}\t{flags}\t{info.source}")
    except VLMError as error:
        print(f"vlm-client: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"vlm-client: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
