"""A checkpoint's tokenizer, read from tokenizer.json + tokenizer_config.json with the `tokenizers` library.

Encoding, decoding and special-token handling follow transformers' fast tokenizer (`PreTrainedTokenizerFast`)
loaded from the same folder, so prompts become the token ids the model was trained on. Kimi checkpoints ship a
tiktoken.model instead of tokenizer.json; offload.tiktoken_bpe turns it into the same kind of backend.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from offload.chat_template import render_chat_template
from offload.errors import CheckpointError, OffloadError
from offload.tiktoken_bpe import KIMI_DEFAULT_EXTRA_SPECIAL_TOKENS, TIKTOKEN_FILE, tiktoken_backend

# The special tokens transformers names (and passes to chat templates) besides model-specific `*_token` entries.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
TOKENIZER_FILES = ("tokenizer.json", TIKTOKEN_FILE)  # what from_dir reads, in order of preference
# The tokenizer class tokenization_kimi.py defines; a tiktoken.model is read only for it.
_KIMI_TOKENIZER_CLASS = "TikTokenTokenizer"


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str],
        chat_templates: dict[str, str],
        source: str,
        sort_tool_keys: bool = False,
    ) -> None:
        self._backend = backend
        self._special_tokens = special_tokens
        self._chat_templates = chat_templates
        self._source = source
        self._sort_tool_keys = sort_tool_keys  # Kimi's apply_chat_template sorts the keys of tool schemas
        # What streaming detokenization needs to know about the decoder (see offload.detokenize).
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)  # dropped by skip_special
        self.byte_fallback_ids = _byte_fallback_ids(backend)  # <0xXX> tokens a ByteFallback decoder turns into bytes

    @staticmethod
    def exists(folder: str | Path) -> bool:
        """Whether `folder` holds a tokenizer from_dir reads (tokenizer.json, or Kimi's tiktoken.model)."""
        return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"tokenizer folder {folder} does not exist; pass a Hugging Face checkpoint folder")
        config = _read_json(folder / "tokenizer_config.json")
        tiktoken = not (folder / "tokenizer.json").is_file() and (folder / TIKTOKEN_FILE).is_file()
        backend = _tiktoken_backend(folder, config) if tiktoken else _tokenizer_json_backend(folder)

        # Generation feeds one unpadded sequence at a time; a max_length in tokenizer.json would silently cut prompts.
        padding = backend.padding
        backend.no_truncation()
        backend.no_padding()

        added = _special_added_tokens(config)
        if padding is not None and "pad_token" not in added:
            added["pad_token"] = AddedToken(padding["pad_token"], special=True, normalized=False)
        # Like transformers, make every configured special token a special added token, so it is matched whole when
        # encoding and dropped by decode(skip_special_tokens=True) even if tokenizer.json did not mark it.
        extra = _extra_special_tokens(config)
        if tiktoken and not extra:  # tokenization_kimi.py's default additional_special_tokens
            extra = [AddedToken(t, special=True, normalized=False) for t in KIMI_DEFAULT_EXTRA_SPECIAL_TOKENS]
        backend.add_special_tokens([*added.values(), *extra])

        special = {name: token.content for name, token in added.items()}
        if "add_bos_token" in config or "add_eos_token" in config:
            _set_bos_eos_processor(
                backend,
                special.get("bos_token") if config.get("add_bos_token") else None,
                special.get("eos_token") if config.get("add_eos_token") else None,
            )
        return cls(backend, special, _chat_templates(folder, config), str(folder), sort_tool_keys=tiktoken)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the post-processor adds (usually a BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._backend.token_to_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the checkpoint has none."""
        return self._chat_templates.get("default")

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text for `messages`; encode it with add_special_tokens=False, as the template adds BOS itself."""
        template = self._chat_templates.get("default")
        # transformers picks a dedicated tool-use template when tools are given and the checkpoint has one.
        if extra.get("tools") is not None and "tool_use" in self._chat_templates:
            template = self._chat_templates["tool_use"]
        if template is None:
            if self._chat_templates:
                names = ", ".join(sorted(self._chat_templates))
                raise OffloadError(
                    f"{self._source} has chat templates named {names} but no 'default' one; "
                    "name one of them 'default' in tokenizer_config.json"
                )
            raise OffloadError(
                f"{self._source} has no chat template; add one to tokenizer_config.json or chat_template.jinja, "
                "or send plain prompts instead of chat messages"
            )
        template_vars = {k: v for k, v in self._special_tokens.items() if k not in ("bos_token", "eos_token")}
        template_vars.update(extra)
        if self._sort_tool_keys and template_vars.get("tools") is not None:
            template_vars["tools"] = _sorted_keys(template_vars["tools"])
        return render_chat_template(
            template,
            messages,
            add_generation_prompt,
            template_vars.pop("bos_token", self.bos_token),
            template_vars.pop("eos_token", self.eos_token),
            **template_vars,
        )


def _tokenizer_json_backend(folder: Path) -> tokenizers.Tokenizer:
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(
            f"{folder} has no tokenizer.json (or Kimi's {TIKTOKEN_FILE}); add the checkpoint's fast tokenizer file "
            "(transformers' tokenizer.save_pretrained writes it)"
        )
    try:
        return tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # the tokenizers library raises bare Exception on malformed files
        raise CheckpointError(f"{tokenizer_file} could not be read ({e}); re-download the checkpoint") from e


def _tiktoken_backend(folder: Path, config: dict[str, Any]) -> tokenizers.Tokenizer:
    tokenizer_class = config.get("tokenizer_class")
    if tokenizer_class not in (None, _KIMI_TOKENIZER_CLASS):
        raise CheckpointError(
            f"{folder} has a {TIKTOKEN_FILE} for tokenizer_class {tokenizer_class!r}; offload reads a {TIKTOKEN_FILE} "
            f"only for Kimi's {_KIMI_TOKENIZER_CLASS}: add the checkpoint's tokenizer.json instead"
        )
    return tiktoken_backend(folder / TIKTOKEN_FILE, config)


def _sorted_keys(value: Any) -> Any:
    """`value` with every dict's keys sorted, at any depth (tokenization_kimi.py's deep_sort_dict)."""
    if isinstance(value, dict):
        return {k: _sorted_keys(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; re-download the checkpoint")
    return data


def _added_token(value: Any) -> AddedToken | None:
    """A tokenizer_config token entry (a string or a serialized AddedToken dict) as a special AddedToken."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        fields = {k: value[k] for k in _ADDED_TOKEN_FIELDS if k in value}
        return AddedToken(**fields)
    return None


def _special_added_tokens(config: dict[str, Any]) -> dict[str, AddedToken]:
    """Named special tokens: the standard ones, named extra_special_tokens, and model-specific `*_token` entries."""
    named: dict[str, Any] = {k: v for k, v in config.items() if k.endswith("_token")}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        named.update(extra)
    tokens = {}
    for name, value in named.items():
        token = _added_token(value)
        if token is not None:
            tokens[name] = token
    # Keep the standard names first, as transformers' special_tokens_map does.
    return {k: tokens[k] for k in _NAMED_SPECIAL_TOKENS if k in tokens} | {
        k: v for k, v in tokens.items() if k not in _NAMED_SPECIAL_TOKENS
    }


def _extra_special_tokens(config: dict[str, Any]) -> list[AddedToken]:
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
    if not isinstance(extra, list):
        return []
    return [token for token in map(_added_token, extra) if token is not None]


def _set_bos_eos_processor(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
    """Rebuild the post-processor from add_bos_token / add_eos_token, as transformers' update_post_processor does."""
    bos_id = None if bos is None else backend.token_to_id(bos)
    eos_id = None if eos is None else backend.token_to_id(eos)
    bos = bos if bos_id is not None else None
    eos = eos if eos_id is not None else None
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _byte_fallback_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    def has_byte_fallback(decoder: Any) -> bool:
        if not isinstance(decoder, dict):
            return False
        return decoder.get("type") == "ByteFallback" or any(map(has_byte_fallback, decoder.get("decoders") or []))

    if backend.decoder is None or not has_byte_fallback(json.loads(backend.decoder.__getstate__())):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
    return frozenset(i for i in ids if i is not None)


def _chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Named chat templates; template files (written by transformers 5) replace those in tokenizer_config.json."""
    from_files = {}
    if (folder / "chat_template.jinja").is_file():
        from_files["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            from_files[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if from_files:
        return from_files

    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and "name" in t and "template" in t for t in value):
        return {t["name"]: t["template"] for t in value}
    raise CheckpointError(
        f"{folder / 'tokenizer_config.json'} has a chat_template that is neither a string nor a list of "
        "{name, template} entries; fix the file"
    )


# The demo tokenizer's special tokens, in id order: <s> is 0, </s> is 1, ... <|end|> is 5.
DEMO_SPECIAL_TOKENS = ("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def build_demo_tokenizer(corpus: list[str], vocab_size: int, out_dir: str | Path) -> None:
    """Train a byte-level BPE on `corpus` and write tokenizer.json + tokenizer_config.json into `out_dir`.

    Same inputs give byte-identical files. Every assistant turn ends with <|end|>, so a demo model should stop on it
    as well as on </s>.
    """
    minimum = 256 + len(DEMO_SPECIAL_TOKENS)  # every byte plus the special tokens
    if vocab_size < minimum:
        raise OffloadError(f"demo tokenizer vocab_size {vocab_size} is too small; use at least {minimum}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(DEMO_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": DEMO_SPECIAL_TOKENS[0],
        "eos_token": DEMO_SPECIAL_TOKENS[1],
        "clean_up_tokenization_spaces": False,
        "chat_template": DEMO_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
