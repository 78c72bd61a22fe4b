"""Frozen, self-validating configuration: the Gemma architecture registry.

Every Gemma text model (1, 2 and 3) is the same network; variants differ only by
the fields of `ModelConfig`. The numbers in `VARIANTS` are the published
architectures (the official configs of google/gemma-*, gemma-2-*, gemma-3-*).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class AttentionKind(str, enum.Enum):
    """What a decoder layer's attention may see."""

    GLOBAL = "global"  # causal attention over the whole context
    LOCAL = "local"  # causal attention over the last `sliding_window` positions only


class Family(str, enum.Enum):
    """Gemma generation; decides defaults, never a separate code path in the model."""

    GEMMA1 = "gemma1"
    GEMMA2 = "gemma2"
    GEMMA3 = "gemma3"


def default_dtype(device: str) -> str:
    """bfloat16 on accelerators (their fast dtype), float32 on CPU (bf16 matmuls are slow there)."""
    return "float32" if device == "cpu" else "bfloat16"


def layer_pattern(num_layers: int, local_per_global: int) -> tuple[AttentionKind, ...]:
    """Repeat `local_per_global` LOCAL layers then one GLOBAL layer (0 → all GLOBAL).

    Gemma 2 alternates local/global (1:1, starting local); Gemma 3 uses 5 local : 1 global.
    """
    if local_per_global == 0:
        return (AttentionKind.GLOBAL,) * num_layers
    period = local_per_global + 1
    return tuple(
        AttentionKind.GLOBAL if (i + 1) % period == 0 else AttentionKind.LOCAL
        for i in range(num_layers)
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of one Gemma text model. Validated on construction."""

    name: str  # registry name, e.g. "gemma-3-270m"; free text for custom configs
    family: Family  # Gemma generation (1, 2 or 3)
    vocab_size: int  # rows of the tied embedding / LM head
    hidden_size: int  # residual stream width
    intermediate_size: int  # GeGLU hidden width (per gate and per up projection)
    num_layers: int  # decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (1 = multi-query attention)
    head_dim: int  # width of one attention head (not always hidden / heads)
    max_position_embeddings: int  # context length the model was trained for
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    query_pre_attn_scalar: float | None = None  # scores scale = this**-0.5 (None → head_dim)
    attn_logit_softcap: float | None = None  # Gemma 2: scores = c * tanh(scores / c)
    final_logit_softcap: float | None = None  # Gemma 2: logits = c * tanh(logits / c)
    sliding_window: int | None = None  # LOCAL layers see this many positions (incl. their own)
    layer_kinds: tuple[AttentionKind, ...] = ()  # per layer; () → all GLOBAL
    use_qk_norm: bool = False  # Gemma 3: RMSNorm over head_dim on q and k before RoPE
    use_sandwich_norms: bool = False  # Gemma 2/3: post-attention and pre/post feed-forward norms
    rope_theta: float = 10_000.0  # RoPE base of GLOBAL layers
    rope_theta_local: float = 10_000.0  # RoPE base of LOCAL layers
    rope_scaling_factor: float = 1.0  # linear position scaling on GLOBAL layers (Gemma 3 4b+: 8)

    def __post_init__(self) -> None:
        if not self.layer_kinds:
            object.__setattr__(self, "layer_kinds", (AttentionKind.GLOBAL,) * self.num_layers)
        object.__setattr__(self, "family", Family(self.family))
        object.__setattr__(self, "layer_kinds", tuple(AttentionKind(k) for k in self.layer_kinds))
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if len(self.layer_kinds) != self.num_layers:
            raise ConfigError(
                f"layer_kinds has {len(self.layer_kinds)} entries for {self.num_layers} layers")
        if AttentionKind.LOCAL in self.layer_kinds and not (self.sliding_window and self.sliding_window > 0):
            raise ConfigError("sliding_window must be a positive int when any layer is LOCAL")
        for field in ("rms_norm_eps", "rope_theta", "rope_theta_local", "rope_scaling_factor"):
            if not (math.isfinite(getattr(self, field)) and getattr(self, field) > 0):
                raise ConfigError(f"{field} must be a positive finite number, got {getattr(self, field)!r}")
        for field in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, field)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{field} must be None or a positive number, got {value!r}")

    @property
    def attention_scale(self) -> float:
        """Multiplier of q·k: query_pre_attn_scalar**-0.5 (head_dim**-0.5 by default)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def num_params(self) -> int:
        """Parameter count (the tied embedding counted once)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (2 * self.head_dim if self.use_qk_norm else 0)
        mlp = 3 * h * self.intermediate_size
        norms = h * (4 if self.use_sandwich_norms else 2)
        return self.vocab_size * h + self.num_layers * (attn + mlp + norms) + h

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """How the paged KV cache lays out a model's layers: the sliding-window pool.

    Layers are split into groups of `group_size` layers of one attention kind (group_size =
    gcd of the LOCAL and GLOBAL layer counts, so every group is full). A page holds one block
    (block_size positions) of K/V for every layer of one group, and all groups draw pages from
    one pool. Each sequence has a block table per group; a LOCAL group's table drops the blocks
    its window has left (their pages go back to the pool), a GLOBAL group's keeps all. So at
    short contexts a sequence holds what one table for all layers held, and at long ones its
    LOCAL layers hold only the window (Gemma 3 270M at 8,192 tokens: 1 x 512 + 5 x 33 pages of
    3 layers, against 512 blocks of 18 layers: 4.5x less). Layer l writes cache tensor
    `layer_slot[l]`, shared by the l-th layer of every group (their pages never overlap).
    """

    group_local: tuple[bool, ...]  # per group: its layers are LOCAL (their table keeps only the window)
    layer_group: tuple[int, ...]  # per layer: its group (which block table it reads)
    layer_slot: tuple[int, ...]  # per layer: its position inside a page (which cache tensor it writes)
    sliding_window: int | None  # positions a LOCAL layer sees (None: no LOCAL layer)

    @property
    def num_groups(self) -> int:
        """Block tables per sequence (pages per block of positions)."""
        return len(self.group_local)

    @property
    def group_size(self) -> int:
        """Layers per page (cache tensors the layers share)."""
        return max(self.layer_slot) + 1

    @property
    def windowed(self) -> bool:
        """True when some group frees the blocks its window has left."""
        return any(self.group_local)

    @classmethod
    def single(cls, num_layers: int) -> "KVLayout":
        """One group of all layers: one block table per sequence, nothing freed early."""
        return cls((False,), (0,) * num_layers, tuple(range(num_layers)), None)

    @classmethod
    def of(cls, config: ModelConfig, window_pool: bool = True) -> "KVLayout":
        """The layout of `config`'s layers: LOCAL and GLOBAL layers in separate groups when
        `window_pool` and the model has LOCAL layers, else one group."""
        local = [i for i, kind in enumerate(config.layer_kinds) if kind is AttentionKind.LOCAL]
        if not (window_pool and local):
            return cls.single(config.num_layers)
        glob = [i for i, kind in enumerate(config.layer_kinds) if kind is AttentionKind.GLOBAL]
        size = math.gcd(len(local), len(glob))
        layer_group, layer_slot, group_local = [0] * config.num_layers, [0] * config.num_layers, []
        for layers, is_local in ((glob, False), (local, True)):
            for start in range(0, len(layers), size):
                for slot, layer in enumerate(layers[start:start + size]):
                    layer_group[layer], layer_slot[layer] = len(group_local), slot
                group_local.append(is_local)
        return cls(tuple(group_local), tuple(layer_group), tuple(layer_slot), config.sliding_window)


def _gemma1(name: str, **fields: Any) -> ModelConfig:
    return ModelConfig(name=name, family=Family.GEMMA1, vocab_size=256_000,
                       max_position_embeddings=8192, head_dim=256, **fields)


def _gemma2(name: str, num_layers: int, **fields: Any) -> ModelConfig:
    return ModelConfig(
        name=name, family=Family.GEMMA2, vocab_size=256_000, max_position_embeddings=8192,
        num_layers=num_layers, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        sliding_window=4096, layer_kinds=layer_pattern(num_layers, 1),
        use_sandwich_norms=True, **fields)


def _gemma3(name: str, num_layers: int, **fields: Any) -> ModelConfig:
    large = fields.pop("large", True)  # 4b/12b/27b: 128K context, 1024 window, RoPE scaling 8
    return ModelConfig(
        name=name, family=Family.GEMMA3, num_layers=num_layers,
        vocab_size=262_208 if large else 262_144,
        max_position_embeddings=131_072 if large else 32_768,
        sliding_window=1024 if large else 512, layer_kinds=layer_pattern(num_layers, 5),
        use_qk_norm=True, use_sandwich_norms=True, rope_theta=1_000_000.0,
        rope_theta_local=10_000.0, rope_scaling_factor=8.0 if large else 1.0, **fields)


VARIANTS: Mapping[str, ModelConfig] = {c.name: c for c in (
    _gemma1("gemma-2b", hidden_size=2048, intermediate_size=16_384, num_layers=18,
            num_heads=8, num_kv_heads=1),
    _gemma1("gemma-7b", hidden_size=3072, intermediate_size=24_576, num_layers=28,
            num_heads=16, num_kv_heads=16),
    _gemma2("gemma-2-2b", 26, hidden_size=2304, intermediate_size=9216, num_heads=8,
            num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    _gemma2("gemma-2-9b", 42, hidden_size=3584, intermediate_size=14_336, num_heads=16,
            num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    _gemma2("gemma-2-27b", 46, hidden_size=4608, intermediate_size=36_864, num_heads=32,
            num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    _gemma3("gemma-3-270m", 18, large=False, hidden_size=640, intermediate_size=2048,
            num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256),
    _gemma3("gemma-3-1b", 26, large=False, hidden_size=1152, intermediate_size=6912,
            num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256),
    _gemma3("gemma-3-4b", 34, hidden_size=2560, intermediate_size=10_240, num_heads=8,
            num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    _gemma3("gemma-3-12b", 48, hidden_size=3840, intermediate_size=15_360, num_heads=16,
            num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    _gemma3("gemma-3-27b", 62, hidden_size=5376, intermediate_size=21_504, num_heads=32,
            num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168),
)}
# Common aliases (Hugging Face repo spellings).
ALIASES: Mapping[str, str] = {
    "gemma-2-2b-v2": "gemma-2-2b", "gemma2-2b": "gemma-2-2b", "2b-v2": "gemma-2-2b",
    "gemma3-270m": "gemma-3-270m", "gemma3-1b": "gemma-3-1b",
}


def get_variant(name: str) -> ModelConfig:
    """The registry entry for `name` (case-insensitive, "-it"/"-pt" suffixes ignored)."""
    key = name.strip().lower()
    for suffix in ("-it", "-pt"):
        key = key.removesuffix(suffix)
    key = ALIASES.get(key, key)
    if key not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
    return VARIANTS[key]
