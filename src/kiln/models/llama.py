"""Llama family: Llama 2/3/3.1/3.2, CodeLlama, Mistral (sliding window) and Qwen2 (q/k/v bias).

They differ only in config: attention bias, sliding window, rope theta/scaling.
"""

from __future__ import annotations

from ctypes import Array

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.kernels.native import CPUKernels, LlamaLayer
from kiln.models.base import CausalLM
from kiln.models.layers.attention import AttentionMetadata, PagedAttention
from kiln.models.layers.embedding import HeadRowsEmbedding
from kiln.models.layers.linear import Linear, cpu_packing_available
from kiln.models.layers.norm import RMSNorm
from kiln.models.layers.rotary import RotaryEmbedding

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size,
            [self.q_size, self.kv_size, self.kv_size],
            bias=config.attention_bias,
        )
        self.o_proj = Linear(self.q_size, config.hidden_size)
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5
        )

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj.forward(x).view(num_tokens, -1, self.head_dim)  # [T, H + 2 KV, D]
        if kv_cache is None:
            # No cache (training): rotate out of place, as autograd cannot follow ``rotate_``.
            num_qk = self.num_heads + self.num_kv_heads
            qk = rotary.rotate(qkv[:, :num_qk], *cos_sin)
            kv = torch.stack((qk[:, self.num_heads :], qkv[:, num_qk:]))  # [2, T, KV, D]
            out = self.attn.forward(qk[:, : self.num_heads], kv, None, attn_metadata)
            return self.o_proj.forward(out)
        kernels = self.attn.kernels
        if kernels is not None and rotary.fits_cpu_kernels and qkv.is_contiguous():
            # One native call rotates q and k and writes k and v to the cache.
            kernels.rope_and_cache(
                qkv, self.num_heads, *cos_sin, attn_metadata.slot_mapping, kv_cache
            )
            out = self.attn.attend(qkv[:, : self.num_heads], kv_cache, attn_metadata)
            return self.o_proj.forward(out)
        # One in-place rotary pass over the q and k heads together; the rotated keys stay next
        # to the values, so the cache takes both in one write.
        rotary.rotate_(qkv[:, : self.num_heads + self.num_kv_heads], *cos_sin)
        q = qkv[:, : self.num_heads]
        kv = qkv[:, self.num_heads :].unflatten(1, (2, self.num_kv_heads)).transpose(0, 1)
        out = self.attn.forward(q, kv, kv_cache, attn_metadata)
        return self.o_proj.forward(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(
            config.hidden_size, [config.intermediate_size] * 2, bias=config.mlp_bias
        )
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")
        self.act = _ACTIVATIONS[config.hidden_act]
        self.kernels: CPUKernels | None = None
        """kiln's CPU kernels (float32 models): silu(gate) * up in one pass."""
        self.fused_silu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.forward(x)
        if self.kernels is not None and self.fused_silu and gate_up.is_contiguous():
            return self.down_proj.forward(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj.forward(self.act(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is the previous layer's MLP output and ``residual`` the stream it adds to
        (None at the first layer, where ``x`` is the embedding): each add is fused with the
        norm that follows it. Returns this layer's MLP output and its residual stream."""
        if residual is None:
            residual, h = x, self.input_layernorm.forward(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn.forward(h, cos_sin, rotary, kv_cache, attn_metadata)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp.forward(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size),
        )
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.head_dim,
            max_positions,
            config.rope_theta,
            config.rope_scaling,
        )


class LlamaForCausalLM(CausalLM):
    stacked_params = (
        ("qkv_proj", "q_proj", 0),
        ("qkv_proj", "k_proj", 1),
        ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )
    supports_training = True

    def __init__(self, config: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__(config)
        self.model = LlamaModel(config, max_positions or config.max_position_embeddings)
        # Tied models read the embedding matrix as their head, unless packing gives the head
        # its own (faster) copy.
        self.lm_head: Linear | None = None
        self.fused_decode = True
        """Run a decode step's layers in one native call where they qualify (quantized linear
        layers, float32, kiln's CPU kernels); False keeps the op-by-op path."""
        self._fused_args: Array[LlamaLayer] | None = None
        self._fused_caches: list[torch.Tensor | None] = [None]
        self._fused_kernels: CPUKernels | None = None
        self._head_from_embedding_blocks = False
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor] | list[None],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states; ``kv_caches`` of None (one per layer) with
        :meth:`AttentionMetadata.packed` runs without a cache, differentiably (training)."""
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        rotary = self.model.rotary
        cos_sin = rotary.cos_sin(positions, x.dtype)
        if (
            self.fused_decode
            and attn_metadata.decode_slots is not None
            and self._fused_decode_layers(kv_caches)
        ):
            return self._fused_decode(x, cos_sin, kv_caches, attn_metadata)
        # NOTE: the decode hot path calls ``.forward`` directly: nn.Module.__call__'s hook
        # handling costs a few microseconds per call, ~10 calls per layer per step.
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer.forward(x, residual, cos_sin, rotary, kv_cache, attn_metadata)
        return self.model.norm.add_forward(x, residual)[0]

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def _fused_decode_layers(self, kv_caches: list[torch.Tensor]) -> bool:
        """Whether a decode step can run as one native call, preparing the layers' constant
        arguments (weight and cache pointers, fixed once loaded) on first use."""
        if kv_caches[0] is not self._fused_caches[0]:
            self._fused_args = self._prepare_fused_args(kv_caches)
            # NOTE: the arguments hold the caches' raw pointers: the caches stay referenced
            # here so their memory lives as long as the pointers do (weights live in modules).
            self._fused_caches = list(kv_caches)
        return self._fused_args is not None

    def _prepare_fused_args(self, kv_caches: list[torch.Tensor]) -> Array[LlamaLayer] | None:
        layers = self.model.layers
        kernels = layers[0].self_attn.attn.kernels
        config = self.config
        if not layers[0].self_attn.attn.native_decode or not self.model.rotary.fits_cpu_kernels:
            return None  # not a float32 CPU model with kiln's attention kernel, or another rotary
        if config.hidden_act != "silu" or config.mlp_bias:
            return None
        if not all(c.is_contiguous() and c.dtype == torch.float32 for c in kv_caches):
            return None
        if len({c.shape for c in kv_caches}) != 1:
            return None  # one slot count for every layer's cache
        args = (LlamaLayer * len(layers))()
        for arg, layer, cache in zip(args, layers, kv_caches, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(linear.bits is None for linear in linears):
                return None  # float layers take the PyTorch path
            bias = attn.qkv_proj.bias
            arg.norm1 = layer.input_layernorm.weight.data_ptr()
            arg.norm2 = layer.post_attention_layernorm.weight.data_ptr()
            arg.qkv_bits, arg.qkv = attn.qkv_proj.bits, attn.qkv_proj.qblocks.data_ptr()
            arg.qkv_bias = None if bias is None else bias.data_ptr()
            arg.o_bits, arg.o = attn.o_proj.bits, attn.o_proj.qblocks.data_ptr()
            arg.gate_up_bits = mlp.gate_up_proj.bits
            arg.gate_up = mlp.gate_up_proj.qblocks.data_ptr()
            arg.down_bits, arg.down = mlp.down_proj.bits, mlp.down_proj.qblocks.data_ptr()
            arg.cache = cache.data_ptr()
        self._fused_kernels = kernels
        return args

    def _fused_decode(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Every layer of a decode step in one call into ``kiln_llama_decode``."""
        config, attn = self.config, self.model.layers[0].self_attn
        hidden = x.contiguous()  # [B, hidden]: the embeddings in, the last layer's output out
        residual = torch.empty_like(hidden)
        cos, sin = (t.contiguous() for t in cos_sin)
        status = self._fused_kernels.llama_decode(
            hidden.data_ptr(),
            residual.data_ptr(),
            self._fused_args,
            len(self._fused_args),
            self.model.layers[0].input_layernorm.eps,
            hidden.shape[0],
            config.hidden_size,
            attn.num_heads,
            attn.num_kv_heads,
            attn.head_dim,
            config.intermediate_size,
            cos.data_ptr(),
            sin.data_ptr(),
            metadata.slot_mapping.data_ptr(),
            kv_caches[0].shape[1],
            metadata.decode_slots.data_ptr(),
            metadata.decode_starts.data_ptr(),
            attn.attn.scale,
            metadata.sliding_window or 0,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("kiln_llama_decode could not allocate its scratch memory")
        return self.model.norm.add_forward(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)

    def quantize_tied_head(self, bits: int, kernels: CPUKernels) -> None:
        if self.lm_head is not None:
            return
        embedding = self.model.embed_tokens.weight
        source = self.quantized_sources.get("model.embed_tokens.weight")
        head = Linear(embedding.shape[1], embedding.shape[0])
        head.quantize_to(bits, kernels)
        # NOTE: the checkpoint's own blocks when they have the head's width (a GGUF's Q8_0
        # embedding under the 8-bit head): the same values as quantizing the table they were
        # dequantized into, without the work (SmolLM2: ~0.13 s of a ~0.8 s cold start).
        same_width = source is not None and source.bits == bits
        head.load_weight_rows(source if same_width else embedding, slice(None))
        head.finish_loading()
        self.lm_head = head
        self._head_from_embedding_blocks = same_width

    def embed_from_head(self, check: bool = True) -> bool:
        head = self.lm_head
        if self.embeds_from_head:
            return True
        if not self.config.tie_word_embeddings or head is None or head.bits is None:
            return False
        # Blocks the embedding was itself dequantized from hold its values by construction.
        exact = self._head_from_embedding_blocks or not check
        if not exact and not torch.equal(head.dense_weight(), self.model.embed_tokens.weight):
            return False  # e.g. a float checkpoint's embedding under --quantize int8
        self.model.embed_tokens = HeadRowsEmbedding(head)
        return True

    @property
    def embeds_from_head(self) -> bool:
        return isinstance(self.model.embed_tokens, HeadRowsEmbedding)

    def prepare_for_cpu(self) -> None:
        if self.lm_head is None and cpu_packing_available(self.dtype):
            self.lm_head = Linear.from_weight(self.model.embed_tokens.weight)
        super().prepare_for_cpu()
