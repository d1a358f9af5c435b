"""ModelConfig: one frozen description of every supported MoE transformer, translated from config.json by arch/."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters` / older `rope_theta` + `rope_scaling`)."""

    theta: float = 10000.0
    type: str = "default"  # "default" | "linear" | "yarn" | "llama3"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / low_freq_factor are divided by `factor`,
    high_freq_factor: float = 4.0  # those below original / high_freq_factor kept, the band between blended


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek multi-head latent attention: a compressed KV latent plus a shared rope key."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleaved: bool  # rope over adjacent pairs (x0, x1) rather than the two halves

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Gated DeltaNet layers (Qwen3-Next, Qwen3.5): a short causal convolution over q/k/v, then per value head a
    [key_head_dim, value_head_dim] state updated by the gated delta rule; each key head serves
    num_value_heads / num_key_heads consecutive value heads."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    # "qkvz_ba": Qwen3-Next's two projections, their outputs grouped per key head (q, k, v, z | b, a);
    # "qkv_z_b_a": Qwen3.5's four projections, each laid out head after head.
    projections: str = "qkv_z_b_a"

    @property
    def conv_dim(self) -> int:
        """Channels the convolution runs over: q, k (key heads) and v (value heads)."""
        return 2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim


@dataclass(frozen=True)
class IndexerConfig:
    """DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2, GLM-5): a small multi-head scorer over its own
    key cache that picks the `topk` cached positions each query's MLA attends to."""

    n_heads: int  # index_n_heads
    head_dim: int  # index_head_dim; RoPE turns the first qk_rope_head_dim channels of each indexer head
    topk: int  # index_topk
    rope_interleaved: bool  # rope over adjacent pairs (GLM-5) rather than the two halves (DeepSeek-V3.2)
    own_layers: tuple[bool, ...]  # per layer: runs its own indexer (True) or reuses the top-k of the last one that did

    @property
    def num_indexer_layers(self) -> int:
        return sum(self.own_layers)


@dataclass(frozen=True)
class RouterConfig:
    """How a MoE layer turns router logits into top-k expert ids and combine weights."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" (max per group) | "noaux_tc" (top-2 sum per group)
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    has_correction_bias: bool = False  # DeepSeek-V3 e_score_correction_bias: biases selection, not weights
    norm_min: float = 0.0  # renormalised weights divide by max(sum, norm_min) (ERNIE-4.5's moe_norm_min)


@dataclass(frozen=True)
class ExpertActivation:
    """How an expert joins its gate and up projections before `down`:
    "silu": silu(gate) * up (every SwiGLU family);
    "clamped_swiglu": gpt-oss's (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything the shared transformer needs, with HF field names where one exists."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    router: RouterConfig
    moe_intermediate_size: int
    intermediate_size: int  # dense MLP layers
    moe_layers: tuple[bool, ...]  # per layer: routed experts (True) or a dense MLP (False)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (and on MLA's q_a / kv_a / o when DeepSeek sets it)
    attention_output_bias: bool = False  # bias on o_proj too (Qwen3-style attention, dots.llm1, with attention_bias)
    qk_norm: str | None = None  # None | "head" (per-head RMSNorm, Qwen3) | "full" (over the projection, OLMoE)
    clip_qkv: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer window, None = full attention
    mla: MLAConfig | None = None
    indexer: IndexerConfig | None = None  # DeepSeek Sparse Attention over the MLA cache
    shared_intermediate_size: int = 0  # 0 = no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(gate(x)) scales the shared expert
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    num_extra_layers: int = 0  # multi-token-prediction layers after the last layer (DeepSeek-V3, GLM-4.x), unused
    rotary_dim: int | None = None  # partial RoPE (GLM-4.x): rotate only each head's first rotary_dim channels
    rope_interleaved: bool = False  # GQA RoPE over adjacent channel pairs (ERNIE-4.5), not the two halves
    qk_norm_after_rope: bool = False  # per-head q/k RMSNorm applied to the rotated q/k (Hunyuan), not before
    mlp_bias: bool = False  # bias on the dense MLPs' and shared experts' projections (ERNIE-4.5's use_bias)
    attention_sinks: bool = False  # a learned per-head logit in every attention softmax (gpt-oss's `sinks`)
    expert_activation: ExpertActivation = ExpertActivation()  # the routed experts' gating function
    router_bias: bool = False  # a bias on the router logits (gpt-oss)
    expert_bias: bool = False  # biases on the routed experts' gate, up and down projections (gpt-oss)
    lm_head_bias: bool = False  # a bias on the LM head (ERNIE-4.5's use_bias), tied embeddings or not
    # Per layer "attention" or "linear_attention" (Gated DeltaNet, `linear_attention` below); () = all attention.
    layer_kinds: tuple[str, ...] = ()
    linear_attention: LinearAttentionConfig | None = None
    attention_output_gate: bool = False  # Qwen3-Next: q_proj also yields a gate; output x sigmoid(gate) before o_proj
    zero_centred_norm: bool = False  # Qwen3-Next: RMSNorm scales by (1 + weight), in fp32
    rope_layers: tuple[bool, ...] = ()  # per layer: RoPE turns q/k (False: a no-RoPE layer, Llama-4); () = every layer
    attention_chunks: tuple[int | None, ...] = ()  # per layer: queries attend only within their chunk of positions
    qk_l2_norm: bool = False  # Llama-4: a parameter-free L2 norm (eps rms_norm_eps) of the rotated q/k, RoPE layers
    # Llama-4's attention temperature on no-RoPE layers: queries at position p scaled by
    # 1 + attn_scale * log1p(floor((p + 1) / floor_scale)); (floor_scale, attn_scale), None = off.
    attention_temperature: tuple[float, float] | None = None
    router_scales_input: bool = False  # Llama-4: expert k runs on weight_k * x and its output is added unweighted
    # Per layer top-k where it differs between layers (Hunyuan's moe_topk list; router.top_k is then the largest);
    # () = router.top_k on every layer.
    layer_top_k: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # untranslated config.json, for display

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    def router_of(self, layer: int) -> RouterConfig:
        """The routing of MoE layer `layer`: `router`, with that layer's own top-k where they differ."""
        return replace(self.router, top_k=self.layer_top_k[layer]) if self.layer_top_k else self.router

    @property
    def routed_per_token(self) -> int:
        """Routed experts one token uses over all MoE layers."""
        return sum(self.router_of(i).top_k for i, moe in enumerate(self.moe_layers) if moe)

    def uses_rope(self, layer: int) -> bool:
        return not self.rope_layers or self.rope_layers[layer]

    def is_linear_attention(self, layer: int) -> bool:
        return bool(self.layer_kinds) and self.layer_kinds[layer] == "linear_attention"

    @property
    def num_linear_attention_layers(self) -> int:
        return sum(kind == "linear_attention" for kind in self.layer_kinds)

    @property
    def rope_dim(self) -> int:
        """Channels of each query/key head that the rotary table turns: MLA's rope part, a partial rotary_dim,
        else the whole head."""
        if self.mla:
            return self.mla.qk_rope_head_dim
        return self.rotary_dim or self.head_dim
