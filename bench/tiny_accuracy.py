"""How often the tiny demo checkpoints describe held-out pictures right (the accuracy figures of docs/models.md).

For each model: captions of every length of ``--count`` held-out pictures (seeded, drawn like the
training pictures but never trained on), and the colour question on the same pictures. A caption
names the colour (or shape, or background) right when that word is in it and no other word of its
kind is. Runs the backends in-process, greedy, on the CPU; nothing is timed.

    python bench/tiny_accuracy.py [--models tiny-moondream ...] [--count 42] [--seeds 2024 7]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from vlm_checkpoints import shapes
from vlm_service.backends import catalogue, registry
from vlm_service.backends.runtime import Runtime
from vlm_service.config import Settings
from vlm_service.types import CaptionLength, GenerationRequest, SamplingParams, Task


class _Collect:
    def __init__(self):
        self.pieces = []

    def add_text(self, piece: str) -> None:
        self.pieces.append(piece)

    def should_stop(self) -> bool:
        return False


def _words(text: str) -> set[str]:
    return set(text.lower().replace(".", " ").replace(",", " ").split())


def _names_right(text: str, right: str, kind: tuple[str, ...]) -> bool:
    words = _words(text)
    return right in words and not (words & (set(kind) - {right}))


def measure(backend, count: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    scenes = shapes.scenes(rng, count)
    images = [shapes.draw(scene, rng) for scene in scenes]
    right = {"colour": 0, "shape": 0, "background": 0, "question": 0}
    captions = 0

    def run(task, image, question="", length=CaptionLength.NORMAL):
        sink = _Collect()
        request = GenerationRequest("acc", backend.spec.name, task, image, SamplingParams(64), question, length)
        backend.generate(request, sink)
        return "".join(sink.pieces)

    for scene, image in zip(scenes, images, strict=True):
        for length in (CaptionLength.SHORT, CaptionLength.NORMAL, CaptionLength.LONG):
            caption = run(Task.CAPTION, image, length=length)
            captions += 1
            right["colour"] += _names_right(caption, scene.colour, tuple(shapes.COLOURS))
            right["shape"] += _names_right(caption, scene.shape, shapes.SHAPES)
            if length is not CaptionLength.SHORT:  # a short caption never names the background
                right["background"] += _names_right(caption, scene.background, tuple(shapes.BACKGROUNDS))
        answer = run(Task.QUERY, image, question=shapes.COLOUR_QUESTION).strip()
        right["question"] += answer == scene.answer(shapes.COLOUR_QUESTION)
    return {
        "captions name the colour": right["colour"] / captions,
        "captions name the shape": right["shape"] / captions,
        "normal/long captions name the background": right["background"] / (2 * count),
        "colour question exactly right": right["question"] / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-smolvlm", "tiny-qwen2-vl", "tiny-moondream"])
    parser.add_argument("--count", type=int, default=42)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2024, 7])
    args = parser.parse_args()
    cache_dir = Path(Settings().cache_dir)
    for name in args.models:
        spec = catalogue.resolve(catalogue.parse_model_arg(name), cache_dir)
        backend = registry.backend_class(spec.family)(spec, Runtime(device="cpu", dtype="float32"))
        backend.load()
        for seed in args.seeds:
            figures = measure(backend, args.count, seed)
            shown = ", ".join(f"{key} {value:.0%}" for key, value in figures.items())
            print(f"{name} ({Path(spec.source).name}), {args.count} pictures, seed {seed}: {shown}", flush=True)


if __name__ == "__main__":
    main()
