"""DeepSeek Sparse Attention (deepseek_v32, glm_moe_dsa) beyond the shared reference runner: the lightning indexer's
top-k against transformers' on the same inputs, prefill and step by step; the absorbed form over the selected
positions against the masked naive form; proof that the tests' contexts really take the sparse path; the indexer
key cache and its bytes; GLM-5's shared top-k layers; the published configs' sizes, a full-size plan, config
errors, and inspect / plan / convert."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

import offload
from offload.arch import architecture, config_from_hf
from offload.errors import CheckpointError
from offload.inspect import param_counts
from offload.model.kv_cache import LatentCache, LatentIndexCache
from offload.placement import PlanRequest, inventory, kv_cache_bytes, make_plan
from test_glm4_moe import with_mtp_layer
from tiny_models import check_plan_and_convert, cli_text, clone_with_config, reference_logits, rel_err

IDS = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3))
CPU = torch.device("cpu")

# DeepSeek-V3.2-Exp's config.json as published (its fp8 quantization_config left out).
DEEPSEEK_V32 = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 129280,
                "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
                "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
                "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
                "moe_layer_freq": 1, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
                "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "q_lora_rank": 1536,
                "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 64, "max_position_embeddings": 163840,
                "rms_norm_eps": 1e-06, "rope_theta": 10000,
                "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                                 "original_max_position_embeddings": 4096, "type": "yarn"},
                "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                "bos_token_id": 0, "eos_token_id": 1}
# GLM-5's config.json (glm_moe_dsa): every layer runs its indexer.
GLM_5 = {"architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa", "vocab_size": 154880,
         "hidden_size": 6144, "intermediate_size": 12288, "moe_intermediate_size": 2048, "num_hidden_layers": 78,
         "num_attention_heads": 64, "num_key_value_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1,
         "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
         "routed_scaling_factor": 2.5, "q_lora_rank": 2048, "kv_lora_rank": 512, "qk_nope_head_dim": 192,
         "qk_rope_head_dim": 64, "v_head_dim": 256, "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 32,
         "max_position_embeddings": 202752, "rms_norm_eps": 1e-05, "rope_theta": 1000000,
         "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "eos_token_id": [154820, 154827, 154829]}


def causal_sets(selection: torch.Tensor, start: int = 0) -> list[set[int]]:
    """Each query's selected causal positions (a query with fewer than k causal positions is given later ones
    too, which attention masks)."""
    return [{p for p in row.tolist() if p <= start + t} for t, row in enumerate(selection)]


def reference_selection(ref, x: torch.Tensor) -> torch.Tensor:
    """transformers' layer-0 indexer top-k [S, k] for attention inputs x [S, H] at positions 0.., with its own
    query latent and rotary embedding."""
    attn = ref.model.layers[0].self_attn
    S = x.shape[0]
    with torch.no_grad():
        q_resid = attn.q_a_layernorm(attn.q_a_proj(x[None]))
        cos_sin = ref.model.rotary_emb(x[None], torch.arange(S)[None])
        causal = torch.ones(S, S, dtype=torch.bool).tril()[None]
        return attn.indexer(x[None], q_resid, cos_sin, causal, None)[0].long()


@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa"])
def test_indexer_topk_equals_transformers(checkpoint_dir, name):
    folder, ref = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", max_context=64)
    attn, rope = model.transformer.layers[0].attn, model.transformer.rope
    topk = model.config.indexer.topk
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(5))
    expected = reference_selection(ref, x)
    with torch.inference_mode():
        q_latent = attn.q_a_norm(attn.input_projs(x)[0])
        whole = attn.indexer(x, q_latent, 0, attn.new_cache(64, torch.float32, CPU), rope)
        cache = attn.new_cache(64, torch.float32, CPU)  # a prefill of 20, then one position at a time
        first = attn.indexer(x[:20], q_latent[:20], 0, cache, rope)
        steps = [attn.indexer(x[i : i + 1], q_latent[i : i + 1], i, cache, rope) for i in range(20, 40)]
    assert whole.shape == expected.shape == (40, topk)
    assert causal_sets(whole) == causal_sets(expected)
    assert torch.equal(whole[topk:], expected[topk:])  # past k causal positions: the same ranking, ties and all
    stepwise = torch.cat([first, *steps])
    assert causal_sets(stepwise) == causal_sets(whole) and torch.equal(stepwise[topk:], whole[topk:])
    # The sparse path is taken: late queries leave most of their causal positions out.
    assert all(len(s) == topk for s in causal_sets(whole)[topk:]) and 40 > 3 * topk


@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa"])
def test_tests_contexts_take_the_sparse_path(checkpoint_dir, tmp_path, name):
    """Guard for the reference runner: with the indexer's top-k above the context (attention over every position)
    the logits are far from transformers' sparse ones, so agreement there means the selection is right."""
    folder, ref = checkpoint_dir(name)
    expected = reference_logits(ref, IDS)
    sparse = offload.load(folder, device="cpu", max_context=64)
    dense = offload.load(clone_with_config(folder, tmp_path / "dense", lambda c: {**c, "index_topk": 1000}),
                         device="cpu", max_context=64)
    assert rel_err(sparse.logits(IDS), expected) <= 1e-4
    assert rel_err(dense.logits(IDS), expected) > 1e-2


