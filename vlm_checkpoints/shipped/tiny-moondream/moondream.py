"""The model behind ``HfMoondream``: a small vision encoder over image crops and a text decoder with one
KV cache per instance, driven through Moondream2's published Python API (``encode_image``, ``caption``,
``query``, ``detect``, ``point``).

Written by vlm-service from the behaviour of Moondream2's published remote code (revision 2025-06-21),
with the traits a loader has to live with:

* the sizes come from this code (``config.py``/``sizes.py``), and so does the weights' dtype, which
  the image crops are also made in (whatever dtype the weights have by then);
* the tokenizer is not in the checkpoint: it is loaded by repo name from the Hugging Face cache
  (``Tokenizer.from_pretrained``), which works offline once the cache holds it;
* ``attn_mask`` and the text model's ``freqs_cis`` are buffers made here and never saved, so a model
  built on the meta device and filled from the weights file has them uninitialised;
* ``encode_image(image, settings)`` reads ``settings["variant"]`` without a default;
* ``caption``/``query`` with ``stream=True`` return a generator of text pieces (whole words), not tokens;
* ``detect``/``point`` have no ``stream``: they return every object at once. They decode greedily
  whatever ``settings`` holds: it is read for ``max_objects`` only (default 50), and passed on to
  ``encode_image`` like ``caption``'s, so a PIL image with settings that lack ``"variant"`` is a
  ``KeyError`` there too (an ``EncodedImage`` is not encoded again, so it passes);
* the object is encoded with a space before it (``" " + object``), between the template's prefix and suffix;
* ``max_objects`` is checked before each object, and each object ends with one more decode step whose
  greedy token (anything but the end token) starts another: a model that never writes the end token
  gives ``max_objects`` objects;
* a coordinate is its bin's lower edge (``bin / bins``: never 1.0), a size ``2 ** (bin / (bins - 1) * 10
  - 10)`` (1/1024 to 1), and a box is the centre plus and minus half the size, unclipped: it may reach
  outside [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer
from torch import nn

from .config import MoondreamConfig, RegionConfig, TextConfig, VisionConfig
from .sizes import DTYPE

#: The Hugging Face repo the tokenizer is read from (the build puts it in a Hugging Face cache).
TOKENIZER_REPO = "vlm-service/tiny-moondream-tokenizer"
DEFAULT_MAX_TOKENS = 768
DEFAULT_TEMPERATURE = 0.5
DEFAULT_TOP_P = 0.3
DEFAULT_MAX_OBJECTS = 50


@dataclass(frozen=True)
class EncodedImage:
    """An image run through the vision encoder and prefilled into the text model's KV cache."""

    pos: int
    caches: list[tuple[torch.Tensor, torch.Tensor]]


