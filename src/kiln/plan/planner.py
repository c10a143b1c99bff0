"""A sizing plan: memory, tensor-parallel degrees, which instances fit, speed and cost.

:func:`make_plan` is pure: a :class:`~kiln.config.ModelConfig`, a :class:`Workload` and a
catalogue in, a :class:`Plan` out. :func:`render_table` and :func:`plan_to_dict` present it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.config import ConfigError, ModelConfig
from kiln.plan.catalogue import CATALOGUE, Accelerator, GiB, Instance
from kiln.plan.sizing import (
    activation_bytes,
    check_quantize,
    kv_bytes_per_token,
    kv_cache_bytes,
    normalise_dtype,
    num_parameters,
    step_tokens,
    valid_tp_degrees,
    weight_bytes,
)

SECONDS_PER_HOUR = 3600
TOKENS_PER_COST_UNIT = 1_000_000


@dataclass(frozen=True)
class Workload:
    """What the model must hold: its dtype, quantization and the KV cache's shape.

    ``batch_size`` x ``sequence_length`` is the static shape of the tutorials' exports
    (``sequence_length`` bounds prompt + output); ``max_num_batched_tokens`` caps the tokens of
    one step (kiln's scheduler default when None).
    """

    dtype: str = "float16"
    quantize: str = "none"
    batch_size: int = 1
    sequence_length: int = 2048
    max_num_batched_tokens: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", normalise_dtype(self.dtype))
        check_quantize(self.quantize)
        for name in ("batch_size", "sequence_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Memory:
    """Bytes on one rank of a ``tp``-way split (the whole model for ``tp=1``)."""

    tp: int
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


@dataclass(frozen=True)
class DeviceNeed:
    """How many units of one accelerator kind the model needs."""

    accelerator: str
    unit: str
    memory_per_unit: int
    min_units_by_memory: int
    """ceil(total / memory per unit): the tutorials' count, ignoring how the model splits."""
    min_accelerators_by_memory: int
    min_valid_tp: int | None
    """Smallest tensor-parallel degree kiln allows whose per-rank share fits; None if none."""


@dataclass(frozen=True)
class InstanceFit:
    instance: str
    target: str
    accelerator: str
    units: int
    tp: int | None
    """The largest valid degree the instance has units for (more units, more bandwidth)."""
    memory_per_unit_needed: int | None
    memory_per_unit: int
    fits: bool
    decode_tokens_per_s: float | None
    price_per_hour: float | None
    cost_per_million_output_tokens: float | None
    notes: tuple[str, ...]


@dataclass(frozen=True)
class ExportCommand:
    """The ``kiln export`` line for the accelerators that run the model at the same degree."""

    accelerators: tuple[str, ...]
    device: str
    """``kiln export --device``: ``cuda`` for GPUs, ``cpu`` for the host."""
    tp: int
    """The smallest valid degree whose rank fits one unit (:attr:`DeviceNeed.min_valid_tp`)."""
    command: str


@dataclass(frozen=True)
class Plan:
    model: str
    model_type: str
    num_parameters: int
    workload: Workload
    weight_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    activation_bytes: int
    step_tokens: int
    total_bytes: int
    tp_rule: str
    valid_tp_degrees: tuple[int, ...]
    devices: tuple[DeviceNeed, ...]
    instances: tuple[InstanceFit, ...]
    export_commands: tuple[ExportCommand, ...] = ()
    export_notes: tuple[str, ...] = ()
    """Why an accelerator of the plan has no export line."""


def memory_per_rank(config: ModelConfig, workload: Workload, tp: int = 1) -> Memory:
    w = workload
    return Memory(
        tp=tp,
        weights=weight_bytes(config, w.dtype, w.quantize, tp=tp),
        kv_cache=kv_cache_bytes(config, w.dtype, w.batch_size, w.sequence_length, tp=tp),
        activations=activation_bytes(
            config,
            w.dtype,
            w.batch_size,
            w.sequence_length,
            tp=tp,
            max_num_batched_tokens=w.max_num_batched_tokens,
        ),
    )


def decode_tokens_per_s(
    config: ModelConfig, workload: Workload, tp: int, bandwidth_per_unit: float
) -> float:
    """Upper bound on decode speed from memory bandwidth alone: each step every rank reads its
    share of the weights (not the embedding table, which is only indexed) and of the KV cache
    of every sequence at full ``sequence_length``; a step yields ``batch_size`` tokens. Compute,
    interconnect (all-reduce) and kernel efficiency are left out, so real speed is lower."""
    w = workload
    read = weight_bytes(config, w.dtype, w.quantize, tp=tp, read_only=True)
    read += kv_cache_bytes(config, w.dtype, w.batch_size, w.sequence_length, tp=tp)
    return w.batch_size * bandwidth_per_unit / read


def cost_per_million_tokens(price_per_hour: float, tokens_per_s: float) -> float:
    """USD per 1M output tokens at ``tokens_per_s`` for an instance billed ``price_per_hour``."""
    return price_per_hour / (tokens_per_s * SECONDS_PER_HOUR) * TOKENS_PER_COST_UNIT


def min_valid_tp(config: ModelConfig, workload: Workload, memory_per_unit: int) -> int | None:
    for tp in valid_tp_degrees(config):
        if memory_per_rank(config, workload, tp).total <= memory_per_unit:
            return tp
    return None


def fit_instance(config: ModelConfig, workload: Workload, instance: Instance) -> InstanceFit:
    acc = instance.accelerator
    degrees = valid_tp_degrees(config, instance.units)
    tp = degrees[-1]  # 1 always divides, so there is one
    need = memory_per_rank(config, workload, tp).total
    fits = need <= acc.memory_per_unit
    speed = None
    bandwidth = acc.bandwidth_per_unit
    if fits and bandwidth is not None:
        speed = decode_tokens_per_s(config, workload, tp, bandwidth)
    cost = None
    if speed is not None and instance.price_per_hour is not None:
        cost = cost_per_million_tokens(instance.price_per_hour, speed)
    notes = []
    if tp < instance.units:
        notes.append(f"{instance.units - tp} of {instance.units} {acc.unit}s idle at tp {tp}")
    weights = weight_bytes(config, workload.dtype, workload.quantize)
    if fits and instance.host_memory < weights:
        notes.append(
            f"host RAM {instance.host_memory / GiB:.0f} GiB < weights: load one shard at a time"
        )
    if not fits:
        notes.append(
            f"needs {_gb(need)} per {acc.unit} at tp {tp} (largest valid <= {instance.units})"
        )
    return InstanceFit(
        instance=instance.name,
        target=instance.target,
        accelerator=acc.name,
        units=instance.units,
        tp=tp,
        memory_per_unit_needed=need,
        memory_per_unit=acc.memory_per_unit,
        fits=fits,
        decode_tokens_per_s=speed,
        price_per_hour=instance.price_per_hour,
        cost_per_million_output_tokens=cost,
        notes=tuple(notes),
    )


def device_need(config: ModelConfig, workload: Workload, acc: Accelerator) -> DeviceNeed:
    total = memory_per_rank(config, workload).total
    units = math.ceil(total / acc.memory_per_unit)
    return DeviceNeed(
        accelerator=acc.name,
        unit=acc.unit,
        memory_per_unit=acc.memory_per_unit,
        min_units_by_memory=units,
        min_accelerators_by_memory=math.ceil(units / acc.units),
        min_valid_tp=min_valid_tp(config, workload, acc.memory_per_unit),
    )


# What `kiln export --device` takes for each kind of unit; NeuronCores have no kiln device.
_EXPORT_DEVICES = {"GPU": "cuda", "host": "cpu"}
_EXPORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def export_commands(
    model: str, workload: Workload, devices: Iterable[DeviceNeed]
) -> tuple[tuple[ExportCommand, ...], tuple[str, ...]]:
    """The ``kiln export`` command line that pre-shards the model for each accelerator's
    smallest valid degree (one line per device and degree), and a note for each accelerator
    kiln cannot export for as planned (the same rules ``kiln export`` enforces)."""
    w = workload
    dtype = _EXPORT_DTYPES[w.dtype]
    by_key: dict[tuple[str, int], list[str]] = {}
    notes = []
    for d in devices:
        device = _EXPORT_DEVICES.get(d.unit)
        reason = None
        if device is None:
            reason = f"kiln export has no device for {d.unit}s (cpu or cuda)"
        elif d.min_valid_tp is None:
            reason = f"no valid tp fits one {d.unit}"
        elif device == "cuda" and w.quantize != "none":
            reason = f"--quantize {w.quantize} runs on the CPU only"
        elif device == "cpu" and w.dtype == "float16":
            reason = "--dtype fp16 is not supported on --device cpu"
        elif d.min_valid_tp > 1 and w.quantize != "none":
            reason = f"--quantize {w.quantize} does not combine with --tp {d.min_valid_tp}"
        if reason is not None:
            notes.append(f"{d.accelerator}: {reason}")
            continue
        assert device is not None and d.min_valid_tp is not None
        by_key.setdefault((device, d.min_valid_tp), []).append(d.accelerator)
    commands = []
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name or model or "model")
    for (device, tp), accelerators in by_key.items():
        words = ["kiln", "export", "--model", model or "default"]
        words += ["-o", f"{stem}-{dtype}-{device}-tp{tp}"]
        words += ["--batch-size", str(w.batch_size), "--sequence-length", str(w.sequence_length)]
        words += ["--dtype", dtype, "--quantize", w.quantize, "--device", device, "--tp", str(tp)]
        commands.append(ExportCommand(tuple(accelerators), device, tp, shlex.join(words)))
    return tuple(commands), tuple(notes)


