"""SmolVLM's vision encoder layers and its decode steps run by OpenVINO's CPU runtime instead of
PyTorch (``--openvino``).

On a CPU, a picture's prefill is mostly its vision encoder (SmolVLM-256M: 12 layers over 1,024 patches
a view), and a stream's pace is its decode step; OpenVINO runs both faster than PyTorch's eager kernels
(docs/performance.md). What moves, converted from the loaded PyTorch modules with
``openvino.convert_model`` (no export step, nothing downloaded) the first time it runs, then compiled
for the CPU:

- :class:`OpenVINOLayers`: groups of the encoder's layers, one OpenVINO model per group that a
  prefill chunk runs; the patch embeddings, the post-layernorm and the connector stay in PyTorch, so
  the backend's prefill keeps its chunks;
- :class:`OpenVINODecoder`: the language model's decode step, one token for each row of the batch,
  the KV cache passed in and returned (a tensor pair per layer), so the continuous batch merges, pads
  and drops rows of it as before; the prompt's prefill stays in PyTorch.

The models compute in the PyTorch model's dtype (OpenVINO's inference precision set to match: bfloat16
for a bfloat16 model, float32 for a float32 one). Their numbers are not PyTorch's to the last bit
(other kernels, other rounding), and a row's numbers in a batch may differ from the same request's
alone in their last bits as with PyTorch's batched matrices (docs/guarantees.md).
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache


def import_openvino():
    """OpenVINO's runtime module, imported with its telemetry off.

    Importing ``openvino`` imports its model converter, which sends usage events to Google Analytics
    unless the user opted out (``openvino_telemetry``: no consent file counts as consent there). A
    server must not send anything anywhere on its own, so ``openvino_telemetry`` is made unimportable
    for this process before the first import; OpenVINO then uses its own no-op stub. (If something
    else imported ``openvino_telemetry`` first, it stays as it was.)"""
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino

    return openvino


class _Layers(torch.nn.Module):
    """Consecutive encoder layers as one module (what is converted): hidden states and the attention
    mask in, hidden states out."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return hidden


