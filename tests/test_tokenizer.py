"""Tokenizer, chat templates and streaming detokenization, checked against transformers on the same folders."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from offload.chat_template import render_chat_template
from offload.detokenize import IncrementalDetokenizer, StopStringMatcher
from offload.errors import CheckpointError, OffloadError
from offload.tokenizer import DEMO_SPECIAL_TOKENS, Tokenizer, build_demo_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you doing today?",
    "Ünïcödé façade naïve café déjà vu — résumé über straße.",
    "日本語のテキストを少し書きます。東京は大きい都市です。",
    "中文文本测试，你好世界。",
    "Emoji time 😀🎉👍 and more 🚀 rockets.",
    "def square(x):\n    return x * x  # tabs\tand  spaces",
    "Numbers 12345 and 3.14159 and -42.",
] * 8

# Characters that are absent from CORPUS, so byte-level and byte-fallback tokenizers split them into single bytes.
RARE_TEXT = "Parrot 🦜 in 鸚鵡 and 𝕏 plus ħ, then 日本 again 😀!"

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA2 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

TOOL_TEMPLATE = (
    "{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Namespaces, loop controls, dict(), strftime_now, {% generation %}, tojson options and whitespace control.
FANCY_TEMPLATE = """{%- set ns = namespace(system=none) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- set ns.system = message['content'] -%}
        {%- continue -%}
    {%- endif -%}
    {%- if message['content'] == 'STOP' -%}{%- break -%}{%- endif -%}
    <{{ message['role'] }}>
    {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}
    {%- else %}{{ message['content'] }}{% endif %}
    {%- if message.reasoning_content is defined %} [thought: {{ message.reasoning_content }}]{% endif %}

