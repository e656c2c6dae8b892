"""Streaming benchmark: the service against in-process ``model.generate`` and ``transformers serve``.

Every target runs the tiny SmolVLM architecture with random weights (the checkpoint the tests use for
long generations: it seldom writes its end token, so answers run to the asked length), on the same
image and prompt, asking for the same number of tokens:

- ``service``: ``vlm-service serve`` in its own process, driven by the real async Python client
  (``AsyncVLMClient``) from this one, at concurrency 1, 2, 4, 8 and 16;
- ``in-process``: the same checkpoint's ``model.generate`` in this process, one request and one batched
  call of 8 (the physical limit of this hardware), timed with a streamer;
- ``transformers-serve``: ``transformers serve`` in its own process (OpenAI-style streaming chat
  completions, the image as a data URL), at the same concurrencies.

Runs are interleaved (every target once, then again) and medians of the repeats are quoted, because
this machine is noisy. Prints one table; writes JSON and a PNG plot of aggregate tokens/s and time to
first text against concurrency.

    make bench                        # ARGS="--tokens 32 1000 --concurrency 1 2 4 8 16 --repeats 3"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pictures import picture, png  # noqa: E402

PROMPT = "Describe this image."
SIZE = (96, 64)  # the pictures' size (width, height); the real-size bench asks for 512x512


class Images:
    """A fresh image for every request, so the service's image cache never helps in the main table."""

    def __init__(self) -> None:
        self.count = 0

    def next(self) -> int:
        self.count += 1
        return self.count


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Stream:
    """What one stream's client saw: when it started, when each piece of text arrived, the tokens."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.arrivals: list[float] = []
        self.text: list[str] = []
        self.tokens = 0
        self.prompt_tokens = 0
        self.end = 0.0

    def piece(self, text: str) -> None:
        self.arrivals.append(time.perf_counter())
        self.text.append(text)


def summarize(streams: list[Stream], wall: float) -> dict:
    """One run's figures: TTFT and inter-token gap percentiles, per-stream and aggregate tokens/s."""
    ttft = [(s.arrivals[0] - s.start) * 1000 for s in streams if s.arrivals]
    itl = []
    for s in streams:
        itl.extend((b - a) * 1000 for a, b in zip(s.arrivals, s.arrivals[1:], strict=False))
    total = sum(s.tokens for s in streams)
    return {
        "ttft_p50_ms": _percentile(ttft, 0.5),
        "ttft_p95_ms": _percentile(ttft, 0.95),
        "gap_p50_ms": _percentile(itl, 0.5),
        "gap_p95_ms": _percentile(itl, 0.95),
        "stream_tok_s": statistics.median(s.tokens / (s.end - s.start) for s in streams),
        "aggregate_tok_s": total / wall,
        "tokens_per_stream": total / len(streams),
    }


class InProcess:
    """The physical limit: the backend's own ``prepare`` + ``model.generate``, no server."""

    name = "in-process"

    def __init__(self, checkpoint: Path, dtype: str = "float32", size: tuple[int, int] = SIZE):
        from vlm_service.backends.runtime import ModelSpec, Runtime
        from vlm_service.backends.smolvlm import SmolVLMBackend
        from vlm_service.types import GenerationRequest, SamplingParams, Task

        self.size = size
        self.backend = SmolVLMBackend(ModelSpec("bench", str(checkpoint)), Runtime("cpu", dtype))
        self.backend.load()
        self.backend.processor.tokenizer.padding_side = "left"
        self.request = GenerationRequest("bench", "bench", Task.CAPTION, picture(0, SIZE), SamplingParams(1))

    async def run(self, tokens: int, images: list[int]) -> tuple[list[Stream], float]:
        """One request per image, as one batched ``generate`` call (1 or 8 in the table)."""
        concurrency = len(images)
        from transformers.generation.streamers import BaseStreamer

        prompt = self.backend.prompt(self.request)
        streams = [Stream() for _ in range(concurrency)]

        class Clock(BaseStreamer):
            seen_prompt = False

            def put(self, value):
                if not self.seen_prompt:
                    self.seen_prompt = True
                    return
                now = time.perf_counter()
                for stream in streams:
                    stream.arrivals.append(now)

            def end(self):
                pass

        start = time.perf_counter()
        for stream in streams:
            stream.start = start
        inputs = self.backend.encode([prompt] * concurrency, [picture(index, self.size) for index in images])
        with torch.inference_mode():
            out = self.backend.model.generate(
                **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=Clock()
            )
        end = time.perf_counter()
        for stream in streams:
            stream.tokens = out.shape[1] - inputs["input_ids"].shape[1]
            stream.prompt_tokens = inputs["input_ids"].shape[1]
            stream.end = end
        return streams, end - start


