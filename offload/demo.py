"""The built-in demo model, and a random-weight checkpoint for tests and benchmarks.

`demo_model()` is the small Qwen3-MoE trained on Python's documentation that ships inside the package
(offload/demo_model/, made by tools/train_demo_model.py): `offload demo` runs it with no download.
`random_demo_checkpoint()` builds a toy MoE with RANDOM weights once and caches it: its output is gibberish by
construction; tests use it where any small checkpoint will do."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .errors import OffloadError
from .synthetic import write_synthetic_checkpoint
from .tokenizer import DEMO_SPECIAL_TOKENS, build_demo_tokenizer

DEMO_MODEL = Path(__file__).parent / "demo_model"
DEMO_VOCAB = 1024

# Qwen3-MoE layout at a toy size: 4 layers, 16 experts, top-4.
RANDOM_DEMO_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": DEMO_VOCAB,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    # The BPE trainer numbers special tokens first, in order: stop on </s> and on <|end|>.
    "eos_token_id": [DEMO_SPECIAL_TOKENS.index("</s>"), DEMO_SPECIAL_TOKENS.index("<|end|>")],
}

CORPUS = [
    "offload runs large sparse mixture-of-experts language models on one workstation.",
    "Attention, the router and the shared experts stay on the device; cold experts live in host memory.",
    "A router picks the top experts for every token, and their outputs are combined by weight.",
    "The expert cache keeps recently used experts close, and the prefetcher guesses the next ones.",
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: ; : , . ! ? ( ) [ ] { } - _ = + * / \\ ' \"",
]


def demo_model() -> Path:
    """The shipped demo checkpoint folder."""
    if not (DEMO_MODEL / "model.safetensors.index.json").exists():
        raise OffloadError(f"the built-in demo model is missing from {DEMO_MODEL}; reinstall offload, or rebuild "
                           "it with python tools/train_demo_model.py --out offload/demo_model")
    return DEMO_MODEL


def default_cache_dir() -> Path:
    base = os.environ.get("OFFLOAD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "offload")
    return Path(base).expanduser()


def random_demo_checkpoint(cache_dir: Path | None = None) -> Path:
    """The demo checkpoint folder, built on first use. Built in a temporary folder and renamed when complete,
    so an interrupted build never leaves a half-written checkpoint behind."""
    folder = (cache_dir or default_cache_dir()) / f"demo-random-moe-{__version__}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=folder.parent))
    try:
        build_demo_tokenizer(CORPUS, DEMO_VOCAB, staging)
        write_synthetic_checkpoint(staging, RANDOM_DEMO_CONFIG, std=0.06, seed=0)
        staging.rename(folder)
    except FileExistsError:
        pass  # another process finished first; its copy is complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
