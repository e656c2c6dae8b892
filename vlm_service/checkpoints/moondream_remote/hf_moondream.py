"""A tiny Moondream-compatible model, shipped as *remote code* inside its checkpoint directory.

vlm-service copies this file into the ``tiny-moondream`` checkpoint, whose ``config.json`` ``auto_map``
points at it, so it is loaded exactly like ``vikhyatk/moondream2``:
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

It implements Moondream's published Python API, written from its documentation:

* ``encode_image(image) -> EncodedImage``
* ``caption(image_or_encoded, length="short"|"normal"|"long", stream=False, settings=None)``
  returns ``{"caption": str}``, or ``{"caption": generator of str}`` with ``stream=True``
* ``query(image_or_encoded, question, stream=False, settings=None)`` returns ``{"answer": ...}``
* ``settings``: ``temperature`` (0 is greedy), ``top_p``, ``max_tokens``

Like the real model it keeps **one KV cache per model instance**, so two generations interleaved on
one instance corrupt each other: callers must serialise them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

DEFAULT_SETTINGS = {"temperature": 0.5, "top_p": 0.3, "max_tokens": 768}
CAPTION_PROMPTS = {
    "short": "\n\nShort caption:",
    "normal": "\n\nCaption:",
    "long": "\n\nLong caption:",
}


class HfConfig(PretrainedConfig):
    model_type = "moondream1"

    def __init__(
        self,
        vocab_size: int = 1024,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        max_context: int = 2048,
        image_size: int = 32,
        patch_size: int = 8,
        eos_token_id: int = 0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.max_context = max_context
        self.image_size = image_size
        self.patch_size = patch_size
        super().__init__(eos_token_id=eos_token_id, **kwargs)


@dataclass
class EncodedImage:
    """An image already run through the vision encoder (reusable across caption/query calls)."""

    embeddings: torch.Tensor  # (1, patches, hidden)


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor, cache_k=None, cache_v=None, start: int = 0) -> torch.Tensor:
        """Causal self-attention over x; with a cache, x sits at positions start.. and extends the cache."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        shape = (b, t, self.heads, c // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        if cache_k is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cache_k[:, :, start : start + t] = k
            cache_v[:, :, start : start + t] = v
            keys, values = cache_k[:, :, : start + t], cache_v[:, :, : start + t]
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class HfMoondream(PreTrainedModel):
    config_class = HfConfig
    base_model_prefix = "moondream"
    _no_split_modules = ["_Block"]

    def __init__(self, config: HfConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.patch_embed = nn.Conv2d(3, hidden, kernel_size=config.patch_size, stride=config.patch_size)
        patches = (config.image_size // config.patch_size) ** 2
        self.vision_pos = nn.Parameter(torch.zeros(1, patches, hidden))
        self.vision_proj = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.embed = nn.Embedding(config.vocab_size, hidden)
        self.pos = nn.Embedding(config.max_context, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, config.num_heads) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self._tokenizer = None
        self._kv = None  # the instance's one KV cache, as in the real model
        self.post_init()

    # --- the tokenizer ships in the checkpoint directory -----------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(Path(self.config._name_or_path) / "tokenizer.json"))
        return self._tokenizer

    # --- the published API -------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_image(self, image) -> EncodedImage:
        if isinstance(image, EncodedImage):
            return image
        if not isinstance(image, Image.Image):
            raise ValueError("image must be a PIL image or an EncodedImage")
        return EncodedImage(self.vision(self.pixels(image)))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(1, 3, size, size) pixels in [-1, 1]."""
        size = self.config.image_size
        resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
        tensor = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(size, size, 3)
        return (tensor.permute(2, 0, 1).float() / 127.5 - 1.0).unsqueeze(0).to(self.device, self.dtype)

    def vision(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.vision_pos
        return self.vision_proj(patches)

    def training_loss(self, images: list, prompts: list[str], answers: list[str]) -> torch.Tensor:
        """Teacher-forced cross-entropy of ``answers`` (and the end token) after image + prompt."""
        eos = self.config.eos_token_id
        prefix = self.vision(torch.cat([self.pixels(image) for image in images]))
        rows, targets = [], []
        for prompt, answer in zip(prompts, answers, strict=True):
            prompt_ids = self.tokenizer.encode(prompt).ids
            answer_ids = self.tokenizer.encode(answer).ids + [eos]
            rows.append(prompt_ids + answer_ids)
            targets.append([-100] * (len(prompt_ids) - 1) + answer_ids + [-100])
        width = max(map(len, rows))
        ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows], device=self.device)
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets], device=self.device)
        embeds = torch.cat([prefix, self.embed(ids)], dim=1)
        x = embeds + self.pos(torch.arange(embeds.shape[1], device=self.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x[:, prefix.shape[1] :]))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    @staticmethod
    def caption_prompt(length: str) -> str:
        if length not in CAPTION_PROMPTS:
            raise ValueError(f"unsupported caption length: {length}")
        return CAPTION_PROMPTS[length]

    @staticmethod
    def query_prompt(question: str) -> str:
        return f"\n\nQuestion: {question}\n\nAnswer:"

    def caption(self, image, length: str = "normal", stream: bool = False, settings: dict | None = None):
        text = self._generate(self.encode_image(image), self.caption_prompt(length), settings)
        return {"caption": text if stream else "".join(text)}

    def query(self, image=None, question: str | None = None, stream: bool = False, settings: dict | None = None):
        if question is None:
            raise ValueError("question is required")
        text = self._generate(self.encode_image(image), self.query_prompt(question), settings)
        return {"answer": text if stream else "".join(text)}

    # --- generation ------------------------------------------------------------------------------

    def forward(self, input_embeds: torch.Tensor, start: int) -> torch.Tensor:
        """One step over new positions, reading and extending the instance's KV cache."""
        positions = torch.arange(start, start + input_embeds.shape[1], device=input_embeds.device)
        x = input_embeds + self.pos(positions)
        for block, (k, v) in zip(self.blocks, self._kv, strict=True):
            x = block(x, k, v, start)
        return self.lm_head(self.ln_f(x[:, -1]))

    def _reset_cache(self) -> None:
        c = self.config
        shape = (1, c.num_heads, c.max_context, c.hidden_size // c.num_heads)
        if self._kv is None:
            self._kv = [
                (
                    torch.zeros(shape, device=self.device, dtype=self.dtype),
                    torch.zeros(shape, device=self.device, dtype=self.dtype),
                )
                for _ in range(c.num_layers)
            ]

    def _generate(self, encoded: EncodedImage, prompt: str, settings: dict | None):
        settings = {**DEFAULT_SETTINGS, **(settings or {})}
        prompt_ids = self.tokenizer.encode(prompt).ids
        return self._stream(encoded, prompt_ids, settings)

    @torch.inference_mode()
    def _stream(self, encoded: EncodedImage, prompt_ids: list[int], settings: dict):
        from tokenizers.decoders import DecodeStream

        self._reset_cache()
        ids = torch.tensor([prompt_ids], device=self.device)
        embeds = torch.cat([encoded.embeddings, self.embed(ids)], dim=1)
        max_tokens = int(settings["max_tokens"])
        if embeds.shape[1] + max_tokens > self.config.max_context:
            raise ValueError("prompt plus max_tokens exceeds the context")
        logits = self(embeds, 0)
        position = embeds.shape[1]
        decoder = DecodeStream(skip_special_tokens=True)
        produced: list[int] = []
        emitted = ""
        for _ in range(max_tokens):
            token = self._pick(logits, float(settings["temperature"]), float(settings["top_p"]))
            if token == self.config.eos_token_id:
                break
            produced.append(token)
            piece = decoder.step(self.tokenizer, token)
            if piece:
                emitted += piece
                yield piece
            if len(produced) == max_tokens:
                break
            logits = self(self.embed(torch.tensor([[token]], device=self.device)), position)
            position += 1
        # Bytes that never formed a character come out at the end, as the full decode has them.
        full = self.tokenizer.decode(produced, skip_special_tokens=True)
        if full.startswith(emitted) and len(full) > len(emitted):
            yield full[len(emitted) :]

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float) -> int:
        if temperature <= 0:
            return int(logits.argmax(-1))
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if 0 < top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return int(torch.multinomial(probs / probs.sum(), 1))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, HfMoondream):
            nn.init.normal_(module.vision_pos, std=math.sqrt(1 / module.config.hidden_size))
