"""Watch benchmark: a live feed at 20 frames per second for 10 s, under each policy, against a lone
Caption on the same server.

``vlm-service serve`` runs in its own process with two models: ``tiny-smolvlm`` (trained: short answers
that end by themselves) and ``noise`` (the same architecture with random weights: answers run to their
token budget, so a newer frame always finds one to interrupt). The real async client sends the frames,
each a different picture (a different image-cache key, as a camera's frames are), paced by the clock.

Measured, per run:

- the server's resident memory (``VmRSS``) sampled every 0.25 s: its range over the run, after a warm-up
  feed of the same kind;
- every frame answered or counted as skipped (the client's answers and ``frames_skipped``, and the
  server's ``vlm_watch_frames_total`` counters), and the last frame answered;
- LATEST (tiny-smolvlm): for each answered frame that arrived while the previous answer was written, the
  time from that answer's last message to the frame's first text, against a lone Caption's time to
  first text (the reference, the median of lone Captions of fresh pictures run before and after, on the
  same model);
- INTERRUPT (noise): for each frame that interrupted an answer, the time from sending it to the old
  answer's last message at the client, and on the server's clock from the frame's arrival to the old
  answer's end (estimated from the answers' usage), against a decode step (the median gap between that
  stream's text messages); the server's queue time of the new frame (arrival to generation start); and
  the new frame's time to first text against a lone Caption's.

    make bench-watch                      # ARGS="--fps 20 --seconds 10 --references 15"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black"]


def picture(index: int, size=(160, 120)) -> bytes:
    """Frame number ``index``: a shape that moves and changes colour (so every frame's bytes differ)."""
    image = Image.new("RGB", size, "white")
    w, h = size
    x = (index * 7) % (w - 50)
    ImageDraw.Draw(image).ellipse((x, h // 4, x + 48, h // 4 + 48), fill=COLOURS[index // 10 % len(COLOURS)])
    image.putpixel((index % w, (index // w) % h), (index % 256, index * 13 % 256, index * 29 % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, cache_dir: Path, noise: Path):
        self.port, self.metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "VLM_MODELS": f"tiny-smolvlm,noise={noise}",
            "VLM_CACHE_DIR": str(cache_dir),
            "VLM_HOST": "127.0.0.1",
            "VLM_PORT": str(self.port),
            "VLM_METRICS_PORT": str(self.metrics_port),
            "VLM_LOG_LEVEL": "warning",
            "VLM_ACCESS_LOG": "false",
        }
        self.process = subprocess.Popen([sys.executable, "-m", "vlm_service", "serve"], env=env)
        self.target = f"127.0.0.1:{self.port}"

    async def start(self, client) -> None:
        deadline = time.monotonic() + 600
        while True:
            try:
                if all(info.ready for info in await client.models(timeout=2)):
                    return
            except Exception:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the server did not start")
            await asyncio.sleep(0.2)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def frames(self, model: str) -> dict[str, float]:
        """The server's Watch frame counters for ``model``."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        counts = {}
        for outcome in ("answered", "interrupted", "skipped", "rejected", "unanswered"):
            pattern = rf'^vlm_watch_frames_total{{model="{model}",outcome="{outcome}"}} (\S+)$'
            found = re.search(pattern, text, re.MULTILINE)
            counts[outcome] = float(found.group(1)) if found else 0.0
        found = re.search(rf'^vlm_watch_frames_received_total{{model="{model}"}} (\S+)$', text, re.MULTILINE)
        counts["received"] = float(found.group(1)) if found else 0.0
        return counts

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def lone_captions(client, model: str, pictures: list[bytes], tokens: int) -> list[dict]:
    """Captions one at a time, each of a fresh picture: client-side and server-side time to first text."""
    out = []
    for data in pictures:
        start = time.perf_counter()
        stream = client.caption(data, model=model, max_new_tokens=tokens)
        first = None
        async for _ in stream:
            first = first or time.perf_counter()
        out.append({"ttft_ms": (first - start) * 1000, "server_ttft_ms": stream.usage.time_to_first_token_ms})
        await asyncio.sleep(0.05)
    return out


async def watch(client, server: Server, model: str, policy: str, fps: float, seconds: float, first: int, tokens: int):
    """One feed: frames ``first``, ``first + 1``, ... at ``fps`` for ``seconds``. Returns what the client saw,
    the server's resident memory samples and its frame counters' change."""
    count = int(fps * seconds)
    pictures = [picture(first + i) for i in range(count)]
    sent: dict[int, float] = {}
    rss: list[tuple[float, float]] = []
    done = asyncio.Event()

    async def feed():
        start = time.perf_counter()
        for i, data in enumerate(pictures):
            delay = start + i / fps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[i] = time.perf_counter()
            yield i, data

    async def sample_memory():
        start = time.perf_counter()
        while not done.is_set():
            rss.append((time.perf_counter() - start, server.rss_mb()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.25)
        rss.append((time.perf_counter() - start, server.rss_mb()))

    before = server.frames(model)
    sampler = asyncio.create_task(sample_memory())
    answers = []
    async for answer in client.watch(feed(), policy=policy, model=model, max_new_tokens=tokens):
        arrivals = [time.perf_counter()] if answer.chunks else []
        async for _ in answer:
            if len(arrivals) < len(answer.chunks):
                arrivals.append(time.perf_counter())
        end = time.perf_counter()
        answers.append(
            {
                "frame_id": answer.frame_id,
                "sent": sent[answer.frame_id],
                "first_text": arrivals[0] if arrivals else None,
                "arrivals": arrivals,
                "end": end,
                "finish_reason": answer.finish_reason,
                "frames_skipped": answer.frames_skipped,
                "error": str(answer.error) if answer.error else None,
                "usage": vars(answer.usage) if answer.usage else None,
            }
        )
    done.set()
    await sampler
    after = server.frames(model)
    return answers, rss, {key: after[key] - before[key] for key in after}, count


def summarize_feed(answers, rss, counters, count, references: list[dict], policy) -> dict:
    answered = [a for a in answers if a["finish_reason"]]
    skipped = sum(a["frames_skipped"] for a in answers)
    memory = [mb for _, mb in rss]
    report = {
        "policy": policy,
        "frames": count,
        "answers": len(answered),
        "interrupted": sum(a["finish_reason"] == "interrupted" for a in answered),
        "errors": sum(a["error"] is not None for a in answers),
        "skipped_reported": skipped,
        "every_frame_accounted": len(answers) + skipped == count,
        "last_frame_answered": bool(answered) and answered[-1]["frame_id"] == count - 1,
        "server_counters": counters,
        "rss_start_mb": memory[0],
        "rss_end_mb": memory[-1],
        "rss_min_mb": min(memory),
        "rss_max_mb": max(memory),
        "rss_range_mb": max(memory) - min(memory),
        "reference_captions": len(references),
        "reference_ttft_p50_ms": percentile([r["ttft_ms"] for r in references], 0.5),
        "reference_ttft_p95_ms": percentile([r["ttft_ms"] for r in references], 0.95),
        "reference_server_ttft_p50_ms": percentile([r["server_ttft_ms"] for r in references], 0.5),
    }
    if policy == "latest":
        # Frames that arrived while the previous answer was written: from that answer's end to their text.
        waited, fresh = [], []
        for previous, answer in zip(answered, answered[1:], strict=False):
            if answer["first_text"] is None:
                continue
            if answer["sent"] < previous["end"]:
                waited.append((answer["first_text"] - previous["end"]) * 1000)
            else:
                fresh.append((answer["first_text"] - answer["sent"]) * 1000)
        report.update(
            {
                "waited_answers": len(waited),
                "after_end_to_first_text_p50_ms": percentile(waited, 0.5),
                "after_end_to_first_text_p95_ms": percentile(waited, 0.95),
                "after_end_to_first_text_max_ms": max(waited, default=float("nan")),
                "fresh_frame_ttft_p50_ms": percentile(fresh, 0.5),
            }
        )
    else:
        stops, steps, ttfts, server_ttfts, queue = [], [], [], [], []
        gaps = []
        for answer in answered:
            arrivals = answer["arrivals"]
            gaps.extend((b - a) * 1000 for a, b in zip(arrivals, arrivals[1:], strict=False))
        step_ms = statistics.median(gaps) if gaps else float("nan")
        server_stops = []
        for old, new in zip(answered, answered[1:], strict=False):
            if old["finish_reason"] == "interrupted":
                stops.append((old["end"] - new["sent"]) * 1000)
                # On the server's clock: the old answer ended total_time_ms after its frame arrived; the newer
                # frame arrived (sent_new - sent_old) after it, give or take the transit's jitter.
                server_stops.append(old["usage"]["total_time_ms"] - (new["sent"] - old["sent"]) * 1000)
            if new["first_text"] is not None:
                ttfts.append((new["first_text"] - new["sent"]) * 1000)
                server_ttfts.append(new["usage"]["time_to_first_token_ms"])
                queue.append(new["usage"]["queue_time_ms"])
        steps = [stop / step_ms for stop in stops]
        report.update(
            {
                "decode_step_ms": step_ms,
                "stop_after_newer_frame_p50_ms": percentile(stops, 0.5),
                "stop_after_newer_frame_p95_ms": percentile(stops, 0.95),
                "stop_in_steps_p50": percentile(steps, 0.5),
                "stop_in_steps_p95": percentile(steps, 0.95),
                "server_stop_after_arrival_p50_ms": percentile(server_stops, 0.5),
                "server_stop_after_arrival_p95_ms": percentile(server_stops, 0.95),
                "new_frame_queue_p50_ms": percentile(queue, 0.5),
                "new_frame_queue_p95_ms": percentile(queue, 0.95),
                "new_frame_ttft_p50_ms": percentile(ttfts, 0.5),
                "new_frame_ttft_p95_ms": percentile(ttfts, 0.95),
                "new_frame_server_ttft_p50_ms": percentile(server_ttfts, 0.5),
                "new_frame_server_ttft_p95_ms": percentile(server_ttfts, 0.95),
            }
        )
    return report


async def measure(args) -> dict:
    from vlm_checkpoints.tiny_smolvlm import ensure_tiny_smolvlm
    from vlm_client import AsyncVLMClient

    noise = ensure_tiny_smolvlm(args.cache_dir, trained=False)
    server = Server(args.cache_dir, noise)
    load = [os.getloadavg()]
    try:
        async with AsyncVLMClient(server.target) as client:
            await server.start(client)
            next_picture = 100_000  # reference pictures: never a frame's

            async def references(model: str, tokens: int) -> list[dict]:
                nonlocal next_picture
                pictures = [picture(next_picture + i) for i in range(args.references)]
                next_picture += args.references
                return await lone_captions(client, model, pictures, tokens)

            plans = [("tiny-smolvlm", "latest", 0), ("noise", "interrupt", args.noise_tokens)]
            refs = {model: [] for model, _, _ in plans}
            for model, policy, tokens in plans:  # warm-up: one short feed of each kind, then the references
                await watch(client, server, model, policy, args.fps, 2, 50_000, tokens)
                refs[model] += await references(model, tokens)
            reports = []
            first = 0
            for model, policy, tokens in plans:
                answers, rss, counters, count = await watch(
                    client, server, model, policy, args.fps, args.seconds, first, tokens
                )
                first += count
                load.append(os.getloadavg())
                refs[model] += await references(model, tokens)
                report = summarize_feed(answers, rss, counters, count, refs[model], policy)
                report["model"] = model
                reports.append(report)
    finally:
        server.stop()
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": load},
        "fps": args.fps,
        "seconds": args.seconds,
        "feeds": reports,
    }


def goals(report: dict) -> list[tuple[str, str, str, bool | None]]:
    """(goal, measured, target, met); met None: informational (the goal is asserted by a test)."""
    out = []
    for feed in report["feeds"]:
        name = f"{feed['policy']} ({feed['model']})"
        out.append(
            (
                f"{name}: resident memory, max - min over the feed (MB)",
                f"{feed['rss_range_mb']:.1f}",
                "a few MB",
                feed["rss_range_mb"] <= 5,
            )
        )
        out.append(
            (
                f"{name}: answers (interrupted included) + frames skipped = frames sent; last frame answered",
                f"{feed['answers']} + {feed['skipped_reported']} = {feed['frames']}; "
                + ("yes" if feed["last_frame_answered"] else "no"),
                "all",
                feed["every_frame_accounted"] and feed["last_frame_answered"],
            )
        )
        p50, p95 = feed["reference_ttft_p50_ms"], feed["reference_ttft_p95_ms"]
        if feed["policy"] == "latest":
            key = "after_end_to_first_text"
            for q, reference in (("p50", p50), ("p95", p95)):
                ratio = feed[f"{key}_{q}_ms"] / reference
                out.append(
                    (
                        f"{name}: previous answer's end -> waiting frame's first text, {q} / lone Caption's {q}",
                        f"{ratio:.2f} ({feed[f'{key}_{q}_ms']:.1f} / {reference:.1f} ms)",
                        "<= 1",
                        ratio <= 1,
                    )
                )
        else:
            out.append(
                (
                    f"{name}: newer frame's arrival -> old answer's end, server clock (estimate), p50 / p95 (ms)",
                    f"{feed['server_stop_after_arrival_p50_ms']:.1f} / {feed['server_stop_after_arrival_p95_ms']:.1f}"
                    f" (decode step {feed['decode_step_ms']:.1f})",
                    "within one step: counted by test_watch",
                    None,
                )
            )
            out.append(
                (
                    f"{name}: newer frame sent -> old answer's last message at the client, p50 (ms)",
                    f"{feed['stop_after_newer_frame_p50_ms']:.1f}",
                    "",
                    None,
                )
            )
            for q, reference in (("p50", p50), ("p95", p95)):
                ratio = feed[f"new_frame_ttft_{q}_ms"] / reference
                out.append(
                    (
                        f"{name}: newer frame's first text, {q} / lone Caption's {q}",
                        f"{ratio:.2f} ({feed[f'new_frame_ttft_{q}_ms']:.1f} / {reference:.1f} ms)",
                        "<= 1.5",
                        ratio <= 1.5,
                    )
                )
    return out


def table(report: dict) -> str:
    lines = [
        f"Watch bench: {report['fps']:g} frames/s for {report['seconds']:g} s per feed; load {report['machine']['load_average']}"
    ]
    for feed in report["feeds"]:
        lines.append(f"\n{feed['policy']} on {feed['model']}:")
        for key, value in feed.items():
            if key in ("policy", "model"):
                continue
            lines.append(f"  {key}: {round(value, 2) if isinstance(value, float) else value}")
    lines.append("\n| goal | measured | target | met |\n|---|---:|---|---|")
    for name, measured, target, met in goals(report):
        lines.append(f"| {name} | {measured} | {target} | {'-' if met is None else 'yes' if met else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fps", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--references", type=int, default=15, help="lone Captions before and after each feed")
    parser.add_argument("--noise-tokens", type=int, default=256, help="token budget of the noise model's answers")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("VLM_CACHE_DIR", "~/.cache/vlm-service")).expanduser()
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "watch_bench.json")
    args = parser.parse_args()
    report = asyncio.run(measure(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
