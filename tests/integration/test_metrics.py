"""The Prometheus endpoint (`--metrics-port`) of a real server, scraped over HTTP as Prometheus would."""

from __future__ import annotations

import concurrent.futures
import socket
import urllib.request

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ServerThread, StepGate, caption_request, query_request, wait_for, wait_idle
from tests.integration.test_observability import RecordedSpans
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.config import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample at /metrics, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def metered(cache_dir, noise_dir):
    port = free_port()
    server = ServerThread(Settings(models=[f"noise={noise_dir}"], cache_dir=cache_dir, metrics_port=port))
    server.wait_ready()
    yield server, port
    server.stop()


def test_metrics_count_requests_tokens_latencies_and_batches(metered):
    server, port = metered
    model = (("model", "noise"),)
    before = scrape(port)
    assert before[("vlm_active_streams", ())] == 0
    assert before[("vlm_queue_depth", model)] == 0

    with server.channel() as channel:
        stub = server.stub(channel)
        # Four streams at once, so decode steps are shared.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda n: list(stub.Caption(caption_request(max_new_tokens=n))), [20, 30, 40, 50]))
        query = list(stub.Query(query_request("What is it?", max_new_tokens=7)))
        with pytest.raises(grpc.RpcError):
            list(stub.Caption(caption_request(top_p=2.0)))  # INVALID_ARGUMENT
        call = stub.Caption(caption_request(max_new_tokens=2000))
        for message in call:
            if message.text:
                call.cancel()
                break
        wait_idle(server.engine)
    tokens = sum(a[-1].usage.completion_tokens for a in answers) + query[-1].usage.completion_tokens
    assert tokens == 147

    # The cancelled call's status is counted when its handler ends, which may be after the engine is
    # idle (a loaded run read 0 here): wait until the server has counted it, then read everything once.
    cancelled = ("vlm_requests_total", (("code", "CANCELLED"), ("method", "Caption")))
    wait_for(lambda: scrape(port).get(cancelled, 0.0) >= 1, message="the cancel was never counted", every=0.05)
    after = scrape(port)

    def count(name, **labels):
        return after.get((name, tuple(sorted(labels.items()))), 0.0)

    assert count("vlm_requests_total", method="Caption", code="OK") == 4
    assert count("vlm_requests_total", method="Query", code="OK") == 1
    assert count("vlm_requests_total", method="Caption", code="INVALID_ARGUMENT") == 1
    assert count("vlm_requests_total", method="Caption", code="CANCELLED") == 1
    generated = count("vlm_generated_tokens_total", model="noise")
    # The cancelled stream's tokens count too, and it stopped short of its 2,000-token budget.
    assert tokens < generated < tokens + 2000, "the cancelled stream's tokens count, up to its cancel"
    assert count("vlm_tokens_after_rpc_end_total", model="noise") <= 2
    # Six generations started: each has a queue time and a first token.
    assert count("vlm_queue_time_seconds_count", model="noise") == 6
    assert count("vlm_time_to_first_token_seconds_count", model="noise") == 6
    # One latency per token after each generation's first; the cancelled one ran to some token.
    assert count("vlm_inter_token_latency_seconds_count", model="noise") >= tokens - 5
    # Some decode steps ran more than one row.
    steps = count("vlm_batch_size_count", model="noise")
    assert steps > 0 and count("vlm_batch_size_bucket", model="noise", le="1.0") < steps
    assert count("vlm_active_streams") == 0 and count("vlm_queue_depth", model="noise") == 0
    assert count("vlm_running_requests", model="noise") == 0

    # End to end, by final status: every call observed once, the refused one too.
    assert count("vlm_request_duration_seconds_count", method="Caption", code="OK") == 4
    assert count("vlm_request_duration_seconds_count", method="Query", code="OK") == 1
    assert count("vlm_request_duration_seconds_count", method="Caption", code="INVALID_ARGUMENT") == 1
    assert count("vlm_request_duration_seconds_count", method="Caption", code="CANCELLED") == 1
    slowest = max(a[-1].usage.total_time_ms for a in answers) / 1000
    assert slowest <= count("vlm_request_duration_seconds_sum", method="Caption", code="OK")
    # Prompt tokens of the six generations: the five captions share one prompt (same image, length).
    caption_prompt = answers[0][-1].usage.prompt_tokens
    assert all(a[-1].usage.prompt_tokens == caption_prompt for a in answers)
    assert count("vlm_prompt_tokens_total", model="noise") == 5 * caption_prompt + query[-1].usage.prompt_tokens
    # Finish reasons of the generations that ran to their end (not the cancelled one).
    reasons = [pb.FinishReason.Name(a[-1].finish_reason).removeprefix("FINISH_REASON_").lower() for a in answers]
    reasons.append(pb.FinishReason.Name(query[-1].finish_reason).removeprefix("FINISH_REASON_").lower())
    for reason in ("stop", "length", "stop_sequence"):
        assert count("vlm_finish_reasons_total", model="noise", reason=reason) == reasons.count(reason)
    # One image in every request: the first generation computes it, the five after it reuse it.
    for kind in ("preprocessing", "features"):
        assert count("vlm_image_cache_misses_total", model="noise", kind=kind) == 1
        assert count("vlm_image_cache_hits_total", model="noise", kind=kind) == 5


