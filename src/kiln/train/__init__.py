"""Supervised fine-tuning: data formatting, packing, LoRA, the training loop and checkpoints.

Reuses ``kiln.models`` (the same forward the server runs, without a KV cache), ``kiln.weights``
and ``kiln.text``; never imports the engine or the serving layer.
"""