@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa"])
def test_absorbed_selected_form_equals_masked_naive_form(checkpoint_dir, name):
    """A prefill shorter than top-k (every position), a chunk past it whose first queries have fewer causal
    positions than k, then single decode steps: the absorbed form (gathering the selected latents) agrees."""
    folder, _ = checkpoint_dir(name)
    model = offload.load(folder, device="cpu", max_context=64)
    rope, topk = model.transformer.rope, model.config.indexer.topk
    x = torch.randn(30, 64, generator=torch.Generator().manual_seed(7))
    results = []
    for absorbed in (False, True):
        caches = [layer.attn.new_cache(64, torch.float32, CPU) for layer in model.transformer.layers]
        outs = []
        with torch.inference_mode():
            for begin, end in [(0, topk - 3), (topk - 3, topk + 3), *((i, i + 1) for i in range(topk + 3, 30))]:
                # layers 0 and 1 on the same input: GLM-5's layer 1 reuses layer 0's selection
                for layer, cache in zip(model.transformer.layers[:2], caches):
                    outs.append(layer.attn(x[begin:end], begin, cache, rope, absorbed=absorbed))
        results.append(torch.cat(outs))
    assert rel_err(results[1], results[0]) <= 1e-5


def test_multi_token_prediction_layer_with_its_indexer_is_skipped(checkpoint_dir, tmp_path):
    """DeepSeek-V3.2 and GLM-5 ship an MTP layer (`model.layers.{num_hidden_layers}`, with its own indexer)."""
    folder, ref = checkpoint_dir("deepseek_v32")
    mtp = with_mtp_layer(folder, tmp_path / "mtp", ref.config.num_hidden_layers)
    mtp = clone_with_config(mtp, tmp_path / "declared", lambda c: {**c, "num_nextn_predict_layers": 1})
    with safe_open(mtp / "mtp.safetensors", "pt") as f:
        extra = list(f.keys())
    assert any(".self_attn.indexer.wq_b." in name for name in extra)
    model = offload.load(mtp, device="cpu", max_context=64)
    assert model.load_info.skipped_tensors == len(extra)
    assert rel_err(model.logits(IDS), reference_logits(ref, IDS)) <= 1e-4


def test_indexer_caches_and_their_bytes(checkpoint_dir):
    """GLM-5 variant: layers 0 and 2 run an indexer and cache its keys; layer 1 reuses layer 0's top-k and keeps
    the plain latent cache. The planner's cache bytes count exactly what the model allocates."""
    folder, _ = checkpoint_dir("glm_moe_dsa")
    model = offload.load(folder, device="cpu", max_context=48)
    cfg, layers = model.config, model.transformer.layers
    assert cfg.indexer.own_layers == (True, False, True)
    assert [type(c) for c in model.transformer.caches] == [LatentIndexCache, LatentCache, LatentIndexCache]
    assert model.transformer.caches[0].index_k.shape == (48, cfg.indexer.head_dim)
    assert layers[1].attn.indexer is None and layers[1].attn.selection is layers[0].attn.selection
    assert layers[2].attn.indexer is not None and layers[2].attn.selection is not layers[0].attn.selection
    assert model.transformer.cache_nbytes == kv_cache_bytes(cfg, 48, 4)
    with torch.inference_mode():
        model.transformer(IDS[:30], 0)
    assert layers[0].attn.selection.positions.shape == (30, cfg.indexer.topk)


