"""Continuous batching on a real server: concurrent requests to one model share decode steps, and
each stream is still exactly what the same request gets alone."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from tests.helpers import (
    StepCounter,
    StepGate,
    caption_request,
    query_request,
    request_id,
    run_as_one_batch,
    run_rpc,
    sample,
    shape_image,
    steps_with_more_rows_than,
    wait_for,
    wait_idle,
)
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
    """One RPC on its own channel, started after ``delay`` seconds: (its text, its last message)."""
    time.sleep(delay)
    return run_rpc(server, request)


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
    engine = smolvlm_server.engine
    batched_before = steps_with_more_rows_than(engine, "tiny-smolvlm", 6)
    together = [text for text, _ in run_as_one_batch(smolvlm_server, "tiny-smolvlm", requests)]
    assert steps_with_more_rows_than(engine, "tiny-smolvlm", 6) > batched_before, "the eight never ran as one batch"
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
    engine = smolvlm_server.engine
    batched_before = steps_with_more_rows_than(engine, "noise", 6)
    together = [text for text, _ in run_as_one_batch(smolvlm_server, "noise", requests)]
    assert steps_with_more_rows_than(engine, "noise", 6) - batched_before >= 20, "the seven never ran as one batch"
    assert together == alone
    assert len(set(together)) == len(together), "different seeds and images should give different texts"


def test_a_cancelled_row_leaves_the_batch_and_the_others_go_on(smolvlm_server):
    """One of four long streams in one batch is cancelled: counted in decode steps from the server's
    side of the cancel, its row leaves the batch within two steps, while the other three go on and
    finish with their answers alone."""
    requests = mixed_requests("noise", [300, 300, 300, 120])
    alone = [run(smolvlm_server, r)[0] for r in requests[1:]]
    engine = smolvlm_server.engine
    served = engine.models["noise"]
    cancelled_before = sample(engine, "vlm_requests_total", method="Query", code="CANCELLED")
    wait_idle(engine)
    with StepGate(served.scheduler, served.backend.model) as gate, smolvlm_server.channel() as channel:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            try:
                others = [pool.submit(run, smolvlm_server, r) for r in requests[1:]]
                call = smolvlm_server.stub(channel).Query(requests[0])
                cancelled_id = request_id(call)
                received = 0
                for message in call:
                    received += bool(message.text)
                    if received >= 20 and len(gate.jobs()) == 4:  # all four rows are in the batch
                        break
                gate.close()
                call.cancel()
                gate.wait_held()
                cancelled = next(j for j in gate.jobs() if j.request.request_id == cancelled_id)
                wait_for(lambda: cancelled.cancelled, message="the server never stopped the cancelled job")
                at_cancel, mark = gate.forward_passes, len(gate.trace)
                gate.open()
                results = [future.result(120) for future in others]
            finally:
                gate.open()  # also when an assertion fails: the pool waits for the other rows
        steps = gate.forward_passes
        after = gate.trace[mark:]
    # The first stop check that sees three running rows tells when the cancelled row had left.
    left_at = next(passes for _, passes, running in after if running <= 3)
    assert left_at - at_cancel <= 2, f"the cancelled row stayed {left_at - at_cancel} decode steps"
    assert steps - at_cancel >= 100, "the other rows should go on decoding after the cancel"
    assert [text for text, _ in results] == alone
    assert [last.usage.completion_tokens for _, last in results] == [300, 300, 120]
    # The server, not only the client, ended that RPC as CANCELLED.
    wait_for(lambda: sample(engine, "vlm_requests_total", method="Query", code="CANCELLED") == cancelled_before + 1)
    wait_idle(engine)


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
        while smolvlm_server.engine.models["noise"].scheduler.running < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        text, last = run(smolvlm_server, caption_request(shape_image("blue"), model="noise", max_new_tokens=5))
        joined_before_the_end = not long_call_done.is_set()
        future.result(60)
    assert last.usage.completion_tokens == 5 and text
    assert joined_before_the_end, "the short request waited for the long one to finish"
