"""Qwen2-VL and Qwen2.5-VL: ``Qwen/Qwen2-VL-2B-Instruct`` and its tiny twin; answers in en/ja/zh/ko."""

from __future__ import annotations

import dataclasses
import re

from vlm_service.backends.base import RegionParser
from vlm_service.backends.hf import TransformersBackend
from vlm_service.types import (
    CaptionLength,
    GenerationRequest,
    ImageBound,
    ImageDetail,
    ImageTiling,
    Malformed,
    Region,
    Task,
)

#: The instruction sent for each caption length.
CAPTION_PROMPTS = {
    CaptionLength.SHORT: "Describe this image in a few words.",
    CaptionLength.NORMAL: "Describe this image in one or two sentences.",
    CaptionLength.LONG: "Describe this image in detail.",
}

#: How the prompt asks for each response language (empty for English, the model's default).
LANGUAGE_INSTRUCTIONS = {
    "en": "",
    "ja": "日本語で答えてください。",
    "zh": "请用中文回答。",
    "ko": "한국어로 답해 주세요.",
}


#: The grounding prompt: Qwen2-VL's object-reference tokens around the phrase, as its grounding data
#: has them; it answers with ``<|object_ref_start|>phrase<|object_ref_end|>`` and one
#: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` per object, corners in 0..1000 of the picture.
DETECT_PROMPT = "Detect the bounding box of <|object_ref_start|>{target}<|object_ref_end|>."
#: The scale of Qwen2-VL's box coordinates.
BOX_SCALE = 1000


def box_text(target: str, boxes: list[tuple[float, float, float, float]]) -> str:
    """Qwen2-VL's answer to :data:`DETECT_PROMPT` for ``boxes`` (normalized corners), as it writes it:
    the phrase, then each box in 0..1000 coordinates; no box: the phrase alone is not written, only
    a sentence saying there is none."""
    if not boxes:
        return f"There is no {target} in the image."
    corners = "".join(
        "<|box_start|>({},{}),({},{})<|box_end|>".format(*(round(v * BOX_SCALE) for v in box)) for box in boxes
    )
    return f"<|object_ref_start|>{target}<|object_ref_end|>{corners}"


def _prefixes(parts: list[str], partials: list[str]) -> str:
    """A pattern matching every prefix of ``parts`` in sequence, the last one possibly partial."""
    if not parts:
        return ""
    return f"(?:{parts[0]}{_prefixes(parts[1:], partials[1:])}|{partials[0]})"


_NUMBER_PART, _PARTIAL_NUMBER = r"\s*\d{1,6}", r"\s*\d{0,6}"
#: One box as the model writes it once its special tokens are skipped, "(x1,y1),(x2,y2)", after its "(".
_BOX_PARTS = [_NUMBER_PART, r"\s*,", _NUMBER_PART, r"\s*\)", r"\s*,", r"\s*\(", _NUMBER_PART, r"\s*,", _NUMBER_PART]
#: A whole box, its four numbers captured.
_BOX = re.compile(r"\(" + "".join(r"\s*(\d{1,6})" if part == _NUMBER_PART else part for part in _BOX_PARTS) + r"\s*\)")
#: What may still become a box with more text: every prefix of one.
_BOX_PREFIX = re.compile(
    r"\("
    + _prefixes(_BOX_PARTS, [_PARTIAL_NUMBER if part == _NUMBER_PART else r"\s*" for part in _BOX_PARTS])
    + r"\s*\Z"
)


class BoxParser(RegionParser):
    """Qwen2-VL's boxes out of its streamed answer, each as soon as its closing parenthesis is written.

    The special tokens around them (``<|box_start|>``...) are skipped by the detokenizer, so the text
    reads ``circle(12,340),(560,780)``: what is not in parentheses (the object's name, words) is not a
    box and is dropped. A parenthesis that cannot become ``(x1,y1),(x2,y2)``, corners out of 0..1000 or
    in the wrong order, or an answer that ends inside a box, is reported as :class:`Malformed`.

    ``echo`` is the object phrase, which the model repeats before its boxes: where it holds parentheses
    ("cup (blue)", or even "(0,0),(9,9)"), they are the phrase's, never a box or a malformed one."""

    def __init__(self, echo: str = ""):
        self._pending = ""
        self._echo = echo if ("(" in echo or ")" in echo) else ""

    def _skip_echo(self) -> bool:
        """Drop the phrase where it comes before the next parenthesis; True: hold the text, for it may
        be the start of the phrase still being written."""
        paren = self._pending.find("(")
        at = self._pending.find(self._echo)
        if at >= 0 and (paren < 0 or at <= paren):
            self._pending = self._pending[at + len(self._echo) :]
            return self._skip_echo()
        last = len(self._pending) - 1 if paren < 0 else paren
        for start in range(last + 1):
            if self._echo.startswith(self._pending[start:]):
                self._pending = self._pending[start:]
                return True
        return False

    def push(self, text: str) -> list[Region | Malformed]:
        self._pending += text
        out: list[Region | Malformed] = []
        while True:
            if self._echo and self._skip_echo():
                return out
            start = self._pending.find("(")
            if start < 0:
                self._pending = ""
                return out
            rest = self._pending[start:]
            match = _BOX.match(rest)
            if match is not None:
                out.append(_box(match))
                self._pending = rest[match.end() :]
                continue
            if _BOX_PREFIX.match(rest):
                self._pending = rest  # may still become a box
                return out
            bad = rest.find("(", 1)  # not a box: report up to the next attempt at one
            bad = len(rest) if bad < 0 else bad
            out.append(Malformed(rest[:bad], "not a box of the form (x1,y1),(x2,y2)"))
            self._pending = rest[bad:]

    def finish(self) -> list[Malformed]:
        rest, self._pending = self._pending, ""
        start = rest.find("(")  # what is held before it is (the start of) the phrase
        return [Malformed(rest[start:], "the answer ended inside a box")] if start >= 0 else []


