"""The sizes of the model this remote code builds, and the dtype it fixes for its weights.

Like Moondream2's published code, the sizes come from the code, never from ``config.json``
(``HfConfig`` resets ``self.config`` to ``{}``). ``tiny-moondream`` ships this file as it is; the
``moondream2-shapes`` twin ships a generated one with Moondream2's published figures.
"""

import torch

DTYPE = torch.float32
TEXT = {"dim": 64, "ff_dim": 256, "n_layers": 2, "vocab_size": 1024, "max_context": 2048, "n_heads": 4, "n_kv_heads": 4}
VISION = {
    "enc_dim": 64,
    "enc_patch_size": 8,
    "enc_n_layers": 1,
    "enc_ff_dim": 256,
    "enc_n_heads": 4,
    "proj_out_dim": 64,
    "crop_size": 32,
    "max_crops": 4,
    "proj_inner_dim": 256,
}
REGION = {
    "dim": 64,
    "coord_feat_dim": 32,
    "coord_out_dim": 64,
    "size_feat_dim": 32,
    "size_out_dim": 128,
    "inner_dim": 128,
}
