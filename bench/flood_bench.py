"""Big pictures against running streams and health, with a real model in a real `vlm-service serve`.

A long stream runs (the model's random-weights twin: it seldom writes its end token, so the stream
runs to its token budget) while ``--pictures`` Captions of 36-megapixel PNGs (about 0.7 MB, under every
limit; each a new picture, so the image cache never helps) arrive at once; a probe asks health every 20 ms on its own channel. Measured from the
flood's start until its last caption ends:

- health: the longest and the median answer time of the probe's checks;
- the running stream: the longest gap between two of its messages;
- each big caption's first text, from the flood's start.

Twins: ``tiny`` (the tiny SmolVLM, random weights; the server with ``--torch-threads 1``, as issue 24
measured) and ``real`` (``smolvlm-256m-shapes``, SmolVLM-256M's shapes and processor; the server at its
defaults). Goals (issue 24): tiny, health <= 100 ms and gap <= 150 ms; real, gap <= 1 s.

Optionally, ``--busy N`` runs N processes that spin on the CPU for the whole measurement (another
service on the same machine), to see how the service degrades.

    make bench-flood                         # ARGS="--twin real --busy 1 --server-args '--torch-threads 1'"
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw

from vlm.v1 import vlm_service_pb2 as pb
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GOALS = {"tiny": {"health_max_ms": 100, "gap_max_ms": 150}, "real": {"gap_max_ms": 1000}}


def png(image: Image.Image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def big_pictures(count: int, megapixels: int = 36) -> list[bytes]:
    """``count`` PNGs of ``megapixels`` million pixels that compress well (lines on white), each with a
    pixel of its own, so the image cache never helps."""
    side = int((megapixels * 1_000_000) ** 0.5)
    image = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(image)
    for i in range(0, side, 97):
        draw.line((0, i, side, side - i), fill=(i % 255, 80, 160), width=3)
    pictures = []
    for n in range(count):
        image.putpixel((n % side, 0), (n % 256, (n // 256) % 256, 7))
        pictures.append(png(image))
    return pictures


def small_picture() -> bytes:
    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).ellipse((24, 8, 72, 56), fill="red")
    return png(image)


def twin_dir(twin: str, cache_dir: Path) -> Path:
    if twin == "tiny":
        from vlm_checkpoints.tiny_smolvlm import ensure_tiny_smolvlm

        return ensure_tiny_smolvlm(cache_dir, trained=False)
    from vlm_checkpoints.smolvlm_256m_shapes import ensure_smolvlm_256m_shapes

    return ensure_smolvlm_256m_shapes(cache_dir)


def start_server(model: Path, extra: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`vlm-service serve` on a free loopback port with ``model`` as `twin`; returns once it is SERVING."""
    args = [str(BIN / "vlm-service"), "serve", "--host", "127.0.0.1", "--port", "0", "--model", f"twin={model}"]
    process = subprocess.Popen(
        [*args, *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
    )
    line = process.stdout.readline()
    if not line.startswith("vlm-service listening on "):
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    target = line.split()[-1]
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return process, target
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server never reported SERVING")


def spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def one_flood(target: str, tokens: int, pictures: list[bytes]) -> dict:
    """One measurement against a running server."""
    stream_times: list[float] = []
    health_times: list[tuple[float, float]] = []  # (asked at, seconds to answer)
    first_texts: list[float] = []
    flood_done = threading.Event()
    with grpc.insecure_channel(target) as channel, grpc.insecure_channel(target) as probe_channel:
        stub = pb_grpc.VisionLanguageServiceStub(channel)
        stream = stub.Caption(
            pb.CaptionRequest(image=pb.Image(data=small_picture()), options=pb.GenerationOptions(max_new_tokens=tokens))
        )

        def read() -> None:
            try:
                for message in stream:
                    stream_times.append(time.monotonic())
                    if message.finish_reason:
                        return
            except grpc.RpcError:
                pass

        reader = threading.Thread(target=read)
        reader.start()
        while len(stream_times) < 20:
            if not reader.is_alive():
                raise SystemExit("the running stream ended before the flood")
            time.sleep(0.01)
        health_stub = health_pb2_grpc.HealthStub(probe_channel)

        def probe() -> None:
            while not flood_done.is_set():
                asked = time.monotonic()
                health_stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
                health_times.append((asked, time.monotonic() - asked))
                time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        start = time.monotonic()

        def caption(picture: bytes) -> None:
            request = pb.CaptionRequest(image=pb.Image(data=picture), options=pb.GenerationOptions(max_new_tokens=4))
            for message in stub.Caption(request, timeout=600):
                if message.text:
                    first_texts.append(time.monotonic() - start)
                    break

        callers = [threading.Thread(target=caption, args=(picture,)) for picture in pictures]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        end = time.monotonic()
        flood_done.set()
        prober.join()
        still_streaming = reader.is_alive()
        stream.cancel()
        reader.join()
    spans = [(a, b) for a, b in zip(stream_times, stream_times[1:], strict=False) if b > start and a < end]
    gaps = [b - a for a, b in spans]
    longest = sorted(spans, key=lambda span: span[0] - span[1])[:3]
    answers = [seconds for asked, seconds in health_times if start <= asked <= end]
    return {
        "flood_seconds": end - start,
        "health_max_ms": 1000 * max(answers),
        "health_median_ms": 1000 * statistics.median(answers),
        "health_checks": len(answers),
        "gap_max_ms": 1000 * max(gaps) if gaps else None,
        "stream_messages_during_flood": len(gaps),
        # when the three longest gaps began, in seconds from the flood's start, and how long they were (ms)
        "longest_gaps_at_seconds": [[round(a - start, 2), round(1000 * (b - a))] for a, b in longest],
        "stream_outlasted_flood": still_streaming,
        "first_text_seconds": sorted(first_texts),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--twin", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--pictures", type=int, default=4, help="big Captions sent at once (default 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=0, help="the running stream's budget (default: by twin)")
    parser.add_argument("--server-args", default="", help="extra `vlm-service serve` flags")
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU meanwhile")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    from vlm_service.config import Settings

    cache_dir = Path(os.environ.get("VLM_CACHE_DIR") or Settings().cache_dir).expanduser()
    model = twin_dir(args.twin, cache_dir)
    extra = shlex.split(args.server_args)
    if args.twin == "tiny" and "--torch-threads" not in extra:
        extra += ["--torch-threads", "1"]
    tokens = args.tokens or (1500 if args.twin == "tiny" else 400)
    pictures = big_pictures(args.pictures * (args.repeats + 1))
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    process, target = start_server(model, [*extra, "--max-new-tokens-limit", str(max(tokens, 2048))])
    runs = []
    try:
        for spinner in spinners:
            spinner.start()
        one_flood(target, min(tokens, 200), pictures[: args.pictures])  # a warm-up flood (first-call costs)
        for n in range(1, args.repeats + 1):
            runs.append(one_flood(target, tokens, pictures[n * args.pictures : (n + 1) * args.pictures]))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()
        process.terminate()
        process.wait(60)
    summary = {
        "twin": args.twin,
        "server_args": extra,
        "busy_processes": args.busy,
        "pictures": args.pictures,
        "picture_bytes": len(pictures[0]),
        "load_average": os.getloadavg(),
        "runs": runs,
        "worst": {key: max(run[key] for run in runs) for key in ("health_max_ms", "gap_max_ms")},
    }
    goals = GOALS[args.twin]
    print(
        f"\nflood of {args.pictures} x 36 MP ({len(pictures[0]) / 1e3:.0f} KB PNGs, each new), {args.twin} twin, {extra}, busy={args.busy}"
    )
    print("| run | health max | health median | stream's longest gap | flood | first texts |")
    print("|---|---|---|---|---|---|")
    for i, run in enumerate(runs, 1):
        firsts = ", ".join(f"{t:.1f}" for t in run["first_text_seconds"])
        print(
            f"| {i} | {run['health_max_ms']:.0f} ms | {run['health_median_ms']:.1f} ms | {run['gap_max_ms']:.0f} ms "
            f"| {run['flood_seconds']:.1f} s | {firsts} s |"
        )
    for key, goal in goals.items():
        worst = summary["worst"][key]
        print(f"goal {key} <= {goal}: worst {worst:.0f} -> {'met' if worst <= goal else 'NOT met'}")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"flood_{args.twin}{'_busy' + str(args.busy) if args.busy else ''}.json"
    (args.out / name).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
