"""The fault matrix on a decode batch of several rows, which serves SmolVLM and Qwen2-VL by default.

Real servers on loopback serve `noise` (tiny SmolVLM with random weights: it never ends its answer on its
own). Faults are injected where a device raises them, in the model's forward pass (a torch forward
pre-hook on the real model), while rows share the decode batch; the scheduler's step gate holds
generation at a known step where a test needs the queue or the batch in a known state.
"""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import (
    StepGate,
    caption_request,
    request_id,
    run_rpc,
    shape_image,
    wait_for,
    wait_idle,
)
from vlm.v1 import vlm_service_pb2 as pb


class ForwardFault:
    """A forward pre-hook on a served model: the first forward pass whose ``input_ids`` satisfy ``when``
    waits for ``release`` (a hung device) and/or raises ``error`` (out of memory, a device error)."""

    def __init__(self, model, when, error: BaseException | None = None, release: threading.Event | None = None):
        self.when, self.error, self.release = when, error, release
        self.fired = threading.Event()
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if self.fired.is_set() or ids is None or not self.when(ids):
            return
        self.fired.set()
        if self.release is not None:
            self.release.wait(60)
        if self.error is not None:
            raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        if self.release is not None:
            self.release.set()


def decode_step_of(rows: int):
    """A decode step of ``rows`` rows (one new token each), as opposed to a prefill."""
    return lambda ids: tuple(ids.shape) == (rows, 1)


def error_of(server, request, timeout: float = 60) -> grpc.RpcError:
    """Run ``request``; it must fail: return its error."""
    with server.channel() as channel, pytest.raises(grpc.RpcError) as info:
        list(server.stub(channel).Caption(request, timeout=timeout))
    return info.value


def together(server, requests, timeout: float = 60) -> list[grpc.RpcError]:
    """Run requests at once, each on its own channel; each must fail: their errors."""
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return [f.result(timeout + 30) for f in [pool.submit(error_of, server, r, timeout) for r in requests]]


def retry_info(error: grpc.RpcError) -> error_details_pb2.RetryInfo:
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status_pb2.Status.FromString(details).details), "no RetryInfo"
    return retry


def health_status(server):
    with server.channel() as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_out_of_memory_in_a_batch_step_fails_every_row_with_retry_info_and_the_next_request_works(noise_server):
    server = noise_server()
    model = server.engine.models["noise"].backend.model
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with ForwardFault(model, decode_step_of(2), error=oom) as fault:
        errors = together(server, [caption_request(max_new_tokens=1500) for _ in range(2)])
    assert fault.fired.is_set(), ("the two rows never shared a decode step", [(e.code(), e.details()) for e in errors])
    for error in errors:  # the step failed for both rows: each gets the error (batch.abort)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in error.details()
        assert retry_info(error).retry_delay.ToMilliseconds() >= 1000
        assert "CUDA" not in error.details() and "GiB" not in error.details()
    wait_idle(server.engine)
    text, last = run_rpc(server, caption_request(max_new_tokens=5))
    assert text and last.usage.completion_tokens == 5
    assert health_status(server) == health_pb2.HealthCheckResponse.SERVING


def test_a_failed_prefill_fails_only_the_joining_request_and_the_batch_goes_on(noise_server):
    """An error while a request joins (its prefill) ends that request with INTERNAL; the row already
    decoding is untouched and finishes with its answer alone."""
    server = noise_server()
    model = server.engine.models["noise"].backend.model
    request = caption_request(max_new_tokens=300)
    alone = run_rpc(server, request)[0]
    gate = StepGate(server.engine.models["noise"].scheduler)
    with gate, server.channel() as channel:
        call = server.stub(channel).Caption(request)
        head = next(call)  # the first row is decoding
        prefill = lambda ids: ids.shape[1] > 1  # noqa: E731
        with ForwardFault(model, prefill, error=RuntimeError("boom in /secret/path/model.py")) as fault:
            error = error_of(server, caption_request(max_new_tokens=50))
        rest = list(call)
    assert fault.fired.is_set()
    assert error.code() == grpc.StatusCode.INTERNAL and "secret" not in error.details()
    assert "request id" in error.details()
    assert len(gate.jobs()) == 2, "the failing request joined while the first one ran"
    assert call.code() == grpc.StatusCode.OK  # the first row went on to its full answer
    assert rest[-1].usage.completion_tokens == 300
    assert head.text + "".join(m.text for m in rest) == alone


