"""``HfConfig`` and ``HfMoondream``: the transformers face of the model, shipped as *remote code* in its
checkpoint (``config.json``'s ``auto_map`` points here) like ``vikhyatk/moondream2``.

Written by vlm-service to behave as Moondream2's published ``hf_moondream.py`` (revision 2025-06-21)
does, faults included, so that the service's loader is tested against what users run:

* ``HfMoondream.__init__`` never calls ``self.post_init()`` (transformers 5's ``from_pretrained``
  needs what it sets);
* ``HfConfig.__init__`` sets ``self.config = {}`` after the base class read ``config.json``, so the
  sizes are the code's own;
* the API (``encode_image``, ``caption``, ``query``, ``detect``, ``point``) is reached through properties
  that set up the KV caches on first use.
"""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

from .config import MoondreamConfig
from .moondream import EncodedImage, MoondreamModel  # noqa: F401  (EncodedImage: part of the API)


class HfConfig(PretrainedConfig):
    _auto_class = "AutoConfig"
    model_type = "moondream1"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.config = {}


class HfMoondream(PreTrainedModel):
    _auto_class = "AutoModelForCausalLM"
    config_class = HfConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = MoondreamModel(MoondreamConfig.from_dict(config.config), setup_caches=False)
        self._is_kv_cache_setup = False

    def _setup_caches(self) -> None:
        if not self._is_kv_cache_setup:
            self.model._setup_caches()
            self._is_kv_cache_setup = True

    @property
    def encode_image(self):
        self._setup_caches()
        return self.model.encode_image

    @property
    def caption(self):
        self._setup_caches()
        return self.model.caption

    @property
    def query(self):
        self._setup_caches()
        return self.model.query

    @property
    def detect(self):
        self._setup_caches()
        return self.model.detect

    @property
    def point(self):
        self._setup_caches()
        return self.model.point
