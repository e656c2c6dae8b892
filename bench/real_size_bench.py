"""Real-size streaming benchmark: the ``smolvlm-256m-shapes`` twin (SmolVLM-256M-Instruct's shapes and
processor, random weights) on 512x512 pictures, 32-token answers (the twin never writes its end token,
so every answer runs to its length), against ``transformers serve`` and in-process ``model.generate``.

The rows (issue 10):

1. time to first text with one 512-px tile (the twin's single-view copy: the same weights, linked,
   ``do_image_splitting: false``): the service at its defaults (and any ``--service-variant``),
   ``transformers serve`` at its defaults, in-process ``generate`` in float32 and in bfloat16;
2. decode tokens/s of one stream (tokens after the first over the time after the first text), from the
   same runs;
3. four requests with four new pictures at once: aggregate tokens/s (service, ``transformers serve``),
   and the last of the four's first text over a lone request's first text (row 1);
4. time to first text with the published processor (16 tiles and a global view: 17 views, about 1,151
   prompt tokens): the service at its defaults against in-process ``generate``, float32 and bfloat16;
5. the longest wait of a running stream while a request with a new 17-view picture arrives: a long
   stream on the 17-view service, once it streams steadily a second request with a new picture; the
   longest gap between the first stream's consecutive messages from the second's arrival until the
   second's first text.

Every request has a new picture (a different pixel, so the image cache never helps). Targets are
interleaved (every one once, then again) and the medians of the repeats are quoted: ``--repeats`` for
rows 1-3, ``--repeats-17`` for rows 4-5 (a 17-view prefill takes tens of seconds on a 2-core CPU). Each
server is started once per mode (one-tile, then 17-view) and reused; a warm-up request per target is
left out (the service also warms up before it reports SERVING; the 17-view service's warm-up is a
17-view prefill). In-process ``generate`` runs in this process, once per ``--threads`` count (1 and 2
torch threads: on an idle 2-core CPU two should be faster, on a busy one one thread decoded several
times faster), and the goals take the fastest; every run follows a short pause that lets the previous
run's spinning threads settle. The services get ``--stall-timeout 900`` (``--stall-timeout 0``: the
service's own default), a guard that only aborts: its default can stop a 17-view prefill on a busy CPU.

Prints one Markdown table and the goals, and writes JSON and Markdown into ``--out``.

    make bench-real                   # ARGS="--repeats 3 --repeats-17 1 --threads 1 2"
    make bench-real ARGS="--service-variant '--torch-threads 2 --dtype bfloat16'"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from pictures import picture, png, single_view_copy
from stream_bench import InProcess, Service, Stream, TransformersServe

ROOT = Path(__file__).resolve().parents[1]
SIZE = (512, 512)
SERVE = "transformers-serve"
DTYPES = ("float32", "bfloat16")

# The rows of the table: (key, label, format).
ROWS = (
    ("first_text_s", "1. first text, one 512-px tile (s)", "{:.2f}"),
    ("decode_tok_s", "2. decode, one stream (tok/s)", "{:.1f}"),
    ("four_aggregate_tok_s", "3. four at once: aggregate (tok/s)", "{:.1f}"),
    ("four_last_first_text_s", "3. four at once: last first text (s)", "{:.2f}"),
    ("four_last_vs_lone", "3. four at once: last first text / lone first text", "{:.2f}x"),
    ("first_text_17_s", "4. first text, 17 views (s)", "{:.1f}"),
    ("longest_wait_17_s", "5. running stream's longest wait while a 17-view picture arrives (s)", "{:.1f}"),
    ("second_first_text_17_s", "5. (the arriving 17-view request's first text, s)", "{:.1f}"),
)


def service_dtype(flags: list[str], twin: Path) -> str:
    """The dtype a service with these flags runs the twin in: ``--dtype`` (or ``VLM_DTYPE``), and for
    auto what the service itself resolves (``Runtime.resolve``: bfloat16 for this bfloat16 checkpoint on
    a CPU with bfloat16 instructions, else float32)."""
    from transformers import AutoConfig

    from vlm_service.backends.runtime import Runtime, saved_dtype

    dtype = os.environ.get("VLM_DTYPE", "auto")
    for i, flag in enumerate(flags):
        if flag.startswith("--dtype="):
            dtype = flag.split("=", 1)[1]
        elif flag == "--dtype" and i + 1 < len(flags):
            dtype = flags[i + 1]
    _, resolved = Runtime(device="cpu", dtype=dtype).resolve(saved_dtype(AutoConfig.from_pretrained(twin)))
    return str(resolved).removeprefix("torch.")


class Figures:
    """Every repeat's figure per (target, key); medians on demand."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = {}
        self.prompt_tokens: dict[str, dict[str, int]] = {}
        self.warnings: list[str] = []

    def add(self, target: str, key: str, value: float) -> None:
        self.values.setdefault(target, {}).setdefault(key, []).append(value)

    def median(self, target: str, key: str) -> float | None:
        values = self.values.get(target, {}).get(key)
        return statistics.median(values) if values else None


