"""``vlm-client``: stream captions and answers in a terminal.

vlm-client caption photo.jpg --length short
vlm-client query photo.jpg "What colour is the car?" --server vlm.example:50051 --tls
vlm-client detect photo.jpg "red car" --draw boxes.png
vlm-client point photo.jpg "face"
vlm-client watch frames/ --fps 20 --question "Is the door open?" --policy interrupt
vlm-client models

Connection options (--server, --tls, --token-file, ...) go before or after the subcommand.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict

from . import __version__
from .client import VLMClient, channel_credentials
from .errors import VLMError


class UsageError(Exception):
    """Options that cannot be used together or a token that cannot be read (exit 2)."""


def _add_connection_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The connection options. The top-level parser holds the defaults; each subcommand accepts the same
    options with no default of its own (SUPPRESS), so a value given after the subcommand wins and an
    absent one leaves the top-level value in place."""

    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--server", default=default(None), help="host:port or a gRPC target [env VLM_SERVER]")
    parser.add_argument("--timeout", type=float, default=default(None), help="deadline in seconds")
    parser.add_argument(
        "--token-file",
        default=default(None),
        help="file whose content is the bearer token (preferred: not visible in `ps`) [env VLM_TOKEN_FILE]",
    )
    parser.add_argument(
        "--token",
        default=default(None),
        help="bearer token; visible to every user in `ps`, prefer --token-file or VLM_TOKEN [env VLM_TOKEN]",
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(False), help="use TLS (system roots unless --ca-cert)"
    )
    parser.add_argument("--ca-cert", default=default(None), help="PEM CA bundle that signed the server's certificate")
    parser.add_argument("--client-cert", default=default(None), help="PEM client certificate, for mutual TLS")
    parser.add_argument("--client-key", default=default(None), help="PEM client private key, for mutual TLS")
    parser.add_argument(
        "--wait-for-ready",
        action="store_true",
        default=default(False),
        help="wait (up to --timeout) for a server whose health says SERVING instead of failing at once",
    )


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--language", default="", help="response language code, e.g. en, ja (default: en)")
    parser.add_argument(
        "--detail",
        choices=("auto", "low", "high"),
        default=None,
        help="how much of the picture the model looks at: low is one view (fastest), high the model's full "
        "tiling (default: auto, the model's own; `vlm-client models --json` lists each model's)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 means the model's default")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--usage", action="store_true", help="print finish reason and usage to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-client", description="Talk to a vlm-service server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_connection_flags(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser("caption", help="stream a caption of an image")
    caption.add_argument("image", help="image file")
    caption.add_argument("--length", choices=("short", "normal", "long"), default=None)
    _add_generation_flags(caption)
    query = commands.add_parser("query", help="stream the answer to a question about an image")
    query.add_argument("image", help="image file")
    query.add_argument("question")
    _add_generation_flags(query)
    query.add_argument(
        "--image",
        dest="more_images",
        action="append",
        default=[],
        metavar="IMAGE",
        help="another picture the question is about, after the first (repeatable; `models --json` says each "
        "model's max_images)",
    )
    grounding = []
    for name, what in (("detect", "a box around"), ("point", "a point on")):
        command = commands.add_parser(name, help=f"stream {what} every instance of an object in an image")
        command.add_argument("image", help="image file")
        command.add_argument("object", help='what to find, in words ("red circle", "face")')
        command.add_argument("--max-objects", type=int, default=0, help="most objects returned (0: server default)")
        command.add_argument("--model", default="", help="model name (default: the server's default model)")
        command.add_argument("--detail", choices=("auto", "low", "high"), default=None, help="image detail")
        command.add_argument("--draw", metavar="OUT", help="write the picture with what was found drawn on it")
        command.add_argument("--json", action="store_true", help="print one JSON object per line")
        command.add_argument("--usage", action="store_true", help="print finish reason and usage to stderr")
        grounding.append(command)
    watch = commands.add_parser(
        "watch", help="send pictures as a live feed and print each answered frame's answer as it streams"
    )
    watch.add_argument(
        "frames", metavar="DIR_OR_GLOB", help="a directory of images (sent in name order), or a glob pattern (quoted)"
    )
    watch.add_argument("--fps", type=float, default=10.0, help="frames sent per second (default 10; 0: at once)")
    watch.add_argument("--question", default="", help="asked about every frame (default: caption each frame)")
    watch.add_argument(
        "--policy",
        choices=("latest", "interrupt"),
        default="latest",
        help="latest: finish each answer, then answer the newest frame; interrupt: a newer frame stops it",
    )
    watch.add_argument("--length", choices=("short", "normal", "long"), default=None, help="caption length")
    _add_generation_flags(watch)
    models = commands.add_parser("models", help="list the server's models")
    models.add_argument("--json", action="store_true", help="print JSON")
    for command in (caption, query, *grounding, watch, models):
        _add_connection_flags(command, defaults=False)
    return parser


def resolve_token(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """The bearer token: --token, else --token-file, else $VLM_TOKEN, else $VLM_TOKEN_FILE (flags win over
    the environment). A token file holds the token alone; surrounding whitespace is ignored."""
    if args.token and args.token_file:
        raise UsageError("give --token or --token-file, not both")
    if args.token:
        return args.token
    if args.token_file:
        return _read_token(args.token_file)
    if environ.get("VLM_TOKEN"):
        return environ["VLM_TOKEN"]
    if environ.get("VLM_TOKEN_FILE"):
        return _read_token(environ["VLM_TOKEN_FILE"])
    return None


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read the token file {path}: {getattr(error, 'strerror', None) or error}") from None
    if not token:
        raise UsageError(f"the token file {path} is empty")
    return token


def _options(args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "language": args.language,
        "detail": args.detail,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "stop": args.stop,
        "seed": args.seed,
    }


def _print_regions(stream, image: str, args: argparse.Namespace) -> None:
    """Each box or point as it streams, in normalized coordinates and in the picture's pixels; what the
    model wrote that was not one goes to stderr; with --draw, the picture with them drawn."""
    size = _picture_size(image)
    for region in stream:
        if args.json:
            print(json.dumps({type(region).__name__.lower(): asdict(region)}), flush=True)
            continue
        values = " ".join(f"{name}={value:.3f}" for name, value in asdict(region).items())
        pixels = f"  pixels={region.pixels(*size)}" if size else ""
        print(f"{type(region).__name__.lower()} {values}{pixels}", flush=True)
    for malformed in stream.malformed:
        print(f"vlm-client: the model wrote {malformed.text!r}: {malformed.reason}", file=sys.stderr)
    if not stream.regions and not args.json:
        print(f"no {args.object} found")
    if args.usage:
        _print_usage(stream)
    if args.draw:
        _draw(image, stream.regions, args.draw)


def _picture_size(path: str) -> tuple[int, int] | None:
    """The picture's width and height after its EXIF rotation (what the coordinates are relative to),
    or None without Pillow."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        return None
    with Image.open(path) as picture:
        return ImageOps.exif_transpose(picture).size


def _draw(path: str, regions: list, out: str) -> None:
    try:
        from PIL import Image, ImageDraw, ImageOps
    except ImportError:
        raise UsageError("--draw needs Pillow: pip install 'vlm-client[draw]'") from None
    with Image.open(path) as opened:
        picture = ImageOps.exif_transpose(opened).convert("RGB")
    pen = ImageDraw.Draw(picture)
    width, height = picture.size
    line = max(2, round(min(width, height) / 100))
    for region in regions:
        if hasattr(region, "x_min"):
            pen.rectangle(region.pixels(width, height), outline=(255, 0, 255), width=line)
        else:
            x, y = region.pixels(width, height)
            r = 2 * line
            pen.ellipse((x - r, y - r, x + r, y + r), fill=(255, 0, 255), outline=(255, 255, 255))
    picture.save(out)
    print(f"wrote {out} ({len(regions)} drawn)", file=sys.stderr)


def _print_stream(stream, show_usage: bool) -> None:
    for text in stream:
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if show_usage:
        _print_usage(stream)


def _print_usage(stream) -> None:
    print(f"finish_reason={stream.finish_reason} usage={json.dumps(asdict(stream.usage))}", file=sys.stderr)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


def frame_files(where: str) -> list[str]:
    """The pictures to send: a directory's image files in name order, or the files a glob pattern
    matches, in name order."""
    if os.path.isdir(where):
        names = sorted(name for name in os.listdir(where) if name.lower().endswith(IMAGE_SUFFIXES))
        files = [path for path in (os.path.join(where, name) for name in names) if os.path.isfile(path)]
    else:
        files = sorted(path for path in glob.glob(where) if os.path.isfile(path))
    if not files:
        raise UsageError(f"no images in {where}" if os.path.isdir(where) else f"no files match {where}")
    return files


def paced(files: list[str], fps: float) -> Iterator[tuple[int, str]]:
    """``(frame_id, path)`` for each file, at ``fps`` frames per second (0: as fast as they are taken)."""
    start = time.monotonic()
    for index, path in enumerate(files):
        if fps > 0:
            delay = start + index / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield index, path


def _print_watch(stream, files: list[str], show_usage: bool) -> None:
    for answer in stream:
        name = os.path.basename(files[answer.frame_id]) if answer.frame_id < len(files) else "?"
        if answer.error is not None:
            print(f"vlm-client: frame {answer.frame_id} ({name}): {answer.error}", file=sys.stderr)
            continue
        sys.stdout.write(f"[{answer.frame_id} {name}] ")
        sys.stdout.flush()
        for text in answer:
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write(" [interrupted]\n" if answer.finish_reason == "interrupted" else "\n")
        sys.stdout.flush()
        if show_usage:
            print(
                f"frame={answer.frame_id} finish_reason={answer.finish_reason} "
                f"frames_skipped={answer.frames_skipped} usage={json.dumps(asdict(answer.usage))}",
                file=sys.stderr,
            )


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    server = args.server or environ.get("VLM_SERVER") or "localhost:50051"
    try:
        token = resolve_token(args, environ)
        credentials = channel_credentials(args.tls, args.ca_cert, args.client_cert, args.client_key)
        with VLMClient(
            server,
            timeout=args.timeout,
            token=token,
            credentials=credentials,
            wait_for_ready=args.wait_for_ready or None,
            health_check=args.wait_for_ready,
        ) as client:
            if args.command == "caption":
                _print_stream(client.caption(args.image, length=args.length, **_options(args)), args.usage)
            elif args.command == "query":
                images = [args.image, *args.more_images] if args.more_images else args.image
                _print_stream(client.query(images, args.question, **_options(args)), args.usage)
            elif args.command in ("detect", "point"):
                if args.max_objects < 0:
                    raise UsageError(f"--max-objects must be 0 or more, got {args.max_objects}")
                call = client.detect if args.command == "detect" else client.point
                stream = call(
                    args.image, args.object, max_objects=args.max_objects, model=args.model, detail=args.detail
                )
                _print_regions(stream, args.image, args)
            elif args.command == "watch":
                if not args.fps >= 0:
                    raise UsageError(f"--fps must be 0 or more, got {args.fps}")
                files = frame_files(args.frames)
                stream = client.watch(
                    paced(files, args.fps),
                    args.question,
                    policy=args.policy,
                    length=args.length,
                    timeout=args.timeout,
                    **_options(args),
                )
                _print_watch(stream, files, args.usage)
            else:
                infos = client.models()
                if args.json:
                    print(json.dumps([asdict(info) for info in infos], indent=2))
                for info in [] if args.json else infos:
                    flags = ("default " if info.is_default else "") + ("ready" if info.ready else "not ready")
                    print(f"{info.name}\t{info.family}\t{flags}\t{info.source}")
    except UsageError as error:
        print(f"vlm-client: {error}", file=sys.stderr)
        return 2
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
