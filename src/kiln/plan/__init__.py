"""Sizing planner: memory, tensor-parallel degrees, instances, speed and cost from config.json.

Pure functions of a :class:`~kiln.config.ModelConfig` (no weights read, no torch); the
instance catalogue is data in :mod:`kiln.plan.catalogue`. ``kiln plan`` is the command.
"""

from kiln.plan.catalogue import CATALOGUE, TARGETS, Accelerator, Instance, Source, local_cpu
from kiln.plan.planner import (
    TP_RULE,
    DeviceNeed,
    ExportCommand,
    InstanceFit,
    Memory,
    Plan,
    Workload,
    cost_per_million_tokens,
    decode_tokens_per_s,
    export_commands,
    make_plan,
    memory_per_rank,
    plan_to_dict,
    render_table,
)
from kiln.plan.sizing import (
    activation_bytes,
    kv_bytes_per_token,
    kv_cache_bytes,
    num_parameters,
    param_groups,
    valid_tp_degrees,
    weight_bytes,
)

__all__ = [
    "CATALOGUE",
    "TARGETS",
    "TP_RULE",
    "Accelerator",
    "DeviceNeed",
    "ExportCommand",
    "Instance",
    "InstanceFit",
    "Memory",
    "Plan",
    "Source",
    "Workload",
    "activation_bytes",
    "cost_per_million_tokens",
    "decode_tokens_per_s",
    "export_commands",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "local_cpu",
    "make_plan",
    "memory_per_rank",
    "num_parameters",
    "param_groups",
    "plan_to_dict",
    "render_table",
    "valid_tp_degrees",
    "weight_bytes",
]