def _box(match: re.Match) -> Region | Malformed:
    x1, y1, x2, y2 = (int(value) for value in match.groups())
    if max(x1, y1, x2, y2) > BOX_SCALE:
        return Malformed(match.group(0), f"a coordinate is above {BOX_SCALE}")
    if x1 > x2 or y1 > y2:
        return Malformed(match.group(0), "the second corner is not below and right of the first")
    return Region(box=(x1 / BOX_SCALE, y1 / BOX_SCALE, x2 / BOX_SCALE, y2 / BOX_SCALE))


#: The most pixels a picture keeps at ImageDetail.LOW (a 512x512 view's worth).
LOW_DETAIL_PIXELS = 512 * 512


class Qwen2VLBackend(TransformersBackend):
    family = "qwen2-vl"
    languages = tuple(LANGUAGE_INSTRUCTIONS)
    # With special tokens skipped, a stray "<|im_start|>assistant\n" leaves its role word behind.
    role_prefixes = ("assistant\n",)
    vision_inputs = ("pixel_values", "image_grid_thw")
    encoder_only_inputs = ("pixel_values",)  # the grid sizes also place the image tokens (M-RoPE)
    grounding = frozenset({Task.DETECT})
    max_images = 8

    def region_parser(self, request: GenerationRequest) -> RegionParser:
        return BoxParser(echo=request.target)

    def next_positions(self, lengths: list[int]) -> list[int]:
        # The prefill just computed the prompts' 3-D positions (from the attention mask, padding left
        # out); each row's text after it is shifted by its delta from the row's length.
        return [length + int(delta) for length, delta in zip(lengths, self.model.model.rope_deltas[:, 0], strict=True)]

    def text_positions(self, mask):
        return None  # M-RoPE: the model computes each row's 3-D positions from the mask

    def prompt(self, request: GenerationRequest) -> str:
        if request.task is Task.DETECT:
            text = DETECT_PROMPT.format(target=request.target)
        else:
            text = request.question if request.task is Task.QUERY else CAPTION_PROMPTS[request.length]
        instruction = LANGUAGE_INSTRUCTIONS[request.language]
        if instruction:
            text = f"{text}\n{instruction}"
        pictures = [{"type": "image"}] * len(request.pictures)
        messages = [{"role": "user", "content": [*pictures, {"type": "text", "text": text}]}]
        # Several pictures are labelled "Picture 1:", "Picture 2:" (the chat template's add_vision_id),
        # so a question can name them.
        several = len(pictures) > 1
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, add_vision_id=several)

    def _pixel_range(self) -> tuple[int, int, int]:
        """The processor's fewest and most pixels per picture, and the pixels one image token covers."""
        images = self.processor.image_processor
        fewest, most = images.size["shortest_edge"], images.size["longest_edge"]
        return fewest, most, (images.patch_size * images.merge_size) ** 2

    def image_bound(self, detail: ImageDetail) -> ImageBound:
        """The most pixels the processor keeps at ``detail``, and a quarter more: the processor then still
        makes its own last resize (to multiples of 28 px, rounding down as it does for any bigger
        picture), so a reduced picture gets the same grid, and image tokens, as the full one."""
        _, most, _ = self._pixel_range()
        if detail is ImageDetail.LOW:
            most = min(most, LOW_DETAIL_PIXELS)
        return ImageBound(pixels=most * 5 // 4)

    def image_tilings(self) -> dict[ImageDetail, ImageTiling]:
        """One view at any resolution: HIGH (and AUTO) keeps up to the processor's most pixels, LOW up to
        512x512 pixels' worth (fewer image tokens, in proportion)."""
        _, most, per_token = self._pixel_range()
        low_most = min(most, LOW_DETAIL_PIXELS)
        high = ImageTiling(ImageDetail.HIGH, f"one view of at most {most:,} pixels", 1, most // per_token)
        low = ImageTiling(ImageDetail.LOW, f"one view of at most {low_most:,} pixels", 1, low_most // per_token)
        return {
            ImageDetail.AUTO: dataclasses.replace(high, detail=ImageDetail.AUTO),
            ImageDetail.LOW: low,
            ImageDetail.HIGH: high,
        }

    def encode(self, prompts: list[str], images: list, detail: ImageDetail = ImageDetail.AUTO):
        options = {}
        if detail is ImageDetail.LOW:
            fewest, most, _ = self._pixel_range()
            options["size"] = {"shortest_edge": fewest, "longest_edge": min(most, LOW_DETAIL_PIXELS)}
        flat = [picture for each in images for picture in (each if isinstance(each, list | tuple) else [each])]
        return self.processor(text=prompts, images=flat, return_tensors="pt", padding=True, **options)
