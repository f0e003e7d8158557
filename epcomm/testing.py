"""Test helpers: calc_diff(), assert_bitwise_equal() with coordinates, and seeded input generators."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import ConfigError

bf16 = np.dtype(ml_dtypes.bfloat16)


def calc_diff(x, y) -> float:
    """1 - 2 * sum(x * y) / sum(x * x + y * y) in float64: 0 for identical inputs, about the relative squared error
    for close ones. Two all-zero inputs give 0."""
    x = np.asarray(x).astype(np.float64)
    y = np.asarray(y).astype(np.float64)
    denominator = float((x * x + y * y).sum())
    if denominator == 0.0:
        return 0.0
    return 1.0 - 2.0 * float((x * y).sum()) / denominator


def _bits(a: np.ndarray) -> np.ndarray:
    """The array reinterpreted as unsigned integers of its item size (so -0.0 != 0.0 and NaNs compare by bits)."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_bitwise_equal(actual, expected, name: str) -> None:
    """AssertionError unless `actual` and `expected` have the same shape, dtype and bits; the message names the first
    differing coordinate. Tuples (e.g. an FP8 (data, scales) pair) and None are compared element by element."""
    if isinstance(expected, tuple) or isinstance(actual, tuple):
        if not (isinstance(expected, tuple) and isinstance(actual, tuple)) or len(actual) != len(expected):
            raise AssertionError(f"{name}: expected a tuple of {len(expected) if isinstance(expected, tuple) else '-'}"
                                 f", got {type(actual).__name__}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bitwise_equal(a, e, f"{name}[{i}]")
        return
    if expected is None or actual is None:
        if actual is not expected:
            raise AssertionError(f"{name}: expected {expected!r}, got {'None' if actual is None else 'an array'}")
        return
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: expected {list(expected.shape)} {expected.dtype}, "
                             f"got {list(actual.shape)} {actual.dtype}")
    differ = _bits(actual) != _bits(expected)
    if differ.any():
        coord = tuple(int(i) for i in np.argwhere(differ)[0])
        raise AssertionError(f"{name}: first difference at {list(coord)}: got {actual[coord]!r}, expected "
                             f"{expected[coord]!r} ({int(differ.sum())} of {differ.size} elements differ)")


def make_topk(rng: np.random.Generator, num_tokens: int, num_topk: int, num_experts: int,
              skew: str | None = None, drop: float = 0.0) -> np.ndarray:
    """Random routing, [num_tokens, num_topk] int64.

    skew=None: num_topk distinct experts per token, uniformly.
    skew='one_expert': every token on expert 0 only, the other entries -1.
    skew='avoid_rank:R:r': distinct experts, never one of rank r's (of R ranks).
    drop=p: afterwards each entry independently becomes -1 with probability p.
    """
    candidates = np.arange(num_experts)
    if skew == "one_expert":
        topk_idx = np.full((num_tokens, num_topk), -1, dtype=np.int64)
        topk_idx[:, 0] = 0
    else:
        if skew is not None:
            parts = skew.split(":")
            if len(parts) != 3 or parts[0] != "avoid_rank":
                raise ConfigError(f"skew: expected None, 'one_expert' or 'avoid_rank:R:r', got {skew!r}")
            num_ranks, avoided = int(parts[1]), int(parts[2])
            num_local_experts = num_experts // num_ranks
            candidates = candidates[candidates // num_local_experts != avoided]
        if num_topk > len(candidates):
            raise ConfigError(f"num_topk: expected at most {len(candidates)} distinct experts, got {num_topk}")
        picks = np.argsort(rng.random((num_tokens, len(candidates))), axis=1)[:, :num_topk]
        topk_idx = candidates[picks].astype(np.int64)
    if drop > 0.0:
        topk_idx[rng.random(topk_idx.shape) < drop] = -1
    return topk_idx


def make_x(rng: np.random.Generator, num_tokens: int, hidden: int, rank: int) -> np.ndarray:
    """[num_tokens, hidden] bf16 rows that say where they came from: x[t, 0] = rank, x[t, 1] = t % 256,
    x[t, 2] = t // 256 (exact in bf16 for rank, t // 256 <= 256); the rest standard normal."""
    if hidden < 3:
        raise ConfigError(f"hidden: expected at least 3 to encode (rank, token), got {hidden}")
    if rank > 256 or num_tokens > 256 * 257:
        raise ConfigError(f"rank/num_tokens: too large to encode exactly in bf16 ({rank}, {num_tokens})")
    x = rng.standard_normal((num_tokens, hidden), dtype=np.float32)
    tokens = np.arange(num_tokens)
    x[:, 0] = rank
    x[:, 1] = tokens % 256
    x[:, 2] = tokens // 256
    return x.astype(bf16)


def make_weights(rng: np.random.Generator, num_tokens: int, num_topk: int) -> np.ndarray:
    """[num_tokens, num_topk] float32 top-k weights, uniform in [0, 1)."""
    return rng.random((num_tokens, num_topk), dtype=np.float32)


def make_rank_inputs(seed: int, tokens, hidden: int, num_topk: int, num_experts: int, skew=None, drop: float = 0.0):
    """Every rank's inputs from one seed (so that each rank can compute every expected value itself): tokens[r] rows
    for rank r; returns ([x_r], [topk_idx_r], [topk_weights_r]) drawn in that order (make_x, make_topk, make_weights;
    skew and drop go to make_topk)."""
    rng = np.random.default_rng(seed)
    xs = [make_x(rng, t, hidden, r) for r, t in enumerate(tokens)]
    idxs = [make_topk(rng, t, num_topk, num_experts, skew=skew, drop=drop) for t in tokens]
    ws = [make_weights(rng, t, num_topk) for t in tokens]
    return xs, idxs, ws


def pairwise_cases(factors: dict, seed: int = 0, candidates: int = 64) -> list[dict]:
    """A small set of cases (dicts factor -> level) in which every pair of levels of every two factors occurs at least
    once ("all-pairs" coverage of the cross product, which would be far too large to run in full). Greedy and seeded:
    each new case is the best of `candidates` random ones at covering pairs not yet covered, each candidate holding
    the first pair still uncovered (so every case covers at least one). Fewer than two factors have no pairs: every
    level of the one factor is a case."""
    names = list(factors)
    levels = [list(factors[n]) for n in names]
    if any(not lv for lv in levels):
        raise ConfigError("factors: expected at least one level per factor")
    if len(names) < 2:
        return [{n: lv} for n, lvs in zip(names, levels) for lv in lvs]
    uncovered = {(i, a, j, b) for i in range(len(names)) for j in range(i + 1, len(names))
                 for a in range(len(levels[i])) for b in range(len(levels[j]))}
    rng = np.random.default_rng(seed)
    cases = []

    def pairs_of(choice):
        return {(i, choice[i], j, choice[j]) for i in range(len(names)) for j in range(i + 1, len(names))}

    while uncovered:
        i0, a0, j0, b0 = min(uncovered)
        best, best_gain = None, -1
        for _ in range(candidates):
            choice = [int(rng.integers(len(lv))) for lv in levels]
            choice[i0], choice[j0] = a0, b0
            gain = len(pairs_of(choice) & uncovered)
            if gain > best_gain:
                best, best_gain = choice, gain
        uncovered -= pairs_of(best)
        cases.append({n: levels[k][best[k]] for k, n in enumerate(names)})
    return cases