class Service:
    name = "service"

    def __init__(
        self, cache_dir: Path, checkpoint: Path, max_batch: int, flags: Sequence[str] = (), size: tuple[int, int] = SIZE
    ):
        """``flags``: more ``vlm-service serve`` flags (none: the server's defaults)."""
        self.size = size
        self.port = _free_port()
        env = {
            **os.environ,
            "VLM_MODELS": f"bench={checkpoint}",
            "VLM_CACHE_DIR": str(cache_dir),
            "VLM_HOST": "127.0.0.1",
            "VLM_PORT": str(self.port),
            "VLM_LOG_LEVEL": "warning",
        }
        if max_batch:
            env["VLM_MAX_BATCH_SIZE"] = str(max_batch)
        self.process = subprocess.Popen([sys.executable, "-m", "vlm_service", "serve", *flags], env=env)

    async def start(self, timeout: float = 300) -> None:
        from vlm_client import AsyncVLMClient

        self.client = AsyncVLMClient(f"127.0.0.1:{self.port}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (await self.client.models(timeout=2))[0].ready:
                    return
            except Exception:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the server did not start")
            await asyncio.sleep(0.2)

    async def _one(self, tokens: int, image: int, question: str = "") -> Stream:
        data = png(image, self.size)
        stream = Stream()
        if question:
            call = self.client.query(data, question, max_new_tokens=tokens)
        else:
            call = self.client.caption(data, max_new_tokens=tokens)
        async for text in call:
            stream.piece(text)
        stream.end = time.perf_counter()
        stream.tokens = call.usage.completion_tokens
        stream.prompt_tokens = call.usage.prompt_tokens
        return stream

    async def run(self, tokens: int, images: list[int]) -> tuple[list[Stream], float]:
        start = time.perf_counter()
        streams = await asyncio.gather(*(self._one(tokens, image) for image in images))
        return list(streams), time.perf_counter() - start

    async def exact(self, tokens: int, images: list[int]) -> bool:
        """Whether greedy streams run together give each the same text as it gets alone."""
        alone = ["".join((await self._one(tokens, image)).text) for image in images]
        together, _ = await self.run(tokens, images)
        return alone == ["".join(s.text) for s in together]

    async def cache_gain(self, repeats: int) -> dict:
        """Time to first text of a Query on a new image, and on an image a Caption just used."""
        fresh, cached = [], []
        for _ in range(repeats):
            stream = await self._one(8, self.images.next(), "What is in the image?")
            fresh.append((stream.arrivals[0] - stream.start) * 1000)
            image = self.images.next()
            await self._one(8, image)  # the Caption
            stream = await self._one(8, image, "What is in the image?")
            cached.append((stream.arrivals[0] - stream.start) * 1000)
        return {
            "query_ttft_new_image_ms": statistics.median(fresh),
            "query_ttft_cached_image_ms": statistics.median(cached),
        }

    async def close(self) -> None:
        await self.client.close()
        self.process.terminate()
        self.process.wait(30)


class TransformersServe:
    """``transformers serve`` with the same checkpoint, over OpenAI-style streaming chat completions."""

    name = "transformers-serve"

    def __init__(self, checkpoint: Path, size: tuple[int, int] = SIZE):
        self.size = size
        self.port = _free_port()
        self.model = str(checkpoint)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "transformers"), "serve", "--port", str(self.port)]
            + ["--device", "cpu", "--log-level", "warning", self.model],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def start(self, timeout: float = 300) -> None:
        import httpx

        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (await self.http.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("transformers serve did not start")
            await asyncio.sleep(0.5)

    async def _one(self, tokens: int, image: int) -> Stream:
        url = "data:image/png;base64," + base64.b64encode(png(image, self.size)).decode()
        body = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": tokens,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": PROMPT},
                    ],
                }
            ],
        }
        stream = Stream()
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        stream.piece(choice["delta"]["content"])
                if chunk.get("usage"):
                    stream.tokens = chunk["usage"]["completion_tokens"]
                    stream.prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
        stream.end = time.perf_counter()
        if not stream.tokens:  # no usage chunk: count the content chunks
            stream.tokens = len(stream.arrivals)
        return stream

    async def run(self, tokens: int, images: list[int]) -> tuple[list[Stream], float]:
        start = time.perf_counter()
        streams = await asyncio.gather(*(self._one(tokens, image) for image in images))
        return list(streams), time.perf_counter() - start

    async def close(self) -> None:
        await self.http.aclose()
        self.process.terminate()
        self.process.wait(30)


