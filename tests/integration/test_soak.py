"""A bounded soak: mixed Caption/Query traffic with random cancels, deadlines and bad inputs against
one real server. CI runs a short version (VLM_SOAK_SECONDS, default 20); `make soak` runs 3 minutes.
Afterwards: every request ended OK or with an expected status, no stream or queued job is left, no
thread leaked, and memory stayed within a bound of the start."""

from __future__ import annotations

import collections
import os
import random
import threading
import time

import grpc
import pytest

from tests.helpers import ServerThread, caption_request, query_request, shape_image, wait_for, wait_idle
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.config import Settings
from vlm_service.images.decode import THREAD_PREFIX

pytestmark = pytest.mark.soak

EXPECTED = {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
MEMORY_BOUND_MB = 300


def threads() -> tuple[int, int]:
    """(threads outside the image decoders' pools, threads in them). A pool starts threads as the load
    needs them, up to --max-image-decodes: growth there is bounded by design, so it is checked against
    that bound, not counted as a leak."""
    names = [thread.name for thread in threading.enumerate()]
    pool = sum(name.startswith(THREAD_PREFIX) for name in names)
    return len(names) - pool, pool


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one_request(stub, rng: random.Random) -> str:
    """Send one random request; return 'ok', 'client-cancel' or the status code's name."""
    kind = rng.random()
    model = rng.choice(["tiny-smolvlm", "noise"])
    image = shape_image(rng.choice(["red", "blue", "green"]), size=(rng.randint(32, 300), rng.randint(32, 300)))
    tokens = rng.randint(1, 150)
    timeout = 30.0
    cancel_after = None
    if kind < 0.15:
        request = caption_request(b"not an image", model=model)
    elif kind < 0.25:
        request = caption_request(image, model=model, top_p=rng.choice([-1.0, 1.5, float("nan")]))
    elif kind < 0.45:
        request, timeout = caption_request(image, model=model, max_new_tokens=tokens), rng.uniform(0.01, 0.3)
    elif kind < 0.6:
        request, cancel_after = caption_request(image, model="noise", max_new_tokens=400), rng.randint(0, 5)
    elif kind < 0.8:
        request = query_request("What colour is the shape?", image, model=model, max_new_tokens=tokens)
    else:
        request = caption_request(image, model=model, max_new_tokens=tokens, temperature=0.8, seed=rng.randint(0, 9))
    method = stub.Query if isinstance(request, pb.QueryRequest) else stub.Caption
    call = method(request, timeout=timeout)
    try:
        for received, message in enumerate(call):
            if cancel_after is not None and received >= cancel_after:
                call.cancel()
                return "client-cancel"  # what the server made of it is read from its metrics
            if message.finish_reason:
                assert message.usage.completion_tokens >= 1, f"a finished stream reported {message.usage}"
        return "ok"
    except grpc.RpcError as error:
        return error.code().name


def test_soak(cache_dir, tiny_smolvlm_dir, noise_dir):
    seconds = float(os.environ.get("VLM_SOAK_SECONDS", "20"))
    server = ServerThread(
        Settings(
            models=["tiny-smolvlm", f"noise={noise_dir}"],
            cache_dir=cache_dir,
            max_queue=6,
            max_streams=12,
            grace_period=0,
        )
    )
    server.wait_ready()
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[BaseException] = []  # raised in client threads, re-raised by the test
    lock = threading.Lock()
    try:
        with server.channel() as channel:
            stub = server.stub(channel)
            list(stub.Caption(caption_request(max_new_tokens=3)))  # warm caches before the baseline
            (threads_before, decode_threads_before), rss_before = threads(), rss_mb()
            stop_at = time.monotonic() + seconds

            def client(seed: int) -> None:
                rng = random.Random(seed)
                try:
                    while time.monotonic() < stop_at:
                        outcome = one_request(stub, rng)
                        with lock:
                            outcomes[outcome] += 1
                except BaseException as exc:  # an assertion in a thread must fail the test, not just warn
                    failures.append(exc)

            clients = [threading.Thread(target=client, args=(i,)) for i in range(10)]
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join(seconds + 120)
            assert not any(thread.is_alive() for thread in clients), "a client hung"
            if failures:
                raise failures[0]
            wait_idle(server.engine, timeout=30)
            rss_after = rss_mb()
            total = sum(outcomes.values())
            # The statuses the server ended its RPCs with (its own count, by method and code), once every
            # handler has finished: a client's cancel is CANCELLED there only if the server saw it so.
            wait_for(lambda: server.engine.open_streams == 0, message="a stream slot leaked")
            codes: collections.Counter[str] = collections.Counter()
            for family in server.engine.metrics.registry.collect():
                for sample in family.samples:
                    if sample.name == "vlm_requests_total":
                        codes[sample.labels["code"]] += int(sample.value)
            threads_after, decode_threads = threads()
            print(
                f"soak {seconds:g}s: {total} requests, client side {dict(outcomes)}, server side {dict(codes)}; "
                f"RSS {rss_before:.0f} -> {rss_after:.0f} MB; threads outside the decode pool {threads_before} -> "
                f"{threads_after}, in it {decode_threads}"
            )
            client_side = {k: v for k, v in outcomes.items() if k not in ("ok", "client-cancel")}
            unexpected = {
                k: v for k, v in (client_side | codes).items() if k != "OK" and grpc.StatusCode[k] not in EXPECTED
            }
            assert not unexpected, f"unexpected statuses: {unexpected}"
            assert codes["OK"] >= outcomes["ok"] > 0 and total >= 20
            if outcomes["client-cancel"]:
                assert codes["CANCELLED"] > 0, "the server counted none of the clients' cancels as CANCELLED"
            assert server.engine.open_streams == 0, "a stream slot leaked"
            assert all(m.scheduler.queue_depth == 0 for m in server.engine.models.values())
            assert threads_after <= threads_before + 2, "threads leaked"
            # Other servers of the test session may hold decode threads too; this one's pool adds at most its bound.
            assert decode_threads - decode_threads_before <= 2 * server.settings.max_image_decodes, (
                "pool threads leaked"
            )
            assert rss_after - rss_before < MEMORY_BOUND_MB
            # The server still answers normally.
            assert list(stub.Caption(caption_request(max_new_tokens=3)))[-1].usage.completion_tokens == 3
    finally:
        server.stop()
