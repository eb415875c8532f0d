"""A tiny character-level tokenizer and causal LM, built locally (no downloads).

The embedded defaults of ``rlfuse train`` and ``rlfuse search`` and many tests need a real
Hugging Face model and tokenizer that exist without network access:

    tok = tiny_tokenizer()                       # PreTrainedTokenizerFast, one token per character
    model = tiny_causal_lm(tok, hidden_size=64)  # LlamaForCausalLM from a config, seeded init

Both save with ``save_pretrained`` and load back with ``AutoTokenizer`` /
``AutoModelForCausalLM.from_pretrained``, like any model on disk.

The vocabulary is the special tokens ``<pad> <bos> <eos> <unk>`` followed by the printable
ASCII characters, newline and tab; any other character encodes as ``<unk>``.  Decoding
joins characters back without separators, so ``decode(encode(s)) == s`` for text in the
vocabulary.
"""

from __future__ import annotations

import string

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = "".join(ch for ch in string.printable if ch not in "\r\x0b\x0c")


def tiny_tokenizer(*, padding_side: str = "left"):
    """A character-level ``PreTrainedTokenizerFast`` (``bos`` is prepended to every text)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own word (newlines included: [\s\S] matches anything).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    bos = vocab["<bos>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )


def tiny_causal_lm(
    tokenizer=None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = False,
    seed: int = 0,
):
    """A small ``LlamaForCausalLM`` sized for ``tokenizer`` (default: :func:`tiny_tokenizer`),
    with weights drawn from a fixed seed (the global RNG state is left untouched)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers),
                        ("num_heads", num_heads),
                        ("max_position_embeddings", max_position_embeddings)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model
