"""Admission: every check a request passes between the protobuf edge and its model's queue, in one step.

A request that reaches :func:`admit` is well-formed: the value checks (ranges, lengths, enum values,
the image) are the edge's (api/convert.py, images/decode.py). What is checked here depends on the server's state
and on the model's, in this order, and the first that fails refuses the request at once:

1. the server is not draining (UNAVAILABLE);
2. it has a stream slot left, ``--max-streams`` (RESOURCE_EXHAUSTED);
3. the model is served here (NOT_FOUND), has not failed (UNAVAILABLE, saying why) and is loaded
   (UNAVAILABLE);
4. the model's family supports what the request asks: its response language, its caption length,
   its image detail, every option it sets (INVALID_ARGUMENT naming the field). These are the
   capabilities each family declares on its backend class (the detail levels, on the loaded model:
   they depend on its processor); nothing else checks them;
5. its deadline can be met from the queue position (DEADLINE_EXCEEDED).

Admission also fills in the model's defaults (``max_new_tokens`` 0 takes the family's budget for the
caption length, or the server's default for a query). Queueing itself (a full queue) is the
scheduler's refusal.

A long-lived RPC (Watch) takes its stream slot once, when it opens (:func:`admit_stream`: checks 1
and 2; the engine then holds a :class:`StreamSlot` for it), and has its config checked then without
queueing anything (:func:`check_request`: checks 3 and 4). Each job it submits later counts under that slot, so
:func:`admit` skips check 2 for it (``stream_held``) and runs the others.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

from vlm_service.config import Settings
from vlm_service.core.served import ModelState, ServedModel
from vlm_service.errors import (
    DeadlineUnmeetable,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NotSupported,
    QueueFull,
    ShuttingDown,
)
from vlm_service.types import GenerationRequest, Task


class StreamSlot:
    """One of ``--max-streams``, held by a long-lived RPC (Watch) across the jobs it submits."""

    __slots__ = ("__weakref__",)


def admit(
    request: GenerationRequest,
    models: Mapping[str, ServedModel],
    *,
    default_model: str,
    settings: Settings,
    draining: bool,
    open_streams: int,
    stream_held: bool = False,
) -> tuple[ServedModel, GenerationRequest]:
    """The model that will serve ``request``, and the request with that model's defaults filled in;
    raises the :class:`~vlm_service.errors.ServiceError` of the first check that fails. With
    ``stream_held`` the request counts under a stream slot its RPC already holds: no slot is needed."""
    if stream_held:
        _check_not_draining(draining)
    else:
        admit_stream(settings=settings, draining=draining, open_streams=open_streams)
    served, request = check_request(request, models, default_model=default_model, settings=settings)
    _check_deadline(served, request)
    return served, request


def admit_stream(*, settings: Settings, draining: bool, open_streams: int) -> None:
    """Checks 1 and 2: the server takes a new stream (not draining, a slot left); raises if not."""
    _check_not_draining(draining)
    if open_streams >= settings.max_streams:
        raise QueueFull(f"the server has {open_streams} streams open (the limit); retry later")


def check_request(
    request: GenerationRequest, models: Mapping[str, ServedModel], *, default_model: str, settings: Settings
) -> tuple[ServedModel, GenerationRequest]:
    """Checks 3 and 4: the model serves, and its family supports what ``request`` asks. Returns the
    model and the request with its defaults filled in."""
    served = find_model(models, request.model, default_model)
    name = served.spec.name
    if served.state is ModelState.FAILED:
        raise ModelNotReady(f"model {name!r} has failed ({served.error}) and no longer serves; use another instance")
    if served.state is not ModelState.READY or served.scheduler is None:
        raise ModelNotReady(f"model {name!r} is still loading; retry shortly")
    check_grounding(request.task, served, models)
    return served, _with_capabilities(request, served.backend, name, settings)


def check_grounding(task: Task, served: ServedModel, models: Mapping[str, ServedModel]) -> None:
    """Detect or Point on a model whose family cannot do it: FAILED_PRECONDITION naming the model, and
    the served models that can."""
    if task.grounding and served.cls is not None and task not in served.cls.grounding:
        able = [n for n, m in models.items() if m.cls is not None and task in m.cls.grounding]
        verb = "detect objects" if task is Task.DETECT else "point at objects"
        elsewhere = f"models here that do: {', '.join(able)}" if able else "no model served here does"
        raise NotSupported(f"model {served.spec.name!r} ({served.spec.family}) cannot {verb}; {elsewhere}")


def _check_not_draining(draining: bool) -> None:
    if draining:
        raise ShuttingDown("the server is shutting down; retry on another instance")


def find_model(models: Mapping[str, ServedModel], name: str, default_model: str) -> ServedModel:
    """The model named ``name`` (empty: the default one), or NOT_FOUND listing the served ones."""
    served = models.get(name or default_model)
    if served is None:
        raise ModelNotFound(name, list(models))
    return served


def check_pictures(count: int, family, name: str, settings: Settings) -> None:
    """A Query's pictures: at most what the model's family takes (and the server's limit)."""
    most = min(family.max_images, settings.max_images_per_query)
    if count > most:
        takes = "one picture" if most == 1 else f"at most {most} pictures"
        raise InvalidInput("images", f"model {name!r} ({family.family}) takes {takes} per Query; got {count}")


def _with_capabilities(request: GenerationRequest, backend, name: str, settings: Settings) -> GenerationRequest:
    """Check the request against what the model's family declares (and the image detail levels the
    loaded model offers); fill in the family's defaults."""
    family = type(backend)
    check_pictures(len(request.pictures), family, name, settings)
    if request.language not in family.languages:
        raise InvalidInput(
            "response_language",
            f"{request.language!r} is not supported by model {name!r}; supported: {', '.join(family.languages)}",
        )
    if request.task is Task.CAPTION and request.length not in family.caption_lengths:
        raise InvalidInput("length", f"model {name!r} does not support {request.length.value} captions")
    details = backend.image_tilings()
    if request.detail not in details:
        raise InvalidInput(
            "detail",
            f"model {name!r} does not offer {request.detail.value} image detail; "
            f"it offers: {', '.join(d.value for d in details)}",
        )
    unsupported = sorted(request.params.options_set() - family.supported_options)
    if unsupported:
        raise InvalidInput(
            f"options.{unsupported[0]}",
            f"not supported by model {name!r} ({family.family}); "
            f"supported: {', '.join(sorted(family.supported_options))}",
        )
    if request.task.grounding:
        max_objects = request.max_objects or settings.max_objects
        budget = min(backend.grounding_budget(max_objects), settings.max_new_tokens_limit)
        return replace(request, max_objects=max_objects, params=replace(request.params, max_new_tokens=budget))
    if request.params.max_new_tokens == 0:
        default = (
            family.caption_budgets[request.length] if request.task is Task.CAPTION else settings.default_max_new_tokens
        )
        request = replace(request, params=replace(request.params, max_new_tokens=default))
    return request


def _check_deadline(served: ServedModel, request: GenerationRequest) -> None:
    """Refuse at once a request whose deadline will pass before its turn comes."""
    if request.deadline is None:
        return
    wait = served.scheduler.estimated_wait()
    remaining = request.deadline - time.monotonic()
    if wait is not None and wait >= remaining:
        raise DeadlineUnmeetable(
            f"the deadline cannot be met: model {served.spec.name!r} needs about {wait:.1f} s for the "
            f"requests ahead of this one, and {max(remaining, 0):.1f} s remain"
        )
