"""Batched logits processors with per-row parameters.

Each function takes logits ``[N, V]`` and one parameter tensor per row, and returns new logits
(inputs are never modified). The maths matches transformers' LogitsProcessor / LogitsWarper of
the same name, min_tokens_to_keep=1 included, so ``generate`` and kiln agree token for token;
where a row's parameter means "disabled" the row comes back unchanged, as transformers would
leave it by not running the warper at all.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def token_mask(
    token_ids: list[list[int]] | list[tuple[int, ...]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """``[N, V]`` bool, True where the row's ids contain that token."""
    mask = torch.zeros(len(token_ids), vocab_size, dtype=torch.bool, device=device)
    rows, cols = _flatten(token_ids, device)
    mask[rows, cols] = True
    return mask


def token_counts(
    token_ids: list[list[int]] | list[tuple[int, ...]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """``[N, V]`` float32: how many times each token occurs in the row's ids."""
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.float32, device=device)
    rows, cols = _flatten(token_ids, device)
    counts.index_put_((rows, cols), torch.ones_like(cols, dtype=torch.float32), accumulate=True)
    return counts


def _flatten(
    token_ids: list[list[int]] | list[tuple[int, ...]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # One host->device copy for all rows instead of one per row.
    lengths = torch.tensor([len(ids) for ids in token_ids], device=device)
    cols = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long, device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_ids), device=device), lengths)
    return rows, cols


def apply_repetition_penalty(
    logits: torch.Tensor,  # [N, V]
    seen: torch.Tensor,  # [N, V] bool: token occurs in prompt or output
    penalty: torch.Tensor,  # [N, 1]
) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: seen tokens' positive logits are divided
    by the penalty and negative ones multiplied, so a penalty > 1 always makes them less likely.
    """
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence_penalties(
    logits: torch.Tensor,  # [N, V]
    counts: torch.Tensor,  # [N, V] float: occurrences in the output so far
    frequency_penalty: torch.Tensor,  # [N, 1]
    presence_penalty: torch.Tensor,  # [N, 1]
) -> torch.Tensor:
    """OpenAI's penalties: ``logit -= frequency * count + presence * (count > 0)``."""
    return logits - (frequency_penalty * counts + presence_penalty * (counts > 0))


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """transformers' TemperatureLogitsWarper; ``temperature`` is ``[N, 1]`` and > 0."""
    return logits / temperature