async def measure(args) -> dict:
    from transformers.utils import logging as hf_logging

    from vlm_checkpoints.tiny_smolvlm import ensure_tiny_smolvlm

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    checkpoint = ensure_tiny_smolvlm(args.cache_dir, trained=False)
    images = Images()
    local = InProcess(checkpoint)
    service = Service(args.cache_dir, checkpoint, args.max_batch)
    service.images = images
    servers = [service]
    if not args.no_transformers_serve:
        servers.append(TransformersServe(checkpoint))
    for server in servers:
        await server.start()
    runs: dict = {}  # (target, tokens, concurrency) -> [figures per repeat]
    try:
        for tokens in args.tokens:
            plan = [(local, 1), (local, 8)] + [(s, c) for s in servers for c in args.concurrency]
            for target, concurrency in plan:  # warm-up
                await target.run(min(tokens, 16), [images.next() for _ in range(concurrency)])
            for repeat in range(args.repeats):
                for target, concurrency in plan:
                    # A pause first: the previous run's spinning torch threads (this process's, after an
                    # in-process run) must not eat into the next target's time.
                    await asyncio.sleep(args.settle)
                    streams, wall = await target.run(tokens, [images.next() for _ in range(concurrency)])
                    runs.setdefault((target.name, tokens, concurrency), []).append(summarize(streams, wall))
                print(f"  {tokens} tokens: repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        exact = {tokens: await service.exact(tokens, [images.next() for _ in range(8)]) for tokens in args.tokens}
        cache = await service.cache_gain(max(5, args.repeats))
    finally:
        for server in servers:
            await server.close()
    results = []
    for (target, tokens, concurrency), figures in runs.items():
        row = {"target": target, "tokens": tokens, "concurrency": concurrency, "repeats": len(figures)}
        for key in figures[0]:
            row[key] = statistics.median(f[key] for f in figures)
        results.append(row)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "checkpoint": "tiny-smolvlm-random",
        "repeats": args.repeats,
        "max_batch_size": args.max_batch or "server default",
        "service_exact": exact,
        "image_cache": cache,
        "results": results,
    }


def _find(results, target, tokens, concurrency):
    for row in results:
        if (row["target"], row["tokens"], row["concurrency"]) == (target, tokens, concurrency):
            return row
    return None


