"""GPT-J (the tutorials' GPT-J-6B demo): attention and MLP in parallel off one LayerNorm,
interleaved rotary on the first ``rotary_dim`` dims of each head, biased LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.models.base import CausalLM
from kiln.models.layers.attention import AttentionMetadata, PagedAttention
from kiln.models.layers.linear import Linear
from kiln.models.layers.norm import LayerNorm
from kiln.models.layers.rotary import RotaryEmbedding


class GPTJAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.qkv_proj = Linear(hidden, [hidden] * 3)
        self.out_proj = Linear(hidden, hidden)
        self.attn = PagedAttention(
            self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5
        )

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        heads = self.num_heads
        qkv = self.qkv_proj.forward(x).view(x.shape[0], 3 * heads, self.head_dim)
        if kv_cache is None:
            # No cache (training): rotate out of place, as autograd cannot follow ``rotate_``.
            qk = rotary.rotate(qkv[:, : 2 * heads], *cos_sin)
            kv = torch.stack((qk[:, heads:], qkv[:, 2 * heads :]))  # [2, T, H, D]
            return self.out_proj.forward(self.attn.forward(qk[:, :heads], kv, None, attn_metadata))
        rotary.rotate_(qkv[:, : 2 * heads], *cos_sin)
        q = qkv[:, :heads]
        kv = qkv[:, heads:].unflatten(1, (2, heads)).transpose(0, 1)
        return self.out_proj.forward(self.attn.forward(q, kv, kv_cache, attn_metadata))


class GPTJMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc_in = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc_out = Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out.forward(F.gelu(self.fc_in.forward(x), approximate="tanh"))


class GPTJBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, config.norm_eps)
        self.attn = GPTJAttention(config)
        self.mlp = GPTJMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        h = self.ln_1.forward(x)
        attn = self.attn.forward(h, cos_sin, rotary, kv_cache, attn_metadata)
        return x + attn + self.mlp.forward(h)


class GPTJForCausalLM(CausalLM):
    stacked_params = (
        ("attn.qkv_proj", "attn.q_proj", 0),
        ("attn.qkv_proj", "attn.k_proj", 1),
        ("attn.qkv_proj", "attn.v_proj", 2),
    )
    # Hugging Face GPT-J checkpoints carry the causal mask as buffers.
    ignored_weights = (r"attn\.bias$", r"attn\.masked_bias$")
    supports_training = True

    def __init__(self, config: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__(config)
        if config.hidden_act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation {config.hidden_act!r} for gptj")
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size),
        )
        self.transformer.wte.weight.requires_grad_(False)
        self.transformer.h = nn.ModuleList(
            GPTJBlock(config) for _ in range(config.num_hidden_layers)
        )
        self.transformer.ln_f = LayerNorm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.rotary_dim or config.head_dim,
            max_positions or config.max_position_embeddings,
            config.rope_theta,
            interleaved=True,
        )
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.transformer.wte(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for block, kv_cache in zip(self.transformer.h, kv_caches, strict=True):
            x = block.forward(x, cos_sin, self.rotary, kv_cache, attn_metadata)
        return self.transformer.ln_f.forward(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h
