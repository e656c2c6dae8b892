"""The engine: the served models' lifecycle (loading through loading.py, the watchdog of
watchdog.py) and the entry of requests.

It knows nothing of gRPC. The servicer hands it a domain request (its values checked at the edge) and
gets back a :class:`~vlm_service.core.job.Job` to stream from: :meth:`Engine.submit` admits the request
(admission.py: every check that depends on the server's or the model's state) and queues it on its
model's scheduler (scheduler.py), whose thread drives the batch the model's backend made. A Watch
stream (api/watch.py) holds one stream slot for its life (:meth:`Engine.open_stream`), has its config
checked once (:meth:`Engine.check`), and submits each frame's answer under that slot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vlm_service.backends import catalogue, registry
from vlm_service.backends.runtime import parameters
from vlm_service.config import Settings
from vlm_service.core.admission import (
    StreamSlot,
    admit,
    admit_stream,
    check_grounding,
    check_pictures,
    check_request,
)
from vlm_service.core.job import Job
from vlm_service.core.loading import freeze_loaded_objects, runtime_of, set_torch_threads, warm_up
from vlm_service.core.scheduler import Scheduler
from vlm_service.core.served import ModelState, ServedModel
from vlm_service.core.watchdog import Watchdog
from vlm_service.errors import GenerationStalled, ModelNotReady
from vlm_service.observability.metrics import Metrics, ModelMetrics, ModelSnapshot, Snapshot
from vlm_service.types import GenerationRequest, ImageBound, ImageDetail, ModelCard, Task

if TYPE_CHECKING:
    from vlm_service.observability.tracing import GenerationTrace

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        args = settings.models or [catalogue.DEFAULT_MODEL]
        specs = [catalogue.parse_model_arg(arg, settings) for arg in args]
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
        self.metrics.watch(self.snapshot)
        self._closed = threading.Event()
        self._watchdog = Watchdog(self.models, settings.stall_timeout, self._stuck)

    # --- lifecycle ------------------------------------------------------------------------------

    def load_all(self) -> None:
        """Load and warm up every model (blocking; run it off the event loop). Raises on failure."""
        runtime = runtime_of(self.settings)
        for served in self.models.values():
            if self._closed.is_set():
                return  # stopped while loading: load nothing more, start no scheduler
            start = time.monotonic()
            try:
                served.spec = catalogue.resolve(served.spec, self.settings.cache_dir)
                served.cls = registry.backend_class(served.spec.family)
                backend = served.cls(served.spec, runtime)
                backend.load()
                # Before the warm-up and the scheduler's thread, which takes the count set when it starts.
                threads = set_torch_threads(
                    self.settings.torch_threads, runtime, parameters(getattr(backend, "model", None))
                )
                if self.settings.warmup:
                    warm_up(served.spec, backend)
                freeze_loaded_objects()
            except Exception:
                served.state = ModelState.FAILED
                served.error = "loading failed"  # what a client may read; the log has the exception
                self._state_changed()
                raise
            served.backend = backend
            if self._closed.is_set():
                return
            served.scheduler = Scheduler(
                served.spec.name,
                backend.new_batch(self.settings.max_batch_size),
                self.settings.max_queue,
                self._fatal,
                ModelMetrics(self.metrics, served.spec.name),
                prefill_budget=backend.prefill.budget,
                torch_threads=threads,
            )
            served.load_seconds = time.monotonic() - start
            served.state = ModelState.READY
            self._state_changed()
            logger.info("model %s ready (%s, %.1fs)", served.spec.name, served.spec.family, served.load_seconds)

    def _fatal(self, name: str) -> None:
        """A fatal device error on model ``name`` (scheduler thread): it stops serving, and so does health."""
        served = self.models[name]
        served.state = ModelState.FAILED
        served.error = "fatal device error"
        logger.critical("model %s hit a fatal device error; it no longer serves", name)
        self._state_changed()

    def _state_changed(self) -> None:
        if self.health_listener is not None:
            self.health_listener()

    def _stuck(self, name: str, timeout: float) -> None:
        """Model ``name`` is stuck (the watchdog's call): it stops serving, its requests end at once,
        and the server is told (it exits non-zero so that its supervisor starts a fresh process; a
        thread cannot be killed)."""
        served = self.models[name]
        served.state = ModelState.FAILED
        served.error = "stuck"
        logger.critical("model %s made no progress for %g s; it no longer serves", name, timeout)
        served.scheduler.declare_stuck(
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
        """Whether a scheduler thread still runs (after ``close``: one inside a model call that did not return)."""
        return any(m.scheduler is not None and m.scheduler.alive for m in self.models.values())

    @property
    def idle(self) -> bool:
        return all(m.scheduler is None or not m.scheduler.busy for m in self.models.values())

    def close(self, timeout: float = 10.0) -> None:
        """Stop the schedulers once their queues are empty; wait up to ``timeout`` for running work.
        A model still loading stops after the one it is on, and starts no scheduler."""
        self._closed.set()
        self._watchdog.close()
        schedulers = [m.scheduler for m in self.models.values() if m.scheduler is not None]
        for scheduler in schedulers:
            scheduler.close()
        for scheduler in schedulers:
            scheduler.join(timeout)

    # --- requests -----------------------------------------------------------------------------

    def model_name(self, name: str) -> str:
        """The name of the model a request's ``model`` field asks for: itself, or the default for empty."""
        return name or self.default_model

    def submit(
        self, request: GenerationRequest, trace: GenerationTrace | None = None, stream: StreamSlot | None = None
    ) -> Job:
        """Admit a request and queue it on its model; raises a ServiceError at once if it is refused.
        ``trace`` (tracing on) receives the queue, prefill and decode phases from the scheduler.
        ``stream``: the slot of a long-lived RPC (:meth:`open_stream`) that the job counts under, instead
        of a slot of its own."""
        served, request = admit(
            request,
            self.models,
            default_model=self.default_model,
            settings=self.settings,
            draining=self._draining,
            open_streams=len(self._streams),
            stream_held=stream is not None,
        )
        job = Job(
            request,
            asyncio.get_running_loop(),
            type(served.backend).role_prefixes,
            abandon_after=self.settings.keepalive_time + self.settings.keepalive_timeout,
            metrics=served.scheduler.metrics,
            trace=trace,
            regions=served.backend.region_parser(request) if request.task.grounding else None,
        )
        served.scheduler.enqueue(job)
        if stream is None:
            self._streams.add(job)
        return job

    def image_bound(self, name: str, detail: ImageDetail) -> ImageBound | None:
        """The largest picture model ``name`` uses at ``detail`` (see ``Backend.image_bound``): a request's
        picture is reduced to it as it is decoded. None for a model not served or not loaded (such a
        request is refused at admission anyway)."""
        served = self.models.get(name)
        backend = served.backend if served is not None else None
        return backend.image_bound(detail) if backend is not None else None

    def check_before_decoding(self, request: GenerationRequest, count: int) -> None:
        """Whether ``request``'s model can do its task (Detect, Point: NotSupported if not) and takes
        ``count`` pictures in one Query (InvalidInput if not), before they are decoded; a model not
        served or not loaded is left to :meth:`submit` to refuse."""
        served = self.models.get(self.model_name(request.model))
        if served is not None and served.cls is not None:
            check_grounding(request.task, served, self.models)
            check_pictures(count, served.cls, served.spec.name, self.settings)

    def check(self, request: GenerationRequest) -> GenerationRequest:
        """What :meth:`submit` would check of ``request`` before queueing it (its model, the model's
        state, language, caption length and options), without queueing it; returns it with its
        model's default max_new_tokens filled in. Raises the ServiceError submit would."""
        return check_request(request, self.models, default_model=self.default_model, settings=self.settings)[1]

    def open_stream(self) -> StreamSlot:
        """Hold one of ``--max-streams`` for a long-lived RPC (Watch) whose jobs come one after another
        and count under it (``submit(..., stream=slot)``); :meth:`close_stream` gives it back. Raises
        ShuttingDown or QueueFull at once, as :meth:`submit` does."""
        admit_stream(settings=self.settings, draining=self._draining, open_streams=len(self._streams))
        slot = StreamSlot()
        self._streams.add(slot)
        return slot

    def close_stream(self, slot: StreamSlot) -> None:
        self._streams.discard(slot)

    def release(self, job: Job) -> None:
        """The job's RPC ended: stop its generation (if still running) and free its stream slot."""
        job.cancel()
        self._streams.discard(job)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def snapshot(self) -> Snapshot:
        """What the metrics report at a scrape (any thread)."""
        models = []
        for name, served in self.models.items():
            scheduler, backend = served.scheduler, served.backend
            hits, misses = backend.images.stats() if backend is not None else (None, None)
            models.append(
                ModelSnapshot(
                    name,
                    queued=scheduler.queue_depth if scheduler is not None else None,
                    running=scheduler.running if scheduler is not None else None,
                    image_cache_hits=hits,
                    image_cache_misses=misses,
                )
            )
        return Snapshot(models=tuple(models), open_streams=len(self._streams))

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
                    image_details=tuple(backend.image_tilings().values()) if backend else (),
                    detects=bool(cls) and Task.DETECT in cls.grounding,
                    points=bool(cls) and Task.POINT in cls.grounding,
                    max_images=min(cls.max_images, self.settings.max_images_per_query) if cls else 0,
                )
            )
        return out
