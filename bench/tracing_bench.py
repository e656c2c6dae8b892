"""What tracing costs: per-token latency and time to first text with tracing off and on.

The server runs in this process (``VLMServer``, the random-weights tiny SmolVLM, batched) on a
loopback port; a gRPC client streams captions from it at a fixed concurrency and times each text
message as it arrives. Modes, interleaved (off, on, off, on, ...) because this machine is noisy:

- ``off``: no ``--otlp-endpoint`` (the default): no interceptor, no span;
- ``on``: ``--otlp-endpoint`` pointing at a local OTLP/gRPC receiver (the OpenTelemetry collector's
  TraceService, answered in this process), so spans are really batched, serialised and sent.

Prints medians over the repeats of each mode's median and p95 gap between text messages, its median
time to first text and its throughput, and how many spans the receiver got (4 per call when on).

    make bench-tracing            # ARGS="--tokens 64 --calls 24 --concurrency 4 --repeats 3"
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlm.v1 import vlm_service_pb2 as pb  # noqa: E402
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc  # noqa: E402
from vlm_checkpoints.tiny_smolvlm import ensure_tiny_smolvlm  # noqa: E402
from vlm_service.config import Settings  # noqa: E402
from vlm_service.server import VLMServer  # noqa: E402


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that counts what it is sent."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(self, request, context):
        count = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        with self._lock:
            self.spans += count
        return trace_service_pb2.ExportTraceServiceResponse()


def png(index: int) -> bytes:
    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).ellipse((24, 16, 72, 48), fill="red")
    image.putpixel((index % 96, index // 96 % 64), (index * 7 % 256, 40, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(mode: str, args, receiver_port: int, first_image: int) -> dict:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        models=[f"noise={args.checkpoint}"],
        cache_dir=args.cache_dir,
        access_log=False,
        otlp_endpoint=f"http://127.0.0.1:{receiver_port}" if mode == "on" else "",
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(VLMServer.start(settings), loop).result(120)
    asyncio.run_coroutine_threadsafe(server.wait_ready(), loop).result(300)
    gaps: list[float] = []
    ttft: list[float] = []
    tokens = 0
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.VisionLanguageServiceStub(channel)

            def one(index: int) -> tuple[list[float], float, int]:
                request = pb.CaptionRequest(
                    image=pb.Image(data=png(index)), options=pb.GenerationOptions(max_new_tokens=args.tokens)
                )
                start = time.perf_counter()
                arrivals, produced = [], 0
                for message in stub.Caption(request, timeout=300):
                    if message.text:
                        arrivals.append(time.perf_counter())
                    if message.HasField("usage"):
                        produced = message.usage.completion_tokens
                return [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)], arrivals[0] - start, produced

            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                for call_gaps, first, produced in pool.map(one, range(first_image, first_image + args.calls)):
                    gaps.extend(call_gaps)
                    ttft.append(first)
                    tokens += produced
            wall = time.perf_counter() - started
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    return {
        "gap_p50_ms": percentile(gaps, 0.5) * 1000,
        "gap_p95_ms": percentile(gaps, 0.95) * 1000,
        "ttft_p50_ms": percentile(ttft, 0.5) * 1000,
        "tok_s": tokens / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="max_new_tokens per call")
    parser.add_argument("--calls", type=int, default=24, help="calls per run")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, interleaved")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("VLM_CACHE_DIR", "~/.cache/vlm-service")).expanduser()
    )
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args.checkpoint = ensure_tiny_smolvlm(args.cache_dir, trained=False)

    receiver = Receiver()
    collector = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    receiver_port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()

    results: dict[str, list[dict]] = {"off": [], "on": []}
    image = 0
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            results[mode].append(run(mode, args, receiver_port, image))
            image += args.calls  # fresh images: the image cache never helps
    collector.stop(0)

    print(f"{args.calls} calls x {args.tokens} tokens at concurrency {args.concurrency}, {args.repeats} runs per mode")
    print(f"{'tracing':8} {'gap p50 ms':>11} {'gap p95 ms':>11} {'TTFT p50 ms':>12} {'tokens/s':>9}")
    for mode, runs in results.items():
        row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(
            f"{mode:8} {row['gap_p50_ms']:11.2f} {row['gap_p95_ms']:11.2f} {row['ttft_p50_ms']:12.1f} {row['tok_s']:9.1f}"
        )
    print(f"spans received over OTLP: {receiver.spans} ({args.calls * args.repeats} traced calls)")


if __name__ == "__main__":
    main()
