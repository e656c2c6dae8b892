"""How the service degrades when something else on the machine wants the CPU, by thread setting.

The ``smolvlm-256m-shapes`` twin with one 512-px tile (real_size_bench.py's single-view copy), one
64-token Caption at a time, each with a new picture: its first text and its decode rate (tokens after
the first over the time after the first text). Each service variant runs quiet and then beside
``--busy`` processes that spin on the CPU (another service on the same machine), alternating, and the
table gives the medians and each variant's busy / quiet ratio. Variants (``--variants``): the defaults
(every core for a model of this size), one torch thread, and OpenMP's passive waiting
(``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning).

    make bench-load                       # ARGS="--repeats 3 --busy 1"
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flood_bench import ROOT, spin, start_server  # noqa: E402
from pictures import single_view_copy  # noqa: E402

from vlm.v1 import vlm_service_pb2 as pb  # noqa: E402
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc  # noqa: E402

VARIANTS = {
    "defaults": ([], {}),
    "torch-threads-1": (["--torch-threads", "1"], {}),
    "omp-passive": ([], {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def picture(n: int) -> bytes:
    image = Image.new("RGB", (512, 512), "white")
    ImageDraw.Draw(image).ellipse((100, 100, 400, 400), fill=(200, 30, 30))
    image.putpixel((n % 512, 0), (n % 256, 7, 7))  # a new picture every time: the image cache never helps
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def one_caption(stub, n: int, tokens: int) -> tuple[float, float]:
    """First text (s) and decode rate (tok/s) of one Caption."""
    start = time.monotonic()
    arrivals, usage = [], None
    request = pb.CaptionRequest(image=pb.Image(data=picture(n)), options=pb.GenerationOptions(max_new_tokens=tokens))
    for message in stub.Caption(request, timeout=600):
        if message.text:
            arrivals.append(time.monotonic())
        if message.HasField("usage"):
            usage = message.usage
    end = time.monotonic()
    return arrivals[0] - start, (usage.completion_tokens - 1) / (end - arrivals[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=1, help="spinning processes in the busy rounds")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    from vlm_checkpoints.smolvlm_256m_shapes import ensure_smolvlm_256m_shapes
    from vlm_service.config import Settings

    cache_dir = Path(os.environ.get("VLM_CACHE_DIR") or Settings().cache_dir).expanduser()
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    n = 0
    with tempfile.TemporaryDirectory() as scratch:
        view = single_view_copy(ensure_smolvlm_256m_shapes(cache_dir), Path(scratch))
        for name in args.variants:
            flags, env = VARIANTS[name]
            process, target = start_server(view, ["--stall-timeout", "900", *flags], env)
            results[name] = {"quiet": [], "busy": []}
            try:
                with grpc.insecure_channel(target) as channel:
                    stub = pb_grpc.VisionLanguageServiceStub(channel)
                    one_caption(stub, n := n + 1, 8)  # warm-up
                    for _ in range(args.repeats):
                        for load in ("quiet", "busy"):
                            stop = multiprocessing.Event()
                            spinners = [multiprocessing.Process(target=spin, args=(stop,)) for _ in range(args.busy)]
                            if load == "busy":
                                for spinner in spinners:
                                    spinner.start()
                                time.sleep(0.5)
                            try:
                                results[name][load].append(one_caption(stub, n := n + 1, args.tokens))
                            finally:
                                stop.set()
                                for spinner in spinners if load == "busy" else ():
                                    spinner.join()
                            time.sleep(0.5)
                            print(name, load, results[name][load][-1], flush=True)
            finally:
                process.terminate()
                process.wait(60)
    table = {}
    print(
        f"\none 512-px tile, {args.tokens}-token Captions, median of {args.repeats}; busy = {args.busy} spinning process(es)"
    )
    print("| variant | first text quiet | busy | busy/quiet | decode quiet (tok/s) | busy | busy/quiet |")
    print("|---|---|---|---|---|---|---|")
    for name, loads in results.items():
        first = {load: statistics.median(r[0] for r in runs) for load, runs in loads.items()}
        rate = {load: statistics.median(r[1] for r in runs) for load, runs in loads.items()}
        table[name] = {"first_text_s": first, "decode_tok_s": rate}
        print(
            f"| {name} | {first['quiet']:.2f} s | {first['busy']:.2f} s | {first['busy'] / first['quiet']:.2f}x "
            f"| {rate['quiet']:.1f} | {rate['busy']:.1f} | {rate['busy'] / rate['quiet']:.2f}x |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "busy": args.busy,
        "tokens": args.tokens,
        "load_average": os.getloadavg(),
        "runs": results,
        "medians": table,
    }
    (args.out / "load_bench.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
