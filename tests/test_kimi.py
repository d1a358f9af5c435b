"""Kimi-K2 checkpoints: model_type kimi_k2 runs as DeepSeek-V3, and a tiktoken.model tokenizer gives tiktoken's ids."""
from __future__ import annotations

import base64
import collections
import json
import shutil
from pathlib import Path

import pytest
import tiktoken
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, pre_tokenizers

import offload
from offload.detokenize import IncrementalDetokenizer
from offload.errors import CheckpointError
from offload.tokenizer import Tokenizer
from tiny_models import write_checkpoint

# The reference: tokenization_kimi.py's pre-split pattern, written out again so the test does not trust offload's copy.
KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
NUM_SPECIAL_IDS = 256 + 2  # Kimi reserves these ids right after the BPE ranks

# Kimi-K2's named special tokens by offset from the first special id (tokenizer_config.json's added_tokens_decoder).
KIMI_SPECIAL_OFFSETS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>",
    7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]",
}
KIMI_EXTRA_SPECIAL_TOKENS = ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                             "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"]

KIMI_CHAT_TEMPLATE = """{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>
  # Tools
  {{ tools | tojson }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- if loop.first and messages[0]['role'] != 'system' -%}
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
  {%- endif -%}

  {%- set role_name =  message.get('name') or  message['role'] -%}
  {%- if message['role'] == 'user' -%}
    <|im_user|>{{role_name}}<|im_middle|>
  {%- elif message['role'] == 'assistant' -%}
    <|im_assistant|>{{role_name}}<|im_middle|>
  {%- else -%}
    <|im_system|>{{role_name}}<|im_middle|>
  {% endif %}

  {%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
    {%- if message['content'] -%}{{ message['content'] }}{%- endif -%}
    <|tool_calls_section_begin|>
    {%- for tool_call in message['tool_calls'] -%}
      {%- set formatted_id = tool_call['id'] -%}
      <|tool_call_begin|>{{ formatted_id }}<|tool_call_argument_begin|>{% if tool_call['function']['arguments'] is string %}{{ tool_call['function']['arguments'] }}{% else %}{{ tool_call['function']['arguments'] | tojson }}{% endif %}<|tool_call_end|>
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- elif message['role'] == 'tool' -%}
    ## Return of {{ message.tool_call_id }}
    {{ message['content'] }}
  {%- elif message['content'] is string -%}
    {{ message['content'] }}
  {%- elif message['content'] is not none -%}
    {% for content in message['content'] -%}
      {% if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
        <|media_start|>image<|media_content|><|media_pad|><|media_end|>
      {% else -%}
        {{ content['text'] }}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}"""  # noqa: E501

CORPUS = """def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

The quick brown fox jumps over the lazy dog. It's what WE'LL see; they've gone.
Kimi 是月之暗面开发的模型，你好世界。日本語のテキストを少し書きます。東京は大きい都市です。
Ünïcödé façade naïve café déjà vu — résumé über straße. Numbers 12345 and 3.14159 and -42.
""" * 6

# Code, CJK, emoji (absent from the corpus, so split into bytes), whitespace runs, special tokens written in the text.
MIXED = """class Cache:
    def get(self, key):\t# tab\r\n        return self._items.get(key, None)   \n\n\n
你好，世界！Kimi 可以读中文。カタカナと漢字混じり、한국어 문장도 있습니다.
Emoji 😀🎉👍🏽 🦜, a flag 🇯🇵 and a family 👨‍👩‍👧.
I'M sure it'S theirs; WE'LL see, you'D know. ǅabc İstanbul สวัสดี مَرْحَبًا Ελληνικά.
""" + " " * 40 + """x
<html><body class="x">&nbsp;1234567 3.14159 -42</body></html>
<|im_user|>user<|im_middle|>Hi [BOS]there<|im_end|> [EOS]<|tool_call_begin|> <|im_end| <|reserved_token_{reserved}|>
"""


