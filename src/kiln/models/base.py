"""What every kiln model provides, and the checkpoint-to-parameter copy they share."""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.errors import ModelLoadError
from kiln.kernels.native import CPUKernels, cpu_kernels
from kiln.models.layers.attention import AttentionMetadata
from kiln.models.layers.linear import Linear, cpu_packing_available
from kiln.quantization import GroupQuantized


class CausalLM(nn.Module, abc.ABC):
    """A decoder-only LM over flattened token batches.

    ``forward`` takes all tokens of a step in one flat tensor (prefill chunks and decodes of many
    sequences mixed), their positions, one KV cache tensor per layer and the step's
    :class:`AttentionMetadata`; it returns hidden states. The caller picks the rows it needs
    logits for (usually each sequence's last token) and calls :meth:`compute_logits`.
    """

    # (fused parameter fragment, checkpoint fragment, shard index): e.g. q/k/v -> qkv_proj.
    stacked_params: tuple[tuple[str, str, int], ...] = ()
    # Checkpoint entries that are buffers in Hugging Face models, not weights.
    ignored_weights: tuple[str, ...] = (r"rotary_emb\.inv_freq$",)

    supports_training: bool = False
    """Whether ``forward`` runs without KV caches (``kv_caches`` all None, with
    :meth:`AttentionMetadata.packed`) differentiably: what fine-tuning needs."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.quantized_sources: dict[str, GroupQuantized] = {}
        """A tied model's float parameters loaded from group-quantized checkpoint tensors (a
        GGUF's Q8_0 embedding), by name, in that form, for :meth:`quantize_tied_head`; whoever
        loads the weights clears it after that step."""

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder blocks in order (what gradient checkpointing wraps)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its decoder layers")

    def hf_projections(self, layer_name: str) -> dict[str, tuple[str, int]]:
        """The Hugging Face projections one of this model's linear layers holds: short name ->
        (module name, row block), e.g. ``model.layers.0.self_attn.qkv_proj`` -> ``q_proj``,
        ``k_proj``, ``v_proj``; an unfused layer is its own single projection."""
        found = {
            original.rsplit(".", 1)[-1]: (layer_name.replace(fused, original), shard)
            for fused, original, shard in self.stacked_params
            if layer_name.endswith(fused)
        }
        return found or {layer_name.rsplit(".", 1)[-1]: (layer_name, 0)}

    @abc.abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        """Hidden states ``[T, hidden]`` for this step's tokens."""

    @abc.abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        """Logits of the LM head."""

    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor | GroupQuantized]], source: str
    ) -> None:
        """Copy checkpoint tensors (Hugging Face names) into parameters, casting dtype; a
        linear layer's weight is handed to the layer, which (de)quantizes it to its own form.

        Raises :class:`ModelLoadError` naming ``source`` and the key for an unknown key, a shape
        mismatch, or a parameter the checkpoint never provided.
        """
        params = dict(self.named_parameters())
        linears = self.linear_layers()
        expected = set(params) | {f"{name}.weight" for name in linears}
        missing = {name: set(range(_num_shards(self, name))) for name in expected}
        ignored = [re.compile(p) for p in self.ignored_weights]
        for hf_name, tensor in weights:
            if any(p.search(hf_name) for p in ignored):
                continue
            name, shard = self._param_for(hf_name)
            if name not in expected:
                if self.config.tie_word_embeddings and hf_name == "lm_head.weight":
                    continue  # tied checkpoints sometimes store the shared matrix twice
                raise ModelLoadError(
                    f"{source}: unexpected weight {hf_name!r} for a {self.config.model_type} model "
                    f"with this config (is config.json from the same checkpoint?)"
                )
            owner, _, attr = name.rpartition(".")
            layer = linears.get(owner) if attr == "weight" else None
            if layer is not None:
                rows = layer.shard_rows(shard) if shard is not None else slice(None)
                out_features, in_features = layer.weight_shape()
                target_shape = (len(range(out_features)[rows]), in_features)
            else:
                target = params[name].data
                if shard is not None:  # a fused layer's bias: the shard's rows
                    target = target[linears[owner].shard_rows(shard)]
                target_shape = tuple(target.shape)
            if target_shape != tuple(tensor.shape):
                raise ModelLoadError(
                    f"{source}: weight {hf_name!r} has shape {tuple(tensor.shape)}, the config "
                    f"implies {target_shape}"
                )
            if layer is not None:
                layer.load_weight_rows(tensor, rows)
            else:
                target.copy_(tensor.dequantize() if isinstance(tensor, GroupQuantized) else tensor)
                if self.config.tie_word_embeddings and isinstance(tensor, GroupQuantized):
                    # A quantized head tied to this table can take these blocks as they are.
                    self.quantized_sources[name] = tensor
            missing[name].discard(shard or 0)
        absent = sorted(n for n, shards in missing.items() if shards)
        if absent:
            raise ModelLoadError(f"{source}: checkpoint has no weight for {', '.join(absent[:5])}")
        for layer in linears.values():
            layer.finish_loading()

    def linear_layers(self) -> dict[str, Linear]:
        """Every linear layer, by module name."""
        return {name: m for name, m in self.named_modules() if isinstance(m, Linear)}

    def checkpoint_names(self, layer_name: str) -> list[str]:
        """The Hugging Face names of the tensors a linear layer's weight is loaded from."""
        weight = f"{layer_name}.weight"
        names = [
            weight.replace(fused, original)
            for fused, original, _ in self.stacked_params
            if fused in weight
        ]
        return names or [weight]

    def quantize_linears(self, bits_by_layer: dict[str, int], kernels: CPUKernels) -> None:
        """Before loading: hold the named linear layers' weights group-quantized."""
        layers = self.linear_layers()
        for name, bits in bits_by_layer.items():
            layers[name].quantize_to(bits, kernels)

    def quantize_tied_head(self, bits: int, kernels: CPUKernels) -> None:
        """After loading: give a head tied to the embedding its own ``bits``-quantized copy
        (models without a tied head ignore this)."""

    def embed_from_head(self, check: bool = True) -> bool:
        """Look the embedding up in the quantized head tied to it and drop the float matrix,
        where the head holds exactly its values (``check=False``: known to, as an artifact's
        manifest says; the head may not be loaded yet). Whether it now does; models without
        such a head keep their embedding."""
        return False

    @property
    def embeds_from_head(self) -> bool:
        """Whether the embedding is read from the quantized head (:meth:`embed_from_head`)."""
        return False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (that of the first floating-point tensor)."""
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.get_default_dtype()

    def prepare_for_cpu(self) -> None:
        """Inference-only layout change for CPU decode: prepack every linear layer's weight
        (see :meth:`Linear.pack_for_cpu`), and hand float32 norms and attention kiln's CPU
        kernels where they run. Call after :meth:`load_weights`."""
        kernels = cpu_kernels() if self.dtype == torch.float32 else None
        for module in self.modules():
            # Modules with a native fast path declare a ``kernels`` attribute (None: PyTorch).
            if hasattr(module, "kernels"):
                module.kernels = kernels
        if not cpu_packing_available(self.dtype):
            return
        for module in self.modules():
            if isinstance(module, Linear) and module.bits is None and module.packed_weight is None:
                module.pack_for_cpu()

    def warm_up(self, max_tokens: int, max_sequences: int) -> None:
        """Make oneDNN's state for every row bucket an engine with these limits can run the
        packed layers at (see ``_ROW_BUCKETS`` in :mod:`kiln.models.layers.linear`): the LM
        head takes one row per sequence sampled in a step, every other layer each token of the
        step. Otherwise each bucket's state is made on its first use, and memory grows while
        serving until every bucket in use has been seen (bounded: a few dozen shapes). Costs
        the compute of every bucket's rows; layers of one weight shape share the state."""
        head = getattr(self, "lm_head", None)
        warmed: set[tuple[tuple[int, ...], int]] = set()
        for module in self.modules():
            if not isinstance(module, Linear) or module.packed_weight is None:
                continue
            rows = max_sequences if module is head else max_tokens
            if (tuple(module.packed_weight.shape), rows) not in warmed:
                warmed.add((tuple(module.packed_weight.shape), rows))
                module.warm_up(rows)

    def convert_parameters_to_buffers(self) -> None:
        """Re-register every parameter as a plain-tensor buffer (same name, same storage,
        still in ``state_dict``). Call after loading (and packing): inference needs no
        autograd, and an ``nn.Parameter`` argument sends each op through Python's
        ``__torch_function__`` dispatch (``F.rms_norm`` at SmolLM2 shapes on 2 cores: 16.6 us
        with a Parameter weight, 10.5 us with a tensor; a step runs 2 norms per layer)."""
        for module in self.modules():
            for name, param in list(module._parameters.items()):
                del module._parameters[name]
                if param is not None:
                    module.register_buffer(name, param.detach())
                else:
                    setattr(module, name, None)

    def _param_for(self, hf_name: str) -> tuple[str, int | None]:
        for fused, original, shard in self.stacked_params:
            if original in hf_name:
                return hf_name.replace(original, fused), shard
        return hf_name, None


def _num_shards(model: nn.Module, param_name: str) -> int:
    owner = model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
    return len(owner.output_sizes) if isinstance(owner, Linear) else 1
