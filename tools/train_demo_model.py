"""Train the small MoE that ships with offload as its built-in demo model (offload/demo_model/).

    apt-get install python3.11-doc      # the corpus: Python's documentation sources (PSF licence)
    python tools/train_demo_model.py --out offload/demo_model

Corpus: the reStructuredText sources of the Python 3.11 documentation as Debian's python3.11-doc package installs
them (/usr/share/doc/python3.11/html/_sources; Python Software Foundation License Version 2). The tutorial,
library and language references, HOWTOs, FAQ and glossary are cleaned to plain text; every section title and
every documented function, class or method also becomes a chat exchange ("What does list.append(x) do?" ->
its first paragraph) so the model learns the chat template. A byte-level BPE (offload's demo tokenizer) is
trained on the same text.

Model: Qwen3-MoE layout, 6 layers, hidden 256, 16 experts of width 128, top-4, tied embeddings (11.7 M
parameters, 23 MB in bf16), trained with transformers' own implementation (so the checkpoint is the reference
layout) on the CPU: AdamW, warm-up then cosine decay, Qwen3-MoE's load-balancing loss. Deterministic for a
given seed and thread count. Prints the loss as it goes and the validation loss at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offload.chat_template import render_chat_template  # noqa: E402
from offload.tokenizer import DEMO_CHAT_TEMPLATE, DEMO_SPECIAL_TOKENS, build_demo_tokenizer  # noqa: E402

DOC_SOURCES = ("/usr/share/doc/python3.11/html/_sources", "/usr/share/doc/python3/html/_sources")
SECTIONS = ("tutorial", "library", "reference", "howto", "faq", "using", "glossary.rst.txt")
VOCAB = 4096

MODEL_CONFIG = dict(
    vocab_size=VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=True,
    max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, router_aux_loss_coef=0.01,
    bos_token_id=DEMO_SPECIAL_TOKENS.index("<s>"),
    eos_token_id=[DEMO_SPECIAL_TOKENS.index("</s>"), DEMO_SPECIAL_TOKENS.index("<|end|>")],
)

QUESTIONS = ("What is {}?", "Tell me about {}.", "Explain {}.", "What should I know about {}?")
DEFINITION_QUESTIONS = ("What does {} do?", "Explain {}.", "What is {} for?")
DEFINITIONS = ("function", "method", "class", "exception", "attribute", "data", "decorator", "classmethod",
               "staticmethod", "opcode", "envvar", "option")

_UNDERLINE = re.compile(r"^([=\-~^*#\"+`'])\1{2,}\s*$")
_ROLE = re.compile(r":[\w:.+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::\s*(.*)$")


def find_sources(path: str | None) -> Path:
    for candidate in ([path] if path else DOC_SOURCES):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise SystemExit("Python's documentation sources were not found: apt-get install python3.11-doc, or pass "
                     "--source DIR (a folder of *.rst.txt files)")


def inline(text: str) -> str:
    """reST inline markup -> plain text: roles, links, literals and substitutions."""
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"\\(?=[\\'*`_| ])", "", text)  # reST backslash escapes
    return text.replace("``", "")


def clean(rst: str) -> tuple[str, list[tuple[str, str]]]:
    """One reST document -> (plain text, [(question, answer)] exchanges from titles and definitions)."""
    lines = rst.splitlines()
    out: list[str] = []
    pairs: list[tuple[str, str]] = []
    pending: tuple[str, str] | None = None  # (kind, subject) awaiting its first paragraph
    skip_indented = False
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        nxt = lines[i + 1].rstrip() if i + 1 < len(lines) else ""
        if _UNDERLINE.match(line):
            i += 1
            continue
        if line.strip() and _UNDERLINE.match(nxt) and len(nxt) >= len(line.strip()):
            title = inline(line.strip())
            out.extend(["", title, ""])
            pending = ("title", title)
            i += 2
            continue
        directive = _DIRECTIVE.match(line.strip()) if not line.startswith(" ") else None
        if directive:
            kind, arg = directive.group(1), directive.group(2)
            kind = kind.split(":")[-1]
            skip_indented = kind not in DEFINITIONS + ("note", "versionadded", "versionchanged", "seealso",
                                                       "deprecated", "tip", "warning", "important")
            if kind in DEFINITIONS and arg:
                out.extend(["", inline(arg), ""])
                pending = ("definition", inline(arg))
            i += 1
            continue
        stripped = line.strip()
        if re.match(r"^:[\w-]+:", stripped) or stripped.startswith(".. "):
            i += 1
            continue
        if skip_indented and (line.startswith(" ") or not stripped):
            i += 1
            continue
        skip_indented = False
        if pending and stripped and not stripped.startswith(">>>"):
            paragraph = []
            while i < len(lines) and lines[i].strip():
                paragraph.append(inline(lines[i].strip()))
                i += 1
            answer = " ".join(paragraph)
            out.extend(paragraph)
            out.append("")
            if 40 <= len(answer) <= 700 and not answer.startswith(("(", "*", "+", "-", "=")):
                pairs.append((pending[0] + ":" + pending[1], answer))
            pending = None
            continue
        out.append(inline(line))
        i += 1
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
    return text, pairs


def load_corpus(source: Path) -> tuple[list[str], list[tuple[str, str]]]:
    files = sorted(p for section in SECTIONS for p in ([source / section] if section.endswith(".txt")
                                                        else (source / section).rglob("*.rst.txt")))
    docs, pairs = [], []
    for path in files:
        text, doc_pairs = clean(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) > 200:
            docs.append(text)
            pairs.extend(doc_pairs)
    return docs, pairs


def chat_text(subject: str, answer: str, rng: random.Random) -> str:
    kind, name = subject.split(":", 1)
    question = rng.choice(DEFINITION_QUESTIONS if kind == "definition" else QUESTIONS).format(name)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return render_chat_template(DEMO_CHAT_TEMPLATE, messages, add_generation_prompt=False, bos_token="<s>",
                                eos_token="</s>")


def units(docs: list[str], pairs: list[tuple[str, str]], rng: random.Random) -> list[str]:
    """Training units: each document in chunks of paragraphs (ended by </s>) and each chat exchange."""
    out = []
    for doc in docs:
        chunk = ""
        for paragraph in doc.split("\n\n"):
            chunk += paragraph + "\n\n"
            if len(chunk) > 1500:
                out.append(chunk.strip() + "</s>")
                chunk = ""
        if chunk.strip():
            out.append(chunk.strip() + "</s>")
    out.extend(chat_text(subject, answer, rng) for subject, answer in pairs)
    rng.shuffle(out)
    return out


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=generator)
        yield torch.stack([stream[s: s + seq] for s in starts.tolist()])


@torch.no_grad()
def validation_loss(model, stream: torch.Tensor, seq: int, max_windows: int = 64) -> float:
    model.eval()
    windows = stream[: (stream.numel() // seq) * seq].view(-1, seq)[:max_windows]
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="offload/demo_model")
    parser.add_argument("--source", default=None, help="folder of the Python docs' *.rst.txt sources")
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="fixed, so runs are repeatable")
    args = parser.parse_args()

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    import tokenizers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    source = find_sources(args.source)
    docs, pairs = load_corpus(source)
    texts = units(docs, pairs, rng)
    n_val = max(len(texts) // 50, 1)
    train_texts, val_texts = texts[n_val:], texts[:n_val]
    print(f"corpus: {len(docs)} documents, {len(pairs)} chat exchanges, {sum(map(len, texts)) / 1e6:.1f} M chars "
          f"from {source}", flush=True)

    build_demo_tokenizer(train_texts, VOCAB, out)
    tokenizer = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    train, val = token_stream(tokenizer, train_texts), token_stream(tokenizer, val_texts)
    print(f"tokens: {train.numel() / 1e6:.2f} M train, {val.numel() / 1e6:.3f} M validation", flush=True)

    config = Qwen3MoeConfig(**MODEL_CONFIG, output_router_logits=True)
    model = Qwen3MoeForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(args.steps // 20, 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(args.steps - warmup, 1)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    data = batches(train, args.batch, args.seq, torch.Generator().manual_seed(args.seed))
    start, running = time.perf_counter(), None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        x = next(data)
        result = model(input_ids=x, labels=x)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lm_loss = (result.loss - config.router_aux_loss_coef * result.aux_loss).item()
        running = lm_loss if running is None else 0.95 * running + 0.05 * lm_loss
        if step % 25 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}/{args.steps}  loss {running:.3f}  aux {result.aux_loss.item():.3f}  "
                  f"lr {lr_at(step):.2e}  {elapsed / 60:.1f} min, ~{elapsed / (step + 1) * (args.steps - step - 1) / 60:.0f} "
                  "min left", flush=True)

    val_loss = validation_loss(model, val, args.seq)
    print(f"validation loss {val_loss:.3f} (perplexity {math.exp(val_loss):.1f})", flush=True)
    model.config.output_router_logits = False
    # Shards under 16 MB: the checkpoint ships inside the repository, where files stay small.
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="15MB")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": config.bos_token_id,
                                                            "eos_token_id": config.eos_token_id}, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps({
        "source": "Python 3.11 documentation sources (Debian python3.11-doc), PSF License Version 2",
        "documents": len(docs), "chat_exchanges": len(pairs), "train_tokens": train.numel(),
        "validation_tokens": val.numel(), "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "validation_loss": round(val_loss, 4),
        "minutes": round((time.perf_counter() - start) / 60, 1)}, indent=2) + "\n")
    print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()