def test_a_fatal_device_error_in_a_batch_fails_every_row_and_stops_the_model(noise_server):
    server = noise_server()
    model = server.engine.models["noise"].backend.model
    fatal = RuntimeError("CUDA error: device-side assert triggered")
    with ForwardFault(model, decode_step_of(2), error=fatal) as fault:
        errors = together(server, [caption_request(max_new_tokens=1500) for _ in range(2)])
    assert fault.fired.is_set(), ("the two rows never shared a decode step", [(e.code(), e.details()) for e in errors])
    for error in errors:
        assert error.code() == grpc.StatusCode.INTERNAL and "CUDA" not in error.details()
    wait_for(
        lambda: health_status(server) == health_pb2.HealthCheckResponse.NOT_SERVING,
        message="health still SERVING after a fatal device error",
        every=0.02,
    )
    error = error_of(server, caption_request(max_new_tokens=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "no longer serves" in error.details()


def test_a_stalled_batch_is_aborted_and_the_model_stops_serving(noise_server):
    """A decode step that never returns (a hung device): the watchdog declares the model stuck after
    ``--stall-timeout``; every row in the step ends ABORTED, and the model refuses new requests with
    UNAVAILABLE (a thread inside a model call cannot be stopped; ``vlm-service serve`` exits non-zero
    so that its supervisor restarts it, see test_lifecycle)."""
    server = noise_server(stall_timeout=1.5)
    model = server.engine.models["noise"].backend.model
    release = threading.Event()
    with ForwardFault(model, decode_step_of(2), release=release) as fault:
        errors = together(server, [caption_request(max_new_tokens=1500) for _ in range(2)], timeout=30)
        assert fault.fired.is_set()
        for error in errors:
            assert error.code() == grpc.StatusCode.ABORTED and "stalled" in error.details()
        error = error_of(server, caption_request(max_new_tokens=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "stuck" in error.details()
    assert server.server.stuck_models == ["noise"]


def test_a_deadline_the_batch_cannot_meet_from_the_queue_is_refused_at_once(noise_server):
    """The queue-wait estimate of the batching scheduler: requests ahead / batch size x recent generation
    time. A deadline shorter than that is refused when the request arrives, with the estimate's own
    message (not the transport's deadline); with time enough the same request is served."""
    server = noise_server(max_batch_size=2, max_queue=8)
    scheduler = server.engine.models["noise"].scheduler
    run_rpc(server, caption_request(max_new_tokens=200))  # the scheduler learns how long a request takes
    assert scheduler.seconds_per_request is not None
    # Pinned, so the deadline below is far from the transport's own timing on a loaded machine.
    scheduler.seconds_per_request = per_request = 10.0
    with StepGate(scheduler, closed=True) as gate, server.channel() as channel:
        stub = server.stub(channel)
        ahead = [stub.Caption(caption_request(max_new_tokens=40)) for _ in range(6)]
        for call in ahead:
            call.initial_metadata()
        wait_for(lambda: scheduler.running + scheduler.queue_depth == 6)  # held: nothing moves
        # Six ahead, two at a time: about 3 x per_request of waiting; the deadline gives 2 x.
        error = error_of(server, caption_request(max_new_tokens=40), timeout=2 * per_request)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "cannot be met" in error.details()
        patient = stub.Caption(caption_request(max_new_tokens=40), timeout=60)
        patient.initial_metadata()
        gate.open()
        assert all(list(call)[-1].usage.completion_tokens == 40 for call in ahead)
        assert list(patient)[-1].usage.completion_tokens == 40


def test_a_cancel_before_the_prefill_never_runs_the_model(noise_server):
    """The stop check at admission: a request whose RPC ends while it is being admitted never runs a
    forward pass (no prefill, no decode step)."""
    server = noise_server()
    served = server.engine.models["noise"]
    with StepGate(served.scheduler, served.backend.model, closed=True) as gate, server.channel() as channel:
        call = server.stub(channel).Caption(caption_request(max_new_tokens=50))
        job = gate.wait_held()  # at its admission, before the prefill
        call.cancel()
        wait_for(lambda: job.cancelled, message="the server never stopped the job")
        gate.open()
        wait_idle(server.engine)
        assert gate.forward_passes == 0, f"{gate.forward_passes} forward passes ran for a cancelled request"
        assert gate.steps_of(job) == 1


def test_a_full_queue_is_refused_with_retry_info_and_a_cancelled_queued_request_never_runs(noise_server):
    server = noise_server(max_batch_size=2, max_queue=2)
    served = server.engine.models["noise"]
    scheduler = served.scheduler
    with StepGate(scheduler, served.backend.model, closed=True) as gate, server.channel() as channel:
        stub = server.stub(channel)
        first = stub.Caption(caption_request(max_new_tokens=20))
        gate.wait_held()  # the first request is being admitted; the scheduler waits
        queued = [stub.Caption(caption_request(max_new_tokens=20)) for _ in range(2)]
        queued_ids = [request_id(call) for call in queued]
        wait_for(lambda: scheduler.queue_depth == 2)
        error = error_of(server, caption_request(max_new_tokens=20), timeout=10)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "waiting" in error.details()
        assert retry_info(error).retry_delay.ToMilliseconds() > 0
        queued[1].cancel()
        wait_for(lambda: scheduler.queue_depth == 1, message="the cancelled request stayed in the queue")
        gate.open()
        assert list(first)[-1].usage.completion_tokens == 20
        assert list(queued[0])[-1].usage.completion_tokens == 20
        wait_idle(server.engine)
    ran = {job.request.request_id for job in gate.jobs()}
    assert queued_ids[0] in ran and queued_ids[1] not in ran, "the cancelled queued request was admitted"
    assert queued[1].code() == grpc.StatusCode.CANCELLED


def test_a_generation_that_reaches_the_models_context_length_ends_there_with_length(noise_server):
    """A row stops at the model's context length (prompt + generated tokens), not only at its token
    budget: finish reason LENGTH, its usage counting what it wrote. The context length is lowered to a
    few tokens past the prompt (the tiny model's own is far beyond the budget limit)."""
    server = noise_server()
    batch = server.engine.models["noise"].scheduler.batch
    _, alone = run_rpc(server, caption_request(max_new_tokens=100))
    assert alone.finish_reason == pb.FINISH_REASON_LENGTH and alone.usage.completion_tokens == 100
    prompt = alone.usage.prompt_tokens
    batch._context_length = prompt + 5  # the first token is written at position `prompt`
    _, short = run_rpc(server, caption_request(max_new_tokens=100))
    assert short.finish_reason == pb.FINISH_REASON_LENGTH
    assert short.usage.prompt_tokens == prompt and short.usage.completion_tokens == 6


def test_a_decode_step_that_fails_while_a_request_joins_fails_the_rows_and_the_joining_request_goes_on(
    noise_server, monkeypatch
):
    """A decode step raises while another request is between the chunks of its prefill (chunked, one
    chunk per step: --prefill-budget-ms 0, and the processor is a chunk of its own): the rows in the step
    end with INTERNAL; the joining request was not in the step, so it goes on and gets its whole answer,
    the same as alone."""
    server = noise_server(prefill_budget_ms=0, chunked_prefill="on")
    scheduler = server.engine.models["noise"].scheduler
    batch = scheduler.batch
    joiner = caption_request(shape_image("blue"), max_new_tokens=20)
    alone = run_rpc(server, joiner)[0]
    real_step = batch.decode_step
    failed = threading.Event()

    def decode_step():
        if batch.joining and not failed.is_set():
            failed.set()
            raise RuntimeError("boom in /secret/path/model.py")
        return real_step()

    monkeypatch.setattr(batch, "decode_step", decode_step)
    with server.channel() as channel:
        stub = server.stub(channel)
        running = stub.Caption(caption_request(max_new_tokens=1500))
        assert next(running).text  # decoding
        text, last = run_rpc(server, joiner)
        with pytest.raises(grpc.RpcError) as ended:
            list(running)
        error = ended.value
    assert failed.is_set(), "no step ran while the request was joining"
    assert error.code() == grpc.StatusCode.INTERNAL and "secret" not in error.details()
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 20
    assert text == alone
