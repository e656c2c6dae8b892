"""The catalogue of built-in model names (hub checkpoints, tiny checkpoints built offline, real-size
twins) and how a ``--model`` argument becomes a :class:`ModelSpec` with its family.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from vlm_service.backends.registry import UnsupportedModel, detect_family, read_config
from vlm_service.backends.runtime import ModelSpec


@dataclass(frozen=True)
class Builtin:
    """A built-in model name: a hub checkpoint, or a tiny checkpoint built locally on first use."""

    description: str
    repo_id: str | None = None
    revision: str | None = None
    build: Callable[..., Path] | None = None  # (cache_dir, trained=True) -> checkpoint directory
    revision_setting: str | None = None  # a Settings field that names the revision
    twin: bool = False  # a real-size random-weights twin: built only when named (cache_dir) -> directory


def _tiny_smolvlm(cache_dir: Path, trained: bool = True) -> Path:
    from vlm_checkpoints.tiny_smolvlm import ensure_tiny_smolvlm

    return ensure_tiny_smolvlm(cache_dir, trained)


def _tiny_qwen2_vl(cache_dir: Path, trained: bool = True) -> Path:
    from vlm_checkpoints.tiny_qwen2_vl import ensure_tiny_qwen2_vl

    return ensure_tiny_qwen2_vl(cache_dir, trained)


def _tiny_moondream(cache_dir: Path, trained: bool = True) -> Path:
    from vlm_checkpoints.tiny_moondream import ensure_tiny_moondream

    return ensure_tiny_moondream(cache_dir, trained)


def _smolvlm_256m_shapes(cache_dir: Path) -> Path:
    from vlm_checkpoints.smolvlm_256m_shapes import ensure_smolvlm_256m_shapes

    return ensure_smolvlm_256m_shapes(cache_dir)


def _qwen2_vl_2b_shapes(cache_dir: Path) -> Path:
    from vlm_checkpoints.qwen2_vl_2b_shapes import ensure_qwen2_vl_2b_shapes

    return ensure_qwen2_vl_2b_shapes(cache_dir)


def _moondream2_shapes(cache_dir: Path) -> Path:
    from vlm_checkpoints.moondream2_shapes import ensure_moondream2_shapes

    return ensure_moondream2_shapes(cache_dir)


BUILTINS: dict[str, Builtin] = {
    "smolvlm": Builtin(
        "SmolVLM 256M Instruct (downloads from the Hugging Face Hub)", "HuggingFaceTB/SmolVLM-256M-Instruct"
    ),
    "tiny-smolvlm": Builtin(
        "tiny SmolVLM shipped with the package, rebuilt offline if stale (demo and tests)", build=_tiny_smolvlm
    ),
    "qwen2-vl": Builtin("Qwen2-VL 2B Instruct (downloads from the Hugging Face Hub)", "Qwen/Qwen2-VL-2B-Instruct"),
    "tiny-qwen2-vl": Builtin(
        "tiny Qwen2-VL shipped with the package, rebuilt offline if stale (demo and tests)", build=_tiny_qwen2_vl
    ),
    "moondream": Builtin(
        "Moondream2 (remote code, downloads from the Hugging Face Hub)",
        "vikhyatk/moondream2",
        revision_setting="moondream_revision",
    ),
    "tiny-moondream": Builtin(
        "tiny Moondream-API remote-code model shipped with the package, rebuilt offline if stale",
        build=_tiny_moondream,
    ),
    "smolvlm-256m-shapes": Builtin(
        "SmolVLM-256M-Instruct's shapes, random weights, built offline (benchmarks, smoke tests)",
        build=_smolvlm_256m_shapes,
        twin=True,
    ),
    "qwen2-vl-2b-shapes": Builtin(
        "Qwen2-VL-2B-Instruct's shapes, random weights, built offline (benchmarks; 4.4 GB)",
        build=_qwen2_vl_2b_shapes,
        twin=True,
    ),
    "moondream2-shapes": Builtin(
        "Moondream2's shapes (revision 2025-06-21), random weights, built offline (benchmarks; 3.9 GB)",
        build=_moondream2_shapes,
        twin=True,
    ),
}

DEFAULT_MODEL = "tiny-smolvlm"


def parse_model_arg(arg: str, settings=None) -> ModelSpec:
    """Turn ``NAME`` or ``NAME=SOURCE`` (``SOURCE`` = dir, repo id, or repo id@revision) into a spec."""
    name, sep, source = arg.partition("=")
    name, source = name.strip(), source.strip()
    if not name:
        raise UnsupportedModel(f"--model {arg!r}: the model needs a name")
    if not sep:
        builtin = BUILTINS.get(name)
        if builtin is None:
            path = Path(name).expanduser()
            if path.is_dir() or "/" in name:
                return _spec_for_source(path.name if path.is_dir() else name, name)
            raise UnsupportedModel(
                f"--model {arg!r}: unknown built-in name; built-ins are {', '.join(BUILTINS)}, "
                "or give NAME=SOURCE with a repo id or a local directory"
            )
        if builtin.build is not None:
            return ModelSpec(name=name, source="", builtin=name)
        revision = builtin.revision
        if builtin.revision_setting and settings is not None:
            revision = getattr(settings, builtin.revision_setting)
        return ModelSpec(name=name, source=builtin.repo_id, revision=revision)
    if not source:
        raise UnsupportedModel(f"--model {arg!r}: SOURCE is empty")
    return _spec_for_source(name, source)


def _spec_for_source(name: str, source: str) -> ModelSpec:
    path = Path(source).expanduser()
    if path.is_dir():
        return ModelSpec(name=name, source=str(path.resolve()))
    repo, _, revision = source.partition("@")
    return ModelSpec(name=name, source=repo, revision=revision or None)


def stop_builds() -> None:
    """Stop the tiny checkpoints this process is building (a shutdown while loading): each build runs
    in a child process, which is terminated; its caller gets an error at once."""
    builder = sys.modules.get("vlm_checkpoints.builder")
    if builder is not None:
        builder.stop_builds()


def resolve(spec: ModelSpec, cache_dir: Path) -> ModelSpec:
    """Make the checkpoint available (building a tiny built-in one) and detect its family."""
    if spec.builtin and BUILTINS[spec.builtin].build is not None:
        spec = replace(spec, source=str(BUILTINS[spec.builtin].build(cache_dir)))
    return replace(spec, family=detect_family(read_config(spec)))
