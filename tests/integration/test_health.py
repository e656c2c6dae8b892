"""Health per model and liveness, against real servers on loopback with the fake family (what a
Kubernetes probe asks: startup and readiness on a model's name, liveness on `liveness`)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import fakes
from tests.helpers import ServerThread, caption_request
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.config import Settings
from vlm_service.server import LIVENESS, SERVICE_NAME, model_health_name

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def fake_server(tmp_path, cache_dir):
    """``fake_server("a", "b")`` starts a server with fake models of those names (not waiting for them
    to load); every server is stopped and the fake reset afterwards."""
    fakes.FakeBackend.reset()
    checkpoint = fakes.register(tmp_path)
    servers: list[ServerThread] = []

    def start(*names: str, **settings) -> ServerThread:
        models = [f"{name}={checkpoint}" for name in names]
        server = ServerThread(Settings(models=models, cache_dir=cache_dir, grace_period=0.0, **settings))
        servers.append(server)
        return server

    yield start
    for gate in fakes.FakeBackend.load_gates.values():
        gate.set()
    if fakes.FakeBackend.step_permits is not None:
        fakes.FakeBackend.step_permits.release(1000)
    for server in servers:
        server.stop()
    fakes.FakeBackend.reset()


def check(channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def watch_until(channel, service: str, wanted: int, timeout: float = 10.0) -> None:
    """Follow the server's own status updates for ``service`` (Health/Watch) until it reports ``wanted``."""
    seen = []
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    try:
        for reply in stream:
            seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            if reply.status == wanted:
                return
    except grpc.RpcError as exc:
        assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"{service!r} never turned {wanted}: saw {seen}"
        raise
    finally:
        stream.cancel()


def caption_code(stub, model: str) -> grpc.StatusCode:
    try:
        list(stub.Caption(caption_request(model=model), timeout=10))
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_each_model_is_serving_once_it_is_loaded_and_liveness_from_the_start(fake_server, caplog):
    gate = threading.Event()
    fakes.FakeBackend.load_gates["b"] = gate  # a loads at once; b waits
    server = fake_server("a", "b")
    with server.channel() as channel:
        stub = server.stub(channel)
        assert check(channel, LIVENESS) == SERVING  # while loading: a probe must not restart the pod
        # A probe that names no served model gets NOT_FOUND (and the server logs no error for it).
        with pytest.raises(grpc.RpcError) as info:
            check(channel, model_health_name("no-such-model"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        watch_until(channel, model_health_name("a"), SERVING)
        assert check(channel, model_health_name("b")) == NOT_SERVING
        for overall in ("", SERVICE_NAME):
            assert check(channel, overall) == NOT_SERVING  # not every model serves yet
        assert caption_code(stub, "a") == grpc.StatusCode.OK
        assert caption_code(stub, "b") == grpc.StatusCode.UNAVAILABLE

        gate.set()
        watch_until(channel, model_health_name("b"), SERVING)
        server.wait_ready()
        for name in ("", SERVICE_NAME, LIVENESS, model_health_name("a")):
            assert check(channel, name) == SERVING, name
        assert caption_code(stub, "b") == grpc.StatusCode.OK

        # Checked after the RPCs above, which the server's one event loop handled after that probe.
        assert not [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_a_failed_model_turns_only_its_own_name_not_serving(fake_server):
    server = fake_server("a", "b")
    server.wait_ready()
    with server.channel() as channel:
        stub = server.stub(channel)
        fakes.FakeBackend.fail_next = RuntimeError("CUDA error: an illegal memory access was encountered")
        assert caption_code(stub, "a") == grpc.StatusCode.INTERNAL
        watch_until(channel, model_health_name("a"), NOT_SERVING)
        assert check(channel, model_health_name("b")) == SERVING
        assert check(channel, "") == NOT_SERVING  # the server as a whole no longer serves every model
        assert check(channel, LIVENESS) == SERVING  # but the process is alive: no restart needed to route around a
        assert caption_code(stub, "a") == grpc.StatusCode.UNAVAILABLE
        assert caption_code(stub, "b") == grpc.StatusCode.OK


def test_a_drain_turns_every_model_not_serving_while_liveness_stays_serving(fake_server):
    server = fake_server("a", "b")
    server.wait_ready()
    fakes.FakeBackend.step_permits = threading.Semaphore(1)  # the stream writes one piece, then waits
    with server.channel() as channel:
        call = server.stub(channel).Caption(caption_request(model="a"))
        chunks = iter(call)
        assert next(chunks).text == "Hello"
        stopped = asyncio.run_coroutine_threadsafe(server.server.stop(30), server.loop)
        for model in ("a", "b"):
            watch_until(channel, model_health_name(model), NOT_SERVING)
        assert check(channel, "") == NOT_SERVING
        assert not stopped.done(), "the drain should still wait for the open stream"
        assert check(channel, LIVENESS) == SERVING  # draining is not dead
        fakes.FakeBackend.step_permits.release(1000)
        rest = list(chunks)
        assert rest[-1].finish_reason == pb.FINISH_REASON_STOP
    stopped.result(30)