def train_ranks(text: str, num_merges: int) -> dict[bytes, int]:
    """tiktoken ranks for `text`: the 256 bytes, then the most frequent adjacent pair, merged, num_merges times."""
    ranks = {bytes([b]): b for b in range(256)}
    pieces = pre_tokenizers.Split(Regex(KIMI_PAT_STR), behavior="isolated").pre_tokenize_str(text)
    words = [[bytes([b]) for b in piece.encode()] for piece, _ in pieces]
    for _ in range(num_merges):
        counts = collections.Counter(pair for word in words for pair in zip(word, word[1:]))
        if not counts:
            break
        (left, right), _ = counts.most_common(1)[0]
        ranks.setdefault(left + right, len(ranks))
        words = [_merge(word, left, right) for word in words]
    return ranks


def _merge(word: list[bytes], left: bytes, right: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            out.append(left + right)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def special_tokens(num_ranks: int) -> dict[str, int]:
    """Kimi's numbering: named ids from the config, `<|reserved_token_{id}|>` for the rest."""
    return {KIMI_SPECIAL_OFFSETS.get(i - num_ranks, f"<|reserved_token_{i}|>"): i
            for i in range(num_ranks, num_ranks + NUM_SPECIAL_IDS)}


def write_kimi_tokenizer(folder: Path, ranks: dict[bytes, int]) -> None:
    """tiktoken.model and a tokenizer_config.json shaped like Kimi-K2-Instruct's."""
    folder.mkdir(parents=True, exist_ok=True)
    by_rank = sorted(ranks, key=ranks.__getitem__)
    lines = (f"{base64.b64encode(token).decode()} {ranks[token]}\n" for token in by_rank)
    (folder / "tiktoken.model").write_text("".join(lines))
    added = {str(len(ranks) + offset): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
             for offset, name in KIMI_SPECIAL_OFFSETS.items()}
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": KIMI_EXTRA_SPECIAL_TOKENS,
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
        "chat_template": KIMI_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """(folder, offload Tokenizer, tiktoken reference Encoding, mixed text) for a tiny Kimi-style tokenizer."""
    ranks = train_ranks(CORPUS, num_merges=300)
    folder = tmp_path_factory.mktemp("kimi_tokenizer")
    write_kimi_tokenizer(folder, ranks)
    reference = tiktoken.Encoding("kimi", pat_str=KIMI_PAT_STR, mergeable_ranks=ranks,
                                  special_tokens=special_tokens(len(ranks)))
    text = MIXED.format(reserved=len(ranks) + 100) * 4
    return folder, Tokenizer.from_dir(folder), reference, text


def test_ids_match_tiktoken_with_kimis_pattern_and_special_tokens(kimi):
    _, tok, reference, text = kimi
    # tokenization_kimi.py encodes with allowed_special="all": special tokens written in the text become their ids.
    expected = reference.encode(text, allowed_special="all")
    assert len(text.encode()) > 900 and len(expected) > 300
    assert tok.encode(text) == expected
    assert tok.encode(text, add_special_tokens=False) == expected  # Kimi adds no BOS
    for piece in ("", " ", "\n\n\n", "  x", "中文", "😀", "it's", "<|im_end|>", "[BOS]" * 3):
        assert tok.encode(piece) == reference.encode(piece, allowed_special="all")


def test_a_token_no_merge_order_reaches_is_found_whole_as_in_tiktoken(tmp_path):
    """tiktoken looks a pre-split piece up before merging: with these ranks "abcd" is a token, yet merging by rank
    goes a|b|c|d -> a|bc|d and stops, as neither "abc" nor "bcd" is a token."""
    ranks = {bytes([b]): b for b in range(256)} | {b"bc": 256, b"ab": 257, b"cd": 258, b"abcd": 259}
    write_kimi_tokenizer(tmp_path, ranks)
    reference = tiktoken.Encoding("kimi", pat_str=KIMI_PAT_STR, mergeable_ranks=ranks,
                                  special_tokens=special_tokens(len(ranks)))
    assert reference.encode("abcd") == [259] and reference.encode("abcde") == [97, 256, 100, 101]
    tok = Tokenizer.from_dir(tmp_path)
    for text in ("abcd", "abcde", "x abcd abcd, abc"):
        assert tok.encode(text) == reference.encode(text)


def test_special_tokens_are_numbered_after_the_ranks(kimi):
    _, tok, reference, _ = kimi
    first = reference.n_vocab - NUM_SPECIAL_IDS
    assert (tok.bos_token, tok.bos_token_id) == ("[BOS]", first)
    assert (tok.eos_token, tok.eos_token_id) == ("[EOS]", first + 1)
    assert tok.vocab_size == reference.n_vocab
    assert tok.encode("<|im_middle|>") == [first + 17]
    assert tok.encode(f"<|reserved_token_{first + 5}|>") == [first + 5]


def test_decode_round_trips_and_skips_only_the_named_special_tokens(kimi):
    _, tok, reference, text = kimi
    ids = reference.encode(text, allowed_special="all")
    assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids) == text
    # As transformers with tokenization_kimi.py: bos/eos/unk/pad and additional_special_tokens are skipped, the other
    # special ids (tool calls, reserved tokens) stay, so tool-call parsers still see their markers.
    reserved_id = reference.n_vocab - NUM_SPECIAL_IDS + 5
    reserved = f"<|reserved_token_{reserved_id}|>"
    ids = tok.encode(f"<|im_user|>user<|im_middle|>Hi [BOS]there<|im_end|>[EOS]<|tool_call_begin|>f{reserved}")
    assert ids[-1] == reserved_id
    assert tok.decode(ids) == f"userHi there<|tool_call_begin|>f{reserved}"