class KVCache(nn.Module):
    def __init__(self, n_kv_heads: int, max_context: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (1, n_kv_heads, max_context, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype))

    def update(self, pos_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k_cache[:, :, pos_ids] = k
        self.v_cache[:, :, pos_ids] = v
        return self.k_cache, self.v_cache


# --- building blocks ------------------------------------------------------------------------------


def _mlp(dim: int, inner: int, out: int, dtype) -> nn.ModuleDict:
    return nn.ModuleDict({"fc1": nn.Linear(dim, inner, dtype=dtype), "fc2": nn.Linear(inner, out, dtype=dtype)})


def mlp(x: torch.Tensor, w: nn.ModuleDict) -> torch.Tensor:
    return w.fc2(F.gelu(w.fc1(x), approximate="tanh"))


def rope_table(rot_dim: int, length: int, theta: float = 10000.0) -> torch.Tensor:
    """(length, rot_dim // 2, 2): cos and sin of each position's rotary angles."""
    inverse = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inverse)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * table.shape[1]`` features of each head (x: batch, heads, time, head_dim)."""
    half = table.shape[1]
    rotated, passed = x[..., : 2 * half].float(), x[..., 2 * half :]
    a, b = rotated[..., :half], rotated[..., half:]
    cos, sin = table[pos_ids, :, 0], table[pos_ids, :, 1]
    out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return torch.cat([out.to(x.dtype), passed], dim=-1)


def build_vision(c: VisionConfig, dtype) -> nn.ModuleDict:
    grid = c.crop_size // c.enc_patch_size
    vision = nn.ModuleDict(
        {
            "patch_emb": nn.Linear(c.in_channels * c.enc_patch_size**2, c.enc_dim, dtype=dtype),
            "blocks": nn.ModuleList(
                nn.ModuleDict(
                    {
                        "ln1": nn.LayerNorm(c.enc_dim, dtype=dtype),
                        "attn": nn.ModuleDict(
                            {
                                "qkv": nn.Linear(c.enc_dim, 3 * c.enc_dim, dtype=dtype),
                                "proj": nn.Linear(c.enc_dim, c.enc_dim, dtype=dtype),
                            }
                        ),
                        "ln2": nn.LayerNorm(c.enc_dim, dtype=dtype),
                        "mlp": _mlp(c.enc_dim, c.enc_ff_dim, c.enc_dim, dtype),
                    }
                )
                for _ in range(c.enc_n_layers)
            ),
            "post_ln": nn.LayerNorm(c.enc_dim, dtype=dtype),
            "proj_mlp": _mlp(2 * c.enc_dim, c.proj_inner_dim, c.proj_out_dim, dtype),
        }
    )
    vision.pos_emb = nn.Parameter(torch.zeros(1, grid * grid, c.enc_dim, dtype=dtype))
    return vision


def build_text(c: TextConfig, dtype) -> nn.ModuleDict:
    head_dim = c.dim // c.n_heads
    qkv_dim = c.dim + 2 * c.n_kv_heads * head_dim
    text = nn.ModuleDict(
        {
            "blocks": nn.ModuleList(
                nn.ModuleDict(
                    {
                        "ln": nn.LayerNorm(c.dim, dtype=dtype),
                        "attn": nn.ModuleDict(
                            {
                                "qkv": nn.Linear(c.dim, qkv_dim, dtype=dtype),
                                "proj": nn.Linear(c.dim, c.dim, dtype=dtype),
                            }
                        ),
                        "mlp": _mlp(c.dim, c.ff_dim, c.dim, dtype),
                    }
                )
                for _ in range(c.n_layers)
            ),
            "post_ln": nn.LayerNorm(c.dim, dtype=dtype),
            "lm_head": nn.Linear(c.dim, c.vocab_size, dtype=dtype),
        }
    )
    text.wte = nn.Parameter(torch.empty(c.vocab_size, c.dim, dtype=dtype))
    # Made here, never saved: a loader that skips __init__'s tensors leaves it uninitialised.
    text.register_buffer("freqs_cis", rope_table(head_dim // 2, c.max_context), persistent=False)
    return text


def build_region(c: RegionConfig, dtype) -> nn.ModuleDict:
    """The published model's region head (pointing and detection); caption and query never use it."""
    region = nn.ModuleDict(
        {
            "coord_encoder": nn.Linear(c.coord_feat_dim, c.dim, dtype=dtype),
            "coord_decoder": _mlp(c.dim, c.inner_dim, c.coord_out_dim, dtype),
            "size_encoder": nn.Linear(c.size_feat_dim, c.dim, dtype=dtype),
            "size_decoder": _mlp(c.dim, c.inner_dim, c.size_out_dim, dtype),
        }
    )
    region.coord_features = nn.Parameter(torch.empty(1, c.coord_feat_dim // 2, dtype=dtype))
    region.size_features = nn.Parameter(torch.empty(2, c.size_feat_dim // 2, dtype=dtype))
    return region


# --- regions (detect, point) ------------------------------------------------------------------------


def fourier_features(x: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """cos and sin of ``2 pi x`` times each frequency (x: ..., n; frequencies: n, features // 2)."""
    angles = (2 * math.pi) * (x @ frequencies)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def encode_coordinate(coord: torch.Tensor, w: nn.ModuleDict) -> torch.Tensor:
    """A coordinate in [0, 1] (..., 1) -> the text model's input embedding (..., dim)."""
    return w.coord_encoder(fourier_features(coord, w.coord_features))


def decode_coordinate(hidden: torch.Tensor, w: nn.ModuleDict) -> torch.Tensor:
    """The text model's hidden state (before its final norm) -> one logit per coordinate bin."""
    return mlp(hidden, w.coord_decoder)


def encode_size(size: torch.Tensor, w: nn.ModuleDict) -> torch.Tensor:
    """A (width, height) pair (..., 2) -> the text model's input embedding (..., dim)."""
    return w.size_encoder(fourier_features(size, w.size_features))


def decode_size(hidden: torch.Tensor, w: nn.ModuleDict) -> torch.Tensor:
    """One position's hidden state -> (2, bins): the width's logits, then the height's."""
    return mlp(hidden, w.size_decoder).view(2, -1)


def size_from_bin(index: torch.Tensor, bins: int) -> torch.Tensor:
    """A size bin's size: log-scale bins from 2**-10 (bin 0) to 1 (the last); for 1024 bins,
    ``2 ** ((bin / 1023) * 10 - 10)``."""
    return torch.pow(2.0, (index.float() / (bins - 1)) * 10.0 - 10.0)


# --- vision -----------------------------------------------------------------------------------------


def select_tiling(height: int, width: int, crop: int, max_crops: int) -> tuple[int, int]:
    """Rows and columns of local crops: about one per ``crop`` pixels, at most ``max_crops``."""
    if height <= crop or width <= crop:
        return 1, 1
    rows, cols = -(-height // crop), -(-width // crop)
    while rows * cols > max_crops:
        if rows >= cols:
            rows -= 1
        else:
            cols -= 1
    return rows, cols


def image_crops(image: Image.Image, c: VisionConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """A global view and a grid of local crops, each ``crop_size`` square (uint8, crops x H x W x 3)."""
    rgb = image.convert("RGB")
    size = c.crop_size
    rows, cols = select_tiling(rgb.height, rgb.width, size, c.max_crops)
    crops = [rgb.resize((size, size), Image.BICUBIC)]
    tiled = rgb.resize((cols * size, rows * size), Image.BICUBIC)
    for row in range(rows):
        for col in range(cols):
            crops.append(tiled.crop((col * size, row * size, (col + 1) * size, (row + 1) * size)))
    return np.stack([np.asarray(crop) for crop in crops]), (rows, cols)


def vision_attention(x: torch.Tensor, w: nn.ModuleDict, n_heads: int) -> torch.Tensor:
    b, t, d = x.shape
    q, k, v = (z.view(b, t, n_heads, d // n_heads).transpose(1, 2) for z in w.qkv(x).chunk(3, dim=-1))
    return w.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


def vision_encoder(crops: torch.Tensor, w: nn.ModuleDict, c: VisionConfig) -> torch.Tensor:
    """(crops, 3, S, S) pixels in [-1, 1] -> (crops, patches, enc_dim)."""
    n, channels, size, _ = crops.shape
    p, g = c.enc_patch_size, size // c.enc_patch_size
    patches = crops.reshape(n, channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, channels * p * p)
    x = w.patch_emb(patches) + w.pos_emb
    for block in w.blocks:
        x = x + vision_attention(block.ln1(x), block.attn, c.enc_n_heads)
        x = x + mlp(block.ln2(x), block.mlp)
    return w.post_ln(x)


def vision_projection(features: torch.Tensor, tiling: tuple[int, int], w: nn.ModuleDict, c: VisionConfig):
    """Global features beside the local crops' features pooled back to one grid -> (patches, text dim)."""
    rows, cols = tiling
    g = c.crop_size // c.enc_patch_size
    local = features[1:].view(rows, cols, g, g, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * g, cols * g)
    pooled = F.adaptive_avg_pool2d(local, (g, g)).flatten(1).transpose(0, 1)
    return mlp(torch.cat([features[0], pooled], dim=-1), w.proj_mlp)


# --- text -------------------------------------------------------------------------------------------


def text_attention(x, w, freqs_cis, kv_cache, attn_mask, pos_ids, n_heads: int, n_kv_heads: int):
    b, t, d = x.shape
    head_dim = d // n_heads
    q, k, v = w.qkv(x).split([d, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q = apply_rope(q.view(b, t, n_heads, head_dim).transpose(1, 2), freqs_cis, pos_ids)
    k = apply_rope(k.view(b, t, n_kv_heads, head_dim).transpose(1, 2), freqs_cis, pos_ids)
    v = v.view(b, t, n_kv_heads, head_dim).transpose(1, 2)
    if kv_cache is not None:
        k, v = kv_cache.update(pos_ids, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=n_heads != n_kv_heads)
    return w.proj(out.transpose(1, 2).reshape(b, t, d))


def text_decoder(x, w, attn_mask, pos_ids, c: TextConfig, use_cache: bool = True) -> torch.Tensor:
    """Parallel attention and MLP blocks; with ``use_cache`` each block reads and extends its KV cache."""
    for block in w.blocks:
        normed = block.ln(x)
        cache = getattr(block, "kv_cache", None) if use_cache else None
        attended = text_attention(normed, block.attn, w.freqs_cis, cache, attn_mask, pos_ids, c.n_heads, c.n_kv_heads)
        x = x + attended + mlp(normed, block.mlp)
    return x


def lm_head(hidden: torch.Tensor, w: nn.ModuleDict) -> torch.Tensor:
    return w.lm_head(w.post_ln(hidden))


# --- the model --------------------------------------------------------------------------------------


class MoondreamModel(nn.Module):
    def __init__(self, config: MoondreamConfig, dtype=DTYPE, setup_caches: bool = True):
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer.from_pretrained(TOKENIZER_REPO)
        self.vision = build_vision(config.vision, dtype)
        self.text = build_text(config.text, dtype)
        self.region = build_region(config.region, dtype)
        context = config.text.max_context
        prefix = 1 + (config.vision.crop_size // config.vision.enc_patch_size) ** 2  # BOS and the image
        mask = torch.ones(context, context, dtype=torch.bool).tril()
        mask[:prefix, :prefix] = True  # the image attends to itself both ways
        self.register_buffer("attn_mask", mask.view(1, 1, context, context), persistent=False)
        if setup_caches:
            self._setup_caches()

    def _setup_caches(self) -> None:
        c = self.config.text
        for block in self.text.blocks:
            block.kv_cache = KVCache(
                c.n_kv_heads, c.max_context, c.dim // c.n_heads, device=self.device, dtype=self.vision.pos_emb.dtype
            )

    @property
    def device(self) -> torch.device:
        return self.vision.pos_emb.device

    # --- images ---------------------------------------------------------------------------------

    def pixels(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        crops, tiling = image_crops(image, self.config.vision)
        tensor = torch.from_numpy(crops).permute(0, 3, 1, 2).to(self.device, DTYPE)
        return tensor / 127.5 - 1.0, tiling

    def image_embeddings(self, image: Image.Image) -> torch.Tensor:
        """(patches, text dim): what the text model reads for ``image``."""
        crops, tiling = self.pixels(image)
        features = vision_encoder(crops, self.vision, self.config.vision)
        return vision_projection(features, tiling, self.vision, self.config.vision)

    def encode_image(self, image, settings: dict | None = None) -> EncodedImage:
        if isinstance(image, EncodedImage):
            return image
        if not isinstance(image, Image.Image):
            raise ValueError("image must be a PIL Image or EncodedImage")
        variant = settings["variant"] if settings is not None else None
        if variant is not None:
            raise ValueError(f"variant {variant!r}: this model has no variants")
        with torch.inference_mode():
            embeddings = self.image_embeddings(image)[None]
            bos = F.embedding(torch.tensor([[self.config.tokenizer.bos_id]], device=self.device), self.text.wte)
            inputs = torch.cat([bos, embeddings], dim=1)
            length = inputs.shape[1]
            pos_ids = torch.arange(length, device=self.device)
            text_decoder(inputs, self.text, self.attn_mask[:, :, :length, :], pos_ids, self.config.text)
        return EncodedImage(
            pos=length,
            caches=[
                (b.kv_cache.k_cache[:, :, :length].clone(), b.kv_cache.v_cache[:, :, :length].clone())
                for b in self.text.blocks
            ],
        )

    def load_encoded_image(self, image: EncodedImage) -> None:
        for block, (k, v) in zip(self.text.blocks, image.caches, strict=True):
            block.kv_cache.k_cache[:, :, : k.shape[2]] = k
            block.kv_cache.v_cache[:, :, : v.shape[2]] = v

    # --- the published API ----------------------------------------------------------------------

    def caption(self, image, length: str = "normal", stream: bool = False, settings: dict | None = None):
        templates = self.config.tokenizer.templates["caption"]
        if length not in templates:
            raise ValueError(f"Model does not support caption length '{length}'.")
        image = self.encode_image(image, settings)
        self.load_encoded_image(image)
        prompt = torch.tensor([templates[length]], device=self.device)

        def pieces():
            yield from self._generate_answer(prompt, image.pos, settings)

        return {"caption": pieces()} if stream else {"caption": "".join(pieces())}

    def query(self, image=None, question: str | None = None, stream: bool = False, settings: dict | None = None):
        if question is None:
            raise ValueError("question must be provided.")
        if image is None:
            raise ValueError("this model answers questions about an image: image must be provided.")
        image = self.encode_image(image, settings)
        self.load_encoded_image(image)
        template = self.config.tokenizer.templates["query"]
        ids = template["prefix"] + self.tokenizer.encode(question).ids + template["suffix"]
        prompt = torch.tensor([ids], device=self.device)

        def pieces():
            yield from self._generate_answer(prompt, image.pos, settings)

        return {"answer": pieces()} if stream else {"answer": "".join(pieces())}

    def detect(self, image, object: str, settings: dict | None = None):  # the published names
        """``{"objects": [{"x_min", "y_min", "x_max", "y_max"}, ...]}``: boxes of ``object``, normalized."""
        return {"objects": self._locate("detect", image, object, settings, include_size=True)}

    def point(self, image, object: str, settings: dict | None = None):  # the published names
        """``{"points": [{"x", "y"}, ...]}``: the centres of ``object``, normalized."""
        return {"points": self._locate("point", image, object, settings, include_size=False)}

    def _locate(self, task: str, image, phrase: str, settings: dict | None, include_size: bool) -> list[dict]:
        template = self.config.tokenizer.templates[task]
        if template is None:
            raise NotImplementedError(f"Model does not support {task}.")
        image = self.encode_image(image, settings)
        self.load_encoded_image(image)
        ids = template["prefix"] + self.tokenizer.encode(" " + phrase).ids + template["suffix"]
        prompt = torch.tensor([ids], device=self.device)
        _, hidden, next_token, pos = self._prefill_prompt(prompt, image.pos, temperature=0, top_p=0)
        max_objects = settings.get("max_objects", DEFAULT_MAX_OBJECTS) if settings else DEFAULT_MAX_OBJECTS
        return self._generate_points(hidden[:, -1:], next_token, pos, include_size, max_objects)

    # --- generation -----------------------------------------------------------------------------

    def _prefill_prompt(self, prompt: torch.Tensor, pos: int, temperature: float, top_p: float):
        """Run the prompt after what the KV cache holds up to ``pos``: its logits at the last position,
        its hidden states, the token sampled from them and the position after it."""
        length = prompt.shape[1]
        with torch.inference_mode():
            embeds = F.embedding(prompt, self.text.wte)
            pos_ids = torch.arange(pos, pos + length, device=self.device)
            mask = self.attn_mask[:, :, pos : pos + length, :]
            hidden = text_decoder(embeds, self.text, mask, pos_ids, self.config.text)
            logits = lm_head(hidden[:, -1], self.text)
            next_token = self._sample(logits, temperature, top_p)
        return logits, hidden, next_token, pos + length

    def _decode_one_tok(self, embeds: torch.Tensor, mask: torch.Tensor, pos_ids: torch.Tensor):
        """One position through the text model and its output layer: (logits, hidden states)."""
        hidden = text_decoder(embeds, self.text, mask, pos_ids, self.config.text)
        return lm_head(hidden[:, -1], self.text), hidden

    def _generate_points(
        self, hidden: torch.Tensor, next_token: torch.Tensor, pos: int, include_size: bool, max_objects: int
    ) -> list[dict]:
        """Objects while the greedy token is not the end token: x from ``hidden``, fed back; y, fed back;
        with ``include_size`` the size, fed back; then one decode step for the next token."""
        c = self.config
        mask = torch.zeros(1, 1, c.text.max_context, dtype=torch.bool, device=self.device)
        mask[..., :pos] = True
        pos_ids = torch.tensor([pos], device=self.device)
        objects: list[dict] = []

        def step(embeds: torch.Tensor):
            nonlocal pos
            mask[..., pos], pos_ids[0] = True, pos
            pos += 1
            return self._decode_one_tok(embeds, mask, pos_ids)

        def coordinate(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = decode_coordinate(hidden, self.region)
            value = logits.argmax(dim=-1) / logits.shape[-1]
            return value, encode_coordinate(value.to(logits.dtype), self.region)[None]

        with torch.inference_mode():
            while next_token.item() != c.tokenizer.eos_id and len(objects) < max_objects:
                x, embeds = coordinate(hidden)
                _, hidden = step(embeds)
                y, embeds = coordinate(hidden)
                if include_size:
                    _, hidden = step(embeds)
                    size_logits = decode_size(hidden, self.region)
                    size = size_from_bin(size_logits.argmax(dim=-1), size_logits.shape[-1])
                    width, height = size
                    embeds = encode_size(size.to(size_logits.dtype), self.region)[None, None]
                    objects.append(
                        {
                            "x_min": x.item() - width.item() / 2,
                            "y_min": y.item() - height.item() / 2,
                            "x_max": x.item() + width.item() / 2,
                            "y_max": y.item() + height.item() / 2,
                        }
                    )
                else:
                    objects.append({"x": x.item(), "y": y.item()})
                logits, hidden = step(embeds)
                next_token = logits.argmax(dim=-1)
        return objects

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        ordered, order = probs.sort(dim=-1, descending=True)
        ordered[ordered.cumsum(dim=-1) - ordered > top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, ordered / ordered.sum(dim=-1, keepdim=True))
        return torch.multinomial(probs, num_samples=1)

    def _generate_answer(self, prompt: torch.Tensor, pos: int, settings: dict | None):
        settings = settings or {}
        max_tokens = settings.get("max_tokens", DEFAULT_MAX_TOKENS)
        temperature = settings.get("temperature", DEFAULT_TEMPERATURE)
        top_p = settings.get("top_p", DEFAULT_TOP_P)
        c = self.config
        _, _, next_token, pos = self._prefill_prompt(prompt, pos, temperature, top_p)

        def pieces(next_token, pos):
            mask = torch.zeros(1, 1, c.text.max_context, dtype=torch.bool, device=self.device)
            mask[..., :pos] = True
            pos_ids = torch.tensor([pos], device=self.device)
            produced: list[int] = []
            sent = 0
            while (token := next_token.item()) != c.tokenizer.eos_id and len(produced) < max_tokens:
                produced.append(token)
                text = self.tokenizer.decode(produced)
                # Whole words only: send the text up to its last space.
                cut = text.rfind(" ") + 1
                if cut > sent:
                    yield text[sent:cut]
                    sent = cut
                with torch.inference_mode():
                    mask[..., pos], pos_ids[0] = True, pos
                    embeds = F.embedding(next_token, self.text.wte)
                    hidden = text_decoder(embeds, self.text, mask, pos_ids, c.text)
                    logits = lm_head(hidden[:, -1], self.text)
                    logits[:, c.tokenizer.answer_id] = float("-inf")
                    next_token = self._sample(logits, temperature, top_p)
                pos += 1
            rest = self.tokenizer.decode(produced)[sent:]
            if rest:
                yield rest

        return pieces(next_token, pos)