def first_text(stream: Stream) -> float:
    return stream.arrivals[0] - stream.start


def decode_rate(stream: Stream) -> float:
    return (stream.tokens - 1) / (stream.end - stream.arrivals[0])


class Threaded:
    """An in-process target run with a given number of torch threads (this process's setting)."""

    def __init__(self, target: InProcess, threads: int):
        self.target, self.threads = target, threads

    async def run(self, tokens: int, images: list[int]) -> tuple[list[Stream], float]:
        torch.set_num_threads(self.threads)
        return await self.target.run(tokens, images)


def generate_name(dtype: str, threads: int) -> str:
    return f"generate {dtype}, {threads} thread{'s' if threads > 1 else ''}"


def _generates(names, dtype: str = "") -> list[str]:
    """The in-process targets among ``names`` (of one dtype if given)."""
    return [name for name in names if name.startswith(f"generate {dtype}")]


def _use_processor(generate: InProcess, directory: Path) -> None:
    """Give an in-process target another processor (the model stays loaded and warm)."""
    from transformers import AutoProcessor

    generate.backend.processor = AutoProcessor.from_pretrained(directory)
    generate.backend.processor.tokenizer.padding_side = "left"


async def _settle(args) -> None:
    # The previous run's spinning torch threads (this process's, after an in-process run) must not eat
    # into the next target's time.
    await asyncio.sleep(args.settle)


def _check(target: str, streams: list[Stream], tokens: int, figures: Figures, view: str) -> None:
    for stream in streams:
        if not stream.arrivals:
            raise RuntimeError(f"{target}: no text (asked for {tokens} tokens)")
        if stream.tokens != tokens:
            figures.warnings.append(f"{target} ({view}): {stream.tokens} tokens where {tokens} were asked")
            _progress("warning: " + figures.warnings[-1])
    figures.prompt_tokens.setdefault(target, {})[view] = streams[0].prompt_tokens


async def one_tile(args, view: Path, figures: Figures, images) -> dict:
    """Rows 1-3 on the single-view copy; returns what the targets ran with."""
    services = {"service": Service(args.cache_dir, view, 0, args.stall_flags, SIZE)}
    for flags in args.service_variant:
        services[f"service {flags}"] = Service(args.cache_dir, view, 0, shlex.split(flags) + args.stall_flags, SIZE)
    servers = dict(services)
    if not args.no_transformers_serve:
        servers[SERVE] = TransformersServe(view, SIZE)
    models = {dtype: InProcess(view, dtype, SIZE) for dtype in args.generate_dtypes}
    generates = {
        generate_name(dtype, threads): Threaded(model, threads)
        for dtype, model in models.items()
        for threads in args.threads
    }
    try:
        for server in servers.values():
            await server.start(args.start_timeout)
        lone = {**servers, **generates}
        four = servers
        plan = [(name, target, 1) for name, target in lone.items()] + [(n, t, 4) for n, t in four.items()]
        for _name, target, concurrency in plan:  # warm-up, left out
            await target.run(8, [images.next() for _ in range(concurrency)])
        for repeat in range(args.repeats):
            for name, target, concurrency in plan:
                await _settle(args)
                streams, wall = await target.run(args.tokens, [images.next() for _ in range(concurrency)])
                _check(name, streams, args.tokens, figures, "one tile")
                if concurrency == 1:
                    figures.add(name, "first_text_s", first_text(streams[0]))
                    figures.add(name, "decode_tok_s", decode_rate(streams[0]))
                else:
                    figures.add(name, "four_aggregate_tok_s", sum(s.tokens for s in streams) / wall)
                    figures.add(name, "four_last_first_text_s", max(first_text(s) for s in streams))
            _progress(f"one tile: repeat {repeat + 1}/{args.repeats} done")
    finally:
        for server in servers.values():
            await server.close()
    return models, generates


