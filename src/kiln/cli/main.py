"""The `kiln` command: one typed function per sub-command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kiln.cli.args import add_command, call_command
from kiln.cli.bench import (
    bench_cpu,
    bench_finetune,
    bench_generate,
    bench_offline,
    bench_quality,
)
from kiln.cli.chat import chat
from kiln.cli.deploy import add_deploy_commands
from kiln.cli.export import add_export_commands
from kiln.cli.finetune import add_finetune_commands
from kiln.cli.generate import generate
from kiln.cli.loadtest import add_loadtest_commands
from kiln.cli.plan import plan
from kiln.cli.serve import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description="From an open LLM checkpoint to a chatbot."
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    add_command(commands, generate)
    add_command(commands, chat)
    add_command(commands, serve)
    add_finetune_commands(commands)  # finetune, finetune eval
    add_command(commands, plan)
    bench = commands.add_parser("bench", help="benchmarks that print ratios against a peer")
    benches = bench.add_subparsers(title="benchmarks", required=True, metavar="BENCH")
    add_command(benches, bench_generate, "generate")
    add_command(benches, bench_offline, "offline")
    add_command(benches, bench_cpu, "cpu")
    add_command(benches, bench_quality, "quality")
    add_command(benches, bench_finetune, "finetune")
    add_loadtest_commands(benches)  # serve, compare, locustfile
    add_export_commands(commands, benches)  # export, push, pull, models ls, bench start
    add_deploy_commands(commands)  # deploy ray, deploy k8s
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from kiln.errors import KilnError

    try:
        return int(call_command(args) or 0)
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`kiln generate ... | head`): stop quietly, as if killed by SIGPIPE.
        # NOTE: stdout is pointed at /dev/null so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _version() -> str:
    from kiln import __version__

    return f"kiln {__version__}"


if __name__ == "__main__":
    sys.exit(main())