TP_RULE = (
    "N must divide num_attention_heads, num_key_value_heads and vocab_size: each rank holds "
    "whole query and KV heads, 1/N of the MLP and an equal slice of the vocabulary; nothing is "
    "padded or replicated"
)


def make_plan(
    config: ModelConfig,
    workload: Workload,
    *,
    model: str = "",
    catalogue: Iterable[Instance] = CATALOGUE,
    target: str | None = None,
) -> Plan:
    """Size ``config`` for ``workload`` on every catalogue instance (of ``target`` if given)."""
    instances = [i for i in catalogue if target is None or i.target == target]
    whole = memory_per_rank(config, workload)
    accelerators: dict[str, Accelerator] = {}
    for instance in instances:
        # NeuronCores of Inferentia2 and Trainium are alike: one row for the core.
        key = f"{instance.accelerator.unit}/{instance.accelerator.memory_per_unit}"
        if instance.accelerator.unit == "GPU":
            key = instance.accelerator.name
        accelerators.setdefault(key, instance.accelerator)
    w = workload
    devices = tuple(device_need(config, workload, acc) for acc in accelerators.values())
    commands, notes = export_commands(model, workload, devices)
    return Plan(
        model=model,
        model_type=config.model_type,
        num_parameters=num_parameters(config),
        workload=workload,
        weight_bytes=whole.weights,
        kv_bytes_per_token=kv_bytes_per_token(config, w.dtype),
        kv_cache_bytes=whole.kv_cache,
        activation_bytes=whole.activations,
        step_tokens=step_tokens(w.batch_size, w.sequence_length, w.max_num_batched_tokens),
        total_bytes=whole.total,
        tp_rule=TP_RULE,
        valid_tp_degrees=tuple(valid_tp_degrees(config)),
        devices=devices,
        instances=tuple(fit_instance(config, workload, i) for i in instances),
        export_commands=commands,
        export_notes=notes,
    )