@pytest.mark.parametrize("hf, total, active", [(DEEPSEEK_V32, 671e9, 37e9), (GLM_5, 744e9, 40e9)])
def test_published_sizes_and_a_full_size_plan(hf, total, active):
    """DeepSeek-V3.2: 671B total / 37B active as V3 (the indexers add 0.9B); GLM-5: 744B / 40B. Active counts leave
    out the embedding and LM head, totals the MTP layer. A 96 GiB device (a workstation card) with a 32K context
    plans, the cache counting each indexer layer's keys."""
    cfg = config_from_hf(hf)
    counts = param_counts(cfg)
    assert counts.total == pytest.approx(total, rel=0.02)
    assert counts.active - 2 * hf["vocab_size"] * hf["hidden_size"] == pytest.approx(active, rel=0.03)
    assert cfg.indexer.num_indexer_layers == cfg.num_hidden_layers and cfg.num_extra_layers == 1
    assert cfg.moe_layers[:4] == (False, False, False, True)

    context = 32768
    cache = kv_cache_bytes(cfg, context, 2)
    assert cache == context * 2 * cfg.num_hidden_layers * (512 + 64 + 128)
    inv = inventory(cfg, architecture(cfg.model_type).names)
    plan = make_plan(inv, PlanRequest(device_budget=96 * 2**30, host_budget=2**40, max_context=context,
                                      kv_cache_bytes=cache, dtype_bytes=2, expert_format="int4",
                                      expert_host_bytes=inv.expert_params // 2))
    assert len(plan.layers) == cfg.num_moe_layers


@pytest.mark.parametrize("spelling", [{}, {"index_topk_pattern": "F" + "SSF" * 25 + "SS"},
                                      {"index_topk_freq": 4, "index_skip_topk_offset": 3}])
def test_glm5_indexer_layers_as_transformers_reads_them(spelling):
    import transformers

    fields = {k: v for k, v in GLM_5.items() if k not in ("architectures", "model_type", "torch_dtype")}
    expected = transformers.GlmMoeDsaConfig(**fields, **spelling).indexer_types
    cfg = config_from_hf({**GLM_5, **spelling})
    assert cfg.indexer.own_layers == tuple(kind == "full" for kind in expected)
    assert cfg.indexer.rope_interleaved and not config_from_hf(DEEPSEEK_V32).indexer.rope_interleaved
    shared = expected.count("shared")
    assert shared == (0 if not spelling else 52 if "index_topk_pattern" in spelling else 57)
    assert kv_cache_bytes(config_from_hf(GLM_5), 1, 2) - kv_cache_bytes(cfg, 1, 2) == 2 * 128 * shared


@pytest.mark.parametrize("hf, edit, message", [
    (GLM_5, {"indexer_types": ["shared"] + ["full"] * 77}, "the first 'full'"),
    (GLM_5, {"indexer_types": ["full"] * 77}, "for each of the 78 layers"),
    (GLM_5, {"index_topk_pattern": "F" * 77 + "X"}, "must be 'full' or 'shared'"),
    (DEEPSEEK_V32, {"q_lora_rank": None}, "deepseek_v32 needs q_lora_rank"),
    (DEEPSEEK_V32, {"index_head_dim": 32}, "index_head_dim 32 is smaller than qk_rope_head_dim 64"),
    (DEEPSEEK_V32, {"index_topk": None}, "config.json has no 'index_topk'"),
])
def test_config_errors(hf, edit, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        config_from_hf({**hf, **edit})


def test_inspect_plan_and_convert_commands(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("glm_moe_dsa")
    text = cli_text("inspect", folder)
    assert "glm_moe_dsa (GlmMoeDsaForCausalLM)" in text
    assert ("sparse (DSA): top-12 positions per query, lightning indexer 6 heads x 16 (interleaved rope) in 2 "
            "layers") in text
    # per token, bf16: three latents (16 + 8) and two indexer keys (16)
    report = json.loads(cli_text("inspect", folder, "--json"))
    assert report["memory"]["kv_cache_bytes_per_token"] == 2 * (3 * 24 + 2 * 16)
    check_plan_and_convert(folder, tmp_path / "store", moe_layers=2, ids=IDS)
