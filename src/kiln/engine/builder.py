"""From :class:`EngineArgs` to a ready engine: resolve the checkpoint, load the model, size and
allocate the KV cache, and assemble the executor and the engine.

This is the one place an engine is put together; :class:`~kiln.llm.LLM` (the Python facade),
the server's model manager and the CLI all come through :func:`build_engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.config import ConfigError, ModelConfig
from kiln.config.engine_args import EngineArgs
from kiln.engine.engine import Engine
from kiln.engine.executor import Executor, InProcessExecutor
from kiln.engine.kv_cache import allocate_kv_cache, num_kv_blocks
from kiln.engine.multiproc_executor import MultiprocExecutor
from kiln.engine.runner import ModelRunner
from kiln.export.reader import Artifact, open_artifact
from kiln.kernels.native import cpu_kernels
from kiln.models.loader import build_model, resolve_dtype
from kiln.models.quantization_plan import quantizes
from kiln.text.chat_template import ChatTemplate, load_chat_template
from kiln.text.tokenizer import Tokenizer
from kiln.weights.checkpoint import Checkpoint
from kiln.weights.resolve import resolve_checkpoint


@dataclass
class LoadedEngine:
    """A built engine and what its users need beside it: the tokenizer, the chat template,
    the model's config and the limits it was built with."""

    args: EngineArgs
    checkpoint: Checkpoint
    config: ModelConfig
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    engine: Engine
    _chat_template: ChatTemplate | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """What the model was loaded from, as the user named it."""
        return self.checkpoint.name

    @property
    def chat_template(self) -> ChatTemplate:
        """Loaded on first use, so plain-completion users of a template-less model never fail."""
        if self._chat_template is None:
            self._chat_template = load_chat_template(
                self.checkpoint.tokenizer_config, self.args.chat_template
            )
        return self._chat_template


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a torch device (None: CUDA when available); a clear error when it is not
    one kiln runs on here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: use cpu or cuda[:N]") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available here (no GPU visible, or a CPU build of torch)")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported: use cpu or cuda[:N]")
    return resolved


def build_engine(args: EngineArgs, *, progress: bool = False) -> LoadedEngine:
    """Load ``args.model`` and build its engine (blocking: seconds to minutes).

    The config is read and checked before the tokenizer and the weights, so a bad option or
    checkpoint fails fast.
    """
    # An exported artifact (config.json with a `kiln` section) sets the device, context and
    # batch limits, and is loaded as stored instead of from a checkpoint.
    artifact = open_artifact(args.model)
    if artifact is not None:
        args = artifact.engine_args(args)
    device = resolve_device(args.device)
    if artifact is not None:
        artifact.check_runtime(device, args.allow_recompile)
        artifact.prefetch()  # read from disk while the tokenizer and the modules are built
        checkpoint = artifact.checkpoint(args.model)
    else:
        checkpoint = resolve_checkpoint(args.model)
    config = ModelConfig.from_hf(checkpoint.config, checkpoint.generation_config)
    quantized = quantizes(args.quantize, checkpoint.weight_formats) and cpu_kernels() is not None
    if artifact is not None:
        dtype = artifact.dtype
        args = artifact.size_kv_cache(args, config)
    else:
        dtype = resolve_dtype(args.dtype, config, device, quantized=quantized)
    max_model_len = min(
        args.max_model_len or config.max_position_embeddings, config.max_position_embeddings
    )
    tokenizer = Tokenizer(checkpoint.tokenizer, checkpoint.tokenizer_config)
    if args.tp > 1:
        # (An artifact's degree was matched against args.tp by artifact.engine_args above.)
        if args.adapter is not None:
            raise ConfigError("tp > 1 loads float weights as they are: no adapter")
        if artifact is None:
            dtype = resolve_dtype(args.dtype, config, device)  # the ranks never quantize
        return _build_tensor_parallel(
            args, checkpoint, config, tokenizer, dtype, device, max_model_len, artifact
        )
    if artifact is not None:
        model = artifact.build_model(config, device)
    else:
        model = build_model(
            checkpoint,
            config,
            dtype,
            device,
            max_positions=max_model_len,
            progress=progress,
            quantize=args.quantize,
        )
    if args.adapter is not None:
        if artifact is not None:
            raise ConfigError("an adapter cannot be applied to an exported artifact")
        from kiln.train.adapter import load_adapter

        load_adapter(model, args.adapter)
    if args.warm_up:
        model.warm_up(args.max_num_batched_tokens, args.max_num_seqs)
    cache_config = args.cache_config()
    num_blocks = num_kv_blocks(config, cache_config, dtype, device)
    kv_caches = allocate_kv_cache(config, num_blocks, args.block_size, dtype, device)
    eos_token_ids = _eos_token_ids(config, tokenizer)
    runner = ModelRunner(model, kv_caches, args.block_size, device, eos_token_ids)
    return _loaded_engine(
        args,
        checkpoint,
        config,
        tokenizer,
        device,
        dtype,
        max_model_len,
        artifact,
        InProcessExecutor(runner),
        num_blocks,
        eos_token_ids,
    )


def _build_tensor_parallel(
    args: EngineArgs,
    checkpoint: Checkpoint,
    config: ModelConfig,
    tokenizer: Tokenizer,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    artifact: Artifact | None,
) -> LoadedEngine:
    """An engine over ``args.tp`` worker processes, each loading its own shard: its part of
    the checkpoint, or its pre-sharded file of an artifact exported for ``args.tp`` ranks."""
    eos_token_ids = _eos_token_ids(config, tokenizer)
    executor = MultiprocExecutor(
        args,
        str(artifact.path if artifact is not None else checkpoint.path),
        config,
        dtype,
        device,
        max_model_len,
        eos_token_ids,
        from_artifact=artifact is not None,
    )
    return _loaded_engine(
        args,
        checkpoint,
        config,
        tokenizer,
        executor.device,
        dtype,
        max_model_len,
        artifact,
        executor,
        executor.num_blocks,
        eos_token_ids,
    )


def _eos_token_ids(config: ModelConfig, tokenizer: Tokenizer) -> frozenset[int]:
    """What ends a request: the config's EOS ids and the tokenizer's."""
    return frozenset(config.eos_token_ids) | (
        {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    )


def _loaded_engine(
    args: EngineArgs,
    checkpoint: Checkpoint,
    config: ModelConfig,
    tokenizer: Tokenizer,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    artifact: Artifact | None,
    executor: Executor,
    num_blocks: int,
    eos_token_ids: frozenset[int],
) -> LoadedEngine:
    """The engine over ``executor`` (in process or tensor-parallel) and what was loaded."""
    engine = Engine(
        executor,
        tokenizer,
        args.scheduler_config(),
        num_blocks,
        max_model_len,
        eos_token_ids,
        enable_prefix_caching=args.enable_prefix_caching,
        exported_sequence_length=artifact.manifest.sequence_length if artifact else None,
    )
    return LoadedEngine(
        args=args,
        checkpoint=checkpoint,
        config=config,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        engine=engine,
    )
