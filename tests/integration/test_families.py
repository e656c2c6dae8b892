"""Every family behind one contract: a real server serving tiny-smolvlm, tiny-qwen2-vl and
tiny-moondream (remote code) on 127.0.0.1:0."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
import torch

from tests.helpers import (
    StepCounter,
    caption_request,
    end_after_chunks,
    keep_up,
    query_request,
    run_as_one_batch,
    run_rpc,
    shape_image,
    steps_with_more_rows_than,
    wait_idle,
)
from vlm.v1 import vlm_service_pb2 as pb
from vlm_service.backends.detokenizer import IncrementalDetokenizer
from vlm_service.backends.hf import TransformersBackend
from vlm_service.backends.moondream import LENGTHS as MOONDREAM_LENGTHS
from vlm_service.core.text import TextAssembler, clean_answer
from vlm_service.types import CaptionLength, GenerationRequest, SamplingParams, Task

FAMILIES = {"tiny-smolvlm": "smolvlm", "tiny-qwen2-vl": "qwen2-vl", "tiny-moondream": "moondream"}
MODELS = list(FAMILIES)


@pytest.fixture
def stub(families_server):
    with families_server.channel() as channel:
        yield families_server.stub(channel)


def backend_of(server, name):
    return server.engine.models[name].backend


def reference(server, name, task, image, question="", length=CaptionLength.NORMAL, max_new_tokens=40, language="en"):
    """The non-streamed answer for the same greedy request, computed in-process."""
    backend = backend_of(server, name)
    if isinstance(backend, TransformersBackend):
        request = GenerationRequest(
            "ref", name, task, image, SamplingParams(max_new_tokens), question, length, language
        )
        inputs = backend.prepare(request)
        with torch.inference_mode():
            output = backend.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        raw = backend.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    else:
        settings = {"temperature": 0.0, "max_tokens": max_new_tokens}
        # The published encode_image reads settings["variant"] (KeyError without it): encode first.
        encoded = backend.model.encode_image(image)
        if task is Task.CAPTION:
            raw = backend.model.caption(encoded, length=MOONDREAM_LENGTHS[length], settings=settings)["caption"]
        else:
            raw = backend.model.query(encoded, question, settings=settings)["answer"]
    return clean_answer(raw, (), type(backend).role_prefixes)[0]


def text_of(messages):
    return "".join(m.text for m in messages)


@pytest.mark.parametrize("name", MODELS)
def test_list_models_names_every_family(stub, name):
    infos = {info.name: info for info in stub.ListModels(pb.ListModelsRequest()).models}
    assert len(infos) == 6 and infos["tiny-smolvlm"].is_default
    info = infos[name]
    assert info.family == FAMILIES[name] and info.ready and info.context_length > 0
    assert info.source.endswith(f"{name}-v1") or name in info.source
    assert "en" in info.response_languages
    if name == "tiny-qwen2-vl":
        assert list(info.response_languages) == ["en", "ja", "zh", "ko"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("length", [pb.CAPTION_LENGTH_SHORT, pb.CAPTION_LENGTH_LONG])
def test_caption_stream_equals_the_non_streamed_answer(families_server, stub, name, length):
    image = shape_image("blue", size=(90, 60))
    messages = list(stub.Caption(caption_request(image, model=name, length=length, max_new_tokens=40)))
    domain_length = {pb.CAPTION_LENGTH_SHORT: CaptionLength.SHORT, pb.CAPTION_LENGTH_LONG: CaptionLength.LONG}[length]
    assert text_of(messages) == reference(families_server, name, Task.CAPTION, image, length=domain_length)
    assert text_of(messages), "the stream carries text"
    assert all(m.text for m in messages[:-1]), "no empty messages"
    assert messages[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


@pytest.mark.parametrize("name", MODELS)
def test_query_stream_equals_the_non_streamed_answer(families_server, stub, name):
    image = shape_image("green", size=(60, 110))
    question = "What colour is the shape?"
    messages = list(stub.Query(query_request(question, image, model=name, max_new_tokens=30)))
    # Content only: a six-token answer written in milliseconds may pile up unread and leave as one
    # message, as the streaming guarantees allow; granularity is tested below, where it is defined.
    assert text_of(messages) == reference(families_server, name, Task.QUERY, image, question, max_new_tokens=30)


def per_token_deltas(server, name, image, max_new_tokens):
    """The text a per-token stream sends for this greedy caption: one delta per model step, computed
    in-process (the ids of ``model.generate``, or the pieces of Moondream's own stream)."""
    backend = backend_of(server, name)
    if isinstance(backend, TransformersBackend):
        request = GenerationRequest(
            "ref", name, Task.CAPTION, image, SamplingParams(max_new_tokens), "", CaptionLength.LONG
        )
        inputs = backend.prepare(request)
        with torch.inference_mode():
            output = backend.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        detokenizer = IncrementalDetokenizer(backend.tokenizer)
        pieces = [detokenizer.add_token(i) for i in output[0, inputs["input_ids"].shape[1] :].tolist()]
        pieces.append(detokenizer.finish())
    else:
        settings = {"temperature": 0.0, "top_p": 1.0, "max_tokens": max_new_tokens}
        encoded = backend.model.encode_image(image)
        pieces = list(backend.model.caption(encoded, length="long", stream=True, settings=settings)["caption"])
    assembler = TextAssembler((), type(backend).role_prefixes)
    deltas = [assembler.push(piece) for piece in pieces] + [assembler.finish()]
    return [delta for delta in deltas if delta]


@pytest.mark.parametrize("family", list(FAMILIES.values()))
def test_a_reader_that_keeps_up_gets_one_message_per_token(families_server, stub, family):
    """Streaming granularity where it is defined: a long answer (random weights), read by a reader that
    keeps up. The scheduler is paced to its RPC (each decode step waits until the handler has taken the
    text sent so far, the ``keep_up`` step gate), so no text piles up: every message but the last is
    exactly one token's text, and the last is at most the final token's text and the decoder's tail."""
    name = f"noise-{family}"
    image = shape_image("red", size=(120, 70))
    # Moondream's code streams whole words, and random weights write long runs without a space: it
    # needs more tokens for as many messages.
    budget = 1000 if family == "moondream" else 120
    scheduler = families_server.engine.models[name].scheduler
    wait_idle(families_server.engine)
    scheduler.step_gate = keep_up
    try:
        request = caption_request(image, model=name, length=pb.CAPTION_LENGTH_LONG, max_new_tokens=budget)
        messages = list(stub.Caption(request))
    finally:
        scheduler.step_gate = None
    texts = [m.text for m in messages if m.text]
    deltas = per_token_deltas(families_server, name, image, budget)
    assert "".join(texts) == "".join(deltas)
    assert len(deltas) >= 20, "random weights should write a long answer"
    assert texts[:-1] == deltas[: len(texts) - 1], "a message carried more (or less) than one token's text"
    assert len(texts) >= len(deltas) - 2


@pytest.mark.parametrize("name", MODELS)
def test_max_new_tokens_is_exact(families_server, stub, name):
    backend = backend_of(families_server, name)
    wait_idle(families_server.engine)
    counter = StepCounter(backend.model)
    try:
        messages = list(stub.Caption(caption_request(model=name, max_new_tokens=3, length=pb.CAPTION_LENGTH_LONG)))
    finally:
        counter.remove()
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert messages[-1].usage.completion_tokens == 3
    # prefill + 2 more decode steps produce 3 tokens (the last token needs no forward pass); Moondream's
    # published code runs one more decode step after its last token, whose result it never reads.
    assert counter.count == 3 + (FAMILIES[name] == "moondream")


@pytest.mark.parametrize("name", MODELS)
def test_seed_makes_sampling_reproducible(stub, name):
    def sample(seed):
        request = caption_request(model=name, max_new_tokens=16, temperature=3.0, seed=seed)
        return text_of(stub.Caption(request))

    first = sample(11)
    assert sample(11) == first
    assert any(sample(seed) != first for seed in (12, 13, 14))


@pytest.mark.parametrize("family", list(FAMILIES.values()))
def test_cancel_stops_generation(families_server, stub, family):
    name = f"noise-{family}"  # random weights: it talks on instead of ending its answer
    call, received, at_cancel, steps = end_after_chunks(families_server, stub, name)
    assert received == 3 and call.code() == grpc.StatusCode.CANCELLED
    # Counted from the server's side of the cancel: the step that was running may finish, no other.
    assert steps - at_cancel <= 1, f"{steps - at_cancel} decode steps ran after the server had the cancel"
    assert steps < 1500, "the generation ran to its budget"


@pytest.mark.parametrize("name", MODELS)
def test_a_seed_never_touches_the_global_random_state(stub, name):
    """Sampled requests, seeded or not, draw from generators of their own: torch's process-wide random
    state (which this in-process server shares with the test) is exactly where it was."""
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    for options in ({"seed": 7}, {}):
        assert text_of(stub.Caption(caption_request(model=name, max_new_tokens=12, temperature=1.5, **options)))
    assert torch.equal(torch.random.get_rng_state(), state), "a request moved the global random state"


def test_greedy_rows_of_a_long_qwen2_vl_batch_equal_their_answers_alone(families_server):
    """Batch equality where drift would show: random-weights Qwen2-VL (each row has its own multimodal
    RoPE offset) decoding a few hundred tokens, four prompts of different lengths in one batch."""
    name = "noise-qwen2-vl"
    sizes, tokens = [(64, 64), (200, 90), (90, 200), (320, 240)], [300, 200, 250, 150]
    requests = [
        caption_request(shape_image("blue", size=size), model=name, max_new_tokens=budget)
        for size, budget in zip(sizes, tokens, strict=True)
    ]
    alone = [run_rpc(families_server, r) for r in requests]
    assert [last.usage.completion_tokens for _, last in alone] == tokens  # random weights never stop early
    engine = families_server.engine
    batched_before = steps_with_more_rows_than(engine, name, 3)
    together = run_as_one_batch(families_server, name, requests)
    assert steps_with_more_rows_than(engine, name, 3) - batched_before >= 100, "the four rows never ran as one batch"
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert [last.usage.completion_tokens for _, last in together] == tokens


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-moondream"])
def test_concurrent_requests_equal_sequential_ones(families_server, name):
    """Eight concurrent greedy requests with different images return what they return one at a time
    (Qwen2-VL decodes them as one batch; Moondream queues them)."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "red"]
    sizes = [(64, 64), (200, 90), (90, 200), (48, 150), (320, 240), (100, 100), (150, 48), (77, 133)]
    requests = [
        caption_request(shape_image(c, size=s), model=name, max_new_tokens=24)
        if i % 2
        else query_request("What colour is the shape?", shape_image(c, size=s), model=name, max_new_tokens=24)
        for i, (c, s) in enumerate(zip(colours, sizes, strict=True))
    ]

    def run(request):
        with families_server.channel() as channel:
            stub = families_server.stub(channel)
            method = stub.Query if isinstance(request, pb.QueryRequest) else stub.Caption
            return text_of(method(request))

    sequential = [run(r) for r in requests]
    if name == "tiny-qwen2-vl":
        batched_before = steps_with_more_rows_than(families_server.engine, name, 6)
        concurrent_answers = [text for text, _ in run_as_one_batch(families_server, name, requests)]
        assert steps_with_more_rows_than(families_server.engine, name, 6) > batched_before, "no batch formed"
    else:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            concurrent_answers = list(pool.map(run, requests))
    assert concurrent_answers == sequential
    assert len(set(sequential)) > 1, "different images should get different answers"


def test_unsupported_options_and_languages_name_the_field(stub):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Caption(caption_request(model="tiny-moondream", top_k=5)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "options.top_k" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Caption(caption_request(model="tiny-qwen2-vl", response_language="fr")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "supported: en, ja, zh, ko" in info.value.details()
