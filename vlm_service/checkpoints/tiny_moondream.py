"""``tiny-moondream``: a tiny local *remote-code* checkpoint with Moondream2's published API.

The directory holds ``config.json`` (whose ``auto_map`` points at ``hf_moondream.py``), that Python file,
``tokenizer.json`` and the weights, so the service loads it through the very path it uses for
``vikhyatk/moondream2``: ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .builder import ensure_checkpoint, train_byte_level_bpe
from .corpus import tokenizer_corpus

REMOTE_CODE = Path(__file__).parent / "moondream_remote" / "hf_moondream.py"
SPECIAL_TOKENS = ["<|endoftext|>"]
#: Training on the synthetic shapes; empty means random weights.
TRAIN = {"steps": 1000, "distinct_batches": 200, "lr": 3e-3}


def _build(directory: Path, trained: bool = True) -> None:
    import torch

    from .moondream_remote.hf_moondream import HfConfig, HfMoondream

    tokenizer = train_byte_level_bpe(tokenizer_corpus(), SPECIAL_TOKENS, vocab_size=1024)
    config = HfConfig(vocab_size=tokenizer.get_vocab_size(), eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    torch.manual_seed(0)
    model = HfMoondream(config).eval()
    tokenizer.save(str(directory / "tokenizer.json"))
    model.config._name_or_path = str(directory)  # where the model finds its tokenizer
    if trained and TRAIN:
        from .train import LENGTHS, train

        names = {length: name for name, length in LENGTHS.items()}

        def make_batch(pairs):
            images = [request.image for request, _ in pairs]
            prompts = [
                model.query_prompt(request.question)
                if request.question
                else model.caption_prompt(names[request.length])
                for request, _ in pairs
            ]
            return images, prompts, [" " + answer for _, answer in pairs]

        train(model, make_batch, lambda batch: model.training_loss(*batch), **TRAIN)
    model.save_pretrained(directory)
    shutil.copyfile(REMOTE_CODE, directory / REMOTE_CODE.name)
    config_path = directory / "config.json"
    saved = json.loads(config_path.read_text())
    saved["auto_map"] = {"AutoConfig": "hf_moondream.HfConfig", "AutoModelForCausalLM": "hf_moondream.HfMoondream"}
    saved["architectures"] = ["HfMoondream"]
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def ensure_tiny_moondream(cache_dir: Path, trained: bool = True) -> Path:
    """Return the directory of the tiny Moondream checkpoint, building it on first use."""
    return ensure_checkpoint(cache_dir, "tiny-moondream", _build, trained)
