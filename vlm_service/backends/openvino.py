"""A vision encoder's layers run by OpenVINO's CPU runtime instead of PyTorch (``--vision-runtime``).

On a CPU, a picture's prefill is mostly its vision encoder (SmolVLM-256M: 12 layers over 1,024
patches a view), and OpenVINO runs those layers faster than PyTorch's eager kernels (docs/performance.md:
1.32x a group of three layers, 1.47x the whole encoder, bfloat16 both, on this project's 2-core CPU).
Only the encoder's layers move: the patch embeddings, the post-layernorm and the connector stay in
PyTorch (they are a small part of the work), so the backend's prefill keeps its chunks: a group of
layers is one OpenVINO model, converted from the loaded PyTorch layers with ``openvino.convert_model``
(no export step, nothing downloaded) the first time the group runs, and compiled for the CPU.

The models compute in the PyTorch model's dtype (OpenVINO's inference precision set to match: bfloat16
for a bfloat16 model, float32 for a float32 one). Their numbers are not PyTorch's to the last bit (other
kernels, other rounding), but depend on the request alone, so a request's answer is the same alone as
in a batch, as with PyTorch's layers.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch


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
        # and outputs are then declared float32, so OpenVINO converts at its edges, and the inference
        # precision says in which dtype it computes.
        group = _Layers(self._layers[start:stop]).eval()
        width = _width(self._layers[start])
        example = (torch.zeros(1, 4, width, dtype=self._dtype), torch.ones(1, 1, 4, 4, dtype=torch.bool))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the tracer's notes on shape checks
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation (the converter's)
            model = self._openvino.convert_model(group, example_input=example)
        edges = self._openvino.preprocess.PrePostProcessor(model)
        edges.input(0).tensor().set_element_type(self._openvino.Type.f32)
        edges.output(0).tensor().set_element_type(self._openvino.Type.f32)
        precision = "bf16" if self._dtype == torch.bfloat16 else "f32"
        return self._core.compile_model(
            edges.build(), "CPU", {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": self._threads}
        )


def _width(layer: torch.nn.Module) -> int:
    """The hidden size a layer takes (its first LayerNorm's)."""
    for module in layer.modules():
        if isinstance(module, torch.nn.LayerNorm):
            return module.normalized_shape[0]
    raise ValueError(f"{type(layer).__name__} has no LayerNorm to read its width from")
