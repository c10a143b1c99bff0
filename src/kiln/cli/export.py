"""`kiln export`, `kiln push`, `kiln pull`, `kiln models ls` and `kiln bench start`: exported
artifacts and their registries."""

from __future__ import annotations

import argparse
from typing import Any

from kiln.cli.args import add_command


def export(
    output: str,
    sequence_length: int,
    dtype: str,
    model: str | None = None,
    batch_size: int = 1,
    quantize: str | None = None,
    device: str = "cpu",
    tp: int = 1,
    registry: str | None = None,
) -> int:
    """Export a model for fixed shapes into a self-contained artifact directory.

    The artifact holds config.json (with a `kiln` section: shapes, dtype, quantization,
    device, versions, source and hashes), generation_config.json, the tokenizer and chat
    template, and the weights in kiln's runtime layout (cast; quantized layers as the packed
    blocks the CPU kernels read; with --tp N, one file per tensor-parallel rank holding just
    that rank's shard), so loading it (--model DIR) does no quantization or sharding work.

    Args:
        output: the new artifact directory (-o).
        sequence_length: most tokens (prompt + output) per sequence.
        dtype: fp32, bf16 or fp16 (fp16 on cuda only).
        model: local directory, .gguf file or hub id (default: SmolLM2-135M-Instruct).
        batch_size: most sequences run at once.
        quantize: none, int8 or int4 (default: keep the checkpoint's, e.g. a GGUF's 4 bits).
        device: cpu or cuda: what the artifact is laid out for.
        tp: tensor-parallel degree: the weights are pre-sharded into one file per rank,
            and the artifact loads with that many worker processes (its --tp by default);
            float weights only (no --quantize int8/int4), a degree kiln plan lists as valid.
        registry: a registry (local path, file:// or fsspec URL such as s3://bucket/dir) to
            look in first: a compatible artifact there is pulled instead of exporting again;
            a new export is pushed to it.
    """
    from pathlib import Path

    from kiln.export.registry import lookup, pull, push
    from kiln.export.writer import EXPORT_DTYPES, ExportOptions, export_artifact, source_sha256
    from kiln.weights.resolve import resolve_checkpoint

    options = ExportOptions(batch_size, sequence_length, dtype, quantize, device, tp)
    if registry is not None:
        source = resolve_checkpoint(model)
        found = lookup(
            registry,
            source_sha256=source_sha256(source.path),
            dtype=str(EXPORT_DTYPES[dtype]).removeprefix("torch."),
            quantization=options.quantization,
            device=device,
            batch_size=batch_size,
            sequence_length=sequence_length,
            tp_degree=tp,
        )
        if found is not None:
            pull(str(found.path), Path(output))
            print(f"compatible artifact found in the registry: {found.path}")
            print(f"pulled into {output}")
            return 0
    manifest = export_artifact(model, Path(output), options)
    print(
        f"exported {manifest.source} to {output}: {manifest.dtype}, quantization "
        f"{manifest.quantization} ({len(manifest.quantized_layers)} packed layers), "
        f"batch {manifest.batch_size}, sequence length {manifest.sequence_length}, "
        f"{manifest.device}"
        + (f", tp {manifest.tp_degree} ({len(manifest.rank_files)} rank files)" if tp > 1 else "")
    )
    if registry is not None:
        print(f"pushed to {push(Path(output), registry)}")
    return 0


def push(artifact: str | None = None, target: str | None = None) -> int:
    """Push an artifact directory to a registry: kiln push DIR TARGET.

    TARGET is a local path, file:// URL or fsspec URL (memory://, s3://, gs://...; an
    existing directory is a registry the artifact goes into, a new path is the artifact's own)
    or a Hugging Face hub repo id. An interrupted push leaves nothing a pull, lookup or
    `models ls` finds (locally: atomic rename; fsspec: the file list is written last).

    Args:
        artifact: the artifact directory (or give it first, without the flag).
        target: where to push (or give it second, without the flag).
    """
    from pathlib import Path

    from kiln.export.registry import push as push_artifact

    artifact, target = _both("push", "artifact", artifact, "target", target)
    print(push_artifact(Path(artifact), target))
    return 0


