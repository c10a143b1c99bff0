"""`kiln finetune`: supervised fine-tuning (LoRA or full) on instruction data."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any


def finetune(
    data: str,
    output: str,
    model: str | None = None,
    format: str = "dolly",
    chat_template: str | None = None,
    sequence_length: int = 512,
    packing: bool = True,
    lora_r: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.05,
    lora_target: list[str] | None = None,
    full: bool = False,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    warmup_steps: int | None = None,
    batch_size: int = 4,
    grad_accum: int = 1,
    max_grad_norm: float = 1.0,
    eval_fraction: float = 0.05,
    eval_every: int | None = None,
    save_every: int | None = None,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    bf16: bool = False,
    resume: bool = False,
    threads: int | None = None,
) -> int:
    """Fine-tune a model on instruction records; write the merged model as a Hugging Face
    directory (loadable by `kiln generate --model OUTPUT`) and the LoRA adapter in OUTPUT/adapter.

    Trains in float32 (or under bfloat16 autocast, --bf16) on the CPU with kiln's own model
    code (any checkpoint kiln loads; GGUF weights are dequantized). Loss is on answer tokens
    only; with packing, samples share a sequence but never attend to each other (positions
    restart per sample). Metrics go to OUTPUT/metrics.jsonl, and to OUTPUT/tensorboard when
    tensorboard is installed.

    Args:
        data: (required) a JSONL (or, for alpaca and chat, JSON array) file of records, or a
            directory of them.
        output: (required) directory for the merged model, adapter/, checkpoints/ and
            metrics.jsonl.
        model: local directory, .gguf file or hub id (default: SmolLM2-135M-Instruct).
        format: record format: dolly (instruction, context, response in the Dolly prompt:
            ### Instruction, optional ### Context, ### Answer), alpaca (instruction, input,
            output in Alpaca's prompt) or chat ({"messages": [...]} through the model's chat
            template, loss on the assistant turns only).
        chat_template: for --format chat: a Jinja file or a built-in name (llama-2, llama-3,
            chatml, mistral) instead of the model's own template.
        sequence_length: tokens per training sequence (longer samples are truncated).
        packing: pack several samples per sequence (--no-packing: one sample per sequence).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (updates are scaled by alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_target: a projection to adapt: q_proj k_proj v_proj o_proj gate_proj up_proj
            down_proj (default: all of them).
        full: full fine-tuning (every weight) instead of LoRA.
        epochs: passes over the training records (unless --max-steps).
        max_steps: optimizer steps to run (overrides --epochs).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup steps before the cosine decay (default: 5% of the steps).
        batch_size: sequences per micro-batch.
        grad_accum: micro-batches per optimizer step.
        max_grad_norm: gradient clipping norm.
        eval_fraction: share of records held out for evaluation (seeded split).
        eval_every: evaluate every N steps (default: before the first and after the last only).
        save_every: write a checkpoint every N steps (default: none).
        seed: seed of the split, the data order, LoRA's initialisation and dropout.
        gradient_checkpointing: recompute each layer's activations in the backward pass
            instead of keeping them (less memory, ~1/3 more compute; same losses).
        bf16: bfloat16 autocast for the forward (weights, optimizer state and loss stay
            float32); fast only where the CPU has AVX512-BF16/AMX, or on a GPU.
        resume: continue exactly from the newest checkpoint in OUTPUT.
        threads: CPU threads for torch (default: torch's choice).
    """
    import torch

    from kiln.errors import ConfigError
    from kiln.train.config import TrainConfig
    from kiln.train.lora import TARGET_MODULES, LoRAConfig
    from kiln.train.run import finetune_run

    if not data or not output:  # see add_finetune_commands
        raise ConfigError("kiln finetune needs --data and --output (-o)")
    if threads:
        torch.set_num_threads(threads)
    lora = None
    if not full:
        targets = tuple(lora_target) if lora_target else TARGET_MODULES
        lora = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=targets)
    config = TrainConfig(
        data_format=format,
        chat_template=chat_template,
        sequence_length=sequence_length,
        packing=packing,
        lora=lora,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_grad_norm=max_grad_norm,
        eval_fraction=eval_fraction,
        eval_every=eval_every,
        save_every=save_every,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
        bf16=bf16,
    )
    out = Path(output)
    result = finetune_run(model, data, config, out, resume=resume)
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}")
    if result.eval_before is not None:
        print(f"eval loss before: {result.eval_before:.4f}")
    if result.eval_after is not None:
        print(f"eval loss after:  {result.eval_after:.4f}")
    print(f"training tokens/s: {result.tokens_per_s:.0f}")
    print(f"merged model: {out}")
    return 0


def finetune_eval(
    data: str,
    model: str | None = None,
    adapter: str | None = None,
    base: str | None = None,
    format: str = "dolly",
    chat_template: str | None = None,
    sequence_length: int = 512,
    packing: bool = True,
    eval_fraction: float = 0.05,
    seed: int = 0,
    batch_size: int = 4,
    threads: int | None = None,
) -> int:
    """Eval loss and perplexity on the records `kiln finetune` held out (the same --seed and
    --eval-fraction select the same records), before and after fine-tuning.

    `--model BASE --adapter OUTPUT/adapter` scores the base model, then base + adapter;
    `--model OUTPUT --base BASE` scores the base, then the merged model; `--model M` alone
    scores M.

    Args:
        data: the records file or directory given to `kiln finetune`.
        model: local directory, .gguf file or hub id (default: SmolLM2-135M-Instruct).
        adapter: a LoRA adapter directory (OUTPUT/adapter) to score on top of --model.
        base: the model before fine-tuning, scored first for comparison.
        format: record format: dolly, alpaca or chat (as for `kiln finetune`).
        chat_template: for --format chat: a Jinja file or a built-in name.
        sequence_length: tokens per sequence (longer samples are truncated, as in training).
        packing: pack several samples per sequence (never attending to each other).
        eval_fraction: share of records held out (as given to `kiln finetune`).
        seed: the seed of the split (as given to `kiln finetune`).
        batch_size: sequences per forward pass.
        threads: CPU threads for torch (default: torch's choice).
    """
    import torch

    from kiln.errors import ConfigError
    from kiln.train.evaluate import EvalData, evaluate

    if adapter is not None and base is not None:
        raise ConfigError("give --adapter (scored on top of --model) or --base, not both")
    if threads:
        torch.set_num_threads(threads)
    spec = EvalData(
        data=data,
        data_format=format,
        chat_template=chat_template,
        sequence_length=sequence_length,
        packing=packing,
        eval_fraction=eval_fraction,
        seed=seed,
        batch_size=batch_size,
    )
    results = evaluate(base, spec) if base is not None else []
    results += evaluate(model, spec, adapter)
    labels = ["before", "after"] if len(results) == 2 else [""]
    for label, (name, score) in zip(labels, results, strict=True):
        print(
            f"{label + ': ' if label else ''}{name}: eval loss {score.loss:.4f}, perplexity "
            f"{score.perplexity:.2f} ({score.num_tokens} tokens of {score.num_examples} records)"
        )
    return 0


def add_finetune_commands(commands: Any) -> None:
    """Register `kiln finetune` and its `kiln finetune eval`."""
    from kiln.cli.args import add_command
    from kiln.cli.export import _alias

    add_command(commands, finetune)
    parser = commands.choices["finetune"]
    _alias(parser, "--output", "-o")
    # NOTE: argparse checks a parser's required flags after its sub-command has parsed the
    # rest of the line, so `kiln finetune eval` would fail for want of --output: finetune()
    # checks its own required flags instead.
    for flag in ("--data", "--output"):
        parser._option_string_actions[flag].required = False
    sub = parser.add_subparsers(title="commands", metavar="{eval}", required=False)
    add_command(sub, finetune_eval, "eval")
    sub.choices["eval"].set_defaults(_command=_eval_command)


def _eval_command(**values: Any) -> int:
    """``finetune_eval`` with the namespace argparse leaves: it also holds ``kiln finetune``'s
    own flags (their defaults, or values typed before ``eval``, which are an error)."""
    own = inspect.signature(finetune_eval).parameters
    defaults = {
        name: None if p.default is inspect.Parameter.empty else p.default  # required: None
        for name, p in inspect.signature(finetune).parameters.items()
    }
    typed = sorted(
        name
        for name, value in values.items()
        if name not in own and name in defaults and value != defaults[name]
    )
    if typed:
        from kiln.errors import ConfigError

        flags = ", ".join("--" + name.replace("_", "-") for name in typed)
        raise ConfigError(f"{flags}: a flag of kiln finetune, not of kiln finetune eval")
    return finetune_eval(**{k: v for k, v in values.items() if k in own})