class OpenVINOLayers:
    """Runs groups of a PyTorch encoder's layers with OpenVINO, each group converted and compiled once.

    ``layers`` are the encoder's layers, each called as ``layer(hidden, mask)`` with a boolean attention
    mask of shape (batch, 1, patches, patches) (True: attend). ``threads``: OpenVINO's threads for
    inference (the model's torch threads).
    """

    def __init__(self, layers: Sequence[torch.nn.Module], dtype: torch.dtype, threads: int):
        openvino = import_openvino()
        self._openvino = openvino
        self._core = openvino.Core()
        self._layers = list(layers)
        self._dtype = dtype
        self._threads = max(1, threads)
        self._compiled: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()  # the warm-up and the scheduler may both build a group

    def __call__(self, start: int, stop: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``layers[start:stop]`` over ``hidden`` (batch, patches, width); ``mask`` None: every patch is
        real. Returns hidden states in ``hidden``'s dtype."""
        compiled = self._group(start, stop)
        if mask is None:
            mask = torch.ones((hidden.shape[0], 1, hidden.shape[1], hidden.shape[1]), dtype=torch.bool)
        request = compiled.create_infer_request()
        result = request.infer([hidden.float().numpy(), mask.numpy()], share_inputs=True)
        return torch.from_numpy(result[0].copy()).to(hidden.dtype)

    def _group(self, start: int, stop: int):
        with self._lock:
            compiled = self._compiled.get((start, stop))
            if compiled is None:
                compiled = self._compiled[(start, stop)] = self._convert(start, stop)
            return compiled

    def _convert(self, start: int, stop: int):
        # Converted as the layers are, in their own dtype (no copy of their weights); the model's inputs
        # and outputs are then declared float32, so OpenVINO converts at its edges.
        width = _width(self._layers[start])
        example = (torch.zeros(1, 4, width, dtype=self._dtype), torch.ones(1, 1, 4, 4, dtype=torch.bool))
        model = _converted(self._openvino, _Layers(self._layers[start:stop]).eval(), example)
        edges = self._openvino.preprocess.PrePostProcessor(model)
        edges.input(0).tensor().set_element_type(self._openvino.Type.f32)
        edges.output(0).tensor().set_element_type(self._openvino.Type.f32)
        return _compiled(self._core, edges.build(), self._dtype, self._threads)


class _Step(torch.nn.Module):
    """One decode step of a language model with its head (what is converted): token ids, the attention
    mask and positions, then each layer's cached keys and values; out come the last position's logits
    and each layer's keys and values, one position longer."""

    def __init__(self, text_model: torch.nn.Module, head: torch.nn.Module, layers: int):
        super().__init__()
        self.text_model, self.head, self.layers = text_model, head, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache()
        for index in range(self.layers):
            keys, values = past[2 * index], past[2 * index + 1]
            cache.update(keys[:, :, :0], values[:, :, :0], index)  # an empty layer of the right rank...
            cache.layers[index].keys, cache.layers[index].values = keys, values  # ...then the cache itself
        output = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        out = [self.head(output.last_hidden_state[:, -1])]
        for layer in cache.layers:
            out += [layer.keys, layer.values]
        return tuple(out)


class OpenVINODecoder:
    """A language model's decode step run by OpenVINO: ``(input_ids, attention_mask, position_ids,
    cache) -> (logits, cache)``, as the model's forward pass over one new position per row.

    ``text_model`` takes ``input_ids``, ``attention_mask``, ``position_ids`` and a ``DynamicCache``;
    ``head`` turns its last hidden state into logits. ``threads``: OpenVINO's threads for inference."""

    def __init__(self, text_model: torch.nn.Module, head: torch.nn.Module, dtype: torch.dtype, threads: int):
        self._openvino = import_openvino()
        self._core = self._openvino.Core()
        self._step = _Step(text_model, head, len(text_model.layers)).eval()
        self._dtype = dtype
        self._threads = max(1, threads)
        self._compiled = None
        self._lock = threading.Lock()

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache
    ) -> tuple[torch.Tensor, DynamicCache]:
        past = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        request = self._model(past).create_infer_request()
        inputs = [input_ids.numpy(), attention_mask.numpy(), position_ids.numpy()]
        result = request.infer(inputs + [self._tensor(tensor) for tensor in past], share_inputs=True)
        outputs = [self._torch(result[index]) for index in range(1 + len(past))]
        new = DynamicCache()
        for index in range(len(past) // 2):
            new.update(outputs[1 + 2 * index], outputs[2 + 2 * index], index)
        return outputs[0].float(), new

    def _tensor(self, tensor: torch.Tensor):
        """A cache tensor as OpenVINO takes it, sharing its memory (bfloat16 through its raw bits)."""
        tensor = tensor.contiguous()
        if tensor.dtype != torch.bfloat16:
            return tensor.numpy()
        shape = self._openvino.Shape(list(tensor.shape))
        return self._openvino.Tensor(tensor.view(torch.int16).numpy(), shape, self._openvino.Type.bf16)

    def _torch(self, array) -> torch.Tensor:
        """An output as a torch tensor of its own (the infer request reuses its buffers)."""
        array = np.asarray(array)
        if self._dtype == torch.bfloat16 and array.dtype == np.float16:  # bfloat16's raw bits
            return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(array.copy())

    def _model(self, past: list[torch.Tensor]):
        with self._lock:
            if self._compiled is None:
                self._compiled = self._convert(past)
            return self._compiled

    def _convert(self, past: list[torch.Tensor]):
        # Traced on a padded batch of two rows (the mask's general path, not the one for no padding),
        # in the model's own dtype; every dimension but the width stays dynamic.
        heads, width = past[0].shape[1], past[0].shape[3]
        layers = [torch.zeros(2, heads, 4, width, dtype=self._dtype) for _ in past]
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, :2] = 0
        example = (torch.ones(2, 1, dtype=torch.long), mask, torch.tensor([[4], [2]]), *layers)
        return _compiled(self._core, _converted(self._openvino, self._step, example), self._dtype, self._threads)


def _converted(openvino, module: torch.nn.Module, example: tuple):
    """``module`` as an OpenVINO model, traced on ``example`` (its dimensions stay dynamic)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the tracer's notes on shape checks
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation (the converter's)
        return openvino.convert_model(module, example_input=example)


def _compiled(core, model, dtype: torch.dtype, threads: int):
    """``model`` compiled for the CPU, computing in ``dtype`` (OpenVINO's inference precision), on
    ``threads`` threads."""
    precision = "bf16" if dtype == torch.bfloat16 else "f32"
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads})


def _width(layer: torch.nn.Module) -> int:
    """The hidden size a layer takes (its first LayerNorm's)."""
    for module in layer.modules():
        if isinstance(module, torch.nn.LayerNorm):
            return module.normalized_shape[0]
    raise ValueError(f"{type(layer).__name__} has no LayerNorm to read its width from")