async def longest_wait(service: Service, args, images) -> tuple[float, float]:
    """Row 5 once: a long stream, then a new 17-view picture; (longest gap, the second's first text)."""
    arrivals: list[float] = []
    steady = asyncio.Event()
    call = service.client.caption(png(images.next(), SIZE), max_new_tokens=args.long_tokens)

    async def read() -> None:
        async for _ in call:
            arrivals.append(time.perf_counter())
            if len(arrivals) >= args.steady_messages:
                steady.set()

    reader = asyncio.create_task(read())
    try:
        waiting = asyncio.create_task(steady.wait())
        await asyncio.wait({reader, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if reader.done():
            reader.result()  # raises what ended it
            raise RuntimeError("the long stream ended before it streamed steadily; raise --long-tokens")
        second = await service._one(args.tokens, images.next())
        sent, answered = second.start, second.arrivals[0]
        while not any(t > answered for t in arrivals):  # the gap that spans the second's first text ends
            if reader.done():
                reader.result()
                raise RuntimeError("the long stream ended before the second's first text; raise --long-tokens")
            await asyncio.sleep(0.05)
    finally:
        reader.cancel()  # the client cancels the RPC
        with contextlib.suppress(BaseException):
            await reader
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b > sent and a < answered]
    return max(gaps), answered - sent


async def seventeen_views(args, twin: Path, figures: Figures, images, models: dict, generates: dict) -> None:
    """Rows 4-5 with the published processor (17 views for a 512x512 picture)."""
    services = {"service": Service(args.cache_dir, twin, 0, args.stall_flags, SIZE)}
    if args.variants_17:
        for flags in args.service_variant:
            services[f"service {flags}"] = Service(args.cache_dir, twin, 0, shlex.split(flags) + args.stall_flags, SIZE)
    for model in models.values():
        _use_processor(model, twin)
    try:
        for service in services.values():  # its warm-up is a 17-view prefill
            await service.start(args.start_timeout)
        plan = {**services, **generates}
        for repeat in range(args.repeats_17):
            for name, target in plan.items():
                await _settle(args)
                streams, _ = await target.run(args.tokens, [images.next()])
                _check(name, streams, args.tokens, figures, "17 views")
                figures.add(name, "first_text_17_s", first_text(streams[0]))
                _progress(f"17 views: {name} first text {first_text(streams[0]):.1f} s")
            for name, service in services.items():
                await _settle(args)
                wait, second = await longest_wait(service, args, images)
                figures.add(name, "longest_wait_17_s", wait)
                figures.add(name, "second_first_text_17_s", second)
                _progress(f"17 views: {name} longest wait {wait:.1f} s (second's first text {second:.1f} s)")
            _progress(f"17 views: repeat {repeat + 1}/{args.repeats_17} done")
    finally:
        for service in services.values():
            await service.close()


def work_bounds(model: InProcess, threads: int, tokens: int, repeats: int) -> dict:
    """What the one-tile rows cost in compute, in-process on the service's dtype and thread count, and
    the bounds that puts on row 3 on this machine: the processor (one request), the vision encoder
    (with its connector) on one picture and on four batched, the prompt's prefill alone and four
    batched, and a decode step of one row and of four. Repeats interleave; medians.

    Four requests at once need four processors, four pictures through the encoder and four prompts
    before the last one's first text, each at its cheaper of alone or batched; the fastest four-at-once
    run adds ``tokens - 1`` decode steps of four rows. Hence the best last-of-four / lone ratio and the
    best aggregate any scheduling can reach here."""
    backend = model.backend
    torch.set_num_threads(threads)
    prompt = backend.prompt(model.request)
    one = backend.encode([prompt], [picture(1_000_001, model.size)])
    four = backend.encode([prompt] * 4, [picture(1_000_000 + i, model.size) for i in range(2, 6)])
    net = backend.model.model
    dtype = backend.model.dtype

    def vision(inputs):
        return backend.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(dtype), pixel_attention_mask=inputs["pixel_attention_mask"]
        )

    def text(inputs):
        embeds = net.text_model.get_input_embeddings()(inputs["input_ids"])
        return net.text_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=True)

    def decode_step(inputs):  # one token for every row, on the prompt's cache (a new one each time)
        cache = text(inputs).cache
        ids = inputs["input_ids"][:, -1:]
        mask = torch.nn.functional.pad(inputs["attention_mask"], (0, 1), value=1)
        started = time.perf_counter()
        backend.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - started

    cases = {
        "processor": lambda: backend.encode([prompt], [picture(1_000_006, model.size)]),
        "vision_1": lambda: vision(one),
        "vision_4": lambda: vision(four),
        "prompt_1": lambda: text(one),
        "prompt_4": lambda: text(four),
    }
    times: dict[str, list[float]] = {key: [] for key in [*cases, "decode_1", "decode_4"]}
    with torch.inference_mode():
        for run in cases.values():  # warm-up
            run()
        for _ in range(repeats):
            for key, run in cases.items():
                started = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - started)
            times["decode_1"].append(decode_step(one))
            times["decode_4"].append(decode_step(four))
    m = {key: statistics.median(values) for key, values in times.items()}
    lone = m["processor"] + m["vision_1"] + m["prompt_1"]
    last_of_four = 4 * m["processor"] + min(4 * m["vision_1"], m["vision_4"]) + min(4 * m["prompt_1"], m["prompt_4"])
    return {
        "threads": threads,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": m,
        "vision_batched_per_picture_vs_alone": m["vision_4"] / 4 / m["vision_1"],
        "prompt_batched_per_request_vs_alone": m["prompt_4"] / 4 / m["prompt_1"],
        "lone_first_text_min_s": lone,
        "four_last_first_text_min_s": last_of_four,
        "four_last_vs_lone_best": last_of_four / lone,
        "four_aggregate_max_tok_s": 4 * tokens / (last_of_four + (tokens - 1) * m["decode_4"]),
    }


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