def pull(source: str | None = None, directory: str | None = None) -> int:
    """Pull an artifact into a new directory, checking every file's sha256: kiln pull SRC DIR.

    Args:
        source: a local path, file:// or fsspec URL, or hub repo id (or give it first,
            without the flag).
        directory: the new directory (or give it second, without the flag).
    """
    from pathlib import Path

    from kiln.export.registry import pull as pull_artifact

    source, directory = _both("pull", "source", source, "directory", directory)
    print(pull_artifact(source, Path(directory)))
    return 0


def models_ls(registry: str | None = None) -> int:
    """List the artifacts of a registry with their shapes, size and content hash.

    Args:
        registry: the registry directory, file:// or fsspec URL (default:
            ~/.cache/kiln/artifacts, or $KILN_CACHE_DIR/artifacts).
    """
    from pathlib import Path

    from kiln.export.registry import default_registry, list_artifacts

    root: Path | str = registry if registry is not None else default_registry()
    entries = list_artifacts(root)
    if not entries:
        print(f"no artifacts in {root}")
        return 0
    print(
        f"{'NAME':<60} {'BATCH':>5} {'SEQ':>6} {'DTYPE':<8} {'QUANT':<6} {'DEV':<4} "
        f"{'TP':>3} {'SIZE':>9}  SHA256"
    )
    for e in entries:
        m = e.manifest
        print(
            f"{e.name:<60} {m.batch_size:>5} {m.sequence_length:>6} {m.dtype:<8} "
            f"{m.quantization:<6} {m.device:<4} {m.tp_degree:>3} {e.size / 2**20:>7.1f}Mi  "
            f"{e.artifact_id[:16]}"
        )
    return 0


def bench_start(model: str | None = None, quantize: str | None = None, repeats: int = 3) -> int:
    """Cold start (load the checkpoint + quantize/pack) vs warm start (load an exported
    artifact): time to the first token, each in a fresh process, and the time to just read
    the artifact's bytes.

    Args:
        model: the checkpoint (default: SmolLM2-135M-Instruct, a Q4_1 GGUF).
        quantize: none, int8 or int4 for both sides (default: the checkpoint's).
        repeats: fresh processes per side; the median is printed.
    """
    from kiln.bench.export_start import run

    return run(model, quantize, repeats)


def add_export_commands(commands: Any, benches: Any) -> None:
    """Register export, push, pull, `models ls` and `bench start`."""
    add_command(commands, export)
    _alias(commands.choices["export"], "--output", "-o")
    add_command(commands, push)
    _positionals(commands.choices["push"], "artifact", "target")
    add_command(commands, pull)
    _positionals(commands.choices["pull"], "source", "directory")
    models = commands.add_parser("models", help="exported artifacts in a registry")
    group = models.add_subparsers(title="commands", required=True, metavar="COMMAND")
    add_command(group, models_ls, "ls")
    add_command(benches, bench_start, "start")


def _alias(parser: argparse.ArgumentParser, flag: str, alias: str) -> None:
    # NOTE: cli/args.py makes one long flag per parameter; a short alias is added to the same
    # action, so it shares its --config bookkeeping.
    action = parser._option_string_actions[flag]
    action.option_strings.append(alias)
    parser._option_string_actions[alias] = action


def _positionals(parser: argparse.ArgumentParser, *names: str) -> None:
    # Optional positionals writing the flags' destinations; SUPPRESS leaves a value typed as a
    # flag in place when the positional is not given.
    for name in names:
        parser.add_argument(name, nargs="?", default=argparse.SUPPRESS, metavar=name.upper())


def _both(command: str, first: str, a: str | None, second: str, b: str | None) -> tuple[str, str]:
    from kiln.errors import ConfigError

    if a is None or b is None:
        raise ConfigError(f"usage: kiln {command} {first.upper()} {second.upper()}")
    return a, b
