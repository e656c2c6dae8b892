"""OpenVINO reference for the real-size bench (issue 27): the ``smolvlm-256m-shapes`` twin exported with
optimum-intel (float, or 8-bit weights), one 512-px tile, timed in-process with a streamer.

It runs in its own venv (optimum-intel 2.2.0 needs an older transformers than the project's; see
docs/openvino.md and requirements/openvino.in), so it imports nothing from the project but
bench/pictures.py (the standard library and Pillow): the same pictures and the same one-tile copy of
the twin as the other benches. The prompt is vlm_service's SmolVLM ``prompt()`` ("Describe this image.").

    .venv-openvino/bin/python bench/openvino_reference.py ~/.cache/vlm-service/smolvlm-256m-shapes-<key> \
        --weights int8 --tokens 32 --repeats 3 --four --threads 2

What it measures, per repeat (a new picture each time, so nothing is cached; a warm-up of each kind is
left out):

- ``first_token_s``: from the call (processor included, the picture already in memory) to the first
  generated token at the streamer's ``put()``;
- ``decode_tok_s``: the tokens after the first over the time after the first (to ``generate``'s return);
- with ``--four``: four different pictures as ONE batched ``generate`` call (an optimum-intel model holds
  one stateful infer request, so four threads would not run at once), ``four_aggregate_tok_s`` = 4 x
  tokens over the call's wall time (processor included), and ``four_first_token_s``.

The twin has random weights and never writes its end token; ``min_new_tokens=max_new_tokens`` makes every
answer exactly ``--tokens`` long anyway. Prints one JSON object (medians) on stdout; progress on stderr.

The exported IR is cached next to the twin, in ``<twin's parent>/openvino/<twin dir name>-<weights>/``
(override with ``--ir-cache``), so a re-run skips the export; the export's command and time are saved
there as ``export.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from pictures import picture, single_view_copy

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SIZE = (512, 512)
PROMPT = "Describe this image."  # vlm_service.backends.smolvlm.CAPTION_PROMPTS[CaptionLength.NORMAL]
WEIGHT_FLAGS = {"fp": [], "int8": ["--weight-format", "int8"]}  # fp: optimum-intel's default export


def _progress(message: str) -> None:
    print(f"[openvino] {message}", file=sys.stderr, flush=True)


def _transformers_major() -> int:
    return int(version("transformers").split(".")[0])


def one_tile_copy(twin: Path, into: Path) -> tuple[Path, list[str]]:
    """pictures.single_view_copy: the twin's files linked, ``do_image_splitting`` off. Under a
    transformers older than 5 (what optimum-intel's SmolVLM export accepts), also the two files the
    twin's transformers 5 wrote in formats 4.x misreads, converted (the weights are untouched):

    - config.json: ``text_config.rope_parameters`` ({rope_theta, rope_type}) becomes 4.x's ``rope_theta``
      (and ``rope_scaling`` for a non-default type); 4.x ignores ``rope_parameters`` and would silently
      use rope_theta 10,000 instead of the twin's 100,000;
    - tokenizer_config.json: ``tokenizer_class: TokenizersBackend`` (5.x only) becomes
      ``PreTrainedTokenizerFast`` (the same tokenizer.json), and the ``extra_special_tokens`` list
      becomes 4.x's ``additional_special_tokens``.

    Returns the copy and a note per conversion."""
    legacy = _transformers_major() < 5
    view = single_view_copy(twin, into, keep_out={"config.json", "tokenizer_config.json"} if legacy else ())
    notes = []
    if legacy:
        config = json.loads((twin / "config.json").read_text())
        for part in (config, config.get("text_config", {})):
            rope = part.pop("rope_parameters", None)
            if rope is not None:
                part.setdefault("rope_theta", rope["rope_theta"])
                if rope.get("rope_type", "default") != "default":
                    part["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
                notes.append(f"config.json: rope_parameters {rope} -> rope_theta {part['rope_theta']}")
        (view / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer = json.loads((twin / "tokenizer_config.json").read_text())
        if tokenizer.get("tokenizer_class") == "TokenizersBackend":
            tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
            notes.append("tokenizer_config.json: tokenizer_class TokenizersBackend -> PreTrainedTokenizerFast")
        tokenizer.pop("backend", None)
        extra = tokenizer.get("extra_special_tokens")
        if isinstance(extra, list):
            tokenizer.pop("extra_special_tokens")
            tokenizer["additional_special_tokens"] = extra
            notes.append("tokenizer_config.json: extra_special_tokens list -> additional_special_tokens")
        (view / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))
    return view, notes


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "model_cache" not in p.parts) / 2**20


def exported(twin: Path, view: Path, weights: str, cache: Path, notes: list[str]) -> tuple[Path, dict]:
    """The cached IR for ``weights``, exported first if missing (into a temporary folder, then renamed,
    so an interrupted export never looks cached)."""
    target = cache / f"{twin.name}-{weights}"
    if (target / "export.json").exists():
        return target, json.loads((target / "export.json").read_text()) | {"cached": True}
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    cli = Path(sys.executable).with_name("optimum-cli")
    command = [str(cli), "export", "openvino", "--model", str(view), "--task", "image-text-to-text"]
    command += WEIGHT_FLAGS[weights] + [str(work / "ir")]
    _progress(f"exporting ({weights}): {' '.join(command)}")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(f"export failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    info = {  # the command as run, with its temporary paths named
        "command": [
            {str(view): f"<one-tile copy of {twin.name}>", str(work / "ir"): str(target)}.get(part, part)
            for part in command
        ],
        "export_s": round(seconds, 1),
        "ir_mb": round(_dir_mb(work / "ir"), 1),
        "twin": str(twin),
        "conversions": notes,
        "versions": {p: version(p) for p in ("openvino", "optimum-intel", "nncf", "transformers", "torch")},
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_average": os.getloadavg(),
    }
    (work / "ir" / "export.json").write_text(json.dumps(info, indent=2))
    if target.exists():  # an older, unfinished copy
        shutil.rmtree(target)
    (work / "ir").rename(target)
    shutil.rmtree(work, ignore_errors=True)
    _progress(f"exported in {seconds:.0f} s, {info['ir_mb']:.0f} MB")
    return target, info | {"cached": False}


class Clock:
    """A streamer: the first ``put`` is the prompt; each later one is a generated token (a row per
    picture), timed."""

    def __init__(self) -> None:
        self.seen_prompt = False
        self.arrivals: list[float] = []

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.arrivals.append(time.perf_counter())

    def end(self) -> None:
        pass


def run(model, processor, indices: list[int], tokens: int) -> dict:
    """One ``generate`` call over the pictures ``indices`` (one row each, batched)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Streamer(Clock, BaseStreamer):
        pass

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
    )
    pictures = [picture(index, SIZE) for index in indices]
    streamer = Streamer()
    start = time.perf_counter()
    inputs = processor(text=[prompt] * len(pictures), images=[[p] for p in pictures], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=streamer)
    end = time.perf_counter()
    new = out[:, inputs["input_ids"].shape[1] :]
    if new.shape[1] != tokens or len(streamer.arrivals) != tokens:
        raise RuntimeError(f"{new.shape[1]} tokens ({len(streamer.arrivals)} streamed) where {tokens} were asked")
    first = streamer.arrivals[0]
    return {
        "first_token_s": first - start,
        "decode_tok_s": (tokens - 1) / (end - first),
        "wall_s": end - start,
        "aggregate_tok_s": len(pictures) * tokens / (end - start),
        "prompt_tokens": inputs["input_ids"].shape[1],
        "ids": new.tolist(),
    }