def test_a_config_without_additional_special_tokens_uses_kimis_defaults(kimi, tmp_path):
    folder, tok, _, _ = kimi
    shutil.copy(folder / "tiktoken.model", tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["additional_special_tokens"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).special_ids == tok.special_ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streaming_detokenization_matches_a_full_decode(kimi, skip_special_tokens):
    _, tok, reference, text = kimi
    ids = reference.encode(text, allowed_special="all")
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in p for p in pieces)  # emoji split into byte tokens are held back until complete


def test_chat_renders_kimis_template(kimi):
    _, tok, reference, _ = kimi
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
                      "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>")
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids == reference.encode(prompt, allowed_special="all")
    assert ids[0] == tok.encode("<|im_system|>")[0] and ids[-1] == tok.encode("<|im_middle|>")[0]


def test_tool_schemas_are_rendered_with_sorted_keys(kimi):
    _, tok, _, _ = kimi
    tool = {"type": "function", "function": {"parameters": {"type": "object", "properties": {}}, "name": "f"}}
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tools=[tool])
    # tokenization_kimi.py sorts every dict in the tools before rendering.
    assert '[{"function": {"name": "f", "parameters": {"properties": {}, "type": "object"}}, "type": "function"}]' \
        in prompt


def test_bad_tiktoken_files_are_one_line_errors(kimi, tmp_path):
    folder, _, _, _ = kimi
    shutil.copy(folder / "tokenizer_config.json", tmp_path)
    (tmp_path / "tiktoken.model").write_text("IQ== 0\nnot-base64 1\n")
    with pytest.raises(CheckpointError, match="line 2 is not '<base64 token> <rank>'"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_text("IQ== 0\nIg== 2\n")
    with pytest.raises(CheckpointError, match="ranks are not 0..1"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(CheckpointError, match="no token for byte"):
        Tokenizer.from_dir(tmp_path)

    shutil.copy(folder / "tiktoken.model", tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    with pytest.raises(CheckpointError, match="only for Kimi's TikTokenTokenizer"):
        Tokenizer.from_dir(tmp_path)
    first = min(map(int, config["added_tokens_decoder"]))  # the id of [BOS]
    for content in ("[BOS]", "!"):  # a second [BOS] or an ordinary token would shift every later special id
        decoder = {**config["added_tokens_decoder"], str(first + 5): {"content": content}}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": decoder}))
        with pytest.raises(CheckpointError, match="gives two special ids the same text"):
            Tokenizer.from_dir(tmp_path)


def test_a_folder_has_a_tokenizer_with_either_file(kimi, tmp_path):
    folder, _, _, _ = kimi
    assert Tokenizer.exists(folder) and not Tokenizer.exists(tmp_path)
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.fixture(scope="module")
def kimi_checkpoint(kimi, tmp_path_factory):
    """(kimi_k2 folder with the tiktoken tokenizer, deepseek_v3 folder, transformers reference) of one tiny model."""
    tok_folder, tok, _, _ = kimi
    original = tmp_path_factory.mktemp("deepseek_v3_big_vocab")
    ref = write_checkpoint("deepseek_v3", original, overrides={"vocab_size": tok.vocab_size})
    folder = tmp_path_factory.mktemp("kimi_k2")
    for file in original.iterdir():
        shutil.copy(file, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(tok_folder / name, folder)
    return folder, original, ref


def test_kimi_k2_config_gives_deepseek_v3_logits(kimi_checkpoint):
    folder, _, ref = kimi_checkpoint
    model = offload.load(folder, device="cpu", max_context=64)
    ids = torch.randint(0, model.tokenizer.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    got = model.logits(ids)
    assert got.shape == expected.shape
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4


def test_kimi_k2_generates_from_text_and_chat(kimi_checkpoint, kimi):
    folder, _, _ = kimi_checkpoint
    _, tok, reference, _ = kimi
    model = offload.load(folder, device="cpu", max_context=128)
    result = model.generate("Kimi 你好, def f(x):", max_new_tokens=12, ignore_eos=True)
    assert result.stats.prompt_tokens == len(reference.encode("Kimi 你好, def f(x):"))
    assert len(result.token_ids) == 12 and result.text == tok.decode(result.token_ids)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert model.chat_prompt(messages) == reference.encode(tok.apply_chat_template(messages), allowed_special="all")
    reply = model.chat(messages, max_new_tokens=8, ignore_eos=True)
    assert len(reply.token_ids) == 8 and reply.text == tok.decode(reply.token_ids)


@pytest.fixture(scope="module")
def kimi_k25_checkpoint(kimi_checkpoint, tmp_path_factory):
    """Kimi-K2.5's layout: the DeepSeek-V3 text model under `language_model.` and `text_config`, with a vision
    tower and projector beside it (stand-in tensors: offload must skip them, whatever they hold)."""
    _, original, ref = kimi_checkpoint
    folder = tmp_path_factory.mktemp("kimi_k25")
    tensors = {f"language_model.{name}": t for name, t in load_file(original / "model.safetensors").items()}
    tensors["vision_tower.encoder.blocks.0.attn.qkv.weight"] = torch.randn(48, 16)
    tensors["mm_projector.proj.0.weight"] = torch.randn(64, 16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    text = json.loads((original / "config.json").read_text())
    config = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"], "text_config": text,
              "vision_config": {"hidden_size": 16}, "media_placeholder_token_id": 163605}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, ref


def test_kimi_k25_runs_its_text_model_and_skips_the_vision_tower(kimi_k25_checkpoint, tmp_path):
    from offload.inspect import describe
    from offload.weights.store import convert

    folder, ref = kimi_k25_checkpoint
    ids = torch.randint(0, ref.config.vocab_size, (16,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    model = offload.load(folder, device="cpu", max_context=64)
    assert model.load_info.skipped_tensors == 2
    got = model.logits(ids)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    skipped = describe(folder)["checkpoint"]["skipped"]
    assert skipped["tensors"] == 2 and skipped["prefixes"] == ["vision_tower.", "mm_projector."]
    # convert writes the text model alone, which loads as DeepSeek-V3 with the same logits
    store = convert(folder, tmp_path / "store", experts="int8")
    assert json.loads((store / "config.json").read_text())["model_type"] == "deepseek_v3"
    torch.testing.assert_close(offload.load(store, device="cpu", max_context=64).logits(ids),
                               offload.load(folder, device="cpu", max_context=64, experts="int8").logits(ids),
                               rtol=0, atol=0)
