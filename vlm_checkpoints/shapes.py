"""Synthetic pictures of one coloured shape on a plain background, and what a model should say of them.

The demo checkpoints are trained on these, so their captions name what is in the picture ("A red circle
on a white background.") and they answer simple questions in English, Japanese, Chinese and Korean.
Everything is drawn from a seeded ``random.Random``: the same seed gives the same samples everywhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "gray": (150, 150, 150)}

# Words per language: colour adjective, shape noun, background adjective.
WORDS = {
    "ja": {
        "red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "purple": "紫の", "orange": "オレンジ色の",
        "black": "黒い", "circle": "丸", "square": "四角", "triangle": "三角", "white": "白い", "gray": "灰色の",
    },
    "zh": {
        "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
        "black": "黑色", "circle": "圆形", "square": "正方形", "triangle": "三角形", "white": "白色", "gray": "灰色",
    },
    "ko": {
        "red": "빨간", "green": "초록색", "blue": "파란", "yellow": "노란", "purple": "보라색", "orange": "주황색",
        "black": "검은", "circle": "원", "square": "사각형", "triangle": "삼각형", "white": "흰색", "gray": "회색",
    },
}  # fmt: skip

COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is it?"
BACKGROUND_QUESTION = "What colour is the background?"


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str

    def caption(self, length: str = "normal", language: str = "en") -> str:
        if language != "en":
            w = WORDS[language]
            colour, shape, background = w[self.colour], w[self.shape], w[self.background]
            return {
                "ja": f"{background}背景に{colour}{shape}があります。",
                "zh": f"{background}背景上有一个{colour}的{shape}。",
                "ko": f"{background} 배경에 {colour} {shape}이 있습니다.",
            }[language]
        article = "An" if self.colour[0] in "aeiou" else "A"
        if length == "short":
            return f"{article} {self.colour} {self.shape}."
        if length == "long":
            return (
                f"The image shows {article.lower()} {self.colour} {self.shape} on a plain {self.background} "
                f"background. The {self.shape} is the only object in the picture."
            )
        return f"{article} {self.colour} {self.shape} on a {self.background} background."

    def answer(self, question: str, language: str = "en") -> str:
        if question == COLOUR_QUESTION:
            if language != "en":
                word = WORDS[language][self.colour]
                return {"ja": f"{word}です。", "zh": f"{word}。", "ko": f"{word}입니다."}[language]
            return f"The shape is {self.colour}."
        if question == SHAPE_QUESTION:
            return f"It is a {self.shape}."
        if question == BACKGROUND_QUESTION:
            return f"The background is {self.background}."
        raise ValueError(f"no answer for {question!r}")


QUESTIONS = (COLOUR_QUESTION, SHAPE_QUESTION, BACKGROUND_QUESTION)


def draw(scene: Scene, rng: random.Random) -> Image.Image:
    """Render a scene at a random size and aspect ratio, the shape near the middle at a random size."""
    width, height = rng.randint(48, 160), rng.randint(48, 160)
    image = Image.new("RGB", (width, height), BACKGROUNDS[scene.background])
    side = int(min(width, height) * rng.uniform(0.55, 0.8))
    x0 = (width - side) // 2 + int(rng.uniform(-0.08, 0.08) * width)
    y0 = (height - side) // 2 + int(rng.uniform(-0.08, 0.08) * height)
    _paint(image, scene, (x0, y0, x0 + side, y0 + side))
    return image


def _paint(image: Image.Image, scene: Scene, box: tuple[int, int, int, int]) -> None:
    pen = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    x0, y0, x1, y1 = box
    if scene.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif scene.shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)


def draw_placed(scene: Scene, rng: random.Random) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Render a scene with the shape anywhere in the picture, at 20-60 % of its shorter side: the
    picture, and the shape's box normalized to it (x_min, y_min, x_max, y_max in [0, 1]). What the
    tiny models learn to ground on: where the shape is cannot be guessed."""
    width, height = rng.randint(64, 192), rng.randint(64, 192)
    image = Image.new("RGB", (width, height), BACKGROUNDS[scene.background])
    side = max(8, int(min(width, height) * rng.uniform(0.2, 0.6)))
    x0, y0 = rng.randint(0, width - side - 1), rng.randint(0, height - side - 1)
    _paint(image, scene, (x0, y0, x0 + side, y0 + side))
    # PIL's ellipse and rectangle fill the pixels x0..x0+side inclusive: side + 1 pixels wide.
    return image, (x0 / width, y0 / height, (x0 + side + 1) / width, (y0 + side + 1) / height)


def box_center(box: tuple[float, float, float, float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x_min, y_min, x_max, y_max) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def scenes(rng: random.Random, count: int) -> list[Scene]:
    return [Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))) for _ in range(count)]


def all_texts() -> list[str]:
    """Every sentence the demo data contains (for tokenizer training)."""
    texts = []
    for colour in COLOURS:
        for shape in SHAPES:
            for background in BACKGROUNDS:
                scene = Scene(colour, shape, background)
                texts += [scene.caption(length) for length in ("short", "normal", "long")]
                texts += [scene.caption(language=language) for language in WORDS]
                texts += [scene.answer(q) for q in QUESTIONS]
                texts += [scene.answer(COLOUR_QUESTION, language) for language in WORDS]
    return texts