def apply_top_k_top_p(
    logits: torch.Tensor,  # [N, V]
    top_k: torch.Tensor | None,  # [N] int; 0 (or >= V) disables the row
    top_p: torch.Tensor | None,  # [N] float64; 1.0 disables the row
) -> torch.Tensor:
    """transformers' TopKLogitsWarper then TopPLogitsWarper, sharing one sort.

    NOTE: top-k only turns the lowest logits into -inf, which keeps an ascending sort sorted, so
    top-p can reuse the sort top-k used. Ascending (not descending) order and the float64
    ``1 - top_p`` rounded to float32 are what transformers computes, so boundary tokens agree.
    """
    if top_p is None:
        return apply_top_k(logits, top_k) if top_k is not None else logits
    vocab_size = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # ascending, [N, V] each

    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab_size).clamp(1, vocab_size)  # [N]
        # Like torch.topk(...)[..., -1]: ties with the k-th largest logit are kept.
        kth = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))  # [N, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _NEG_INF)

    # Rows with top_p == 1 get a threshold no cumulative probability can be under: without it,
    # tokens whose probability underflows to exactly 0 would be dropped, which transformers
    # (not running the warper at all) would not do.
    threshold = torch.where(top_p < 1.0, 1.0 - top_p.double(), -1.0).float()  # [N]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
    remove = cumulative <= threshold.unsqueeze(1)
    remove[:, -1] = False  # min_tokens_to_keep=1: the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(remove, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def apply_top_k(
    logits: torch.Tensor,  # [N, V]
    top_k: torch.Tensor,  # [N] int; 0 (or >= V) disables the row
    max_k: int | None = None,
) -> torch.Tensor:
    """transformers' TopKLogitsWarper, without a sort.

    NOTE: a full sort of ``[N, V]`` costs far more than ``topk`` for the k people use (about
    30x on CPU at V=32k), so the k-th value comes from ``topk`` as in transformers, with k as
    large as the largest enabled row needs. Pass ``max_k`` (that largest k, or more) when it
    is known on the host to save a device sync.
    """
    vocab_size = logits.shape[-1]
    disabled = (top_k <= 0) | (top_k >= vocab_size)  # [N]
    k = torch.where(disabled, 1, top_k)  # [N], each in [1, V)
    max_k = int(k.max()) if max_k is None else min(max_k, vocab_size)
    top_values = logits.topk(max_k, dim=-1).values  # [N, max_k], descending
    kth = top_values.gather(1, (k - 1).unsqueeze(1))  # [N, 1]
    # Ties with the k-th value are kept, like transformers' `scores < topk(...)[..., -1]`.
    return logits.masked_fill((logits < kth) & ~disabled.unsqueeze(1), _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """transformers' MinPLogitsWarper; ``min_p`` is ``[N, 1]`` in [0, 1), 0 disables the row.

    With min_p < 1 the most likely token is never below ``min_p * p_max``, so the
    min_tokens_to_keep=1 guarantee holds without transformers' extra argsort.
    """
    probs = logits.softmax(dim=-1)  # [N, V]
    top_probs = probs.amax(dim=-1, keepdim=True)  # [N, 1]
    return logits.masked_fill(probs < min_p * top_probs, _NEG_INF)


def apply_typical_p(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """transformers' TypicalLogitsWarper; ``mass`` is ``[N, 1]`` in (0, 1).

    Only pass rows that use it: transformers skips the warper at typical_p == 1, and running
    it at mass 1 is not a no-op (it can drop tokens whose probability underflows).
    """
    log_probs = torch.log_softmax(logits, dim=-1)  # [N, V]
    # Entropy; nansum because -inf logits give 0 * -inf = NaN terms that contribute nothing.
    entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)  # [N, 1]
    # Tokens whose surprise is closest to the entropy are the most "typical".
    shifted = (-log_probs - entropy).abs()  # [N, V]
    sorted_shifted, sorted_ids = shifted.sort(dim=-1)
    cumulative = logits.gather(-1, sorted_ids).softmax(dim=-1).cumsum(dim=-1)  # [N, V]
    last = (cumulative < mass).sum(dim=1).clamp_(max=logits.shape[-1] - 1)  # [N]
    remove_sorted = sorted_shifted > sorted_shifted.gather(1, last.unsqueeze(1))
    remove_sorted[:, :1] = False  # min_tokens_to_keep=1
    remove = remove_sorted.scatter(1, sorted_ids, remove_sorted)
    return logits.masked_fill(remove, _NEG_INF)


def sample_from_probs(
    probs: torch.Tensor,  # [N, V], rows sum to 1
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One token per row, ``[N]`` long, drawn from ``probs`` with the row's own generator.

    NOTE: inverse transform sampling: one uniform number per row, located in the row's
    cumulative distribution (float64, so 49k small probabilities add up without drift). It
    draws exactly from ``probs``, needs no host sync, and takes a fixed one number per row, so a
    seeded row's stream depends only on its own seed and step, never on the other rows. (An
    exponential race drew V numbers per row instead: ~2 ms a token for SmolLM2's 49k vocabulary
    on a CPU, a fifth of its decode step.)
    """
    uniform = torch.empty(probs.shape[0], 1, dtype=torch.float64, device=probs.device)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        uniform.uniform_()  # unseeded rows share the global RNG
    for i in seeded:
        uniform[i].uniform_(generator=generators[i])
    cumulative = probs.double().cumsum(dim=-1)  # [N, V]
    targets = uniform * cumulative[:, -1:]
    # The first token whose cumulative probability passes the target: zero-probability tokens
    # (masked by top-k/top-p) have empty intervals and are never picked.
    tokens = torch.searchsorted(cumulative, targets, right=True).squeeze(-1)
    return tokens.clamp_(max=probs.shape[-1] - 1)
