"""The registry of model families: which family serves a checkpoint, and its backend class.

Adding a family is one module under ``backends/``, one line in ``FAMILIES``, its architectures in
``ARCHITECTURES``, and (for tests and demos) a tiny checkpoint builder in the catalogue's ``BUILTINS``
(catalogue.py); a real-size twin of a published model (random weights, for benchmarks) is a
``BUILTINS`` entry too. Backends are imported lazily, so serving one family never imports another.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from vlm_service.backends.base import Backend
from vlm_service.backends.runtime import ModelSpec

#: family name -> (module, class)
FAMILIES: dict[str, tuple[str, str]] = {
    "smolvlm": ("vlm_service.backends.smolvlm", "SmolVLMBackend"),
    "qwen2-vl": ("vlm_service.backends.qwen2_vl", "Qwen2VLBackend"),
    "moondream": ("vlm_service.backends.moondream", "MoondreamBackend"),
}

#: ``config.json`` "architectures" entry -> family name
ARCHITECTURES: dict[str, str] = {
    "SmolVLMForConditionalGeneration": "smolvlm",
    "Idefics3ForConditionalGeneration": "smolvlm",
    "Qwen2VLForConditionalGeneration": "qwen2-vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2-vl",
    "HfMoondream": "moondream",
}


def read_config(spec: ModelSpec) -> dict:
    """Read the checkpoint's ``config.json`` (from the directory, or the Hugging Face cache/hub)."""
    path = Path(spec.source)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise UnsupportedModel(f"model {spec.name!r}: {spec.source} has no config.json")
    else:
        from huggingface_hub import hf_hub_download

        try:
            config_path = Path(hf_hub_download(spec.source, "config.json", revision=spec.revision))
        except Exception as exc:  # network, auth, missing repo: all mean "cannot read it"
            raise UnsupportedModel(
                f"model {spec.name!r}: cannot fetch config.json of {spec.display_source} "
                f"({type(exc).__name__}); without network, pre-fill the Hugging Face cache"
            ) from exc
    return json.loads(config_path.read_text())


def detect_family(config: dict) -> str:
    """The family serving a checkpoint, from its ``config.json``."""
    for architecture in config.get("architectures") or []:
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture]
    found = ", ".join(config.get("architectures") or []) or config.get("model_type", "unknown")
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedModel(f"unsupported architecture {found}; supported: {supported}")


def backend_class(family: str) -> type[Backend]:
    module_name, class_name = FAMILIES[family]
    return getattr(importlib.import_module(module_name), class_name)


class UnsupportedModel(ValueError):
    """The checkpoint's architecture has no family here, or the source cannot be read."""
