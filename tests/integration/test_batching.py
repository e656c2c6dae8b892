"""Continuous batching on a real server: concurrent requests to one model share decode steps, and
each stream is still exactly what the same request gets alone."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest

from tests.helpers import StepCounter, caption_request, query_request, shape_image, wait_idle
from vlm.v1 import vlm_service_pb2 as pb

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "red"]
# Different sizes give SmolVLM different numbers of image tiles, so prompts differ in length and the
# batch's left padding is exercised.
SIZES = [(64, 64), (200, 90), (90, 200), (48, 150), (320, 240), (100, 100), (150, 48), (77, 133)]


def mixed_requests(model: str, tokens: list[int], **options) -> list:
    """Captions and Queries on different images, with their own token budgets."""
    out = []
    for i, (colour, size, budget) in enumerate(zip(COLOURS, SIZES, tokens, strict=False)):
        image = shape_image(colour, size=size)
        if i % 2:
            out.append(caption_request(image, model=model, max_new_tokens=budget, **options))
        else:
            out.append(query_request("What colour is the shape?", image, model=model, max_new_tokens=budget, **options))
    return out


def run(server, request, delay: float = 0.0) -> tuple[str, pb.CaptionResponse]:
    """One RPC on its own channel: (its text, its last message)."""
    time.sleep(delay)
    with server.channel() as channel:
        stub = server.stub(channel)
        method = stub.Query if isinstance(request, pb.QueryRequest) else stub.Caption
        messages = list(method(request))
    return "".join(m.text for m in messages), messages[-1]


def run_together(server, requests, stagger: float = 0.0) -> list[tuple[str, pb.CaptionResponse]]:
    """All requests at once (each a little after the previous one when ``stagger`` is set)."""
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(run, server, r, i * stagger) for i, r in enumerate(requests)]
        return [f.result(timeout=120) for f in futures]


@pytest.mark.parametrize("stagger", [0.0, 0.005], ids=["together", "joining-mid-batch"])
def test_concurrent_greedy_streams_share_decode_steps_and_equal_their_answers_alone(smolvlm_server, stagger):
    """Eight greedy requests of different lengths and prompt sizes, run at once (or joining a running
    batch one after another), each get exactly the text they get alone, in far fewer forward passes."""
    tokens = [60, 24, 90, 40, 75, 10, 50, 33]
    requests = mixed_requests("noise", tokens)
    alone = [run(smolvlm_server, r) for r in requests]
    assert [last.usage.completion_tokens for _, last in alone] == tokens  # random weights never stop early

    backend = smolvlm_server.engine.models["noise"].backend
    wait_idle(smolvlm_server.engine)
    counter = StepCounter(backend.model)
    try:
        together = run_together(smolvlm_server, requests, stagger)
        wait_idle(smolvlm_server.engine)
    finally:
        counter.remove()
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert [last.usage.completion_tokens for _, last in together] == tokens
    assert all(last.finish_reason == pb.FINISH_REASON_LENGTH for _, last in together)
    # Alone, every token but the last costs one forward pass (the prefill makes the first): 382 in all.
    # Started together, rows share their decode steps: the longest answer's steps plus the prefills,
    # with room for rows prefilled a step late. Joining one by one, they still overlap for most steps.
    bound = max(tokens) + len(tokens) + 20 if not stagger else sum(tokens) // 2
    assert counter.count <= bound, f"{counter.count} forward passes (alone: {sum(tokens)})"


def test_the_trained_model_answers_the_same_in_a_batch(smolvlm_server):
    """The demo model still sees in a batch: each colour answer is right and equal to its answer alone."""
    requests = [
        query_request("What colour is the shape?", shape_image(c, size=s), max_new_tokens=20)
        for c, s in zip(COLOURS, SIZES, strict=True)
    ]
    alone = [run(smolvlm_server, r)[0] for r in requests]
    together = [text for text, _ in run_together(smolvlm_server, requests)]
    assert together == alone
    assert sum(f"is {c}." in text for c, text in zip(COLOURS, together, strict=True)) >= 6


def test_seeded_sampling_in_a_batch_equals_the_same_seed_alone(smolvlm_server):
    """Each row samples with its own generator: a seeded request gets the same text whatever it shares a
    batch with (greedy rows, rows with other seeds, a repetition penalty)."""
    requests = mixed_requests("noise", [30] * 6, temperature=1.3, top_p=0.9)
    for i, request in enumerate(requests):
        request.options.seed = 100 + i
    requests[1].options.repetition_penalty = 1.5
    requests[2].options.top_k = 5
    requests.append(caption_request(shape_image("blue"), model="noise", max_new_tokens=30))  # greedy
    alone = [run(smolvlm_server, r)[0] for r in requests]
    together = [text for text, _ in run_together(smolvlm_server, requests)]
    assert together == alone
    assert len(set(together)) == len(together), "different seeds and images should give different texts"


def test_a_cancelled_row_leaves_the_batch_and_the_others_go_on(smolvlm_server):
    """One of four long streams is cancelled mid-batch: it stops costing compute at once (the batch's
    steps after it are the other rows'), and the other three still finish with their answers alone."""
    requests = mixed_requests("noise", [300, 300, 300, 120])
    alone = [run(smolvlm_server, r)[0] for r in requests[1:]]
    wait_idle(smolvlm_server.engine)
    worker = smolvlm_server.engine.models["noise"].worker
    cancelled_running = threading.Event()
    results: list = [None] * 3

    def cancelled():
        with smolvlm_server.channel() as channel:
            call = smolvlm_server.stub(channel).Query(requests[0])
            received = 0
            for message in call:
                received += bool(message.text)
                if received == 20:
                    call.cancel()
                    break
            cancelled_running.set()
            return call

    def other(i):
        results[i] = run(smolvlm_server, requests[i + 1])

    threads = [threading.Thread(target=other, args=(i,)) for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(cancelled)
        for thread in threads:
            thread.start()
        call = future.result(60)
        assert cancelled_running.wait(5)
        # The cancelled row leaves within a step or two; the three others are still running then.
        deadline = time.monotonic() + 5
        while worker.running > 3:
            assert time.monotonic() < deadline, "the cancelled row never left the batch"
            time.sleep(0.001)
        for thread in threads:
            thread.join(60)
    assert call.code() == grpc.StatusCode.CANCELLED
    assert [text for text, _ in results] == alone
    assert [last.usage.completion_tokens for _, last in results] == [300, 300, 120]
    wait_idle(smolvlm_server.engine)


def test_a_request_that_joins_gets_its_first_text_before_the_running_rows_finish(smolvlm_server):
    """Continuous batching: a request arriving while a long one runs is admitted between decode steps;
    it does not wait for the long answer to end."""
    long_call_done = threading.Event()

    def long_one():
        try:
            return run(smolvlm_server, caption_request(shape_image("red"), model="noise", max_new_tokens=1500))
        finally:
            long_call_done.set()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(long_one)
        deadline = time.monotonic() + 10
        while smolvlm_server.engine.models["noise"].worker.running < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        text, last = run(smolvlm_server, caption_request(shape_image("blue"), model="noise", max_new_tokens=5))
        joined_before_the_end = not long_call_done.is_set()
        future.result(60)
    assert last.usage.completion_tokens == 5 and text
    assert joined_before_the_end, "the short request waited for the long one to finish"
