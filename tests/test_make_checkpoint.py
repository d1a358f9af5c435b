"""tools/make_checkpoint.py: real shapes' configs and parameter counts; on tiny configs of every model_type, the
Hugging Face output matches transformers, the store equals the HF output quantized at load, runs repeat
bit for bit, and --skew skews routing."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import offload
from offload.arch import architecture
from offload.placement.inventory import inventory
from offload.weights.checkpoint import Checkpoint
from offload.weights.encoders import encode_fp8_block
from tiny_models import COMMON, VARIANTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_checkpoint as mc  # noqa: E402

# Published totals (billions of parameters). DeepSeek-V3: 671 B main model; its 685 B on the hub include the
# 14 B multi-token-prediction module, which offload skips and make_checkpoint does not write.
PUBLISHED = {"mixtral-8x7b": 46.7, "mixtral-4.7b": 4.73, "qwen3-30b-a3b": 30.5, "deepseek-v2-lite": 15.7,
             "deepseek-v3": 671.0, "deepseek-v3.2": 671.0, "glm-5": 744.0,
             "qwen3.5-35b-a3b": 35.0}  # Qwen3.5: the text model (vision tower apart)
TINY = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2_group_yarn", "deepseek_v3", "glm_moe_dsa"]
FORMATS = {"mixtral": ("int4", "int8"), "qwen2_moe": ("int8", "int4"), "qwen3_moe": ("bf16", "int8"),
           "olmoe": ("int4", "bf16"), "deepseek_v2_group_yarn": ("int8", "int8"), "deepseek_v3": ("int4", "int4"),
           "glm_moe_dsa": ("int8", "int8")}


def tiny_config(name: str, **overrides) -> dict:
    import transformers

    model_type, variant = VARIANTS[name]
    return transformers.CONFIG_MAPPING[model_type](**{**COMMON, **variant, **overrides}).to_dict()


def prompt(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def folder_bytes(folder: Path) -> dict[str, object]:
    """Every file's bytes; for safetensors, the parsed header and the data bytes (safetensors writes the keys of
    a header's __metadata__ in hash-map order, which varies between runs)."""
    files: dict[str, object] = {}
    for path in sorted(folder.iterdir()):
        raw = path.read_bytes()
        if path.suffix == ".safetensors":
            n = int.from_bytes(raw[:8], "little")
            files[path.name] = (json.loads(raw[8 : 8 + n]), raw[8 + n :])
        else:
            files[path.name] = raw
    return files


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """write_hf output of each tiny config, seed 3, written once per module."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = tmp_path_factory.mktemp(f"hf_{name}")
            mc.write_hf(cache[name], tiny_config(name), seed=3, std=0.05, log=None)
        return cache[name]

    return get


@pytest.mark.parametrize("shape", sorted(mc.SHAPES))
def test_shape_configs_load_and_count_like_the_real_models(shape):
    import transformers

    cfg = mc.shape_config(shape)
    arch = architecture(cfg["model_type"])
    model_config = arch.config_from_hf(cfg)
    hf = transformers.AutoConfig.for_model(**cfg)
    assert hf.model_type == cfg["model_type"] and hf.num_hidden_layers == cfg["num_hidden_layers"]
    inv = inventory(model_config, arch.names)
    total = sum(inv.params.values()) + inv.expert_params * inv.num_experts * len(inv.moe_layers)
    assert total == mc.parameter_count(mc.tensor_roles(cfg))
    assert abs(total / 1e9 - PUBLISHED[shape]) <= 0.01 * PUBLISHED[shape]


@pytest.mark.parametrize("shape", sorted(mc.SHAPES))
def test_truncated_shapes_keep_an_moe_layer(shape):
    import transformers

    for n in (1, 2, 4):
        cfg = mc.shape_config(shape, layers=n)
        model_config = architecture(cfg["model_type"]).config_from_hf(cfg)
        transformers.AutoConfig.for_model(**cfg)
        assert model_config.num_hidden_layers == n and any(model_config.moe_layers)
        assert model_config.moe_layers[-1]
    v3 = mc.shape_config("deepseek-v3", layers=4)
    assert v3["first_k_dense_replace"] == 3 and mc.shape_config("deepseek-v3", layers=2)["first_k_dense_replace"] == 1


@pytest.mark.parametrize("name", TINY)
def test_hf_output_matches_transformers_and_offload(hf_dir, name):
    import transformers

    folder = hf_dir(name)
    index = json.loads((folder / mc.INDEX_FILE).read_text())
    layers = tiny_config(name)["num_hidden_layers"]
    assert sorted(set(index["weight_map"].values())) == [mc.shard_file(k, layers + 1) for k in range(layers + 1)]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation.get("eos_token_id") == tiny_config(name).get("eos_token_id")
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = prompt()
    with torch.no_grad():
        expected = ref.eval()(ids[None]).logits[0]
    got = offload.load(folder, device="cpu", max_context=64).logits(ids)
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("name", TINY)
def test_store_equals_hf_output_quantized_at_load(hf_dir, tmp_path, name):
    experts, dense = FORMATS[name]
    mc.write_quantized(tmp_path / "store", tiny_config(name), experts, dense, seed=3, std=0.05, log=None)
    ids = prompt()
    stored = offload.load(tmp_path / "store", device="cpu", max_context=64)
    assert stored.config.num_hidden_layers == COMMON["num_hidden_layers"]
    at_load = offload.load(hf_dir(name), device="cpu", max_context=64, experts=experts, dense=dense)
    assert torch.equal(stored.logits(ids), at_load.logits(ids))


def test_two_runs_write_identical_files(tmp_path):
    cfg = tiny_config("deepseek_v3")
    for run in ("a", "b"):
        mc.write_hf(tmp_path / run / "hf", cfg, seed=5, skew=3.0, log=None)
        mc.write_quantized(tmp_path / run / "q", cfg, "int4", "int8", seed=5, skew=3.0, log=None)
    assert folder_bytes(tmp_path / "a" / "hf") == folder_bytes(tmp_path / "b" / "hf")
    assert folder_bytes(tmp_path / "a" / "q") == folder_bytes(tmp_path / "b" / "q")
    mc.write_hf(tmp_path / "other", cfg, seed=6, skew=3.0, log=None)
    assert folder_bytes(tmp_path / "other") != folder_bytes(tmp_path / "a" / "hf")


def test_values_do_not_depend_on_order_or_chunking(monkeypatch):
    cfg = tiny_config("qwen3_moe", num_hidden_layers=5, mlp_only_layers=[2])
    roles = [(n, s) for n, s in mc.hf_tensors(mc.tensor_roles(cfg))]
    forward = {n: mc.Values(cfg, seed=1, skew=4).tensor(n, s) for n, s in roles}
    backward_values = mc.Values(cfg, seed=1, skew=4)
    backward = {n: backward_values.tensor(n, s) for n, s in reversed(roles)}
    assert all(torch.equal(forward[n], backward[n]) for n, _ in roles)
    # a truncated model has the same values for the layers it keeps, routers included
    short = mc.truncate_layers(cfg, 3)
    kept = {n: mc.Values(short, seed=1, skew=4).tensor(n, s) for n, s in mc.hf_tensors(mc.tensor_roles(short))}
    assert all(torch.equal(v, forward[n]) for n, v in kept.items())
    # chunked generation: the rule is fixed by CHUNK; values keep their distribution
    monkeypatch.setattr(mc, "CHUNK", 64)
    small = mc.Values(cfg, seed=1).tensor("model.embed_tokens.weight", (96, 64))
    assert small.shape == (96, 64) and abs(small.float().std().item() - 0.02) < 0.002
    assert torch.equal(mc.Values(cfg, seed=1).tensor("model.norm.weight", (64,)), torch.ones(64, dtype=torch.bfloat16))
    for name in TINY:  # the routers --skew rewrites are tensors the loader reads
        names = {n for n, _ in mc.hf_tensors(mc.tensor_roles(tiny_config(name)))}
        routers = mc.Values(tiny_config(name)).routers
        assert routers and set(routers) <= names


def test_skew_makes_routing_hot_and_correlated_across_layers(tmp_path):
    cfg = tiny_config("deepseek_v3", num_hidden_layers=4, n_routed_experts=16, max_position_embeddings=1024)
    heat = {}
    for skew in (0.0, 4.0):
        mc.write_hf(tmp_path / str(skew), cfg, seed=0, skew=skew, embed_std=1.0, out_std=0.002, log=None)
        model = offload.load(tmp_path / str(skew), device="cpu", max_context=600)
        model.logits(torch.randint(0, 96, (512,), generator=torch.Generator().manual_seed(2)))
        counts = torch.tensor(model.routing_heat(), dtype=torch.float32)
        heat[skew] = (counts.max(1).values / counts.mean(1)).mean().item()
    assert heat[4.0] > 1.3 * heat[0.0]

    # the routers alone, on random hidden states: graded skew; neighbouring layers share most of router and order
    wide = tiny_config("qwen3_moe", num_hidden_layers=4, num_experts=64, mlp_only_layers=[])
    h = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    names = [f"model.layers.{i}.mlp.gate.weight" for i in range(4)]
    load = {}
    for skew in (0.0, 1.0, 4.0):
        router = mc.Values(wide, seed=0, skew=skew).tensor(names[0], (64, 64)).float()
        counts = torch.bincount((h @ router.T).topk(3, dim=-1).indices.flatten(), minlength=64).float()
        load[skew] = (counts.max() / counts.mean()).item()
    assert load[0.0] < 2.5 < load[1.0] < load[4.0]
    values = mc.Values(wide, seed=0, skew=4.0)
    routers = [values.tensor(name, (64, 64)).float() for name in names]
    for a, b in zip(routers, routers[1:]):
        hot_a, hot_b = a.norm(dim=1), b.norm(dim=1)  # row length grows with hotness
        ranks = torch.stack([hot_a.argsort().argsort().float(), hot_b.argsort().argsort().float()])
        assert torch.corrcoef(ranks)[0, 1] > 0.5
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1).mean()
        assert 0.7 < cos < 0.9


def test_embed_and_out_std_apply_to_their_tensors():
    cfg = tiny_config("mixtral")
    values = mc.Values(cfg, seed=0, std=0.02, embed_std=1.0, out_std=0.002)
    for name, shape, std in [("model.embed_tokens.weight", (96, 64), 1.0), ("lm_head.weight", (96, 64), 0.02),
                             ("model.layers.0.self_attn.o_proj.weight", (64, 64), 0.002),
                             ("model.layers.0.self_attn.q_proj.weight", (64, 64), 0.02),
                             ("model.layers.0.block_sparse_moe.experts.1.w2.weight", (64, 48), 0.002),
                             ("model.layers.0.block_sparse_moe.experts.1.w1.weight", (48, 64), 0.02)]:
        assert abs(values.tensor(name, shape).float().std().item() / std - 1) < 0.1, name
    plain = mc.Values(cfg, seed=0, std=0.02)
    assert torch.equal(plain.tensor("model.layers.0.self_attn.q_proj.weight", (64, 64)),
                       values.tensor("model.layers.0.self_attn.q_proj.weight", (64, 64)))


def test_command_line_on_a_tiny_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(mc.SHAPES, "tiny-v3", tiny_config("deepseek_v3"))
    realistic = ["--skew", "2", "--seed", "1", "--embed-std", "1", "--out-std", "0.002"]
    mc.main(["tiny-v3", str(tmp_path / "q"), "--layers", "2", "--experts-format", "int4", "--dense", "int8",
             *realistic])
    mc.main(["tiny-v3", str(tmp_path / "hf"), "--layers", "2", "--hf", *realistic])
    out = capsys.readouterr().out
    assert "[3/3] model-00003-of-00003.safetensors" in out and "parameters" in out
    ids = prompt()
    stored = offload.load(tmp_path / "q", device="cpu", max_context=64)
    assert stored.config.num_hidden_layers == 2 and stored.config.moe_layers == (False, True)
    at_load = offload.load(tmp_path / "hf", device="cpu", max_context=64, experts="int4", dense="int8")
    assert torch.equal(stored.logits(ids), at_load.logits(ids))
    with pytest.raises(SystemExit):
        mc.main(["tiny-v3", str(tmp_path / "hf"), "--hf"])  # not empty


def test_an_interrupted_hf_run_resumes(tmp_path, monkeypatch):
    cfg = tiny_config("qwen2_moe")
    mc.write_hf(tmp_path / "clean", cfg, seed=2, log=None)
    real = mc.write_streaming_safetensors
    calls = []

    def dies_on_the_third(path, tensors, chunks):
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, tensors, chunks)

    monkeypatch.setattr(mc, "write_streaming_safetensors", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        mc.write_hf(tmp_path / "resumed", cfg, seed=2, log=None)
    monkeypatch.setattr(mc, "write_streaming_safetensors", real)
    with pytest.raises(SystemExit):  # other options: refused
        mc.write_hf(tmp_path / "resumed", cfg, seed=3, log=None)
    lines = []
    mc.write_hf(tmp_path / "resumed", cfg, seed=2, log=lines.append)
    assert sum("kept from an earlier run" in line for line in lines) == 2
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "clean")


@pytest.mark.parametrize("dense", ["bf16", "int8"])
def test_prefetching_reader_follows_write_store_and_tolerates_other_orders(tmp_path, dense):
    from offload.weights.store import write_store

    cfg = tiny_config("qwen2_moe", tie_word_embeddings=True)
    roles = mc.tensor_roles(cfg)
    values = mc.Values(cfg, seed=4, skew=2.0)
    asked = []

    def recording(name, shape):
        asked.append((name, tuple(shape)))
        return values.tensor(name, shape)

    write_store(tmp_path / "store", cfg, recording, experts="int8", dense=dense)
    assert asked == mc.store_read_order(roles, dense, cfg["num_hidden_layers"])
    reader = mc.PrefetchingReader(mc.Values(cfg, seed=4, skew=2.0), asked)
    try:
        shuffled = [asked[i] for i in torch.randperm(len(asked), generator=torch.Generator().manual_seed(0))]
        for name, shape in asked[:5] + shuffled + asked:
            assert torch.equal(reader(name, shape), mc.Values(cfg, seed=4, skew=2.0).tensor(name, shape))
    finally:
        reader.close()


def test_fp8_bands_are_the_rows_of_encoding_the_whole_matrix(monkeypatch):
    monkeypatch.setattr(mc, "CHUNK", 210)  # Values chunks of 3 rows of 70; bands of 8 rows cross them
    values = mc.Values(tiny_config("deepseek_v3"), seed=1)
    name, shape, block = "model.layers.0.mlp.up_proj.weight", (45, 70), (8, 16)  # ragged tiles on both sides
    bands = list(mc.fp8_bands(values.chunks(name, shape), shape, block))
    weight, scale_inv = encode_fp8_block(values.tensor(name, shape), block)
    assert len(bands) == 6 and [len(w) for w, _ in bands] == [8] * 5 + [5]
    assert torch.equal(torch.cat([w for w, _ in bands]).view(torch.uint8), weight.view(torch.uint8))
    assert torch.equal(torch.cat([s for _, s in bands]), scale_inv) and scale_inv.shape == (6, 5)


def test_fp8_output_is_deepseek_v3s_published_layout_of_the_hf_values(hf_dir, tmp_path):
    mc.write_hf(tmp_path / "fp8", tiny_config("deepseek_v3"), seed=3, std=0.05, fp8=True, log=None)
    fp8, bf16 = Checkpoint(tmp_path / "fp8"), Checkpoint(hf_dir("deepseek_v3"))
    assert fp8.scheme.method == "fp8"
    assert fp8.config_json["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3",
                                                      "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    published = re.compile(r"^model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")  # as DeepSeek-V3 is on the hub
    quantized = {name for name, info in fp8.tensors.items() if info.dtype == "F8_E4M3"}
    assert quantized == {name for name in bf16.tensors if published.match(name)}
    assert any(".experts." in n for n in quantized) and any("kv_a_proj_with_mqa" in n for n in quantized)
    assert set(fp8.tensors) == set(bf16.tensors) | {f"{name}_scale_inv" for name in quantized}
    for name in bf16.tensors:
        if name in quantized:
            weight, scale_inv = encode_fp8_block(bf16.read(name))
            assert torch.equal(fp8.read(name).view(torch.uint8), weight.view(torch.uint8)), name
            assert torch.equal(fp8.read(f"{name}_scale_inv"), scale_inv), name
        else:
            assert torch.equal(fp8.read(name), bf16.read(name)), name


def test_fp8_command_line_matches_transformers_and_stays_close_to_bf16(tmp_path, monkeypatch, capsys):
    from test_quantized_checkpoints import hf_model

    monkeypatch.setitem(mc.SHAPES, "tiny-v3", tiny_config("deepseek_v3"))
    mc.main(["tiny-v3", str(tmp_path / "fp8"), "--layers", "2", "--fp8", "--seed", "1"])
    mc.main(["tiny-v3", str(tmp_path / "hf"), "--layers", "2", "--hf", "--seed", "1"])
    assert "hf fp8" in capsys.readouterr().out
    ids = prompt()
    reference = hf_model(tmp_path / "fp8")
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    bf16_experts = offload.load(tmp_path / "fp8", device="cpu", max_context=64, experts="bf16").logits(ids)
    assert rel_err(bf16_experts, expected) <= 2e-3  # transformers dequantizes to bf16 on a CPU: measured 3e-4
    default = offload.load(tmp_path / "fp8", device="cpu", max_context=64)
    assert default.load_info.expert_format == "int8"
    unquantized = offload.load(tmp_path / "hf", device="cpu", max_context=64, experts="bf16").logits(ids)
    # FP8 e4m3 moves each weight by ~2.8 % (RMS): through 2 random layers (std 0.02) the logits move by 0.075 of
    # their largest value at seed 1 (0.018-0.079 over seeds 1-6); int8 experts on top change that by < 0.001
    assert rel_err(default.logits(ids), unquantized) <= 0.1
    assert rel_err(bf16_experts, unquantized) <= 0.1


def test_an_interrupted_fp8_run_resumes(tmp_path, monkeypatch):
    cfg = tiny_config("deepseek_v3")
    mc.write_hf(tmp_path / "clean", cfg, seed=2, fp8=True, log=None)
    real = mc.write_streaming_safetensors

    def dies_on_the_third(path, tensors, chunks):
        if path.name.startswith("model-00003"):
            raise KeyboardInterrupt
        return real(path, tensors, chunks)

    monkeypatch.setattr(mc, "write_streaming_safetensors", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        mc.write_hf(tmp_path / "resumed", cfg, seed=2, fp8=True, log=None)
    monkeypatch.setattr(mc, "write_streaming_safetensors", real)
    with pytest.raises(SystemExit):  # the bf16 layout is other options
        mc.write_hf(tmp_path / "resumed", cfg, seed=2, log=None)
    lines = []
    mc.write_hf(tmp_path / "resumed", cfg, seed=2, fp8=True, log=lines.append)
    assert sum("kept from an earlier run" in line for line in lines) == 2
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "clean")