async def measure(args) -> dict:
    from transformers.utils import logging as hf_logging

    from vlm_checkpoints.smolvlm_256m_shapes import ensure_smolvlm_256m_shapes

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    started, load_start = time.perf_counter(), os.getloadavg()
    twin = ensure_smolvlm_256m_shapes(args.cache_dir)
    figures = Figures()

    class Images:
        count = 0

        def next(self) -> int:
            self.count += 1
            return self.count

    images = Images()
    with tempfile.TemporaryDirectory(prefix="real-size-bench-") as tmp:
        models, generates = await one_tile(args, single_view_copy(twin, Path(tmp)), figures, images)
    dtype = service_dtype(args.stall_flags, twin)
    bounds = None
    if dtype in models and not args.no_bounds:
        bounds = work_bounds(models[dtype], os.cpu_count() or 1, args.tokens, args.repeats + 2)
        _progress(
            "bounds: vision batched x4 per picture / alone "
            f"{bounds['vision_batched_per_picture_vs_alone']:.2f}, best last-of-four / lone "
            f"{bounds['four_last_vs_lone_best']:.2f}x"
        )
    openvino = openvino_reference(args, twin)
    if not args.no_17_views:
        await seventeen_views(args, twin, figures, images, models, generates)
    medians = {name: {key: statistics.median(v) for key, v in keys.items()} for name, keys in figures.values.items()}
    medians.update(openvino)
    for row in medians.values():
        if row.get("first_text_s") and "four_last_first_text_s" in row:  # a ratio of the medians
            row["four_last_vs_lone"] = row["four_last_first_text_s"] / row["first_text_s"]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_model()}), torch {torch.__version__}, "
        f"transformers {_version('transformers')}",
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "checkpoint": "smolvlm-256m-shapes",
        "picture": f"{SIZE[0]}x{SIZE[1]}, a new one per request",
        "tokens": args.tokens,
        "repeats": args.repeats,
        "repeats_17": args.repeats_17,
        "generate_threads": args.threads,
        "service_flags": {"service": args.stall_flags}
        | {f"service {flags}": shlex.split(flags) + args.stall_flags for flags in args.service_variant},
        "bounds": bounds,
        "service_dtype": {"service": dtype}
        | {f"service {flags}": service_dtype(shlex.split(flags), twin) for flags in args.service_variant},
        "figures": figures.values,
        "medians": medians,
        "prompt_tokens": figures.prompt_tokens,
        "warnings": figures.warnings,
    }


