"""The remote-code loader's parts: weights copied in with every key and shape checked, and a bundled
Hugging Face hub cache used (offline) while a model is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vlm_service.backends.remote_code import (
    cast_weights,
    hub_cache,
    load_weights,
    weight_files,
    weights_dtype,
    write_hub_file,
)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2, dtype=torch.bfloat16)
        self.register_buffer("made_here", torch.arange(4.0), persistent=False)


def weights(**overrides):
    tensors = {"linear.weight": torch.ones(2, 3), "linear.bias": torch.full((2,), 2.0)}
    tensors.update(overrides)
    return {k: v for k, v in tensors.items() if v is not None}


def test_weights_are_copied_into_the_models_dtype_and_buffers_kept(tmp_path):
    save_file(weights(), str(tmp_path / "model.safetensors"))
    model = Small()
    load_weights(model, weight_files(str(tmp_path)))
    assert model.linear.weight.dtype == torch.bfloat16 and model.linear.weight.eq(1).all()
    assert model.linear.bias.eq(2).all()
    assert torch.equal(model.made_here, torch.arange(4.0))
    assert weights_dtype(model) == torch.bfloat16


class FixedInputs(Small):
    """Like Moondream2's code: it makes its inputs in the dtype it fixes (bfloat16), whatever the weights."""

    def forward(self, values):
        return self.linear(torch.tensor(values, dtype=torch.bfloat16))


def test_cast_weights_gives_the_asked_dtype_and_fits_the_codes_own_inputs_to_it():
    model = FixedInputs()
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.25, 0.125]]))
        model.linear.bias.fill_(1.0)
    expected = model([[1.0, 1.0, 1.0]])
    assert cast_weights(model, torch.float32)
    assert weights_dtype(model) == torch.float32 and model.linear.bias.dtype == torch.float32
    assert model.made_here.dtype == torch.float32 and torch.equal(model.made_here, torch.arange(4.0))
    out = model([[1.0, 1.0, 1.0]])
    assert out.dtype == torch.float32 and torch.equal(out, expected.float())
    assert not cast_weights(model, torch.float32), "nothing left to cast"


def test_without_the_input_cast_such_code_cannot_run_in_another_dtype():
    model = FixedInputs().float()
    with pytest.raises(RuntimeError, match="dtype"):
        model([[1.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"linear.bias": None}, "1 missing"),
        ({"extra": torch.zeros(1)}, "1 unexpected"),
        ({"linear.weight": torch.ones(3, 2)}, r"linear.weight: \(3, 2\) in the file, the model has \(2, 3\)"),
    ],
)
def test_weights_that_do_not_fit_are_refused(tmp_path, overrides, message):
    save_file(weights(**overrides), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        load_weights(Small(), weight_files(str(tmp_path)))


def test_sharded_weights_follow_the_index(tmp_path):
    save_file({"linear.weight": torch.ones(2, 3)}, str(tmp_path / "a.safetensors"))
    save_file({"linear.bias": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    save_file({"stray": torch.ones(1)}, str(tmp_path / "c.safetensors"))  # not in the index
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"linear.weight": "a.safetensors", "linear.bias": "b.safetensors"}}'
    )
    files = weight_files(str(tmp_path))
    assert [f.name for f in files] == ["a.safetensors", "b.safetensors"]
    load_weights(Small(), files)


def test_a_directory_without_weights_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        weight_files(str(tmp_path))


def test_a_bundled_hub_cache_serves_files_by_repo_name_offline(tmp_path):
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    write_hub_file(tmp_path / "hub", "acme/words", "tokenizer.json", b"{}")
    before = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    with hub_cache(tmp_path / "hub"):
        path = hf_hub_download("acme/words", "tokenizer.json")
        assert Path(path).read_bytes() == b"{}"
    assert before == (constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)
    with hub_cache(tmp_path / "empty"), pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("acme/words", "tokenizer.json")
