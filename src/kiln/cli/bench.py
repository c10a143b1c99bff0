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
