"""moondream2-shapes: the published sizes go into the code it ships, and the output rows it must never
write are exactly the special tokens, the ids past its tokenizer and the tokens that are not whole
printable words. (The 3.9 GB twin itself is built and served by hand; see docs/models.md, "Real-size twins".)"""

from __future__ import annotations

import runpy

from vlm_checkpoints import moondream2_shapes as twin
from vlm_checkpoints.builder import train_byte_level_bpe
from vlm_checkpoints.corpus import tokenizer_corpus
from vlm_checkpoints.moondream_remote.config import SPECIAL_TOKENS


def test_the_shipped_sizes_are_the_published_ones_in_bfloat16(tmp_path):
    path = tmp_path / "sizes.py"
    path.write_text(twin.sizes_source())
    sizes = runpy.run_path(str(path))
    assert str(sizes["DTYPE"]) == "torch.bfloat16"
    assert sizes["TEXT"] == {**twin.TEXT} and sizes["TEXT"]["vocab_size"] == 51200 and sizes["TEXT"]["n_layers"] == 24
    assert sizes["VISION"]["enc_n_layers"] == 27 and sizes["VISION"]["crop_size"] == 378
    assert sizes["REGION"] == twin.REGION


def test_silenced_rows_are_specials_fragments_and_ids_past_the_tokenizer():
    tokenizer = train_byte_level_bpe(tokenizer_corpus(), SPECIAL_TOKENS, vocab_size=1024)
    known = tokenizer.get_vocab_size()
    silenced = set(twin.silenced_ids(tokenizer, 2000))
    assert set(range(len(SPECIAL_TOKENS))) <= silenced, "special tokens, the end token among them"
    assert set(range(known, 2000)) <= silenced
    kept = [i for i in range(known) if i not in silenced]
    assert kept and all(twin.is_whole_printable(tokenizer.decode([i])) for i in kept)
    assert all(tokenizer.decode([i]).startswith(" ") for i in kept), "only whole words: the code streams at spaces"
    assert tokenizer.token_to_id("cle") in silenced and tokenizer.token_to_id("Ġred") not in silenced
    fragments = [i for i in range(len(SPECIAL_TOKENS), known) if "\ufffd" in tokenizer.decode([i])]
    assert fragments and set(fragments) <= silenced