{% endfor -%}
{%- if ns.system %}(system: {{ ns.system }}){% endif %}
{{ dict(a=1, b='<&>') | tojson(indent=1, sort_keys=True) }}
year {{ strftime_now('%Y') }}
{%- if add_generation_prompt %}
<assistant>
{%- endif %}"""

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there, café 日本 😀"},
    {"role": "assistant", "content": "Hello <b>&</b>", "reasoning": "be nice"},
    {"role": "user", "content": "And now?", "tool_calls": None},
]


def _train_byte_level(folder: Path) -> None:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))


def _train_sentencepiece_bpe(folder: Path) -> None:
    """A Llama-2-style tokenizer.json: ▁ normalizer, byte fallback, Strip decoder, BOS post-processor."""
    trainee = HFTokenizer(models.BPE(unk_token="<unk>"))
    trainee.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60, show_progress=False
    )
    trainee.train_from_iterator(CORPUS, trainer)
    trained = json.loads(trainee.to_str())["model"]
    vocab = dict(trained["vocab"])
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))


def _train_unigram_metaspace(folder: Path) -> None:
    tok = HFTokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))


def _write_config(folder: Path, **config: object) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    byte_level, llama, unigram, jinja_file = (root / n for n in ("byte_level", "llama", "unigram", "jinja_file"))

    _train_byte_level(byte_level)
    _write_config(byte_level, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)

    _train_sentencepiece_bpe(llama)
    _write_config(
        llama,
        bos_token={"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                   "rstrip": False, "single_word": False, "special": True},
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        chat_template=LLAMA2,
    )

    _train_unigram_metaspace(unigram)
    _write_config(
        unigram,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=[{"name": "default", "template": CHATML}, {"name": "tool_use", "template": TOOL_TEMPLATE}],
    )

    # transformers 5 writes the template to chat_template.jinja; that file wins over a config entry.
    jinja_file.mkdir()
    shutil.copy(byte_level / "tokenizer.json", jinja_file / "tokenizer.json")
    _write_config(jinja_file, bos_token="<|endoftext|>", eos_token="<|im_end|>", chat_template="IGNORED")
    (jinja_file / "chat_template.jinja").write_text(FANCY_TEMPLATE, encoding="utf-8")
    return {"byte_level": byte_level, "llama": llama, "unigram": unigram, "jinja_file": jinja_file}


@pytest.fixture(scope="module")
def loaded(folders: dict[str, Path]) -> dict[str, tuple[Tokenizer, object]]:
    return {name: (Tokenizer.from_dir(p), AutoTokenizer.from_pretrained(str(p))) for name, p in folders.items()}


TEXTS = [
    "",
    "Hello world!",
    "  leading and trailing spaces  ",
    "multiple   spaces\n\nand newlines\ttabs",
    "Ünïcödé façade naïve café",
    "日本語のテキスト 中文 😀🎉",
    RARE_TEXT,
    "<|im_start|>user\nhi<|im_end|> <s> inline </s> specials",
]

NAMES = ["byte_level", "llama", "unigram", "jinja_file"]


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_match_transformers(loaded, name):
    ours, ref = loaded[name]
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_match_transformers(loaded, name):
    ours, ref = loaded[name]
    assert ours.bos_token == ref.bos_token
    assert ours.eos_token == ref.eos_token
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.vocab_size == len(ref)


def test_llama_style_adds_bos_and_matches_whole_special_tokens(loaded):
    ours, _ = loaded["llama"]
    ids = ours.encode("Hello </s> world")
    assert ids[0] == ours.bos_token_id
    assert ids.count(ours.eos_token_id) == 1
    assert ours.decode(ids, skip_special_tokens=False).startswith("<s> Hello ")


def test_add_bos_token_in_config_controls_bos(folders, tmp_path):
    folder = tmp_path / "with_bos"
    shutil.copytree(folders["byte_level"], folder)
    _write_config(folder, bos_token="<|endoftext|>", eos_token="<|im_end|>", add_bos_token=True)
    tok = Tokenizer.from_dir(folder)
    assert tok.encode("Hello") == [tok.bos_token_id] + tok.encode("Hello", add_special_tokens=False)

    no_bos = tmp_path / "no_bos"
    shutil.copytree(folders["llama"], no_bos)
    config = json.loads((no_bos / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (no_bos / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(no_bos)
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi there, café 日本 😀"}, {"role": "assistant", "content": "Hello"},
     {"role": "user", "content": "More?"}],
]


@pytest.mark.parametrize("name", ["byte_level", "llama", "unigram"])
def test_chat_template_matches_transformers(loaded, name):
    ours, ref = loaded[name]
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_chat_template_file_with_jinja_features_matches_transformers(loaded):
    ours, ref = loaded["jinja_file"]
    assert ours.chat_template == FANCY_TEMPLATE
    stopped = MESSAGES[:2] + [{"role": "user", "content": "STOP"}] + MESSAGES[2:]
    for messages in (MESSAGES, stopped):
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    full = ours.apply_chat_template(MESSAGES)
    assert "[thought: be nice]" in full and '"b": "<&>"' in full and full.endswith("<assistant>")
    assert "Hello <b>" not in ours.apply_chat_template(stopped)


def test_named_templates_pick_tool_use_when_tools_given(loaded):
    ours, ref = loaded["unigram"]
    tools = [{"type": "function", "function": {"name": "weather", "description": "Wetter in Köln <now>"}}]
    messages = CONVERSATIONS[0]
    expected = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    got = ours.apply_chat_template(messages, tools=tools)
    assert got == expected
    assert got.startswith('Tools: [{"type": "function"') and "Köln <now>" in got
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)


def test_raise_exception_becomes_offload_error(loaded):
    ours, ref = loaded["llama"]
    bad = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(Exception, match="roles must alternate"):
        ref.apply_chat_template(bad, tokenize=False)
    with pytest.raises(OffloadError, match="Conversation roles must alternate user/assistant"):
        ours.apply_chat_template(bad)


def test_template_syntax_error_and_sandbox(loaded):
    with pytest.raises(OffloadError, match="not valid Jinja"):
        render_chat_template("{% for m in messages %}", [], True, None, None)
    with pytest.raises(OffloadError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [], True, None, None)
    # A missing token stays undefined (empty), never the text "None".
    assert render_chat_template("[{{ bos_token }}]", [], True, None, "</s>") == "[]"


def test_missing_files_and_templates(folders, tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folders["byte_level"] / "tokenizer.json", bare / "tokenizer.json")
    tok = Tokenizer.from_dir(bare)
    assert tok.chat_template is None and tok.bos_token is None
    with pytest.raises(OffloadError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])

    _write_config(bare, chat_template=[{"name": "rag", "template": CHATML}])
    with pytest.raises(OffloadError, match="rag"):
        Tokenizer.from_dir(bare).apply_chat_template([{"role": "user", "content": "hi"}])


def test_demo_tokenizer_is_deterministic_and_loads_in_transformers(tmp_path):
    build_demo_tokenizer(CORPUS, 400, tmp_path / "a")
    build_demo_tokenizer(list(CORPUS), 400, tmp_path / "b")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()

    ours, ref = Tokenizer.from_dir(tmp_path / "a"), AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert [ours.encode(t, add_special_tokens=False) for t in DEMO_SPECIAL_TOKENS] == [[i] for i in range(6)]
    assert (ours.bos_token, ours.eos_token, ours.bos_token_id, ours.eos_token_id) == ("<s>", "</s>", 0, 1)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text)
    messages = CONVERSATIONS[1]
    prompt = ours.apply_chat_template(messages)
    assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<s><|user|>\n") and prompt.endswith("<|end|>\n<|assistant|>\n")
    ids = ours.encode(prompt, add_special_tokens=False)
    assert ids[:2] == [0, DEMO_SPECIAL_TOKENS.index("<|user|>")]
    assert ours.decode(ids, skip_special_tokens=False) == prompt
    with pytest.raises(OffloadError, match="Unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(OffloadError, match="too small"):
        build_demo_tokenizer(CORPUS, 100, tmp_path / "c")


# --- streaming -----------------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("name", ["byte_level", "llama", "unigram"])
def test_streamed_pieces_concatenate_to_decode_for_random_ids(loaded, name):
    tok, _ = loaded[name]
    rng = random.Random(1)
    for _ in range(60):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 50))]
        for skip in (True, False):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("name", ["byte_level", "llama", "unigram"])
def test_streamed_text_never_shows_half_characters(loaded, name):
    tok, _ = loaded[name]
    for text in TEXTS + [" ".join(CORPUS[:8])]:
        ids = tok.encode(text)
        full = tok.decode(ids)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces), pieces


def test_split_characters_are_held_back(loaded):
    tok, _ = loaded["byte_level"]
    ids = tok.encode("🦜")  # absent from training, so split between byte tokens
    assert len(ids) > 1
    assert _stream(tok, ids) == [""] * (len(ids) - 1) + ["🦜", ""]


def test_byte_fallback_runs_are_streamed_whole(loaded):
    tok, ref = loaded["llama"]
    assert len(tok.byte_fallback_ids) == 256 and not loaded["byte_level"][0].byte_fallback_ids
    ids = tok.encode("x🦜 y", add_special_tokens=False)
    assert sum(i in tok.byte_fallback_ids for i in ids) == 4  # 🦜 is unknown to the vocabulary: four byte tokens
    pieces = _stream(tok, ids)
    assert "".join(pieces) == "x🦜 y" and not any("\ufffd" in p for p in pieces)
    # A run that turns invalid later is replaced whole by ByteFallback, so streaming must not show its start early.
    run = [ref.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in (0x41, 0x42, 0x80)]  # "A", "B", stray byte
    assert tok.decode(run) == "\ufffd" * 3
    assert _stream(tok, run) == ["", "", "", "\ufffd" * 3]


def test_sentencepiece_spaces_survive_streaming(loaded):
    tok, _ = loaded["llama"]
    ids = tok.encode("Hello world and   more")
    pieces = _stream(tok, ids)
    assert "".join(pieces) == "Hello world and   more"
    assert any(p.startswith(" ") for p in pieces)


def test_detokenizer_window_stays_short(loaded):
    tok, _ = loaded["byte_level"]

    class Recorder:
        longest = 0
        special_ids = tok.special_ids
        byte_fallback_ids = tok.byte_fallback_ids

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            Recorder.longest = max(Recorder.longest, len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(CORPUS) + RARE_TEXT)
    assert len(ids) > 500
    detok = IncrementalDetokenizer(Recorder())
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert Recorder.longest <= 8


# --- stop strings --------------------------------------------------------------------------------------------


def _run_stops(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_string_split_across_pieces():
    out, stopped = _run_stops(["</stop>"], ["Hel", "lo wo", "rld<", "/st", "op> more"])
    assert stopped and "".join(out) == "Hello world"
    assert out[2] == "rld"  # "<" could start the stop string, so it waits


def test_stop_string_earliest_match_wins_and_stays_stopped():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.push("hello world") == ("hel", True)
    assert matcher.push("more") == ("", True)


def test_no_stop_releases_everything():
    out, stopped = _run_stops(["abc"], ["xxa", "b", "x", "a"])
    assert not stopped and "".join(out) == "xxabxa"
    assert out[:3] == ["xx", "", "abx"]


def test_stop_strings_random_splits_match_find():
    rng = random.Random(2)
    stops = ["abc", "cab", "bb", "ca a"]
    for _ in range(300):
        text = "".join(rng.choice("abc ") for _ in range(rng.randrange(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        out, stopped = _run_stops(stops, pieces)
        assert stopped == bool(hits)
        assert "".join(out) == (text[: min(hits)] if hits else text)


def test_empty_stop_string_rejected():
    with pytest.raises(OffloadError, match="empty stop string"):
        StopStringMatcher(["ok", ""])
    assert _run_stops([], ["a", "b"]) == (["a", "b", ""], False)
