"""`kiln finetune`: supervised fine-tuning (LoRA or full) on instruction data."""

from __future__ import annotations

from pathlib import Path


def finetune(
    data: str,
    output: str,
    model: str | None = None,
    format: str = "dolly",
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
    resume: bool = False,
    threads: int | None = None,
) -> int:
    """Fine-tune a model on instruction records; write the merged model as a Hugging Face
    directory (loadable by `kiln generate --model OUTPUT`) and the LoRA adapter in OUTPUT/adapter.

    Trains in float32 on the CPU with kiln's own model code (any checkpoint kiln loads; GGUF
    weights are dequantized). Loss is on answer tokens only; with packing, samples share a
    sequence but never attend to each other (positions restart per sample).

    Args:
        data: a Dolly JSONL file, or a directory of them.
        output: directory for the merged model, adapter/, checkpoints/ and metrics.jsonl.
        model: local directory, .gguf file or hub id (default: SmolLM2-135M-Instruct).
        format: record format: dolly (### Instruction, optional ### Context, ### Answer).
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
        resume: continue exactly from the newest checkpoint in OUTPUT.
        threads: CPU threads for torch (default: torch's choice).
    """
    import torch

    from kiln.train.config import TrainConfig
    from kiln.train.lora import TARGET_MODULES, LoRAConfig
    from kiln.train.run import finetune_run

    if threads:
        torch.set_num_threads(threads)
    lora = None
    if not full:
        targets = tuple(lora_target) if lora_target else TARGET_MODULES
        lora = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=targets)
    config = TrainConfig(
        data_format=format,
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
    )
    out = Path(output)
    result = finetune_run(model, data, config, out, resume=resume)
    if result.eval_before is not None:
        print(f"eval loss before: {result.eval_before:.4f}")
    if result.eval_after is not None:
        print(f"eval loss after:  {result.eval_after:.4f}")
    print(f"training tokens/s: {result.tokens_per_s:.0f}")
    print(f"merged model: {out}")
    return 0
