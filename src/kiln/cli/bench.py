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