def test_gauges_while_one_stream_runs_and_one_waits(metered):
    """The gauges are read from the engine at each scrape: with one request running (held by the step
    gate at its admission) and one waiting behind it, they say so; then they drop back to zero."""
    server, port = metered
    model = (("model", "noise"),)
    scheduler = server.engine.models["noise"].scheduler
    with StepGate(scheduler, closed=True) as gate, server.channel() as channel:
        stub = server.stub(channel)
        running = stub.Caption(caption_request(max_new_tokens=5))
        gate.wait_held()  # the scheduler holds the first request: the next one waits in the queue
        waiting = stub.Caption(caption_request(max_new_tokens=5))
        wait_for(lambda: scheduler.queue_depth == 1)
        during = scrape(port)
        gate.open()
        assert list(running)[-1].usage.completion_tokens == list(waiting)[-1].usage.completion_tokens == 5
    assert during[("vlm_running_requests", model)] == 1
    assert during[("vlm_queue_depth", model)] == 1
    assert during[("vlm_active_streams", ())] == 2
    wait_idle(server.engine)
    wait_for(lambda: server.engine.open_streams == 0)
    after = scrape(port)
    assert after[("vlm_running_requests", model)] == after[("vlm_queue_depth", model)] == 0
    assert after[("vlm_active_streams", ())] == 0


def test_each_requests_phases_are_measured_once_from_its_timeline(cache_dir, noise_dir):
    """One request timeline feeds Prometheus and the spans (chunked prefill on, so a prompt takes several
    stop checks before its first token):

    - a request cancelled after its processor chunk and before the rest of its prefill has a queue time
      and nothing else: no first token (histogram or decode span), no inter-token latency, no token
      after its end (no decode step ran for it), and its unrun prompt is not counted;
    - requests that run to their end have exactly one inter-token latency per token after their first:
      prefill chunks and stop checks are not tokens.

    Before the timeline, the stop check recorded both the latency and the tokens after the end, and a
    request stopped while joining got a first-token span and its prompt counted."""
    spans = RecordedSpans()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    port = free_port()
    settings = Settings(models=[f"noise={noise_dir}"], cache_dir=cache_dir, metrics_port=port, chunked_prefill="on")
    server = ServerThread(settings, tracer_provider=provider)
    server.wait_ready()
    try:
        scheduler = server.engine.models["noise"].scheduler
        gate = StepGate(scheduler)
        gate.hold_when = lambda job: job.request.request_id == "victim" and gate.steps_of(job) >= 2
        with server.channel() as channel:
            stub = server.stub(channel)
            call = stub.Caption(caption_request(max_new_tokens=50), metadata=(("x-request-id", "victim"),))
            victim = gate.wait_held()
            assert victim.request.request_id == "victim"
            call.cancel()
            wait_for(lambda: victim.cancelled, message="the cancel never reached the job")
            gate.remove()
            wait_idle(server.engine)
            first = scrape(port)

            def count(sample, name, **labels):
                return sample.get((name, tuple(sorted(labels.items()))), 0.0)

            assert count(first, "vlm_queue_time_seconds_count", model="noise") == 1, "it started"
            assert count(first, "vlm_time_to_first_token_seconds_count", model="noise") == 0
            assert count(first, "vlm_inter_token_latency_seconds_count", model="noise") == 0
            assert count(first, "vlm_tokens_after_rpc_end_total", model="noise") == 0
            assert count(first, "vlm_prompt_tokens_total", model="noise") == 0, "its prompt never ran"
            assert count(first, "vlm_generated_tokens_total", model="noise") == 0
            phases = spans.wait_for(
                lambda found: any(s.name == "prefill" and s.attributes.get("vlm.request_id") == "victim" for s in found)
            )
            mine = [
                s for s in phases if s.attributes.get("vlm.request_id") == "victim" and s.kind is not SpanKind.SERVER
            ]
            assert sorted(s.name for s in mine) == ["prefill", "queue"], [s.name for s in mine]
            assert next(s for s in mine if s.name == "prefill").attributes.get("vlm.cancelled") is True

            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(lambda n: list(stub.Caption(caption_request(max_new_tokens=n))), [5, 9, 13]))
            wait_idle(server.engine)
        second = scrape(port)
        completions = [a[-1].usage.completion_tokens for a in answers]
        latencies = count(second, "vlm_inter_token_latency_seconds_count", model="noise")
        assert latencies == sum(completions) - 3, f"{latencies} latencies for answers of {completions} tokens"
        assert count(second, "vlm_time_to_first_token_seconds_count", model="noise") == 3
        assert count(second, "vlm_tokens_after_rpc_end_total", model="noise") == 0
        prompts = sum(a[-1].usage.prompt_tokens for a in answers)
        assert count(second, "vlm_prompt_tokens_total", model="noise") == prompts
        assert count(second, "vlm_generated_tokens_total", model="noise") == sum(completions)
    finally:
        server.stop()
