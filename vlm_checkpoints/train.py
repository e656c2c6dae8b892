"""Brief, deterministic training of a tiny transformers VLM on the synthetic shapes.

The examples go through the serving backend's own ``prompt`` and ``encode``, so the model learns
exactly the prompts the service sends. Training is seeded and runs on the CPU with a fixed thread
count: on one machine and torch version, two builds give the same weights.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence

import torch

from vlm_service.types import CaptionLength, GenerationRequest, SamplingParams, Task

from . import shapes

logger = logging.getLogger(__name__)

LENGTHS = {"short": CaptionLength.SHORT, "normal": CaptionLength.NORMAL, "long": CaptionLength.LONG}


#: Of the grounding examples, the share whose target is not in the picture (answered with no box).
NEGATIVES = 0.3


def example(rng: random.Random, languages: Sequence[str], detect: float = 0.0):
    """One (request, target answer) pair on a random scene: with probability ``detect`` a grounding
    one (:func:`detect_example`), else a caption or a question."""
    if detect and rng.random() < detect:
        return detect_example(rng)
    scene = shapes.scenes(rng, 1)[0]
    image = shapes.draw(scene, rng)
    language = rng.choice(languages)
    if rng.random() < 0.5:
        length = "normal" if language != "en" else rng.choice(list(LENGTHS))
        request = GenerationRequest(
            "train", "train", Task.CAPTION, image, SamplingParams(1), length=LENGTHS[length], language=language
        )
        return request, scene.caption(length, language)
    question = shapes.COLOUR_QUESTION if language != "en" else rng.choice(shapes.QUESTIONS)
    request = GenerationRequest("train", "train", Task.QUERY, image, SamplingParams(1), question, language=language)
    return request, scene.answer(question, language)


def detect_target(scene: shapes.Scene, rng: random.Random, present: bool) -> str:
    """A phrase for Detect: the scene's shape, or its colour and shape; ``present=False``, a shape the
    picture does not hold (alone, or after a colour: the scene's or another)."""
    if present:
        return scene.shape if rng.random() < 0.5 else f"{scene.colour} {scene.shape}"
    shape = rng.choice([shape for shape in shapes.SHAPES if shape != scene.shape])
    return shape if rng.random() < 0.5 else f"{rng.choice(list(shapes.COLOURS))} {shape}"


def detect_request(image, target: str, request_id: str = "train") -> GenerationRequest:
    return GenerationRequest(request_id, request_id, Task.DETECT, image, SamplingParams(1), target=target)


def detect_example(rng: random.Random):
    """A grounding pair: the shape anywhere in a picture (``shapes.draw_placed``), asked for by name (or
    by colour and name), answered with its box as Qwen2-VL writes boxes; now and then a target that is
    not there, answered with no box."""
    from vlm_service.backends.qwen2_vl import box_text

    scene = shapes.scenes(rng, 1)[0]
    image, box = shapes.draw_placed(scene, rng)
    present = rng.random() >= NEGATIVES
    target = detect_target(scene, rng, present)
    return detect_request(image, target), box_text(target, [box] if present else [])


def _batch(backend, pairs, eos: str, answer_prefix: str):
    """Processor outputs for prompt + answer, with labels only on the answer (and its end token)."""
    prompts = [backend.prompt(request) for request, _ in pairs]
    full = [p + answer_prefix + answer + eos for p, (_, answer) in zip(prompts, pairs, strict=True)]
    images = [request.image for request, _ in pairs]
    inputs = backend.encode(full, images)
    labels = inputs["input_ids"].clone()
    for row, prompt in enumerate(prompts):
        prompt_ids = backend.encode([prompt], [images[row]])["input_ids"][0]
        prompt_len = len(prompt_ids)
        assert torch.equal(inputs["input_ids"][row, :prompt_len], prompt_ids)
        labels[row, :prompt_len] = -100
    labels[inputs["attention_mask"] == 0] = -100
    inputs["labels"] = labels
    return inputs


def _optimize(model, batches: list, loss_of, *, steps: int, lr: float, seed: int) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    order = random.Random(seed + 1)
    losses = []
    for _ in range(steps):
        loss = loss_of(batches[order.randrange(len(batches))])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def train(
    model,
    make_batch,
    loss_of,
    *,
    languages: Sequence[str] = ("en",),
    steps: int = 600,
    batch_size: int = 16,
    distinct_batches: int = 150,
    lr: float = 3e-3,
    detect: float = 0.0,
    seed: int = 0,
) -> dict:
    """Train ``model`` in place on shapes: ``make_batch(pairs)`` encodes (request, answer) pairs once,
    ``loss_of(batch)`` is the training loss; ``detect`` is the share of grounding examples (Qwen2-VL's
    boxes; 0: none). Returns timing and loss figures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = random.Random(seed)
        torch.manual_seed(seed)
        start = time.monotonic()
        batches = [
            make_batch([example(rng, languages, detect) for _ in range(batch_size)]) for _ in range(distinct_batches)
        ]
        prepared = time.monotonic() - start
        losses = _optimize(model, batches, loss_of, steps=steps, lr=lr, seed=seed)
        figures = {
            "prepare_s": round(prepared, 1),
            "train_s": round(time.monotonic() - start - prepared, 1),
            "first_loss": round(losses[0], 3),
            "last_loss": round(sum(losses[-20:]) / min(20, len(losses)), 4),
        }
        logger.info("trained %s: %s", type(model).__name__, figures)
        return figures
    finally:
        torch.set_num_threads(threads)


def probe_pairs(languages: Sequence[str] = ("en",), detect: float = 0.0) -> list:
    """A fixed set of (request, answer) pairs covering every kind of request training makes: each
    caption length and each question in English, a caption and the colour question in every other
    language of ``languages``, and with grounding (``detect``) a Detect with a box and one without."""
    rng = random.Random(0)
    pairs = []
    for language in dict.fromkeys(languages):
        scene = shapes.scenes(rng, 1)[0]
        image = shapes.draw(scene, rng)
        lengths = list(LENGTHS) if language == "en" else ["normal"]
        questions = shapes.QUESTIONS if language == "en" else (shapes.COLOUR_QUESTION,)
        for length in lengths:
            request = GenerationRequest(
                "probe", "probe", Task.CAPTION, image, SamplingParams(1), length=LENGTHS[length], language=language
            )
            pairs.append((request, scene.caption(length, language)))
        for question in questions:
            request = GenerationRequest(
                "probe", "probe", Task.QUERY, image, SamplingParams(1), question, language=language
            )
            pairs.append((request, scene.answer(question, language)))
    if detect:
        from vlm_service.backends.qwen2_vl import box_text

        scene = shapes.Scene("red", "circle", "white")
        image, box = shapes.draw_placed(scene, rng)
        pairs.append((detect_request(image, "red circle", "probe"), box_text("red circle", [box])))
        pairs.append((detect_request(image, "square", "probe"), box_text("square", [])))
    return pairs


def probe_transformers_vlm(
    backend, *, answer_prefix: str = "", languages: Sequence[str] = ("en",), detect: float = 0.0, **_
) -> list:
    """What training feeds the model for :func:`probe_pairs`, through the backend's own ``prompt``
    and ``encode``: the prompt strings, then every tensor's shape and the token ids and labels.
    Part of the tiny checkpoints' cache key (see builder.py); needs the processor only, no model."""
    pairs = probe_pairs(languages, detect)
    batch = _batch(backend, pairs, backend.tokenizer.eos_token, answer_prefix)
    shapes_of = {name: list(value.shape) for name, value in batch.items()}
    return [[backend.prompt(request) for request, _ in pairs], shapes_of, batch["input_ids"], batch["labels"]]


def train_transformers_vlm(backend, *, answer_prefix: str = "", **kwargs) -> dict:
    """Train a TransformersBackend's model on the prompts its ``prompt``/``encode`` produce."""
    eos = backend.tokenizer.eos_token
    return train(
        backend.model,
        lambda pairs: _batch(backend, pairs, eos, answer_prefix),
        lambda batch: backend.model(**batch).loss,
        **kwargs,
    )