def _compiled_properties(model) -> dict:
    """What OpenVINO actually runs the language model with (the CPU plugin picks bf16 on a CPU with
    bfloat16 instructions unless told otherwise)."""
    found = {}
    try:
        request = model.language_model.request
        compiled = request.get_compiled_model() if hasattr(request, "get_compiled_model") else request
        for key in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "KV_CACHE_PRECISION", "PERFORMANCE_HINT"):
            with contextlib.suppress(Exception):  # a property this plugin does not have
                found[key] = str(compiled.get_property(key))
    except Exception as error:  # noqa: BLE001
        found["error"] = repr(error)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("twin", type=Path, help="the smolvlm-256m-shapes twin's folder")
    parser.add_argument("--weights", choices=sorted(WEIGHT_FLAGS), default="int8")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--four", action="store_true", help="also four new pictures at once (one batch)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OpenVINO and torch threads")
    parser.add_argument("--ir-cache", type=Path, help="default: <twin's parent>/openvino")
    parser.add_argument("--precision", help="OpenVINO INFERENCE_PRECISION_HINT (f32, bf16); default: the plugin's")
    parser.add_argument("--export-only", action="store_true")
    args = parser.parse_args()

    import openvino
    import torch
    from optimum.intel import OVModelForVisualCausalLM
    from transformers import AutoProcessor

    twin = args.twin.expanduser().resolve()
    cache = (args.ir_cache or twin.parent / "openvino").expanduser()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        view, notes = one_tile_copy(twin, Path(tmp))
        ir, export = exported(twin, view, args.weights, cache, notes)
        if args.export_only:
            print(json.dumps({"weights": args.weights, "ir": str(ir), "export": export}))
            return
        processor = AutoProcessor.from_pretrained(view)
    processor.tokenizer.padding_side = "left"
    ov_config = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
    if args.precision:
        ov_config["INFERENCE_PRECISION_HINT"] = args.precision
    start = time.perf_counter()
    model = OVModelForVisualCausalLM.from_pretrained(ir, export=False, ov_config=ov_config)
    _progress(f"loaded and compiled in {time.perf_counter() - start:.1f} s")

    plan = [("one", 1)] + ([("four", 4)] if args.four else [])
    picture = iter(range(1_000_000, 2_000_000))
    for _, count in plan:  # warm-up, left out
        run(model, processor, [next(picture) for _ in range(count)], 8)
    figures: dict[str, list] = {}
    ids = None
    for repeat in range(args.repeats):
        for name, count in plan:
            time.sleep(0.5)  # let the previous run's spinning threads settle
            # lone pictures 1, 2, ...; four at once 1001-1004, 1005-1008, ...: the same in every run, so
            # fp and int8 answers can be compared picture by picture
            indices = [repeat + 1] if count == 1 else [1001 + 4 * repeat + i for i in range(4)]
            result = run(model, processor, indices, args.tokens)
            if name == "one":
                figures.setdefault("first_token_s", []).append(result["first_token_s"])
                figures.setdefault("decode_tok_s", []).append(result["decode_tok_s"])
                ids = ids or result["ids"][0]
            else:
                figures.setdefault("four_aggregate_tok_s", []).append(result["aggregate_tok_s"])
                figures.setdefault("four_first_token_s", []).append(result["first_token_s"])
            figures.setdefault(f"prompt_tokens_{name}", []).append(result["prompt_tokens"])
        _progress(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in figures.items()))
    medians = {key: statistics.median(values) for key, values in figures.items()}
    print(
        json.dumps(
            {
                "weights": args.weights,
                "first_token_s": medians["first_token_s"],
                "decode_tok_s": medians["decode_tok_s"],
                "four_aggregate_tok_s": medians.get("four_aggregate_tok_s"),
                "four_first_token_s": medians.get("four_first_token_s"),
                "four_mode": "one batched generate call of four pictures" if args.four else None,
                "openvino": openvino.__version__,
                "optimum_intel": version("optimum-intel"),
                "transformers": version("transformers"),
                "threads": args.threads,
                "compiled": _compiled_properties(model),
                "tokens": args.tokens,
                "repeats": args.repeats,
                "prompt_tokens": medians["prompt_tokens_one"],
                "figures": figures,
                "picture_1_token_ids": ids,
                "ir": str(ir),
                "export": export,
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "load_average_start": load_start,
                "load_average_end": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
