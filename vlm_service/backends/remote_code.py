"""Loading a remote-code checkpoint (``trust_remote_code``) the way its own code expects to be built.

transformers 5's ``from_pretrained`` builds a model on the meta device and fills it from the weights
file. Remote code written for older releases breaks there: Moondream2's published code never calls
``post_init`` (AttributeError on ``all_tied_weights_keys``), and the buffers its ``__init__`` computes
and never saves (``attn_mask``, ``freqs_cis``) come back uninitialised (NaN answers). So this loader
builds the remote class eagerly on the CPU, as its author ran it (weight initialisation skipped, since
every weight is then read from the file, but every buffer made by ``__init__``), and copies the
safetensors weights in itself, checking that each one is there with the right shape.

Such code also fixes its weights' dtype (Moondream2's makes bfloat16 weights and casts its image crops
to bfloat16, whatever the caller asks). :func:`cast_weights` then gives the model the dtype the service
was asked for: a CPU without bfloat16 instructions multiplies bfloat16 matrices about 30 times slower
than float32. It casts the parameters (the code's buffers keep their dtype: a float32 rotary table, a
boolean mask) and, on each module whose own weights it cast, casts floating-point inputs of another
dtype to the weights' dtype, so the tensors the code makes in its fixed dtype still fit.

Remote code may read more files by repo name from the Hugging Face cache (Moondream2's reads its
tokenizer with ``tokenizers.Tokenizer.from_pretrained``). A local checkpoint directory may carry such a
cache in ``hf-cache/`` (the tiny built-in checkpoints do); it is used while the model is built.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

#: A local checkpoint's own Hugging Face hub cache, for what its remote code fetches by repo name.
BUNDLED_HUB_CACHE = "hf-cache"

_HUB_SETTINGS = threading.Lock()


def write_hub_file(cache: Path, repo_id: str, filename: str, data: bytes, revision: str = "main") -> Path:
    """Put one file of ``repo_id`` into the Hugging Face hub cache ``cache`` (the layout that
    ``huggingface_hub`` and the ``tokenizers`` library read offline)."""
    commit = hashlib.sha1(data).hexdigest()
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    target = repo / "snapshots" / commit / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return target


def bundled_hub_cache(source: str) -> Path | None:
    """The hub cache a local checkpoint directory carries, if any."""
    path = Path(source) / BUNDLED_HUB_CACHE
    return path if path.is_dir() else None


@contextmanager
def hub_cache(path: Path | None) -> Iterator[None]:
    """While the block runs, ``huggingface_hub`` (which ``tokenizers``' ``from_pretrained`` calls) reads
    the hub cache ``path``, offline: a bundled cache holds all its code needs. Nothing changes when
    ``path`` is None. The service loads its models one after another, and nothing else fetches from the
    hub meanwhile; the lock keeps two such blocks apart."""
    if path is None:
        yield
        return
    from huggingface_hub import constants

    with _HUB_SETTINGS:
        before = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(path), True
        try:
            yield
        finally:
            constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = before


def weight_files(source: str, revision: str | None = None) -> list[Path]:
    """The checkpoint's safetensors files (the hub's are downloaded, or read from the cache offline)."""
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        patterns = ["*.safetensors", "*.safetensors.index.json"]
        folder = Path(snapshot_download(source, revision=revision, allow_patterns=patterns))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{source}: no .safetensors weights")
    return files


def load_weights(model: torch.nn.Module, files: list[Path]) -> None:
    """Copy every tensor of ``files`` into ``model``'s parameters and saved buffers (into their dtype);
    raise if one is missing, unexpected, or of another shape."""
    from safetensors import safe_open

    targets = model.state_dict()
    loaded, unexpected = set(), []
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    target = targets.get(key)
                    if target is None:
                        unexpected.append(key)
                        continue
                    tensor = weights.get_tensor(key)
                    if tensor.shape != target.shape:
                        raise ValueError(
                            f"weight {key}: {tuple(tensor.shape)} in the file, the model has {tuple(target.shape)}"
                        )
                    target.copy_(tensor)
                    loaded.add(key)
    missing = sorted(set(targets) - loaded)
    if missing or unexpected:
        raise ValueError(
            f"the weights do not fit the model's code: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )


def load_remote_model(source: str, revision: str | None, device: torch.device) -> torch.nn.Module:
    """Build ``config.json``'s ``auto_map`` AutoModelForCausalLM class eagerly and load its weights."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=True)
    reference = (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if not reference:
        raise ValueError(f"{source}: config.json's auto_map names no AutoModelForCausalLM class")
    model_class = get_class_from_dynamic_module(reference, source, revision=revision)
    files = weight_files(source, revision)
    with hub_cache(bundled_hub_cache(source)), no_init_weights():
        model = model_class(config)
    load_weights(model, files)
    return model.to(device).eval()


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Cast ``model``'s floating-point parameters to ``dtype`` (buffers keep theirs), and make each module
    whose weights changed cast its floating-point inputs to that dtype. Returns whether anything changed."""
    cast = []
    with torch.no_grad():
        for module in model.modules():
            changed = False
            for parameter in module.parameters(recurse=False):
                if parameter.is_floating_point() and parameter.dtype != dtype:
                    parameter.data = parameter.data.to(dtype)
                    changed = True
            if changed:
                cast.append(module)
    for module in cast:
        module.register_forward_pre_hook(_inputs_to(dtype))
    return bool(cast)


def _inputs_to(dtype: torch.dtype):
    def hook(module, args):
        if not any(isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype for a in args):
            return None
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    return hook


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of the model's floating-point weights have (what it computes in)."""
    counts = Counter()
    for parameter in model.parameters():
        if parameter.is_floating_point():
            counts[parameter.dtype] += parameter.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32