#: The OpenVINO reference's targets (bench/openvino_reference.py in its own venv: see docs/openvino.md).
OPENVINO = ("openvino-int8", "openvino-fp")


def openvino_reference(args, twin: Path) -> dict[str, dict]:
    """Rows 1-3 of the OpenVINO reference: the twin exported with optimum-intel (float, and 8-bit
    weights), timed in-process with a streamer by bench/openvino_reference.py in ``--openvino-python``
    (its own venv: optimum-intel needs transformers < 5.6). Medians of its own ``--repeats``, right
    after the other targets' rows 1-3, once per ``--threads`` count (the fastest is kept, as for
    in-process generate). Empty without that venv."""
    python = args.openvino_python
    if not Path(python).exists():
        _progress(f"no OpenVINO reference: {python} does not exist (make openvino-env)")
        return {}
    found: dict[str, dict] = {}
    for weights in ("int8", "fp"):
        best = None
        for threads in args.threads:
            command = [
                str(python), str(ROOT / "bench" / "openvino_reference.py"), str(twin), "--weights", weights,
                "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--four", "--threads", str(threads),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"the OpenVINO reference failed: {done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if best is None or result["first_token_s"] < best["first_token_s"]:
                best = result
        found[f"openvino-{weights}"] = {
            "first_text_s": best["first_token_s"],
            "decode_tok_s": best["decode_tok_s"],
            "four_aggregate_tok_s": best["four_aggregate_tok_s"],
            "four_last_first_text_s": best["four_first_token_s"],
            "four_last_vs_lone": best["four_first_token_s"] / best["first_token_s"],
            "threads": best["threads"],
        }
        _progress(f"openvino {weights}: first token {best['first_token_s']:.2f} s ({best['threads']} threads)")
    return found


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def goals(report: dict) -> list[tuple[str, str, dict[str, float | None]]]:
    """The issue's goals, as (what, goal, {service target: measured}); a goal ending in x is a ratio."""
    med = report["medians"]

    def get(target: str | None, key: str) -> float | None:
        return med.get(target, {}).get(key) if target else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    services = [name for name in med if name.startswith("service")]

    def best(key: str, dtype: str = "", pick=min) -> float | None:  # the fastest in-process configuration
        values = [get(name, key) for name in _generates(med, dtype) if get(name, key)]
        return pick(values) if values else None

    dtype = report["service_dtype"]
    rows = [
        ("first text, one tile, vs transformers serve", "<= 0.7x", lambda s: ratio(get(s, "first_text_s"), get(SERVE, "first_text_s"))),
        ("first text, one tile, vs the fastest in-process generate", "<= 1.1x", lambda s: ratio(get(s, "first_text_s"), best("first_text_s"))),
        ("decode, one stream, vs the fastest in-process generate in the service's dtype", ">= 0.95x", lambda s: ratio(get(s, "decode_tok_s"), best("decode_tok_s", dtype.get(s, "?"), max))),
        ("four at once: aggregate tok/s vs transformers serve", ">= 3x", lambda s: ratio(get(s, "four_aggregate_tok_s"), get(SERVE, "four_aggregate_tok_s"))),
        ("four at once: last first text vs a lone first text", "<= 2.5x", lambda s: get(s, "four_last_vs_lone")),
        ("running stream's longest wait while a 17-view picture arrives", "<= 1.0 s", lambda s: get(s, "longest_wait_17_s")),
        ("first text, 17 views, vs the fastest in-process generate float32", "<= 0.5x", lambda s: ratio(get(s, "first_text_17_s"), best("first_text_17_s", "float32"))),
        ("first text, one tile, vs OpenVINO 8-bit in-process", "<= 1.0x", lambda s: ratio(get(s, "first_text_s"), get("openvino-int8", "first_text_s"))),
        ("decode, one stream, vs OpenVINO 8-bit in-process", ">= 1.0x", lambda s: ratio(get(s, "decode_tok_s"), get("openvino-int8", "decode_tok_s"))),
        ("four at once: aggregate tok/s vs OpenVINO 8-bit in-process (one batch)", ">= 2x", lambda s: ratio(get(s, "four_aggregate_tok_s"), get("openvino-int8", "four_aggregate_tok_s"))),
    ]  # fmt: skip
    return [(what, goal, {name: measured(name) for name in services}) for what, goal, measured in rows]


def _met(value: float, goal: str) -> bool:
    how, bound = goal.split()[:2]
    bound = float(bound.rstrip("x"))
    return value <= bound if how == "<=" else value >= bound


def markdown(report: dict) -> str:
    med = report["medians"]
    services = [name for name in med if name.startswith("service")]
    targets = services + [name for name in med if name == SERVE] + [n for n in OPENVINO if n in med] + _generates(med)
    head = [f"service `{name[8:]}`" if name.startswith("service ") else name for name in targets]
    lines = ["| | " + " | ".join(head) + " |", "|---|" + "---:|" * len(targets)]
    for key, label, fmt in ROWS:
        cells = [fmt.format(med[t][key]) if key in med[t] else "" for t in targets]
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    best = bounds(report)
    lines += [
        "",
        "| goal | target | " + " | ".join(head[: len(services)]) + " | best possible here |",
        "|---|---|" + "---|" * len(services) + "---|",
    ]
    for what, goal, values in goals(report):
        unit = "x" if goal.endswith("x") else " s"
        cells = [
            "" if value is None else f"{value:.2f}{unit} ({'met' if _met(value, goal) else 'not met'})"
            for value in values.values()
        ]
        bound = best.get(what)
        cells.append("" if bound is None else f"{bound:.2f}{unit}")
        lines.append(f"| {what} | {goal.replace('<=', '≤').replace('>=', '≥')} | " + " | ".join(cells) + " |")
    work = report.get("bounds")
    if work:
        sec = work["seconds"]
        lines += [
            "",
            f"In-process work per request ({work['dtype']}, {work['threads']} threads, medians): processor "
            f"{sec['processor'] * 1000:.0f} ms, vision encoder {sec['vision_1'] * 1000:.0f} ms (four batched: "
            f"{work['vision_batched_per_picture_vs_alone']:.2f}x alone per picture), prompt "
            f"{sec['prompt_1'] * 1000:.0f} ms (four batched: {work['prompt_batched_per_request_vs_alone']:.2f}x "
            f"per request), decode step {sec['decode_1'] * 1000:.0f} ms (four rows: {sec['decode_4'] * 1000:.0f} ms).",
        ]
    return "\n".join(lines) + "\n"


def bounds(report: dict) -> dict[str, float]:
    """The best the first-text and four-at-once goals can be on this machine, from the in-process work
    (:func:`work_bounds`): a service can only add to it."""
    work, serve = report.get("bounds"), report["medians"].get(SERVE, {})
    if not work:
        return {}
    best = {"four at once: last first text vs a lone first text": work["four_last_vs_lone_best"]}
    if serve.get("first_text_s"):  # the processor, the encoder and the prompt, nothing else
        best["first text, one tile, vs transformers serve"] = work["lone_first_text_min_s"] / serve["first_text_s"]
    if serve.get("four_aggregate_tok_s"):
        best["four at once: aggregate tok/s vs transformers serve"] = (
            work["four_aggregate_max_tok_s"] / serve["four_aggregate_tok_s"]
        )
    return best


def notes(report: dict) -> str:
    stall = " ".join(report["service_flags"]["service"])
    service = f"the service at its defaults ({report['service_dtype']['service']})"
    if stall:
        service += f" but for `{stall}` (a guard that only aborts: the default may stop a 17-view prefill)"
    return (
        f"{report['checkpoint']}, {report['picture']}, {report['tokens']}-token answers; medians of "
        f"{report['repeats']} interleaved repeats (17-view rows: {report['repeats_17']}); {service}; "
        "transformers serve at its defaults; "
        f"prompt tokens {json.dumps(report['prompt_tokens'])}; {report['machine']}; load average "
        f"{report['load_average_start'][0]:.2f} at the start, {report['load_average_end'][0]:.2f} at the end; "
        f"{report['date']}; {report['wall_s'] / 60:.1f} minutes."
        + "".join(f"\nwarning: {w}" for w in report["warnings"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32, help="answer length")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the one-tile rows (1-3)")
    parser.add_argument("--repeats-17", type=int, default=1, help="repeats of the 17-view rows (4-5)")
    parser.add_argument(
        "--no-bounds", action="store_true", help="skip the in-process work measurement (the goals' best possible)"
    )
    parser.add_argument(
        "--service-variant",
        action="append",
        default=[],
        metavar="FLAGS",
        help="another service to measure beside the defaults, with these serve flags (repeatable), "
        "e.g. '--torch-threads 2 --dtype bfloat16'",
    )
    parser.add_argument("--variants-17", action="store_true", help="measure the variants in rows 4-5 too")
    parser.add_argument("--generate-dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch threads of in-process generate, one target per count (its goals take the fastest: on a "
        "busy 2-core CPU one thread decodes several times faster than two)",
    )
    parser.add_argument("--long-tokens", type=int, default=1500, help="row 5's long stream (cancelled once measured)")
    parser.add_argument("--steady-messages", type=int, default=8, help="row 5: messages before the second request")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=900,
        help="--stall-timeout of every service (0: the service's default, 300 s, which a 17-view prefill on a busy "
        "2-core CPU can exceed: docs/models.md's twin section measured 276 s; the guard only aborts, it never speeds up)",
    )
    parser.add_argument("--start-timeout", type=float, default=900, help="seconds a server may take to start")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds of pause before each run")
    parser.add_argument("--no-transformers-serve", action="store_true", help="leave transformers serve out")
    parser.add_argument(
        "--openvino-python",
        type=Path,
        default=ROOT / ".venv-openvino" / "bin" / "python",
        help="the python of the OpenVINO reference's venv (`make openvino-env`; docs/openvino.md); "
        "left out when it does not exist",
    )
    parser.add_argument("--no-17-views", action="store_true", help="only the one-tile rows (1-3)")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("VLM_CACHE_DIR", "~/.cache/vlm-service")).expanduser()
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where JSON and Markdown go")
    args = parser.parse_args()
    args.stall_flags = ["--stall-timeout", f"{args.stall_timeout:g}"] if args.stall_timeout else []

    report = asyncio.run(measure(args))
    report["goals"] = [{"what": w, "goal": g, "measured": v} for w, g, v in goals(report)]
    text = markdown(report) + "\n" + notes(report) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_size_bench.json").write_text(json.dumps(report, indent=2))
    (args.out / "real_size_bench.md").write_text(text)
    print(f"wrote real_size_bench.json and real_size_bench.md in {args.out}")


if __name__ == "__main__":
    main()
