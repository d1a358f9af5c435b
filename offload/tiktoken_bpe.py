"""Kimi's `tiktoken.model` tokenizer, rebuilt as a `tokenizers` byte-level BPE with the same ids.

Kimi-K2 checkpoints ship no tokenizer.json: the hub runs `tokenization_kimi.py` (a transformers tokenizer around
`tiktoken`) with trust_remote_code. Its behaviour is fixed by that file, not by data, so the pre-split pattern, the
number of reserved special ids and the default extra special tokens are written down here.

Why a `tokenizers` BPE and not `tiktoken` itself: the rest of offload (added-token matching, skip_special_tokens,
the streaming detokenizer) already works on a `tokenizers.Tokenizer`, and tiktoken would be one more runtime
dependency. A tiktoken rank file is a byte-level BPE: merging the adjacent pair whose concatenation has the lowest
rank is what a BPE does with every split of every token listed as a merge, ordered by the merged token's rank
(transformers' TikTokenConverter builds its merges the same way). tests/test_kimi.py checks the ids against tiktoken.
"""
from __future__ import annotations

import base64
import binascii
import functools
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from offload.errors import CheckpointError

TIKTOKEN_FILE = "tiktoken.model"

# tokenization_kimi.py's pat_str: Han runs, cased words with English contractions, up to 3 digits, punctuation, spaces.
KIMI_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Ids right after the BPE ranks are special tokens: tokenizer_config.json's added_tokens_decoder names some, the rest
# are `<|reserved_token_{id}|>`. Kimi reserves 256 + 2 of them.
KIMI_NUM_SPECIAL_IDS = 256 + 2

# What tokenization_kimi.py uses when tokenizer_config.json lists no additional_special_tokens.
KIMI_DEFAULT_EXTRA_SPECIAL_TOKENS = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>", "[EOT]",
    "<|im_system|>", "<|im_middle|>",
)


def tiktoken_backend(path: Path, config: dict[str, Any]) -> tokenizers.Tokenizer:
    """The BPE of `path` (a tiktoken.model) with Kimi's pre-split and its special ids as (not yet special) added tokens.

    Like transformers with Kimi's tokenizer, every special id is matched whole when its text appears in a prompt; which
    of them decode(skip_special_tokens=True) drops is decided by the caller (the named and extra special tokens).
    """
    ranks = read_ranks(path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{path} has no token for byte(s) {missing[:8]}; a tiktoken.model ranks every single "
                              "byte, re-download the checkpoint")
    table = _byte_level_table()
    as_str = {token: token.decode("latin-1").translate(table) for token in ranks}  # bytes -> vocabulary string
    vocab = {as_str[token]: rank for token, rank in ranks.items()}
    merges = [(as_str[left], as_str[right]) for left, right in _merges(ranks)]
    # ignore_merges: a pre-split piece that is itself a token becomes that token, as tiktoken looks pieces up first.
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(KIMI_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    names = _special_token_names(path, config)
    first = len(ranks)
    specials = [names.get(i, f"<|reserved_token_{i}|>") for i in range(first, first + KIMI_NUM_SPECIAL_IDS)]
    # add_tokens gives new tokens consecutive ids after the vocabulary, in order: exactly Kimi's numbering.
    backend.add_tokens([AddedToken(s, special=False, normalized=False) for s in specials])
    if [backend.token_to_id(s) for s in specials] != list(range(first, first + KIMI_NUM_SPECIAL_IDS)):
        raise CheckpointError(f"{path.parent / 'tokenizer_config.json'} added_tokens_decoder gives two special ids the "
                              "same text, or one the text of an ordinary token; fix the file")
    return backend


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file: one `<base64 token> <rank>` per line, ranks 0..n-1."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise CheckpointError(f"{path} line {number} is not '<base64 token> <rank>' ({e}); "
                                  "re-download the checkpoint") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path} ranks are not 0..{len(ranks) - 1}, each once; re-download the checkpoint")
    return ranks


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, ordered by the token's rank (then the halves' ranks)."""
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        splits = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                splits.append((ranks[left], ranks[right], left, right))
        merges.extend((left, right) for _, _, left, right in sorted(splits))
    return merges


def _special_token_names(path: Path, config: dict[str, Any]) -> dict[int, str]:
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{path.parent / 'tokenizer_config.json'} has an added_tokens_decoder that is not an "
                              "object of id -> token; fix the file")
    names = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else entry
        if not (isinstance(content, str) and str(key).isdigit()):
            raise CheckpointError(f"{path.parent / 'tokenizer_config.json'} added_tokens_decoder entry {key!r} has "
                                  "no integer id and content; fix the file")
        names[int(key)] = content
    return names


@functools.cache
def _byte_level_table() -> dict[int, str]:
    """A str.translate table from a byte (as a latin-1 character) to GPT-2's printable stand-in for it: the alphabet
    of a byte-level BPE vocabulary, which the ByteLevel pre-tokenizer and decoder use."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table