# The goals: (what, numerator, denominator, how they compare, goal). Each side is (target,
# concurrency, figure); "ratio" divides them, "diff" subtracts them.
GOALS = (
    ("one stream tok/s vs in-process", ("service", 1, "stream_tok_s"), ("in-process", 1, "stream_tok_s"), "ratio", ">= 0.9x"),
    ("TTFT minus in-process TTFT (ms)", ("service", 1, "ttft_p50_ms"), ("in-process", 1, "ttft_p50_ms"), "diff", "<= +5 ms"),
    ("8 streams aggregate vs one stream", ("service", 8, "aggregate_tok_s"), ("service", 1, "aggregate_tok_s"), "ratio", ">= 4x"),
    ("8 streams aggregate vs in-process batch of 8", ("service", 8, "aggregate_tok_s"), ("in-process", 8, "aggregate_tok_s"), "ratio", ">= 0.6x"),
    ("TTFT vs transformers serve", ("service", 1, "ttft_p50_ms"), ("transformers-serve", 1, "ttft_p50_ms"), "ratio", "< 1x"),
    ("one stream tok/s vs transformers serve", ("service", 1, "stream_tok_s"), ("transformers-serve", 1, "stream_tok_s"), "ratio", "> 1x"),
    ("8 streams aggregate vs transformers serve", ("service", 8, "aggregate_tok_s"), ("transformers-serve", 8, "aggregate_tok_s"), "ratio", "> 1x"),
)  # fmt: skip


def ratios(report: dict) -> list[tuple[str, float, str]]:
    """The goals, as (what, measured, goal) rows, for every answer length measured."""
    res = report["results"]
    lengths = sorted({r["tokens"] for r in res})
    out = []
    for tokens in lengths:
        for what, (t1, c1, k1), (t2, c2, k2), how, goal in GOALS:
            a, b = _find(res, t1, tokens, c1), _find(res, t2, tokens, c2)
            if a and b:
                value = a[k1] / b[k2] if how == "ratio" else a[k1] - b[k2]
                out.append((f"{tokens} tok: {what}", value, goal))
    if len(lengths) > 1:
        short, long = _find(res, "service", lengths[0], 1), _find(res, "service", lengths[-1], 1)
        if short and long:
            out.append(
                (
                    f"one stream tok/s, {lengths[-1]} vs {lengths[0]} tokens",
                    long["stream_tok_s"] / short["stream_tok_s"],
                    ">= 0.9x",
                )
            )
    return out


