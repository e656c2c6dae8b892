"""What the real-size twins share: random weights at a published model's shapes that write text.

A real-size twin is a checkpoint with exactly the shapes of a published model (layers, widths, heads,
vocabulary, processor and its tiling) and random weights: it costs what the real model costs to load,
encode and decode, so benchmarks and smoke tests can run at real size with no network. It is not for
accuracy: what it writes is noise.

Random weights write noise in a way that hurts a *streaming* service's benchmark: they pick byte-level
tokens that are fragments of a multi-byte character and never complete one, so a stream holds its text
back until the end; and they pick special tokens (the end token among them) at random.
:func:`silence_unprintable_rows` edits the output layer so that such tokens are never written, and a
twin writes whole printable text to the asked length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

#: Names of the linear layers that write into the language model's residual stream (Llama, Qwen2).
RESIDUAL_WRITERS = ("o_proj", "down_proj")
#: How far below the kept tokens' shift a silenced token's logit is pushed (see silence_unprintable_rows).
SILENCE = 256
#: Characters a written token may hold besides printable ones.
WHITESPACE = frozenset("\n\t")


def is_whole_printable(text: str) -> bool:
    """Whether ``text`` is non-empty text of whole characters (no U+FFFD from a cut multi-byte
    sequence) that prints: no control characters other than newline and tab."""
    return bool(text) and "\ufffd" not in text and all(ch.isprintable() or ch in WHITESPACE for ch in text)


def unprintable_ids(tokenizer, vocab_size: int, keep: Iterable[int] = ()) -> list[int]:
    """The token ids below ``vocab_size`` that a twin must never write: every special or added token,
    every id the tokenizer does not know (the model's vocabulary is often padded beyond it), and every
    token that does not decode, alone, to whole printable text. Ids in ``keep`` are never listed."""
    keep = set(keep)
    known = min(len(tokenizer), vocab_size)
    added = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(known)], clean_up_tokenization_spaces=False)
    silenced = [i for i, text in enumerate(texts) if i in added or not is_whole_printable(text)]
    silenced += range(known, vocab_size)
    return [i for i in silenced if i not in keep]


def silence_unprintable_rows(
    model, tokenizer, keep: Iterable[int] = (), writers: Sequence[str] = RESIDUAL_WRITERS
) -> list[int]:
    """Edit a random-weights language model so that it never writes the tokens of
    :func:`unprintable_ids`; returns those ids.

    With a bias on the output layer, the silenced rows' bias is set far below every other logit. Without
    one (Llama, Qwen2), the last hidden dimension carries the signal: every kept token's input embedding
    holds a small ``+c`` there, and the residual ``writers`` (linear layers named so, whose output is the
    hidden size) write nothing into it, so after the final RMSNorm that dimension is positive wherever a
    kept token stands. Output rows hold ``+c`` there (kept: every kept logit rises by the same small
    amount, their order unchanged, bfloat16's resolution kept) or ``-256c`` (silenced: far below, hundreds of
    standard deviations of the random logits). With tied embeddings a silenced token's input embedding
    holds ``-256c`` too: harmless where it stands inside a prompt, but a prompt must end in a kept token
    (the chat templates of the twins end in text; :func:`check_prompts_end_kept` checks).
    """
    output = model.get_output_embeddings()
    silenced = unprintable_ids(tokenizer, output.weight.shape[0], keep)
    with torch.no_grad():
        if output.bias is not None:
            output.bias[silenced] = output.bias.min() - 1e4
            return silenced
        inputs = model.get_input_embeddings()
        hidden = output.weight.shape[1]
        dim = hidden - 1
        # A quarter of an embedding's squared norm in that one dimension.
        c = 0.5 * float(inputs.weight.float().std()) * hidden**0.5
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in writers and getattr(module, "out_features", None) == hidden:
                module.weight[dim] = 0
                if module.bias is not None:
                    module.bias[dim] = 0
        inputs.weight[:, dim] = c
        output.weight[:, dim] = c
        output.weight[silenced, dim] = -SILENCE * c
    return silenced


def check_prompts_end_kept(tokenizer, prompts: Iterable[str], silenced: Iterable[int]) -> None:
    """Raise ``ValueError`` unless every prompt's last token is a kept one (see
    :func:`silence_unprintable_rows`): a twin's first written token must not be a silenced one."""
    silenced = set(silenced)
    for prompt in prompts:
        last = tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]
        if last in silenced:
            raise ValueError(f"the prompt {prompt!r} ends in a silenced token ({last}); keep it")


def service_prompts(backend) -> list[str]:
    """The prompts the service sends through ``backend``: a Caption of every length and a Query."""
    from vlm_service.types import CaptionLength, GenerationRequest, SamplingParams, Task

    requests = [
        GenerationRequest("twin", "twin", Task.CAPTION, None, SamplingParams(32), "", length)
        for length in CaptionLength
    ]
    requests.append(GenerationRequest("twin", "twin", Task.QUERY, None, SamplingParams(32), "What is in the picture?"))
    return [backend.prompt(request) for request in requests]


def save_twin(model, processor, directory, dtype: torch.dtype = torch.bfloat16) -> None:
    """Save a twin as its published checkpoint is saved (in ``dtype``), with its processor."""
    model.to(dtype).save_pretrained(directory)
    processor.save_pretrained(directory)
