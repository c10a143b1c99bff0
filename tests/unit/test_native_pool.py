"""kiln's native thread pool (cpu_kernels.c): any thread count, callers on several Python
threads at once, and a forked child that uses the kernels after its parent did."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels.native import CPUKernels, cpu_kernels
from kiln.quantization import quantize


@pytest.fixture(scope="module")
def kernels() -> CPUKernels:
    built = cpu_kernels()
    if built is None:
        pytest.fail("kiln's CPU kernels did not build here (x86-64 Linux, AVX2, gcc expected)")
    return built


def _layer(bits: int, out_features: int = 200, in_features: int = 256, seed: int = 0):
    """A quantized weight as the kernels take it, and its exact float values."""
    from kiln.models.layers.linear import Linear

    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features)
    layer = Linear(in_features, out_features)
    layer.quantize_to(bits, cpu_kernels())
    layer.load_weight_rows(weight, slice(None))
    layer.finish_loading()
    return layer.qblocks, quantize(weight, bits).dequantize()


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("rows", [1, 5])
def test_every_thread_count_computes_every_output_feature_once(kernels, threads, rows):
    # 200 features over 3 or 7 threads do not split evenly: a lost or doubled share shows.
    blocks, dense = _layer(4)
    x = torch.randn(rows, 256)
    out = kernels.linear(4, x, blocks, threads=threads)
    assert _relative_error(out, F.linear(x, dense)) < 2e-4


def test_callers_on_several_threads_at_once_each_get_their_own_result(kernels):
    blocks, dense = _layer(8)
    inputs = [torch.randn(1 + i % 3, 256) for i in range(8)]
    expected = [F.linear(x, dense) for x in inputs]
    errors: list[float] = []
    failures: list[BaseException] = []

    def call(i: int) -> None:
        try:
            for _ in range(40):
                out = kernels.linear(8, inputs[i], blocks, threads=2)
                errors.append(_relative_error(out, expected[i]))
        except BaseException as e:  # surfaced below: a thread's exception is otherwise lost
            failures.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not failures
    assert len(errors) == 8 * 40 and max(errors) < 2e-4


def _child_linear(queue) -> None:
    # torch's own OpenMP threads do not survive a fork either: keep torch on this thread.
    torch.set_num_threads(1)
    blocks, dense = _layer(4, seed=1)
    x = torch.randn(3, 256)
    out = cpu_kernels().linear(4, x, blocks, threads=2)
    queue.put(_relative_error(out, F.linear(x, dense)))


def test_a_forked_child_starts_its_own_pool(kernels):
    # The parent's pool has worker threads; a fork copies none of them, so a child that
    # waited on the parent's workers would hang.
    blocks, _ = _layer(4)
    kernels.linear(4, torch.randn(1, 256), blocks, threads=2)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_linear, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the kernels")
    assert child.exitcode == 0
    assert queue.get(timeout=5) < 2e-4


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "window"),
    [(9, 3, 64, 0), (4, 4, 72, 0), (8, 2, 128, 5), (6, 1, 16, 0)],
)
def test_decode_attention_matches_softmax_attention_over_each_sequence(
    kernels, heads, kv_heads, head_dim, window
):
    """One query per sequence against its own scattered cache slots, grouped-query heads, an
    optional sliding window: the kernel against softmax(q k^T * scale) v in float64."""
    torch.manual_seed(head_dim)
    lengths = [1, 7, 37, 100]
    num_slots = sum(lengths) + 11
    cache = torch.randn(2, num_slots, kv_heads, head_dim)
    order = torch.randperm(num_slots)
    slots = order[: sum(lengths)]
    starts = torch.tensor([0, *lengths]).cumsum(0)
    q = torch.randn(len(lengths), heads, head_dim)
    scale = head_dim**-0.5
    out = kernels.decode_attention(q, cache, slots, starts, scale, window)
    group = heads // kv_heads
    for b in range(len(lengths)):
        seq = (
            slots[starts[b] : starts[b + 1]][-window:]
            if window
            else slots[starts[b] : starts[b + 1]]
        )
        keys, values = cache[0, seq].double(), cache[1, seq].double()  # [len, kv, D]
        for h in range(heads):
            weights = torch.softmax(keys[:, h // group] @ q[b, h].double() * scale, dim=0)
            expected = weights @ values[:, h // group]
            torch.testing.assert_close(out[b, h].double(), expected, rtol=1e-5, atol=1e-5)