# --- presentation -----------------------------------------------------------------------------


def plan_to_dict(plan: Plan, catalogue: Iterable[Instance] = CATALOGUE) -> dict[str, Any]:
    """The plan as JSON-ready data, with each instance's catalogue entry and sources."""
    data = dataclasses.asdict(plan)
    entries = {i.name: i for i in catalogue}
    for fit in data["instances"]:
        entry = entries.get(fit["instance"])
        if entry is not None:
            fit["catalogue"] = dataclasses.asdict(entry)
    data["units"] = "bytes; bandwidth in bytes/s; prices in USD"
    return data


def _gb(nbytes: float) -> str:
    """Decimal units (1 GB = 1e9 bytes, as the tutorials count); MB below a gigabyte."""
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.1f} MB"


def _number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if value >= 0.01 else f"{value:.2g}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def render_table(plan: Plan) -> str:
    w = plan.workload
    quant = "" if w.quantize == "none" else f", linear layers {w.quantize}"
    lines = [
        f"model: {plan.model} ({plan.model_type}), {_count(plan.num_parameters)} parameters "
        f"({plan.num_parameters:,})",
        f"workload: {w.dtype}{quant}, batch {w.batch_size} x {w.sequence_length} tokens",
        "",
        "memory (1 GB = 1e9 bytes; 1 GiB = 2^30 bytes)",
        f"  weights                      {_gb(plan.weight_bytes):>12}",
        f"  KV cache per token           {plan.kv_bytes_per_token:>12,} bytes",
        f"  KV cache, batch x sequence   {_gb(plan.kv_cache_bytes):>12}",
        f"  activation headroom          {_gb(plan.activation_bytes):>12}"
        f"  (one layer's live tensors for a {plan.step_tokens}-token step + logits)",
        f"  total                        {_gb(plan.total_bytes):>12}",
        "",
        f"tensor parallelism: valid degrees {', '.join(map(str, plan.valid_tp_degrees))}",
        *textwrap.wrap(f"rule: {plan.tp_rule}", 96, initial_indent="  ", subsequent_indent="    "),
        "",
    ]
    head = ("accelerator", "memory/unit", "min units", "min chips", "min valid tp")
    rows = [
        (
            f"{d.accelerator} ({d.unit})",
            f"{d.memory_per_unit / GiB:.1f} GiB",
            str(d.min_units_by_memory),
            str(d.min_accelerators_by_memory),
            "none" if d.min_valid_tp is None else str(d.min_valid_tp),
        )
        for d in plan.devices
    ]
    lines += _table(head, rows)
    lines.append("  (min units/chips: by memory alone; min valid tp: also by the rule above)")
    lines.append("")
    head = ("instance", "units", "tp", "need/unit", "have/unit", "fits", "tok/s", "$/h", "$/1M")
    rows = []
    for f in plan.instances:
        rows.append(
            (
                f.instance,
                str(f.units),
                str(f.tp),
                _gb(f.memory_per_unit_needed or 0),
                _gb(f.memory_per_unit),
                "yes" if f.fits else "no",
                _number(f.decode_tokens_per_s, 1),
                "-" if f.price_per_hour is None else f"{f.price_per_hour:.4g}",
                _number(f.cost_per_million_output_tokens),
            )
        )
    lines += _table(head, rows)
    notes = [f"  {f.instance}: {note}" for f in plan.instances for note in f.notes]
    if notes:
        lines += ["", "notes:", *notes]
    lines += ["", "export, pre-sharded for the smallest valid tp (kiln export --tp):"]
    for e in plan.export_commands:
        lines += [f"  {', '.join(e.accelerators)}:", f"    {e.command}"]
    lines += [f"  {note}" for note in plan.export_notes]
    lines += [
        "",
        "tok/s: decode upper bound from memory bandwidth (weights + KV read once per step);",
        "$/1M: on-demand price / tok/s, per 1M output tokens. Sources: kiln plan --json.",
    ]
    return "\n".join(lines)


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(widths[i + 1]) for i, c in enumerate(cells[1:])]
        return "  " + "  ".join([first, *rest])

    return [line(head), "  " + "  ".join("-" * w for w in widths), *(line(r) for r in rows)]
