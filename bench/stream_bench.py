"""Streaming benchmark: one stream through the service versus ``model.generate`` in-process.

The server runs in its own process (``vlm-service serve``) and is driven by the real Python client
from this one, on the tiny SmolVLM architecture with random weights (the one the tests use for long
generations: it seldom writes its end token, so every run produces the asked number of tokens). Runs are interleaved (service, in-process,
service, ...) and medians are quoted, because this machine is noisy.

    make bench                      # or: python bench/stream_bench.py --tokens 32 1000 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _image() -> Image.Image:
    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).ellipse((24, 16, 72, 48), fill="red")
    return image


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class InProcess:
    """The physical limit: the same backend's ``prepare`` + ``model.generate``, no server."""

    def __init__(self, checkpoint: Path):
        from vlm_service.backends.base import ModelSpec, Runtime
        from vlm_service.backends.smolvlm import SmolVLMBackend

        self.backend = SmolVLMBackend(ModelSpec("bench", str(checkpoint)), Runtime("cpu", "float32"))
        self.backend.load()

    def run(self, tokens: int) -> dict:
        from transformers.generation.streamers import BaseStreamer

        from vlm_service.types import GenerationRequest, SamplingParams, Task

        times: list[float] = []

        class Clock(BaseStreamer):
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        start = time.perf_counter()
        request = GenerationRequest("bench", "bench", Task.CAPTION, _image(), SamplingParams(tokens))
        inputs = self.backend.prepare(request)
        with torch.inference_mode():
            out = self.backend.model.generate(
                **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=Clock()
            )
        end = time.perf_counter()
        generated = out.shape[1] - inputs["input_ids"].shape[1]
        first = times[1]  # times[0] is the prompt
        return {"ttft_ms": (first - start) * 1000, "tokens": generated, "tok_s": generated / (end - start)}


class Service:
    def __init__(self, cache_dir: Path, checkpoint: Path):
        self.port = _free_port()
        env = {
            **os.environ,
            "VLM_MODELS": f"bench={checkpoint}",
            "VLM_CACHE_DIR": str(cache_dir),
            "VLM_HOST": "127.0.0.1",
            "VLM_PORT": str(self.port),
            "VLM_LOG_LEVEL": "warning",
        }
        self.process = subprocess.Popen([sys.executable, "-m", "vlm_service", "serve"], env=env)
        from vlm_client import VLMClient

        self.client = VLMClient(f"127.0.0.1:{self.port}")
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.client.models()[0].ready:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        import io

        buffer = io.BytesIO()
        _image().save(buffer, format="PNG")
        self.png = buffer.getvalue()

    def run(self, tokens: int) -> dict:
        start = time.perf_counter()
        first = None
        stream = self.client.caption(self.png, max_new_tokens=tokens)
        for _ in stream:
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        generated = stream.usage.completion_tokens
        return {"ttft_ms": (first - start) * 1000, "tokens": generated, "tok_s": generated / (end - start)}

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 1000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("VLM_CACHE_DIR", "~/.cache/vlm-service")).expanduser()
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "stream_bench.json")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from vlm_service.checkpoints.tiny_smolvlm import ensure_tiny_smolvlm

    hf_logging.disable_progress_bar()

    checkpoint = ensure_tiny_smolvlm(args.cache_dir, trained=False)
    local = InProcess(checkpoint)
    service = Service(args.cache_dir, checkpoint)
    results: dict = {}
    try:
        for tokens in args.tokens:
            for runner in (local, service):  # warm-up
                runner.run(min(tokens, 8))
            runs = {"service": [], "in_process": []}
            for _ in range(args.repeats):
                runs["service"].append(service.run(tokens))
                runs["in_process"].append(local.run(tokens))
            results[tokens] = {
                name: {key: statistics.median(r[key] for r in values) for key in ("ttft_ms", "tok_s", "tokens")}
                for name, values in runs.items()
            }
    finally:
        service.close()

    print(f"{'answer':>8} {'path':>11} {'TTFT ms':>9} {'tok/s':>9}  (medians of {args.repeats} interleaved runs)")
    for tokens, by_path in results.items():
        for name, figures in by_path.items():
            print(f"{tokens:>8} {name:>11} {figures['ttft_ms']:>9.1f} {figures['tok_s']:>9.0f}")
        s, p = by_path["service"], by_path["in_process"]
        print(f"{tokens:>8} {'ratio':>11} {s['ttft_ms'] - p['ttft_ms']:>+8.1f}ms {s['tok_s'] / p['tok_s']:>8.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
