"""How often the tiny demo checkpoints describe held-out pictures right (the accuracy figures of docs/models.md).

For each model: captions of every length of ``--count`` held-out pictures (seeded, drawn like the
training pictures but never trained on), and the colour question on the same pictures. A caption
names the colour (or shape, or background) right when that word is in it and no other word of its
kind is. For a model that grounds, also Detect (and Point) on as many pictures with the shape anywhere
(``shapes.draw_placed``): how often the first box overlaps the shape's by half (IoU >= 0.5) beside a box
of the mean size fixed in the middle, how often the first point lies on it beside the centre, and
how often a shape the picture does not hold is not found. Runs the backends in-process, greedy, on
the CPU; nothing is timed.

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
from vlm_service.types import CaptionLength, GenerationRequest, Region, SamplingParams, Task


class _Collect:
    def __init__(self, parser=None):
        self.pieces, self.regions, self.parser = [], [], parser

    def add_text(self, piece: str) -> None:
        self.pieces.append(piece)
        if self.parser is not None:
            self.regions += [event for event in self.parser.push(piece) if isinstance(event, Region)]

    def add_region(self, region: Region) -> None:
        self.regions.append(region)

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


def _regions(backend, task: Task, image, target: str) -> list[Region]:
    request = GenerationRequest(
        "acc", backend.spec.name, task, image, SamplingParams(80), target=target, max_objects=10
    )
    sink = _Collect(backend.region_parser(request))
    backend.generate(request, sink)
    return sink.regions


def _inside(point, box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def measure_grounding(backend, count: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    placed = [(scene, *shapes.draw_placed(scene, rng)) for scene in shapes.scenes(rng, count)]
    width = sum(box[2] - box[0] for _, _, box in placed) / count
    height = sum(box[3] - box[1] for _, _, box in placed) / count
    centred = (0.5 - width / 2, 0.5 - height / 2, 0.5 + width / 2, 0.5 + height / 2)
    boxes = points = absent_empty = 0
    for i, (scene, image, box) in enumerate(placed):
        phrase = scene.shape if i % 2 else f"{scene.colour} {scene.shape}"
        found = _regions(backend, Task.DETECT, image, phrase)
        boxes += bool(found) and shapes.iou(found[0].box, box) >= 0.5
        other = [shape for shape in shapes.SHAPES if shape != scene.shape][i % 2]
        absent_empty += not _regions(backend, Task.DETECT, image, other)
        if Task.POINT in backend.grounding:
            found = _regions(backend, Task.POINT, image, phrase)
            points += bool(found) and _inside(found[0].point, box)
    figures = {
        "detect IoU >= 0.5": boxes / count,
        "(a centred box)": sum(shapes.iou(centred, box) >= 0.5 for _, _, box in placed) / count,
        "a shape not there found nowhere": absent_empty / count,
    }
    if Task.POINT in backend.grounding:
        figures["point on the shape"] = points / count
        figures["(the centre)"] = sum(_inside((0.5, 0.5), box) for _, _, box in placed) / count
    return figures


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
            if backend.grounding:
                figures = measure_grounding(backend, args.count, seed)
                shown = ", ".join(f"{key} {value:.0%}" for key, value in figures.items())
                print(f"{name} grounding, {args.count} pictures, seed {seed}: {shown}", flush=True)


if __name__ == "__main__":
    main()
