"""The model's configuration: frozen dataclasses whose defaults are the sizes in ``sizes.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sizes import REGION, TEXT, VISION


def _sized(defaults: dict, name: str):
    return field(default=defaults[name])


@dataclass(frozen=True)
class TextConfig:
    dim: int = _sized(TEXT, "dim")
    ff_dim: int = _sized(TEXT, "ff_dim")
    n_layers: int = _sized(TEXT, "n_layers")
    vocab_size: int = _sized(TEXT, "vocab_size")
    max_context: int = _sized(TEXT, "max_context")
    n_heads: int = _sized(TEXT, "n_heads")
    n_kv_heads: int = _sized(TEXT, "n_kv_heads")


@dataclass(frozen=True)
class VisionConfig:
    enc_dim: int = _sized(VISION, "enc_dim")
    enc_patch_size: int = _sized(VISION, "enc_patch_size")
    enc_n_layers: int = _sized(VISION, "enc_n_layers")
    enc_ff_dim: int = _sized(VISION, "enc_ff_dim")
    enc_n_heads: int = _sized(VISION, "enc_n_heads")
    proj_out_dim: int = _sized(VISION, "proj_out_dim")
    crop_size: int = _sized(VISION, "crop_size")
    max_crops: int = _sized(VISION, "max_crops")
    proj_inner_dim: int = _sized(VISION, "proj_inner_dim")
    in_channels: int = 3


@dataclass(frozen=True)
class RegionConfig:
    dim: int = _sized(REGION, "dim")
    coord_feat_dim: int = _sized(REGION, "coord_feat_dim")
    coord_out_dim: int = _sized(REGION, "coord_out_dim")
    size_feat_dim: int = _sized(REGION, "size_feat_dim")
    size_out_dim: int = _sized(REGION, "size_out_dim")
    inner_dim: int = _sized(REGION, "inner_dim")


#: The tokenizer's special tokens, in id order (the build trains the tokenizer with them first). New ones
#: go at the end, so that the ids the templates already use never move.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|md_reserved_0|>",
    "<|md_reserved_1|>",
    "<|md_reserved_2|>",
    "<|describe|>",
    "<|short|>",
    "<|normal|>",
    "<|long|>",
    "<|query|>",
    "<|detect|>",
    "<|point|>",
    "<|coord|>",
    "<|size|>",
)


@dataclass(frozen=True)
class TokenizerConfig:
    """Ids in ``SPECIAL_TOKENS``. As in the published config, ``detect``/``point`` prompts are a prefix, the
    object's tokens and a suffix, and ``coord_id``/``size_id`` name the tokens a coordinate or a size
    stands in for (region embeddings replace them)."""

    bos_id: int = 0
    eos_id: int = 0
    answer_id: int = 3
    coord_id: int = 11
    size_id: int = 12
    templates: dict = field(
        default_factory=lambda: {
            "caption": {"short": [1, 4, 2, 5, 3], "normal": [1, 4, 2, 6, 3], "long": [1, 4, 2, 7, 3]},
            "query": {"prefix": [1, 8, 2], "suffix": [3]},
            "detect": {"prefix": [1, 9, 2], "suffix": [3]},
            "point": {"prefix": [1, 10, 2], "suffix": [3]},
        }
    )


@dataclass(frozen=True)
class MoondreamConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    @classmethod
    def from_dict(cls, values: dict) -> MoondreamConfig:
        """Sizes given in ``values`` override the code's defaults (``HfMoondream`` passes ``{}``)."""
        return cls(
            text=TextConfig(**values.get("text", {})),
            vision=VisionConfig(**values.get("vision", {})),
            region=RegionConfig(**values.get("region", {})),
            tokenizer=TokenizerConfig(**values.get("tokenizer", {})),
        )
