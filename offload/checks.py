"""Checks that need no weight: made before a single weight is read, so bad input fails in milliseconds.

load() calls `check_load` right after the config is translated; the CLI also calls `check_request` (tokenizer,
prompt, sampling values) before it loads anything. Each is a pure decision on numbers the caller already has,
except that `check_load` asks the machine how much RAM is free.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from .config import ModelConfig
from .errors import ContextLengthError, OffloadError
from .generate import check_fits
from .placement.inventory import kv_cache_bytes
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights.checkpoint import Checkpoint

log = logging.getLogger("offload")

DEFAULT_MAX_CONTEXT = 4096  # the default context when the model allows it
# The rope table holds each position's angles as float32 (position * frequency): past 2^24 positions float32
# cannot tell neighbouring positions apart, so the rotations themselves would be wrong, whatever the rope type.
MAX_EXACT_POSITIONS = 2**24
GiB = 2**30


def default_max_context(cfg: ModelConfig) -> int:
    """The context every command allocates unless told otherwise: 4096, or the model's position limit if lower."""
    return min(DEFAULT_MAX_CONTEXT, cfg.max_position_embeddings)


def check_max_context(cfg: ModelConfig, max_context: int | None) -> int:
    """The max_context to use (the default when None), checked against the model's position limit."""
    max_context = resolve_max_context(cfg, max_context)
    check_position_limit(cfg, max_context)
    return max_context


def resolve_max_context(cfg: ModelConfig, max_context: int | None) -> int:
    if max_context is None:
        return default_max_context(cfg)
    if max_context < 1:
        raise OffloadError(f"max_context must be positive, got {max_context}")
    return max_context


def check_position_limit(cfg: ModelConfig, max_context: int) -> None:
    """Past max_position_embeddings a model sees positions it was never trained on.

    With the default or linear rope that is extrapolation: the angles are defined for every position and quality
    degrades gradually, so it is allowed with a warning (some models are used this way on purpose). A YaRN rope
    cannot be extended that way: its config already is an extension, and its interpolation ramp and attention
    temperature are derived from `factor` for exactly max_position_embeddings positions; a longer context needs a
    larger factor in config.json, which changes the numbers for every position, so running past it is an error
    naming that fix.
    """
    if max_context > MAX_EXACT_POSITIONS:
        raise OffloadError(f"max_context {max_context} is past {MAX_EXACT_POSITIONS} positions, where the rope's "
                           "float32 angles can no longer tell positions apart; lower max_context")
    limit = cfg.max_position_embeddings
    if max_context <= limit:
        return
    if cfg.rope.type == "yarn":
        raise OffloadError(f"max_context {max_context} exceeds the {limit} positions this model's YaRN rope is "
                           f"scaled for (factor {cfg.rope.factor:g}); lower max_context to {limit} or raise the "
                           "rope factor in config.json")
    log.warning("max_context %d exceeds the model's %d positions (max_position_embeddings): the model was not "
                "trained on positions past it and its output may degrade", max_context, limit)


def rope_table_bytes(cfg: ModelConfig, max_context: int, dtype_bytes: int) -> int:
    """The rotary table for max_context positions: cos and sin [P, rope_dim/2] in the model dtype, plus the
    float32 angles they are computed from."""
    half = cfg.rope_dim // 2
    return max_context * half * (2 * dtype_bytes + 4)


def context_bytes(cfg: ModelConfig, max_context: int, dtype_bytes: int, kv_bytes: int | None = None) -> int:
    """What max_context costs in memory: the layers' caches (KV, MLA latent, fixed recurrent states; kv_bytes a
    cached value, None: dtype_bytes) plus the rope table."""
    return kv_cache_bytes(cfg, max_context, dtype_bytes, kv_bytes) + rope_table_bytes(cfg, max_context, dtype_bytes)


def check_host_memory(cfg: ModelConfig, max_context: int, dtype_bytes: int, weight_bytes: int,
                      available_bytes: int, kv_bytes: int | None = None) -> None:
    """Everything on the host (no device tier): the context and the weights must fit the RAM that is free."""
    context = context_bytes(cfg, max_context, dtype_bytes, kv_bytes)
    if context + weight_bytes <= available_bytes:
        return
    fixed = context_bytes(cfg, 0, dtype_bytes, kv_bytes)  # recurrent layers' states: the same for any context
    per_position = context_bytes(cfg, 1, dtype_bytes, kv_bytes) - fixed
    fits = max(available_bytes - weight_bytes - fixed, 0) // per_position
    if fits < 1:
        raise OffloadError(f"the weights need {_gib(weight_bytes)} but only {_gib(available_bytes)} of RAM is "
                           "free; free memory, run the experts as int8 or int4 (--experts), or give a GPU budget")
    halve = " or keep the cache as bf16 (--kv-cache bf16)" if (kv_bytes or dtype_bytes) > 2 else ""
    raise OffloadError(f"max_context {max_context} needs {_gib(context)} for the KV cache and rope table on top "
                       f"of {_gib(weight_bytes)} of weights, but only {_gib(available_bytes)} of RAM is free; "
                       f"lower max_context (at most {min(fits, max_context - 1)} fits){halve}")


