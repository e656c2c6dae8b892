"""The automatic runtime choices: the dtype a model computes in, the torch threads it gets and whether
OpenVINO runs its encoder and decode steps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vlm_service.backends import runtime
from vlm_service.backends.runtime import LARGE_MODEL_PARAMETERS, Runtime, saved_dtype
from vlm_service.core.loading import auto_torch_threads


@pytest.mark.parametrize(
    ("native", "saved", "expected"),
    [
        (True, torch.bfloat16, torch.bfloat16),  # the published checkpoints on a CPU with AVX512-BF16 / AMX
        (True, torch.float32, torch.float32),  # the tiny checkpoints stay in the dtype they were trained in
        (True, None, torch.float32),  # a checkpoint that does not say
        (False, torch.bfloat16, torch.float32),  # bfloat16 matrices are many times slower without the instructions
        (False, torch.float32, torch.float32),
    ],
)
def test_auto_dtype_on_a_cpu_is_bfloat16_only_for_a_bfloat16_checkpoint_on_a_cpu_that_computes_it(
    monkeypatch, native, saved, expected
):
    monkeypatch.setattr(runtime, "native_bfloat16", lambda: native)
    assert Runtime(device="cpu").resolve(saved) == (torch.device("cpu"), expected)


@pytest.mark.parametrize("native", [True, False])
def test_an_explicit_dtype_wins_over_auto(monkeypatch, native):
    monkeypatch.setattr(runtime, "native_bfloat16", lambda: native)
    assert Runtime(device="cpu", dtype="float32").resolve(torch.bfloat16)[1] is torch.float32
    assert Runtime(device="cpu", dtype="bfloat16").resolve(torch.float32)[1] is torch.bfloat16


def test_native_bfloat16_follows_the_cpus_capabilities(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True}, raising=False)
    assert runtime.native_bfloat16()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "avx2": True}, raising=False)
    assert not runtime.native_bfloat16()


def test_saved_dtype_reads_a_config_json(tmp_path):
    from transformers import AutoConfig, LlamaConfig

    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, dtype="bfloat16").save_pretrained(tmp_path)
    assert saved_dtype(AutoConfig.from_pretrained(tmp_path)) is torch.bfloat16
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"  # what files written by transformers 4 say
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert saved_dtype(AutoConfig.from_pretrained(tmp_path)) is torch.float32


@pytest.mark.parametrize(
    ("cpus", "parameters", "expected"),
    [
        (2, 3_000_000, 1),  # a tiny model: a core stays with the gRPC server
        (2, LARGE_MODEL_PARAMETERS - 1, 1),
        (2, LARGE_MODEL_PARAMETERS, 2),
        (2, 256_484_928, 2),  # SmolVLM-256M: compute-bound, every core
        (1, 3_000_000, 1),  # never zero
        (16, 2_208_985_600, 16),
    ],
)
def test_auto_threads_give_a_large_model_every_core_and_a_small_one_all_but_one(cpus, parameters, expected):
    assert auto_torch_threads(cpus, parameters) == expected


def test_the_edge_reads_image_detail_from_captions_queries_and_watch_configs(settings):
    from vlm.v1 import vlm_service_pb2 as pb
    from vlm_service.api import convert
    from vlm_service.errors import InvalidInput
    from vlm_service.types import ImageDetail

    assert convert.caption_request(pb.CaptionRequest(), settings).detail is ImageDetail.AUTO
    assert convert.caption_request(pb.CaptionRequest(detail=pb.IMAGE_DETAIL_LOW), settings).detail is ImageDetail.LOW
    query = pb.QueryRequest(question="What colour?", detail=pb.IMAGE_DETAIL_HIGH)
    assert convert.query_request(query, settings).detail is ImageDetail.HIGH
    watch = pb.WatchRequest(config=pb.WatchConfig(question="What colour?", detail=pb.IMAGE_DETAIL_LOW))
    assert convert.watch_config(watch, settings).request.detail is ImageDetail.LOW
    with pytest.raises(InvalidInput) as info:
        convert.watch_config(pb.WatchRequest(config=pb.WatchConfig(detail=7)), settings)
    assert info.value.field == "config.detail" and "unknown image detail 7" in str(info.value)


@pytest.mark.parametrize(
    ("setting", "device", "parameters", "expected"),
    [
        ("auto", "cpu", LARGE_MODEL_PARAMETERS, True),  # a large model on a CPU: compute-bound
        ("auto", "cpu", LARGE_MODEL_PARAMETERS - 1, False),
        ("auto", "cuda", LARGE_MODEL_PARAMETERS, False),
        ("off", "cpu", LARGE_MODEL_PARAMETERS, False),
        ("on", "cpu", 1, True),
    ],
)
def test_openvino_runs_a_large_model_on_a_cpu_or_when_asked(setting, device, parameters, expected):
    runtime = Runtime(openvino=setting)
    assert runtime.uses_openvino(parameters, torch.device(device)) is expected


def test_openvino_asked_for_on_a_gpu_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="runs on a CPU"):
        Runtime(openvino="on").uses_openvino(1, torch.device("cuda"))


def test_openvino_is_imported_with_its_telemetry_off():
    """Importing openvino imports its converter, which would send usage events unless the user opted
    out; the service imports it with openvino_telemetry blocked, so OpenVINO takes its no-op stub. In a
    new interpreter: nothing else may have imported either first."""
    code = (
        "import sys\n"
        "from vlm_service.backends.openvino import import_openvino\n"
        "import_openvino()\n"
        "import openvino.tools.ovc.telemetry_utils as used\n"
        "assert used.tm.__name__ == 'openvino.tools.ovc.telemetry_stub', used.tm.__name__\n"
        "assert sys.modules['openvino_telemetry'] is None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
