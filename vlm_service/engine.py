"""The engine: the served models, their loading and warm-up, and where requests are sent.

It knows nothing of gRPC. The servicer hands it validated domain requests and gets back a
:class:`~vlm_service.worker.Job` to stream from.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from . import registry
from .backends.base import Backend, ModelSpec, Runtime
from .config import Settings
from .errors import (
    DeadlineUnmeetable,
    GenerationStalled,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    QueueFull,
    ShuttingDown,
)
from .metrics import Metrics, ModelMetrics
from .types import GenerationRequest, ModelCard, SamplingParams, Task
from .worker import BatchingWorker, Job, ModelWorker

if TYPE_CHECKING:
    from .tracing import GenerationTrace

logger = logging.getLogger(__name__)


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ServedModel:
    spec: ModelSpec
    state: ModelState = ModelState.LOADING
    backend: Backend | None = None
    worker: ModelWorker | None = None
    load_seconds: float = 0.0
    error: str = ""
    cls: type[Backend] | None = field(default=None, repr=False)


class StreamSlot:
    """One of ``--max-streams``, held by a long-lived RPC (Watch) across the jobs it submits."""

    __slots__ = ("__weakref__",)


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        args = settings.models or [registry.DEFAULT_MODEL]
        specs = [registry.parse_model_arg(arg, settings) for arg in args]
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise registry.UnsupportedModel(f"model names must be unique; repeated: {', '.join(duplicates)}")
        self.models: dict[str, ServedModel] = {s.name: ServedModel(s) for s in specs}
        self.default_model = specs[0].name
        self._draining = False
        # Submitted and not yet released, over all models, and the slots of long-lived streams (Watch).
        self._streams: set[Job | StreamSlot] = set()
        # Called (from any thread) when a model starts or stops serving.
        self.health_listener: Callable[[], None] | None = None
        self.stuck_listener: Callable[[str], None] | None = None  # called (watchdog thread) when a model is stuck
        self.metrics = Metrics()
        self.metrics.watch(self)
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="vlm-watchdog", daemon=True)
        self._watchdog.start()

    # --- lifecycle ------------------------------------------------------------------------------

    def load_all(self) -> None:
        """Load and warm up every model (blocking; run it off the event loop). Raises on failure."""
        runtime = Runtime(
            device=self.settings.device,
            dtype=self.settings.dtype,
            image_cache_size=self.settings.image_cache_size,
            image_cache_bytes=self.settings.image_cache_bytes,
        )
        set_torch_threads(self.settings.torch_threads, runtime)
        for served in self.models.values():
            if self._closed.is_set():
                return  # stopped while loading: load nothing more, start no worker
            start = time.monotonic()
            try:
                served.spec = registry.resolve(served.spec, self.settings.cache_dir)
                served.cls = registry.backend_class(served.spec.family)
                backend = served.cls(served.spec, runtime)
                backend.load()
                if self.settings.warmup:
                    self._warm_up(served.spec, backend)
            except Exception:
                served.state = ModelState.FAILED
                served.error = "loading failed"  # what a client may read; the log has the exception
                self._state_changed()
                raise
            served.backend = backend
            if self._closed.is_set():
                return
            metrics = ModelMetrics(self.metrics, served.spec.name)
            args = (served.spec.name, backend, self.settings.max_queue, self._fatal, metrics)
            if backend.batches and self.settings.max_batch_size > 1:
                served.worker = BatchingWorker(*args, slots=self.settings.max_batch_size)
            else:
                served.worker = ModelWorker(*args)
            served.load_seconds = time.monotonic() - start
            served.state = ModelState.READY
            self._state_changed()
            logger.info("model %s ready (%s, %.1fs)", served.spec.name, served.spec.family, served.load_seconds)

    def _warm_up(self, spec: ModelSpec, backend: Backend) -> None:
        """One short generation through the real path, so SERVING means a request will work."""

        class _Discard:
            def add_text(self, piece: str) -> None:
                pass

            def should_stop(self) -> bool:
                return False

        request = GenerationRequest(
            request_id="warmup",
            model=spec.name,
            task=Task.CAPTION,
            image=warmup_image(),
            params=SamplingParams(max_new_tokens=2),
        )
        backend.generate(request, _Discard())

    def _fatal(self, name: str) -> None:
        """A fatal device error on model ``name`` (worker thread): it stops serving, and so does health."""
        served = self.models[name]
        served.state = ModelState.FAILED
        served.error = "fatal device error"
        logger.critical("model %s hit a fatal device error; it no longer serves", name)
        self._state_changed()

    def _state_changed(self) -> None:
        if self.health_listener is not None:
            self.health_listener()

    def _watch(self) -> None:
        """The watchdog thread: a worker that works without a sign of life (a decode step, a prefill
        finished) for the stall timeout holds its model for good, as far as anyone can tell."""
        timeout = self.settings.stall_timeout
        while not self._closed.wait(min(1.0, timeout / 4)):
            now = time.monotonic()
            for name, served in self.models.items():
                worker = served.worker
                if worker is not None and not worker.stuck and worker.silent_for(now) > timeout:
                    self._stuck(name, worker, timeout)

    def _stuck(self, name: str, worker: ModelWorker, timeout: float) -> None:
        """Model ``name`` is stuck: it stops serving, its requests end at once, and the server is told
        (it exits non-zero so that its supervisor starts a fresh process; a thread cannot be killed)."""
        served = self.models[name]
        served.state = ModelState.FAILED
        served.error = "stuck"
        logger.critical("model %s made no progress for %g s; it no longer serves", name, timeout)
        worker.declare_stuck(
            GenerationStalled(f"model {name!r} stalled: no progress for {timeout:g} s; the generation was stopped"),
            ModelNotReady(f"model {name!r} is stuck and no longer serves; retry on another instance"),
        )
        self._state_changed()
        if self.stuck_listener is not None:
            self.stuck_listener(name)

    @property
    def ready(self) -> bool:
        return not self._draining and all(m.state is ModelState.READY for m in self.models.values())

    def serves(self, name: str) -> bool:
        """Whether model ``name`` takes requests now: loaded, not failed, and the server not draining."""
        return not self._draining and self.models[name].state is ModelState.READY

    def start_draining(self) -> None:
        """Refuse new requests; running and queued ones go on."""
        self._draining = True

    @property
    def threads_alive(self) -> bool:
        """Whether a worker thread still runs (after ``close``: one inside a model call that did not return)."""
        return any(m.worker is not None and m.worker.alive for m in self.models.values())

    @property
    def idle(self) -> bool:
        return all(m.worker is None or not m.worker.busy for m in self.models.values())

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers once their queues are empty; wait up to ``timeout`` for running work.
        A model still loading stops after the one it is on, and starts no worker."""
        self._closed.set()
        workers = [m.worker for m in self.models.values() if m.worker is not None]
        for worker in workers:
            worker.close()
        for worker in workers:
            worker.join(timeout)

    # --- requests -----------------------------------------------------------------------------

    def lookup(self, name: str) -> ServedModel:
        served = self.models.get(name or self.default_model)
        if served is None:
            raise ModelNotFound(name, list(self.models))
        return served

    def submit(
        self, request: GenerationRequest, trace: GenerationTrace | None = None, stream: StreamSlot | None = None
    ) -> Job:
        """Queue a request on its model; raises a ServiceError at once if it cannot be queued.
        ``trace`` (tracing on) receives the queue, prefill and decode phases from the worker.
        ``stream``: the slot of a long-lived RPC (:meth:`open_stream`) that the job counts under, instead
        of a slot of its own."""
        if stream is None:
            self._admit()
        elif self._draining:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        served, request = self._checked(request)
        self._check_deadline(served, request)
        job = Job(
            request,
            asyncio.get_running_loop(),
            type(served.backend).role_prefixes,
            abandon_after=self.settings.keepalive_time + self.settings.keepalive_timeout,
            metrics=served.worker.metrics,
            trace=trace,
        )
        served.worker.submit(job)
        if stream is None:
            self._streams.add(job)
        return job

    def check(self, request: GenerationRequest) -> GenerationRequest:
        """What :meth:`submit` would check of ``request`` before queueing it (its model, the model's
        state, language, caption length and options), without queueing it; returns it with its
        model's default max_new_tokens filled in. Raises the ServiceError submit would."""
        return self._checked(request)[1]

    def open_stream(self) -> StreamSlot:
        """Hold one of ``--max-streams`` for a long-lived RPC (Watch) whose jobs come one after another
        and count under it (``submit(..., stream=slot)``); :meth:`close_stream` gives it back. Raises
        ShuttingDown or QueueFull at once, as :meth:`submit` does."""
        self._admit()
        slot = StreamSlot()
        self._streams.add(slot)
        return slot

    def close_stream(self, slot: StreamSlot) -> None:
        self._streams.discard(slot)

    def _admit(self) -> None:
        if self._draining:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        if len(self._streams) >= self.settings.max_streams:
            raise QueueFull(f"the server has {len(self._streams)} streams open (the limit); retry later")

    def _checked(self, request: GenerationRequest) -> tuple[ServedModel, GenerationRequest]:
        served = self.lookup(request.model)
        if served.state is ModelState.FAILED:
            raise ModelNotReady(
                f"model {served.spec.name!r} has failed ({served.error}) and no longer serves; use another instance"
            )
        if served.state is not ModelState.READY or served.worker is None:
            raise ModelNotReady(f"model {served.spec.name!r} is still loading; retry shortly")
        backend_cls = type(served.backend)
        if request.language not in backend_cls.languages:
            raise InvalidInput(
                "response_language",
                f"{request.language!r} is not supported by model {served.spec.name!r}; "
                f"supported: {', '.join(backend_cls.languages)}",
            )
        if request.task is Task.CAPTION and request.length not in backend_cls.caption_lengths:
            raise InvalidInput("length", f"model {served.spec.name!r} does not support {request.length.value} captions")
        unsupported = sorted(request.params.options_set() - backend_cls.supported_options)
        if unsupported:
            raise InvalidInput(
                f"options.{unsupported[0]}",
                f"not supported by model {served.spec.name!r} ({backend_cls.family}); "
                f"supported: {', '.join(sorted(backend_cls.supported_options))}",
            )
        if request.params.max_new_tokens == 0:
            default = (
                backend_cls.caption_budgets[request.length]
                if request.task is Task.CAPTION
                else self.settings.default_max_new_tokens
            )
            request = replace(request, params=replace(request.params, max_new_tokens=default))
        return served, request

    @staticmethod
    def _check_deadline(served: ServedModel, request: GenerationRequest) -> None:
        """Refuse at once a request whose deadline will pass before its turn comes."""
        if request.deadline is None:
            return
        wait = served.worker.estimated_wait()
        remaining = request.deadline - time.monotonic()
        if wait is not None and wait >= remaining:
            raise DeadlineUnmeetable(
                f"the deadline cannot be met: model {served.spec.name!r} needs about {wait:.1f} s for the "
                f"requests ahead of this one, and {max(remaining, 0):.1f} s remain"
            )

    def release(self, job: Job) -> None:
        """The job's RPC ended: stop its generation (if still running) and free its stream slot."""
        job.cancel()
        self._streams.discard(job)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def cards(self) -> list[ModelCard]:
        out = []
        for served in self.models.values():
            cls, backend = served.cls, served.backend
            out.append(
                ModelCard(
                    name=served.spec.name,
                    family=served.spec.family,
                    source=served.spec.display_source or served.spec.builtin or "",
                    ready=served.state is ModelState.READY and not self._draining,
                    is_default=served.spec.name == self.default_model,
                    caption_lengths=cls.caption_lengths if cls else (),
                    languages=cls.languages if cls else (),
                    context_length=backend.context_length if backend else 0,
                    max_new_tokens_limit=self.settings.max_new_tokens_limit,
                    device=backend.device if backend else "",
                    dtype=backend.dtype if backend else "",
                )
            )
        return out


def set_torch_threads(threads: int, runtime: Runtime) -> None:
    """Size torch's intra-op thread pool (process-wide): ``threads``, or for 0 the automatic choice."""
    import os

    import torch

    if not threads:
        device, _ = runtime.resolve()
        if device.type != "cpu":
            return
        threads = max(1, (os.cpu_count() or 1) - 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.info("torch uses %d intra-op thread(s)", threads)


def warmup_image() -> Image.Image:
    image = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(image).ellipse((16, 8, 48, 40), fill="red")
    return image