def check_load(checkpoint: Checkpoint, cfg: ModelConfig, max_context: int | None, device: str, dtype: str,
               gpu_memory: int | str | None, plan: object, kv_cache: str | None = None) -> int:
    """What load() checks before reading a weight; returns the max_context to load with.

    With a device tier (a GPU, a simulated budget or a plan) the planner weighs the KV cache against the device
    budget before any weight is read; without one the whole model and its cache live in host RAM, checked here.
    """
    from .api import resolve_device, resolve_dtype, resolve_kv_dtype
    from .placement import has_device_tier
    from .placement.budget import detect_budgets

    max_context = resolve_max_context(cfg, max_context)
    torch_device = resolve_device(device)
    if not has_device_tier(torch_device, gpu_memory, plan):
        torch_dtype = resolve_dtype(dtype, torch_device)
        kv_bytes = resolve_kv_dtype(kv_cache, torch_dtype).itemsize
        check_host_memory(cfg, max_context, torch_dtype.itemsize, resident_weight_bytes(checkpoint),
                          detect_budgets(torch_device, None).host_bytes, kv_bytes)
    check_position_limit(cfg, max_context)
    return max_context


def resident_weight_bytes(checkpoint: Checkpoint) -> int:
    """Weight bytes loading copies into RAM: all of them, except a store's packed matrices, which stay memory-mapped
    (clean file pages the kernel can drop: a store may be larger than RAM, docs/benchmarks.md)."""
    from .weights.store import packed_entries

    mapped = sum(checkpoint.tensors[f"{name}.{part}"].nbytes for name in packed_entries(checkpoint)
                 for part in ("q", "d", "m") if f"{name}.{part}" in checkpoint.tensors)
    return checkpoint.nbytes() - mapped


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Every id must index the embedding table."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise OffloadError(f"token id {bad} is outside the vocabulary (0 to {vocab_size - 1}); pass ids the "
                           "model's tokenizer produces")


def model_config(folder: Path) -> ModelConfig:
    """The config a checkpoint folder would load with (its safetensors headers validated on the way)."""
    from .arch import config_from_hf

    return config_from_hf(Checkpoint(folder).config_json)


def parse_token_ids(text: str) -> list[int]:
    """--prompt-ids: "1,2,3" (spaces allowed) -> [1, 2, 3]."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise OffloadError(f"--prompt-ids takes comma-separated token ids like 1,2,3, got {text!r}") from None


def chat_prompt_ids(folder: Path, messages: list[dict[str, str]]) -> list[int]:
    """Messages through the checkpoint's chat template, as Model.chat_prompt makes them."""
    tokenizer = Tokenizer.from_dir(folder)
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                            add_special_tokens=False)


def prompt_token_ids(folder: Path, text: str) -> list[int]:
    """A text prompt as the loaded model would encode it (the tokenizer loads in milliseconds, no weight)."""
    if not Tokenizer.exists(folder):
        raise OffloadError(f"{folder} has no tokenizer.json (or tiktoken.model) to encode a text prompt; pass token "
                           "ids instead (--prompt-ids 1,2,3)")
    return Tokenizer.from_dir(folder).encode(text)


def check_request(ids: Sequence[int], cfg: ModelConfig, max_context: int, max_new_tokens: int,
                  **sampling: float | int | None) -> None:
    """A generation request against the model it is for, before loading it: bad sampling values (SamplingParams
    validates itself), an empty prompt, ids outside the vocabulary, max_new_tokens < 1 and a prompt that does not
    fit max_context are errors."""
    SamplingParams(**sampling)
    check_token_ids(ids, cfg.vocab_size)
    check_fits(len(ids), max_new_tokens, max_context)


def check_chat(folder: Path, max_context: int | None, max_new_tokens: int, system: str | None,
               prompt: str | None, **sampling: float | int | None) -> None:
    """`offload chat` before loading: sampling values, room for a reply, and a --prompt message that fits."""
    SamplingParams(**sampling)
    max_context = resolve_max_context(model_config(folder), max_context)
    check_room_for_reply(max_new_tokens, max_context)
    if prompt is not None:
        messages = [{"role": "system", "content": system}] if system else []
        ids = chat_prompt_ids(folder, messages + [{"role": "user", "content": prompt}])
        check_fits(len(ids), max_new_tokens, max_context)


def check_profile_prompts(folder: Path, prompts: Sequence[str], max_new_tokens: int,
                          max_context: int | None) -> None:
    """`offload profile` before loading: each prompt, sent as profile sends it (a user message through the chat
    template when there is one, else plain text), fits max_context with max_new_tokens. The profile's own checks
    (offload.profiling.check_profile_args) come first and name a missing tokenizer."""
    max_context = resolve_max_context(model_config(folder), max_context)
    tokenizer = Tokenizer.from_dir(folder)
    for text in prompts:
        ids = (chat_prompt_ids(folder, [{"role": "user", "content": text}]) if tokenizer.chat_template is not None
               else tokenizer.encode(text))
        check_fits(len(ids), max_new_tokens, max_context)


def check_bench(folder: Path, prompt_tokens: int, gen_tokens: int, max_context: int | None) -> None:
    """`offload bench` before loading: the random prompt and the generated tokens fit max_context."""
    check_fits(prompt_tokens, gen_tokens, resolve_max_context(model_config(folder), max_context))


def check_room_for_reply(max_new_tokens: int, max_context: int) -> None:
    """A chat needs room for at least one prompt token besides the reply."""
    if max_new_tokens < 1:
        raise OffloadError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens >= max_context:
        raise ContextLengthError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                                 f"max_context={max_context}; lower --max-new-tokens or raise --max-context")


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB // 10 else f"{n / 2**20:.1f} MiB"
