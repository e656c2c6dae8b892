"""Building checkpoints offline: what a build depends on (its cache key), isolated builds, atomic caching.

This package (``vlm_checkpoints``) holds the offline builders and training code only; the runtime
(``vlm_service``) imports it lazily, when it serves a built-in checkpoint or runs ``vlm-service build``.

Rules:

- A checkpoint's cache key is a digest of what its build depends on, declared by its builder as
  :class:`BuildInputs`: the code the build runs (its own module, the tokenizer trainer and its corpus,
  the training loop), the training recipe, and a *probe*: the chat-templated prompts and the token ids
  of a fixed set of requests encoded through the backend the model is trained through. The runtime's
  source bytes (``vlm_service``) are not part of it: a refactor of a backend that leaves prompts and
  encodings alone keeps every checkpoint; a changed caption instruction or recipe rebuilds the ones it
  touches.
  A module of this package is named in the key relative to it (``source:.train``), so that moving or
  renaming the package keeps the keys.
- A build runs in a child process (``spawn``), never in the caller: training sets torch's thread count
  and global seed, and the caller may be a server that already serves other models.
- A checkpoint is written beside its target and renamed into place: readers never see half of one,
  concurrent builders race safely, and a failed build leaves nothing behind. Each carries
  ``build-inputs.json`` (its key and the digest of every part), so a stale copy says what changed.
- A checkpoint shipped with the package (``vlm_checkpoints/shipped/<name>/``, see ``ship.py``) is used
  when its key is the one the code gives now; a stale one is never used: it is rebuilt, with a log line.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tokenizer import train_byte_level_bpe

__all__ = [
    "TOKENIZER_SOURCES",
    "TRAINING_SOURCES",
    "BuildInputs",
    "build_cached",
    "ensure_checkpoint",
    "fresh_builds",
    "train_byte_level_bpe",
]

logger = logging.getLogger(__name__)

#: The file in every built checkpoint that records the inputs it was built from.
INPUTS_FILE = "build-inputs.json"
#: Checkpoints shipped as package data, one directory per name.
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"

_PACKAGE = __name__.rpartition(".")[0]
#: The code behind every tiny tokenizer: the trainer, its corpus, and the shapes the corpus draws on.
TOKENIZER_SOURCES = (f"{_PACKAGE}.tokenizer", f"{_PACKAGE}.corpus", f"{_PACKAGE}.shapes")
#: The code behind training on the shapes.
TRAINING_SOURCES = (f"{_PACKAGE}.train", f"{_PACKAGE}.shapes")


@dataclass(frozen=True)
class BuildInputs:
    """What one checkpoint's build depends on; its digest is the cache key.

    ``sources`` are the modules whose code the build runs (dotted names; their file bytes count),
    ``recipe`` the training settings, and ``probe`` a function returning what the model is trained
    on for a fixed set of requests (prompt strings, token-id lists, tensor shapes): it runs in the
    caller, so it must be cheap (no model, no training).
    """

    sources: tuple[str, ...]
    recipe: Mapping[str, Any] = field(default_factory=dict)
    probe: Callable[[], Iterable[Any]] | None = None

    @functools.cached_property
    def parts(self) -> dict[str, str]:
        """A digest per part: one per source module, the recipe, the probe."""
        parts = {}
        for module in sorted(set(self.sources)):
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.origin:
                raise ValueError(f"build input {module!r} is not an importable module")
            parts[f"source:{_source_name(module)}"] = _digest(Path(spec.origin).read_bytes())
        if self.recipe:
            parts["recipe"] = _digest(_canonical(self.recipe))
        if self.probe is not None:
            parts["probe"] = _digest(_canonical(list(self.probe())))
        return parts

    @functools.cached_property
    def key(self) -> str:
        return _digest(_canonical(self.parts))[:10]

    def record(self) -> dict[str, Any]:
        return {"key": self.key, "parts": self.parts}


def _source_name(module: str) -> str:
    """A source module's name in the key: relative to this package (``.train``; ``.`` the package
    itself), else in full."""
    if module == _PACKAGE or module.startswith(f"{_PACKAGE}."):
        return "." + module[len(_PACKAGE) + 1 :]
    return module


def _canonical(value: Any) -> bytes:
    """A stable byte form of JSON-like values (tuples as lists, tensors and arrays as nested lists)."""

    def plain(item):
        if hasattr(item, "tolist"):
            return item.tolist()
        if isinstance(item, tuple | set | frozenset):
            return list(item)
        raise TypeError(f"cannot digest {type(item).__name__}")

    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=plain).encode()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_inputs(build: Callable[..., None]) -> BuildInputs:
    """For a builder that declares nothing: its own module and every module of this package,
    ``vlm_checkpoints`` (the tokenizer, training and remote code it may use), but for the code that
    shipped checkpoints carry (a copy, in ``shipped/``). Runtime modules (``vlm_service``) never count:
    a backend it trains or probes through is not a source."""
    while isinstance(build, functools.partial):
        build = build.func
    package = Path(__file__).resolve().parent
    modules = {
        ".".join((_PACKAGE, *path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
        for path in package.glob("**/*.py")
        if SHIPPED_DIR not in path.parents
    }
    return BuildInputs(sources=tuple(sorted(modules | {build.__module__})))


_fresh = contextvars.ContextVar("fresh_builds", default=False)


@contextlib.contextmanager
def fresh_builds() -> Iterator[None]:
    """Within this block, shipped checkpoints are not used: what is not in the cache is built
    (``vlm-service build`` rebuilds from the code on demand)."""
    token = _fresh.set(True)
    try:
        yield
    finally:
        _fresh.reset(token)


def ensure_checkpoint(
    cache_dir: Path,
    name: str,
    build: Callable[..., None],
    trained: bool = True,
    *,
    inputs: Callable[[bool], BuildInputs] | None = None,
) -> Path:
    """The tiny checkpoint ``name``, trained on the shapes, or with ``trained=False`` its random-weights
    twin (it writes noise and seldom ends its answer: what tests of long generations need).
    ``inputs(trained)`` declares what the build depends on (default: see :func:`default_inputs`)."""
    declared = inputs(trained) if inputs is not None else None
    if trained:
        return build_cached(cache_dir, name, build, inputs=declared)
    return build_cached(cache_dir, f"{name}-random", functools.partial(build, trained=False), inputs=declared)


def build_cached(
    cache_dir: Path, name: str, build: Callable[[Path], None], *, inputs: BuildInputs | None = None
) -> Path:
    """Checkpoint ``name`` built by ``build(directory)``: from the cache, else shipped with the package
    (when its key is current), else built now in a child process and cached as ``<name>-<key>``.

    ``build`` runs in a ``spawn``-ed process, so it must pickle: a module-level function, or a
    ``functools.partial`` of one.
    """
    inputs = inputs if inputs is not None else default_inputs(build)
    target = Path(cache_dir) / f"{name}-{inputs.key}"
    if (target / "config.json").is_file():
        return target
    if not _fresh.get():
        shipped = _shipped(name, inputs)
        if shipped is not None:
            return shipped
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        logger.info("building checkpoint %s (offline, deterministic, in a child process)", target.name)
        run_isolated(build, tmp)
        (tmp / INPUTS_FILE).write_text(json.dumps(inputs.record(), indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished first; its build is identical.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _shipped(name: str, inputs: BuildInputs) -> Path | None:
    """The shipped copy of ``name`` if there is one and its key is current; a stale one is logged."""
    directory = SHIPPED_DIR / name
    try:
        record = json.loads((directory / INPUTS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("the shipped checkpoint %s is unreadable (%s); building it", name, exc)
        return None
    if record.get("key") == inputs.key and (directory / "config.json").is_file():
        return directory
    changed = sorted(
        part
        for part in {*record.get("parts", {}), *inputs.parts}
        if record.get("parts", {}).get(part) != inputs.parts.get(part)
    )
    logger.warning(
        "the shipped checkpoint %s is stale (built from key %s, the code gives %s; changed: %s); building it",
        name,
        record.get("key"),
        inputs.key,
        ", ".join(changed) or "unknown",
    )
    return None


class BuildFailed(RuntimeError):
    """A checkpoint build failed in its child process (the message carries the child's traceback)."""


_running: set[multiprocessing.process.BaseProcess] = set()
_running_lock = threading.Lock()


def run_isolated(build: Callable[[Path], None], directory: Path) -> None:
    """Run ``build(directory)`` in a fresh ``spawn``-ed process and wait for it; raise BuildFailed
    if it fails or is stopped (:func:`stop_builds`). The caller's torch state (threads, seeds) is
    never touched."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    level = logging.getLogger().getEffectiveLevel()
    process = context.Process(
        target=_child, args=(build, directory, sender, level), name=f"build-{directory.name}", daemon=True
    )
    with _running_lock:
        process.start()
        _running.add(process)
    sender.close()
    try:
        error = receiver.recv()
    except EOFError:  # it died without a word
        process.join()
        error = f"the build process ended with exit code {process.exitcode}"
    finally:
        receiver.close()
        process.join()
        with _running_lock:
            _running.discard(process)
    if error is not None:
        raise BuildFailed(f"building {directory.name} failed:\n{error}")


def stop_builds() -> int:
    """Stop every build running in a child process of this one (a server shutting down while it
    builds a model); their callers get BuildFailed. Returns how many were stopped."""
    with _running_lock:
        running = list(_running)
    for process in running:
        process.terminate()
    return len(running)


def _child(build: Callable[[Path], None], directory: Path, sender, level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        build(directory)
    except BaseException:
        sender.send(traceback.format_exc())
        raise
    sender.send(None)