def table(report: dict) -> str:
    head = (
        f"{'target':<19}{'tokens':>7}{'conc':>6}{'TTFT p50':>10}{'p95':>8}{'gap p50':>9}{'p95':>7}"
        f"{'tok/s/stream':>14}{'tok/s total':>13}"
    )
    lines = [head, "-" * len(head)]
    for row in sorted(report["results"], key=lambda r: (r["tokens"], r["target"], r["concurrency"])):
        lines.append(
            f"{row['target']:<19}{row['tokens']:>7}{row['concurrency']:>6}{row['ttft_p50_ms']:>10.1f}"
            f"{row['ttft_p95_ms']:>8.1f}{row['gap_p50_ms']:>9.2f}{row['gap_p95_ms']:>7.2f}"
            f"{row['stream_tok_s']:>14.0f}{row['aggregate_tok_s']:>13.0f}"
        )
    lines.append("")
    lines.append(f"{'goal':<58}{'measured':>10}  target")
    for what, value, goal in ratios(report):
        lines.append(f"{what:<58}{value:>10.2f}  {goal}")
    for tokens, exact in report["service_exact"].items():
        verdict = "yes" if exact else "NO"
        lines.append(f"{tokens} tok: 8 concurrent greedy streams each equal to the same request alone: {verdict}")
    cache = report["image_cache"]
    lines.append(
        f"image cache: Query time to first text {cache['query_ttft_new_image_ms']:.1f} ms on a new image, "
        f"{cache['query_ttft_cached_image_ms']:.1f} ms on the image a Caption just used"
    )
    lines.append(f"(medians of {report['repeats']} interleaved repeats; times in ms; {report['machine']})")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The same table and goals as Markdown (what docs/performance.md shows)."""
    lines = [
        "| target | tokens | streams | first text p50 (ms) | p95 | gap p50 (ms) | p95 | tok/s per stream | tok/s total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(report["results"], key=lambda r: (r["tokens"], r["target"], r["concurrency"])):
        lines.append(
            f"| {row['target']} | {row['tokens']} | {row['concurrency']} | {row['ttft_p50_ms']:.1f} | "
            f"{row['ttft_p95_ms']:.1f} | {row['gap_p50_ms']:.2f} | {row['gap_p95_ms']:.2f} | "
            f"{row['stream_tok_s']:,.0f} | {row['aggregate_tok_s']:,.0f} |"
        )
    lines += ["", "| goal | measured | target | met |", "|---|---:|---|---|"]
    for what, value, goal in ratios(report):
        lines.append(f"| {what} | {value:.2f} | {goal} | {'yes' if _met(value, goal) else 'no'} |")
    return "\n".join(lines) + "\n"


def _met(value: float, goal: str) -> bool:
    bound = float(goal.split()[1].rstrip("xms").lstrip("+"))
    return {">=": value >= bound, "<=": value <= bound, ">": value > bound, "<": value < bound}[goal.split()[0]]


def plot(report: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    lengths = sorted({r["tokens"] for r in res})
    fig, axes = plt.subplots(2, len(lengths), figsize=(5 * len(lengths), 7), squeeze=False)
    for column, tokens in enumerate(lengths):
        for target, style in (("service", "o-"), ("transformers-serve", "s--")):
            rows = sorted(
                (r for r in res if r["target"] == target and r["tokens"] == tokens), key=lambda r: r["concurrency"]
            )
            if rows:
                xs = [r["concurrency"] for r in rows]
                axes[0][column].plot(xs, [r["aggregate_tok_s"] for r in rows], style, label=target)
                axes[1][column].plot(xs, [r["ttft_p50_ms"] for r in rows], style, label=target)
        for concurrency, marker in ((1, "^"), (8, "v")):
            row = _find(res, "in-process", tokens, concurrency)
            if row:
                label = f"in-process generate, batch {concurrency}"
                axes[0][column].plot([concurrency], [row["aggregate_tok_s"]], marker, markersize=9, label=label)
                axes[1][column].plot([concurrency], [row["ttft_p50_ms"]], marker, markersize=9, label=label)
        axes[0][column].set_title(f"{tokens}-token answers")
        axes[0][column].set_ylabel("aggregate tokens/s")
        axes[1][column].set_ylabel("time to first text, p50 (ms)")
        axes[1][column].set_yscale("log")
        for ax in (axes[0][column], axes[1][column]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["concurrency"] for r in res}))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("concurrent streams")
            ax.grid(True, alpha=0.3)
        axes[0][column].legend(fontsize=7)
    fig.suptitle("vlm-service vs transformers serve vs in-process generate (tiny SmolVLM, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 1000])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=0.5, help="seconds of pause before each run")
    parser.add_argument("--max-batch", type=int, default=0, help="the service's --max-batch-size (0: its default)")
    parser.add_argument("--no-transformers-serve", action="store_true", help="leave transformers serve out")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("VLM_CACHE_DIR", "~/.cache/vlm-service")).expanduser()
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where JSON and PNG go")
    args = parser.parse_args()

    report = asyncio.run(measure(args))
    print(table(report))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream_bench.json").write_text(json.dumps(report, indent=2))
    (args.out / "stream_bench.md").write_text(markdown(report))
    plot(report, args.out / "stream_bench.png")
    print(f"wrote stream_bench.json, stream_bench.md and stream_bench.png in {args.out}")


if __name__ == "__main__":
    main()
