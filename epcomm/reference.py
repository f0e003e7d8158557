"""The numpy definition of every epcomm operation: shared/SPEC.md made executable.

Each operation is split into a per-rank SEND half and RECV half (a CPU backend moves the messages between them with
mpi4py), plus all-rank wrappers that route the messages in memory (tests generate every rank's inputs from one seed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

import ml_dtypes
import numpy as np

from .errors import ConfigError

bf16 = np.dtype(ml_dtypes.bfloat16)
fp8 = np.dtype(ml_dtypes.float8_e4m3fn)

FP8_MAX = 448.0          # largest finite e4m3 value
FP8_MAX_INV = np.float32(1.0) / np.float32(448.0)   # DeepEP's kFinfoAmaxInvE4M3 (1 / 448.0f): scale_inv = amax * it
FP8_BLOCK = 128          # channels per scale
FP8_AMAX_FLOOR = 1e-4    # amax of an all-zero block
FP8_NAN_BITS = 0x7F      # the e4m3 NaN the hardware's saturating conversion writes for a NaN

# A dispatched payload: bf16 [n, hidden], or (fp8 [n, hidden], scales [n, hidden / 128] float32).
Payload = Union[np.ndarray, tuple]


# ---------------------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------------------

def _describe(a) -> str:
    return f"{list(np.shape(a))} {getattr(a, 'dtype', type(a).__name__)}"


def _check_experts(num_experts: int, num_ranks: int) -> int:
    """Returns E_local; ConfigError unless num_experts is a positive multiple of num_ranks."""
    if num_ranks <= 0:
        raise ConfigError(f"num_ranks: expected a positive integer, got {num_ranks}")
    if num_experts <= 0 or num_experts % num_ranks != 0:
        raise ConfigError(f"num_experts: expected a positive multiple of num_ranks={num_ranks}, got {num_experts}")
    return num_experts // num_ranks


def _check_rank(rank: int, num_ranks: int) -> None:
    if not 0 <= rank < num_ranks:
        raise ConfigError(f"rank: expected an integer in [0, {num_ranks}), got {rank}")


def _check_topk_idx(topk_idx, num_experts: int) -> np.ndarray:
    """ConfigError unless topk_idx is [num_tokens, num_topk] integer with entries in [-1, num_experts)."""
    if not isinstance(topk_idx, np.ndarray) or topk_idx.ndim != 2 or topk_idx.dtype.kind not in "iu":
        raise ConfigError(f"topk_idx: expected [num_tokens, num_topk] int64, got {_describe(topk_idx)}")
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bad.any():
        t, k = np.argwhere(bad)[0]
        raise ConfigError(f"topk_idx: expected entries in [-1, {num_experts}), "
                          f"got {int(topk_idx[t, k])} at [{t}, {k}]")
    return topk_idx.astype(np.int64, copy=False)


def _check_topk_weights(topk_weights, topk_idx) -> None:
    if topk_weights is None:
        return
    if topk_idx is None:
        raise ConfigError("topk_weights: expected None when topk_idx is None (pass both or neither)")
    if not isinstance(topk_weights, np.ndarray) or topk_weights.dtype != np.float32 \
            or topk_weights.shape != topk_idx.shape:
        raise ConfigError(f"topk_weights: expected {list(topk_idx.shape)} float32, got {_describe(topk_weights)}")


def _check_bf16(x, name: str, num_rows: int | None = None) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != bf16 \
            or (num_rows is not None and x.shape[0] != num_rows):
        rows = "num_tokens" if num_rows is None else num_rows
        raise ConfigError(f"{name}: expected [{rows}, hidden] bf16, got {_describe(x)}")


def _check_payload(x, name: str = "x") -> int:
    """Validates a bf16 array or an (fp8, scales) pair; returns its number of rows."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ConfigError(f"{name}: expected (fp8 [num_tokens, hidden], scales [num_tokens, hidden / 128]), "
                              f"got a tuple of {len(x)}")
        data, scales = x
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.dtype != fp8:
            raise ConfigError(f"{name}[0]: expected [num_tokens, hidden] float8_e4m3fn, got {_describe(data)}")
        if not isinstance(scales, np.ndarray) or scales.ndim != 2 or scales.shape[0] != data.shape[0] \
                or scales.dtype != np.float32:
            raise ConfigError(f"{name}[1]: expected [{data.shape[0]}, num_scales] float32, got {_describe(scales)}")
        return data.shape[0]
    _check_bf16(x, name)
    return x.shape[0]


def _check_is_token_in_rank(is_token_in_rank, num_tokens: int | None = None) -> np.ndarray:
    if not isinstance(is_token_in_rank, np.ndarray) or is_token_in_rank.ndim != 2 \
            or is_token_in_rank.dtype != np.bool_ \
            or (num_tokens is not None and is_token_in_rank.shape[0] != num_tokens):
        rows = "num_tokens" if num_tokens is None else num_tokens
        raise ConfigError(f"is_token_in_rank: expected [{rows}, num_ranks] bool, got {_describe(is_token_in_rank)}")
    return is_token_in_rank


# ---------------------------------------------------------------------------------------------------------------------
# Payload helpers (a payload is a bf16 array or an (fp8, scales) pair; both are handled row-wise)
# ---------------------------------------------------------------------------------------------------------------------

def _concat(arrays: list) -> np.ndarray:
    """np.concatenate along rows through a same-size integer view (10x faster for ml_dtypes types)."""
    dtype = arrays[0].dtype
    raw = np.dtype(f"u{dtype.itemsize}")
    return np.concatenate([np.ascontiguousarray(a).view(raw) for a in arrays]).view(dtype)


def _take_rows(x: Payload, rows: np.ndarray) -> Payload:
    if isinstance(x, tuple):
        return (x[0][rows], np.ascontiguousarray(x[1][rows]))
    return x[rows]


def _concat_rows(parts: list) -> Payload:
    if isinstance(parts[0], tuple):
        return (_concat([p[0] for p in parts]), _concat([p[1] for p in parts]))
    return _concat(parts)


def _pad_rows(a: np.ndarray, num_rows: int, fill) -> np.ndarray:
    """Appends rows of `fill` to reach num_rows rows."""
    out = np.full((num_rows,) + a.shape[1:], fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


def _pad_payload(x: Payload, num_rows: int) -> Payload:
    if isinstance(x, tuple):
        return (_pad_rows(x[0], num_rows, 0), _pad_rows(x[1], num_rows, 0))
    return _pad_rows(x, num_rows, 0)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Routing layout
# ---------------------------------------------------------------------------------------------------------------------

def get_dispatch_layout(topk_idx: np.ndarray, num_experts: int, num_ranks: int, num_nodes: int = 1):
    """Counts where every token goes.

    Args:
        topk_idx: [num_tokens, num_topk] int64, global expert ids in [-1, num_experts); -1 means no expert.
        num_experts: E, a multiple of num_ranks; expert e lives on rank e // (E / num_ranks).
        num_ranks: R.
        num_nodes: number of nodes; rank r is on node r // (R / num_nodes).

    Returns:
        num_tokens_per_rank: [num_ranks] int32, tokens selecting at least one expert of each rank.
        num_tokens_per_rdma_rank: [num_nodes] int32, tokens selecting at least one rank of each node;
            None when num_nodes == 1.
        num_tokens_per_expert: [num_experts] int32, #(t, k) with topk_idx[t, k] == e.
        is_token_in_rank: [num_tokens, num_ranks] bool, token t selects at least one expert of rank r.
    """
    num_local_experts = _check_experts(num_experts, num_ranks)
    if num_nodes <= 0 or num_ranks % num_nodes != 0:
        raise ConfigError(f"num_nodes: expected a positive divisor of num_ranks={num_ranks}, got {num_nodes}")
    topk_idx = _check_topk_idx(topk_idx, num_experts)
    num_tokens = topk_idx.shape[0]

    valid = topk_idx >= 0
    num_tokens_per_expert = np.bincount(topk_idx[valid], minlength=num_experts).astype(np.int32)

    is_token_in_rank = np.zeros((num_tokens, num_ranks), dtype=bool)
    token_of_pair = np.broadcast_to(np.arange(num_tokens)[:, None], topk_idx.shape)
    is_token_in_rank[token_of_pair[valid], topk_idx[valid] // num_local_experts] = True
    num_tokens_per_rank = is_token_in_rank.sum(axis=0, dtype=np.int32)

    num_tokens_per_rdma_rank = None
    if num_nodes > 1:
        is_token_in_node = is_token_in_rank.reshape(num_tokens, num_nodes, num_ranks // num_nodes).any(axis=2)
        num_tokens_per_rdma_rank = is_token_in_node.sum(axis=0, dtype=np.int32)
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank


# ---------------------------------------------------------------------------------------------------------------------
# 2. Normal dispatch
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class DispatchMessage:
    """What one source rank sends to one destination rank in a normal dispatch.

    Fields (n = number of tokens sent):
        src_idx: [n] int32, token indices at the source, ascending.
        x: [n, hidden] bf16, or (fp8 [n, hidden], scales [n, hidden / 128] float32): the rows of those tokens.
        topk_idx: [n, num_topk] int64 global expert ids as at the source, or None (cached dispatch / no top-k).
        topk_weights: [n, num_topk] float32, or None.
        num_tokens_per_expert: [E_local] int32, the source's get_dispatch_layout counts of the destination's experts
            (what DeepEP's notify step sends), or None (cached dispatch).
    """
    src_idx: np.ndarray
    x: Payload
    topk_idx: np.ndarray | None
    topk_weights: np.ndarray | None
    num_tokens_per_expert: np.ndarray | None = None


@dataclass
class DispatchResult:
    """Rank r's normal-dispatch outputs and the handle fields combine and cached dispatch need.

    Received rows are grouped by source rank 0..R-1, ascending source token index inside a group.
    N = num_recv_tokens; arrays have num_worst_tokens rows instead when that was > 0 (padding described per field).

    Fields:
        recv_x: [N, hidden] bf16, or (fp8 [N, hidden], scales [N, hidden / 128] float32 C-contiguous);
            padding rows are zero.
        recv_topk_idx: [N, num_topk] int64, e - r * E_local where global expert e lives on rank r, else -1
            (padding rows -1); None without top-k.
        recv_topk_weights: [N, num_topk] float32, the weight where recv_topk_idx >= 0, else 0.0; None without top-k.
        num_recv_tokens_per_expert_list: [E_local] ints, for local expert j the sum over sources of their
            num_tokens_per_expert[r * E_local + j] (with top-k from the layout: #(row, k) with recv_topk_idx == j),
            rounded UP to a multiple of expert_alignment, as DeepEP derives it from the layout's counts (so a
            dispatch without top-k has it too); messages without counts: #(row, k) with recv_topk_idx == j, aligned;
            [] when num_worst_tokens > 0, or with neither counts nor top-k.
        recv_src_idx: [N] int32, token index at its source rank (padding rows -1).
        num_recv_tokens_per_source: [num_ranks] int32, rows received from each source rank.
        num_recv_tokens: N, the true number of received rows.
    """
    recv_x: Payload
    recv_topk_idx: np.ndarray | None
    recv_topk_weights: np.ndarray | None
    num_recv_tokens_per_expert_list: list
    recv_src_idx: np.ndarray
    num_recv_tokens_per_source: np.ndarray
    num_recv_tokens: int


def dispatch_send(x: Payload, topk_idx: np.ndarray | None, topk_weights: np.ndarray | None,
                  is_token_in_rank: np.ndarray, num_tokens_per_expert: np.ndarray | None = None) -> list:
    """Source side of a normal dispatch: one DispatchMessage per destination rank d, holding the tokens t with
    is_token_in_rank[t, d] in ascending order (a token goes once to each rank, however many of its experts live there).

    Args:
        x: [num_tokens, hidden] bf16, or (fp8 [num_tokens, hidden], scales [num_tokens, hidden / 128] float32).
        topk_idx: [num_tokens, num_topk] int64 or None.
        topk_weights: [num_tokens, num_topk] float32 or None (given only with topk_idx).
        is_token_in_rank: [num_tokens, num_ranks] bool.
        num_tokens_per_expert: [num_experts] int32 from get_dispatch_layout (num_experts a multiple of num_ranks);
            each destination gets the slice of its own experts. None: no counts (a cached dispatch; dispatch_recv
            then counts recv_topk_idx instead, which gives the same list when the counts are the layout's).
    """
    num_tokens = _check_payload(x)
    _check_is_token_in_rank(is_token_in_rank, num_tokens)
    if topk_idx is not None and (not isinstance(topk_idx, np.ndarray) or topk_idx.ndim != 2
                                 or topk_idx.shape[0] != num_tokens):
        raise ConfigError(f"topk_idx: expected [{num_tokens}, num_topk] int64, got {_describe(topk_idx)}")
    _check_topk_weights(topk_weights, topk_idx)
    num_ranks = is_token_in_rank.shape[1]
    per_expert = None
    if num_tokens_per_expert is not None:
        per_expert = np.asarray(num_tokens_per_expert)
        if per_expert.ndim != 1 or per_expert.dtype.kind not in "iu" or per_expert.shape[0] % num_ranks:
            raise ConfigError(f"num_tokens_per_expert: expected [num_experts] int32 with num_experts a multiple of "
                              f"num_ranks={num_ranks}, got {_describe(per_expert)}")
    per_expert = None if per_expert is None else per_expert.astype(np.int32).reshape(num_ranks, -1)

    messages = []
    for dst in range(num_ranks):
        src_idx = np.nonzero(is_token_in_rank[:, dst])[0].astype(np.int32)
        messages.append(DispatchMessage(
            src_idx=src_idx,
            x=_take_rows(x, src_idx),
            topk_idx=None if topk_idx is None else topk_idx[src_idx].astype(np.int64),
            topk_weights=None if topk_weights is None else topk_weights[src_idx].copy(),
            num_tokens_per_expert=None if per_expert is None else per_expert[dst].copy()))
    return messages


def _align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _recv_rows(messages: list, num_ranks: int, num_worst_tokens: int):
    """Concatenates the messages' rows in source order; returns (recv_x, recv_src_idx, per-source counts, N),
    padded to num_worst_tokens rows when that is > 0."""
    if len(messages) != num_ranks:
        raise ConfigError(f"messages: expected one per source rank ({num_ranks}), got {len(messages)}")
    num_recv_tokens_per_source = np.array([len(m.src_idx) for m in messages], dtype=np.int32)
    num_recv_tokens = int(num_recv_tokens_per_source.sum())
    recv_x = _concat_rows([m.x for m in messages])
    recv_src_idx = np.concatenate([m.src_idx for m in messages]).astype(np.int32)
    if num_worst_tokens > 0:
        if num_recv_tokens > num_worst_tokens:
            raise ConfigError(f"num_worst_tokens: expected at least the {num_recv_tokens} received tokens, "
                              f"got {num_worst_tokens}")
        recv_x = _pad_payload(recv_x, num_worst_tokens)
        recv_src_idx = _pad_rows(recv_src_idx, num_worst_tokens, -1)
    return recv_x, recv_src_idx, num_recv_tokens_per_source, num_recv_tokens


def dispatch_recv(messages: list, rank: int, num_ranks: int, num_experts: int,
                  expert_alignment: int = 1, num_worst_tokens: int = 0) -> DispatchResult:
    """Destination side of a normal dispatch.

    Args:
        messages: [num_ranks] DispatchMessage, indexed by source rank, all addressed to `rank`.
        rank: this rank r.
        num_experts: E; this rank owns global experts [r * E_local, (r + 1) * E_local).
        expert_alignment: each per-expert count is rounded up to a multiple of this.
        num_worst_tokens: > 0 pads every per-row output to this many rows and leaves the per-expert list empty.
    """
    num_local_experts = _check_experts(num_experts, num_ranks)
    _check_rank(rank, num_ranks)
    if expert_alignment <= 0:
        raise ConfigError(f"expert_alignment: expected a positive integer, got {expert_alignment}")
    if num_worst_tokens < 0:
        raise ConfigError(f"num_worst_tokens: expected >= 0, got {num_worst_tokens}")
    recv_x, recv_src_idx, per_source, num_recv_tokens = _recv_rows(messages, num_ranks, num_worst_tokens)

    recv_topk_idx = recv_topk_weights = None
    per_expert = []
    has_counts = [m.num_tokens_per_expert is not None for m in messages]
    if all(has_counts) and num_worst_tokens == 0:
        counts = np.sum([m.num_tokens_per_expert.astype(np.int64) for m in messages], axis=0)
        if counts.shape != (num_local_experts,):
            raise ConfigError(f"messages: expected num_tokens_per_expert of {num_local_experts} local experts, got "
                              f"{list(counts.shape)}")
        per_expert = [_align_up(int(c), expert_alignment) for c in counts]
    has_topk = [m.topk_idx is not None for m in messages]
    if any(has_topk):
        if not all(has_topk):
            raise ConfigError("messages: expected topk_idx in every message or in none")
        global_idx = np.concatenate([m.topk_idx for m in messages]).astype(np.int64)
        is_local = (global_idx >= 0) & (global_idx // num_local_experts == rank)
        recv_topk_idx = np.where(is_local, global_idx - rank * num_local_experts, -1)
        if messages[0].topk_weights is not None:
            weights = np.concatenate([m.topk_weights for m in messages]).astype(np.float32)
            recv_topk_weights = np.where(is_local, weights, np.float32(0.0)).astype(np.float32)
        if num_worst_tokens > 0:
            recv_topk_idx = _pad_rows(recv_topk_idx, num_worst_tokens, -1)
            if recv_topk_weights is not None:
                recv_topk_weights = _pad_rows(recv_topk_weights, num_worst_tokens, 0.0)
        elif not all(has_counts):
            counts = np.bincount(recv_topk_idx[recv_topk_idx >= 0], minlength=num_local_experts)
            per_expert = [_align_up(int(c), expert_alignment) for c in counts]

    return DispatchResult(recv_x=recv_x, recv_topk_idx=recv_topk_idx, recv_topk_weights=recv_topk_weights,
                          num_recv_tokens_per_expert_list=per_expert, recv_src_idx=recv_src_idx,
                          num_recv_tokens_per_source=per_source, num_recv_tokens=num_recv_tokens)


def _route(sent: list) -> list:
    """sent[src][dst] -> received[dst][src]."""
    return [list(column) for column in zip(*sent)]


def dispatch(xs: list, topk_idxs: list, topk_weights: list | None, num_experts: int,
             expert_alignment: int = 1, num_worst_tokens: int = 0) -> list:
    """All ranks' normal dispatch, messages routed in memory. Returns [num_ranks] DispatchResult.

    Args:
        xs: [num_ranks] payloads, rank s's x (bf16 [T_s, hidden] or an FP8 pair).
        topk_idxs: [num_ranks] [T_s, num_topk] int64.
        topk_weights: [num_ranks] [T_s, num_topk] float32, or None.
    """
    num_ranks = len(xs)
    _check_experts(num_experts, num_ranks)
    layouts = [get_dispatch_layout(idx, num_experts, num_ranks) for idx in topk_idxs]
    sent = [dispatch_send(xs[s], topk_idxs[s], None if topk_weights is None else topk_weights[s], layouts[s][3],
                          layouts[s][2])
            for s in range(num_ranks)]
    return [dispatch_recv(received, r, num_ranks, num_experts, expert_alignment, num_worst_tokens)
            for r, received in enumerate(_route(sent))]


def cached_dispatch(xs: list, results: list, is_token_in_ranks: list) -> list:
    """All ranks' cached dispatch: the layout of an earlier dispatch reused for new rows (also the backward of
    combine). Returns [num_ranks] recv_x, padded like the earlier results' recv_src_idx.

    Args:
        xs: [num_ranks] payloads with the same row counts as the earlier dispatch.
        results: [num_ranks] DispatchResult of the earlier dispatch.
        is_token_in_ranks: [num_ranks] [T_s, num_ranks] bool of the earlier dispatch.
    """
    num_ranks = len(xs)
    sent = [dispatch_send(xs[s], None, None, is_token_in_ranks[s]) for s in range(num_ranks)]
    recv_xs = []
    for r, received in enumerate(_route(sent)):
        padded_rows = len(results[r].recv_src_idx)
        num_worst_tokens = padded_rows if padded_rows > results[r].num_recv_tokens else 0
        recv_x, src_idx, per_source, _ = _recv_rows(received, num_ranks, num_worst_tokens)
        if not np.array_equal(per_source, results[r].num_recv_tokens_per_source) \
                or not np.array_equal(src_idx, results[r].recv_src_idx):
            raise ConfigError(f"is_token_in_ranks: rank {r}'s layout does not match results[{r}]")
        recv_xs.append(recv_x)
    return recv_xs


# ---------------------------------------------------------------------------------------------------------------------
# 3. Normal combine
# ---------------------------------------------------------------------------------------------------------------------

def combine_send(x: np.ndarray, num_recv_tokens_per_source: np.ndarray, topk_weights: np.ndarray | None = None) -> list:
    """Sends each received row back to its source: returns [num_ranks] (rows [n_s, hidden] bf16,
    weights [n_s, num_topk] float32 or None), the slice of rows that came from source s.

    Args:
        x: [N, hidden] bf16 in the dispatch's receive order (rows past sum(num_recv_tokens_per_source),
            i.e. num_worst_tokens padding, are ignored).
        num_recv_tokens_per_source: [num_ranks] int32 from DispatchResult.
        topk_weights: [N, num_topk] float32 or None.
    """
    counts = np.asarray(num_recv_tokens_per_source, dtype=np.int64)
    num_rows = int(counts.sum())
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != bf16 or x.shape[0] < num_rows:
        raise ConfigError(f"x: expected [{num_rows}, hidden] bf16, got {_describe(x)}")
    if topk_weights is not None and (not isinstance(topk_weights, np.ndarray) or topk_weights.ndim != 2
                                     or topk_weights.dtype != np.float32 or topk_weights.shape[0] < num_rows):
        raise ConfigError(f"topk_weights: expected [{num_rows}, num_topk] float32, got {_describe(topk_weights)}")
    begins = np.concatenate([[0], np.cumsum(counts)])
    return [(x[b:e].copy(), None if topk_weights is None else topk_weights[b:e].copy())
            for b, e in zip(begins[:-1], begins[1:])]


def _biases(bias, num_tokens: int) -> list:
    """None, one array or a pair -> the list of given [num_tokens, hidden] bf16 biases, validated."""
    if bias is None:
        return []
    parts = list(bias) if isinstance(bias, tuple) else [bias]
    if len(parts) > 2:
        raise ConfigError(f"bias: expected None, one [{num_tokens}, hidden] bf16 array or a pair, got {len(parts)}")
    for i, b in enumerate(parts):
        if b is not None:
            _check_bf16(b, f"bias[{i}]", num_tokens)
    return [b for b in parts if b is not None]


def combine_recv(messages: list, is_token_in_rank: np.ndarray, bias=None):
    """Source side of a normal combine: adds up what every rank returns for each original token.

    combined_x[t] = bias0[t] + bias1[t] + sum over ranks r = 0..R-1 with is_token_in_rank[t, r] of rank r's row for t,
    accumulated in float32 in that order, rounded to bf16 once. No expert weights are applied.

    Args:
        messages: [num_ranks] (rows [n_r, hidden] bf16, weights [n_r, num_topk] float32 or None), indexed by the
            rank that sends back; rows in ascending token order of the tokens t with is_token_in_rank[t, r].
        is_token_in_rank: [num_tokens, num_ranks] bool of the dispatch.
        bias: None, [num_tokens, hidden] bf16, or a pair of those (either may be None).

    Returns:
        combined_x: [num_tokens, hidden] bf16 (tokens sent nowhere get the bias only, zeros without bias).
        combined_topk_weights: [num_tokens, num_topk] float32 sum of the returned weights, or None.
    """
    _check_is_token_in_rank(is_token_in_rank)
    num_tokens, num_ranks = is_token_in_rank.shape
    if len(messages) != num_ranks:
        raise ConfigError(f"messages: expected one per rank ({num_ranks}), got {len(messages)}")
    hidden = messages[0][0].shape[1] if num_ranks else 0
    num_topk = None if messages[0][1] is None else messages[0][1].shape[1]

    combined = np.zeros((num_tokens, hidden), dtype=np.float32)
    for b in _biases(bias, num_tokens):
        combined += b.astype(np.float32)
    combined_weights = None if num_topk is None else np.zeros((num_tokens, num_topk), dtype=np.float32)
    for r, (rows, weights) in enumerate(messages):
        token_idx = np.nonzero(is_token_in_rank[:, r])[0]
        if not isinstance(rows, np.ndarray) or rows.dtype != bf16 or rows.shape != (len(token_idx), hidden):
            raise ConfigError(f"messages[{r}]: expected rows [{len(token_idx)}, {hidden}] bf16, got {_describe(rows)}")
        combined[token_idx] += rows.astype(np.float32)
        if combined_weights is not None:
            combined_weights[token_idx] += weights.astype(np.float32)
    return combined.astype(bf16), combined_weights


def combine(xs: list, results: list, is_token_in_ranks: list, topk_weights: list | None = None,
            biases: list | None = None) -> list:
    """All ranks' normal combine, messages routed in memory. Returns [num_ranks] (combined_x, combined_topk_weights).

    Args:
        xs: [num_ranks] [N_r, hidden] bf16, rank r's rows in its dispatch receive order.
        results: [num_ranks] DispatchResult of the dispatch being reversed.
        is_token_in_ranks: [num_ranks] [T_s, num_ranks] bool of that dispatch.
        topk_weights: [num_ranks] [N_r, num_topk] float32 or None.
        biases: [num_ranks] bias arguments (see combine_recv) or None.
    """
    num_ranks = len(xs)
    sent = [combine_send(xs[r], results[r].num_recv_tokens_per_source,
                         None if topk_weights is None else topk_weights[r]) for r in range(num_ranks)]
    return [combine_recv(received, is_token_in_ranks[s], None if biases is None else biases[s])
            for s, received in enumerate(_route(sent))]


# ---------------------------------------------------------------------------------------------------------------------
# 4. FP8 (e4m3, per token, per 128-channel block)
# ---------------------------------------------------------------------------------------------------------------------

def _ceil_pow2(v: np.ndarray) -> np.ndarray:
    """Smallest power of two >= v (v > 0 float32), exactly: 2**ceil(log2(v)) without log2 rounding."""
    mantissa, exponent = np.frexp(v)           # v = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = np.where(mantissa == 0.5, exponent - 1, exponent)
    return np.ldexp(np.float32(1.0), exponent).astype(np.float32)


def pack_ue8m0(scale_inv: np.ndarray) -> np.ndarray:
    """float32 [..., S] -> int32 [..., ceil(S / 4)]: the 8-bit float32 exponent field of each scale, block j in byte
    j % 4 (little-endian) of word j // 4; missing bytes of the last word are zero. Exact for powers of two."""
    bits = np.ascontiguousarray(scale_inv, dtype=np.float32).view(np.uint32)
    exponents = ((bits >> 23) & 0xFF).astype(np.uint32)
    num_scales = exponents.shape[-1]
    num_words = (num_scales + 3) // 4
    padded = np.zeros(exponents.shape[:-1] + (num_words * 4,), dtype=np.uint32)
    padded[..., :num_scales] = exponents
    grouped = padded.reshape(exponents.shape[:-1] + (num_words, 4))
    words = grouped[..., 0] | (grouped[..., 1] << 8) | (grouped[..., 2] << 16) | (grouped[..., 3] << 24)
    return words.astype(np.uint32).view(np.int32)


def unpack_ue8m0(packed: np.ndarray, num_scales: int) -> np.ndarray:
    """int32 [..., ceil(S / 4)] -> float32 [..., S] = 2 ** (byte - 127) (byte 0 gives 0.0, never produced)."""
    words = np.ascontiguousarray(packed, dtype=np.int32).view(np.uint32)
    shifts = np.array([0, 8, 16, 24], dtype=np.uint32)
    exponents = (words[..., None] >> shifts) & 0xFF
    exponents = exponents.reshape(words.shape[:-1] + (words.shape[-1] * 4,))[..., :num_scales]
    return (exponents.astype(np.uint32) << 23).view(np.float32)


def per_token_cast_to_fp8(x: np.ndarray, round_scale: bool = False, use_ue8m0: bool = False):
    """Quantises each token's 128-channel blocks to e4m3, as DeepEP's low-latency dispatch kernel does.

    amax = max |x| over the block in float32, ignoring NaN (fmaxf), floored at 1e-4.
    Plain: scale_inv = amax * float32(1 / 448) (a float32 product, as DeepEP's kernel: dividing by 448 instead, as
        DeepEP's Python test helper does, differs in the last bit for about half of all blocks), and
        stored = e4m3(x * (448 / amax)).
    round_scale: scale_inv = 2 ** ceil(log2(amax * float32(1 / 448))), stored = e4m3(x * (1 / scale_inv)) (exact).
    The conversion rounds to nearest even and saturates: finite values beyond 448 become +-448, a NaN becomes the
    e4m3 NaN 0x7F (the hardware's satfinite conversion).

    Args:
        x: [num_tokens, hidden] bf16 or float32, hidden % 128 == 0.
        use_ue8m0: pack the scales as UE8M0 (requires round_scale).

    Returns:
        (fp8 [num_tokens, hidden] float8_e4m3fn, scales): scales are float32 [num_tokens, hidden / 128] holding
        scale_inv, or with use_ue8m0 int32 [num_tokens, ceil(hidden / 512)] (see pack_ue8m0).
    """
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype not in (bf16, np.dtype(np.float32)):
        raise ConfigError(f"x: expected [num_tokens, hidden] bf16 or float32, got {_describe(x)}")
    num_tokens, hidden = x.shape
    if hidden % FP8_BLOCK != 0:
        raise ConfigError(f"x: expected hidden a multiple of {FP8_BLOCK} for FP8, got {hidden}")
    if use_ue8m0 and not round_scale:
        raise ConfigError("use_ue8m0: expected round_scale=True with use_ue8m0=True")

    blocks = x.astype(np.float32).reshape(num_tokens, hidden // FP8_BLOCK, FP8_BLOCK)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        amax = np.fmax.reduce(np.abs(blocks), axis=2, initial=np.float32(FP8_AMAX_FLOOR)).astype(np.float32)
        if round_scale:
            scale_inv = _ceil_pow2(amax * FP8_MAX_INV)
            scale = np.float32(1.0) / scale_inv
        else:
            scale_inv = (amax * FP8_MAX_INV).astype(np.float32)
            scale = np.float32(FP8_MAX) / amax
        scaled = blocks * scale[..., None]
        stored = np.clip(scaled, -FP8_MAX, FP8_MAX).astype(fp8)
    stored.view(np.uint8)[np.isnan(scaled)] = FP8_NAN_BITS
    scales = pack_ue8m0(scale_inv) if use_ue8m0 else scale_inv.astype(np.float32)
    return stored.reshape(num_tokens, hidden), scales


def per_token_cast_back(x_fp8: np.ndarray, scales: np.ndarray, use_ue8m0: bool = False) -> np.ndarray:
    """Dequantises: float32 [num_tokens, hidden] = fp8 * scale_inv of the row's block.

    Args:
        x_fp8: [num_tokens, hidden] float8_e4m3fn.
        scales: [num_tokens, hidden / 128] float32 (any strides), or int32 [num_tokens, ceil(hidden / 512)] UE8M0.
    """
    num_tokens, hidden = x_fp8.shape
    num_scales = hidden // FP8_BLOCK
    scale_inv = unpack_ue8m0(scales, num_scales) if use_ue8m0 else np.asarray(scales, dtype=np.float32)
    blocks = x_fp8.astype(np.float32).reshape(num_tokens, num_scales, FP8_BLOCK)
    return (blocks * scale_inv[..., None]).reshape(num_tokens, hidden)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Low-latency mode
# ---------------------------------------------------------------------------------------------------------------------

class LowLatencyMessage(NamedTuple):
    """Rows of one (source rank, expert rank) pair in low-latency dispatch or combine (m rows).

    Fields:
        local_expert: [m] int32 local expert index on the expert rank.
        src_idx: [m] int32 token index at the source rank.
        rows: [m, hidden] bf16, or (fp8 [m, hidden], scales [m, S] float32 or [m, ceil(S / 4)] int32 UE8M0).
    """
    local_expert: np.ndarray
    src_idx: np.ndarray
    rows: Payload


@dataclass
class LowLatencyDispatchResult:
    """One rank's low-latency dispatch outputs and handle (Tmax = num_max_dispatch_tokens_per_rank).

    Fields:
        recv_x: [E_local, R * Tmax, hidden] bf16, or (fp8 [E_local, R * Tmax, hidden], scales) with scales float32
            [E_local, R * Tmax, S] (int32 [E_local, R * Tmax, ceil(S / 4)] with UE8M0), COLUMN-MAJOR in the last two
            dims (a transposed view of [E_local, S, R * Tmax]). Unused rows are zero.
        recv_count: [E_local] int32 valid rows per local expert (at the front of its block).
        src_info: [E_local, R * Tmax] int32 token index at its source rank, -1 in unused rows.
        layout_range: [E_local, R] int64 = (begin << 32) | count of the rows of expert j from source r;
            begin = sum of the counts of sources < r.
    """
    recv_x: Payload
    recv_count: np.ndarray
    src_info: np.ndarray
    layout_range: np.ndarray


def low_latency_dispatch_send(x: np.ndarray, topk_idx: np.ndarray, rank: int, num_ranks: int, num_experts: int,
                              num_max_dispatch_tokens_per_rank: int, use_fp8: bool = True,
                              round_scale: bool = False, use_ue8m0: bool = False) -> list:
    """Source side of a low-latency dispatch: returns [num_ranks] LowLatencyMessage, one per expert rank.

    Every (t, k) with topk_idx[t, k] >= 0 is its own row (no per-rank dedup), ordered by (local expert, token index,
    k). With use_fp8 the whole x is cast here by per_token_cast_to_fp8(x, round_scale, use_ue8m0); round_scale and
    use_ue8m0 are ignored without use_fp8.

    Args:
        x: [num_tokens, hidden] bf16, num_tokens <= num_max_dispatch_tokens_per_rank.
        topk_idx: [num_tokens, num_topk] int64 in [-1, num_experts).
    """
    num_local_experts = _check_experts(num_experts, num_ranks)
    _check_rank(rank, num_ranks)
    _check_bf16(x, "x")
    topk_idx = _check_topk_idx(topk_idx, num_experts)
    num_tokens = x.shape[0]
    if topk_idx.shape[0] != num_tokens:
        raise ConfigError(f"topk_idx: expected [{num_tokens}, num_topk] int64, got {_describe(topk_idx)}")
    if num_tokens > num_max_dispatch_tokens_per_rank:
        raise ConfigError(f"x: expected at most num_max_dispatch_tokens_per_rank="
                          f"{num_max_dispatch_tokens_per_rank} tokens, got {num_tokens}")
    payload = per_token_cast_to_fp8(x, round_scale, use_ue8m0) if use_fp8 else x

    token_idx, k_idx = np.nonzero(topk_idx >= 0)           # row-major: ascending (t, k)
    experts = topk_idx[token_idx, k_idx]
    order = np.lexsort((k_idx, token_idx, experts))        # by expert, then token, then k
    token_idx, experts = token_idx[order], experts[order]
    messages = []
    for dst in range(num_ranks):
        mine = experts // num_local_experts == dst
        local_expert = (experts[mine] % num_local_experts).astype(np.int32)
        per_expert = np.bincount(local_expert, minlength=num_local_experts)
        if (per_expert > num_max_dispatch_tokens_per_rank).any():
            raise ConfigError(f"topk_idx: a local expert of rank {dst} gets {int(per_expert.max())} rows from rank "
                              f"{rank}, above num_max_dispatch_tokens_per_rank={num_max_dispatch_tokens_per_rank} "
                              f"(repeated experts in one token?)")
        src_idx = token_idx[mine].astype(np.int32)
        messages.append(LowLatencyMessage(local_expert, src_idx, _take_rows(payload, src_idx)))
    return messages


def low_latency_dispatch_recv(messages: list, rank: int, num_ranks: int, num_experts: int,
                              num_max_dispatch_tokens_per_rank: int, hidden: int, use_fp8: bool,
                              use_ue8m0: bool = False) -> LowLatencyDispatchResult:
    """Expert side of a low-latency dispatch. Rows of local expert j: sources 0..R-1 in order, inside a source in
    message order (ascending token index); unused rows are zero with src_info -1.

    Args:
        messages: [num_ranks] LowLatencyMessage, indexed by source rank, all addressed to `rank`.
        hidden: H; use_fp8 / use_ue8m0 as at the senders (they fix the shape of recv_x).
    """
    num_local_experts = _check_experts(num_experts, num_ranks)
    _check_rank(rank, num_ranks)
    if len(messages) != num_ranks:
        raise ConfigError(f"messages: expected one per source rank ({num_ranks}), got {len(messages)}")
    num_slots = num_ranks * num_max_dispatch_tokens_per_rank
    num_scales = hidden // FP8_BLOCK
    if use_fp8:
        data = np.zeros((num_local_experts, num_slots, hidden), dtype=fp8)
        scale_cols, scale_dtype = ((num_scales + 3) // 4, np.int32) if use_ue8m0 else (num_scales, np.float32)
        scales = np.zeros((num_local_experts, scale_cols, num_slots), dtype=scale_dtype).transpose(0, 2, 1)
    else:
        data = np.zeros((num_local_experts, num_slots, hidden), dtype=bf16)
    src_info = np.full((num_local_experts, num_slots), -1, dtype=np.int32)
    layout_range = np.zeros((num_local_experts, num_ranks), dtype=np.int64)
    recv_count = np.zeros(num_local_experts, dtype=np.int32)

    for j in range(num_local_experts):
        begin = 0
        for src, msg in enumerate(messages):
            rows = np.nonzero(msg.local_expert == j)[0]
            count = len(rows)
            if count > num_max_dispatch_tokens_per_rank:
                raise ConfigError(f"messages[{src}]: {count} rows for local expert {j}, above "
                                  f"num_max_dispatch_tokens_per_rank={num_max_dispatch_tokens_per_rank}")
            end = begin + count
            src_info[j, begin:end] = msg.src_idx[rows]
            if use_fp8:
                data[j, begin:end] = msg.rows[0][rows]
                scales[j, begin:end] = msg.rows[1][rows]
            else:
                data[j, begin:end] = msg.rows[rows]
            layout_range[j, src] = (begin << 32) | count
            begin = end
        recv_count[j] = begin
    recv_x = (data, scales) if use_fp8 else data
    return LowLatencyDispatchResult(recv_x=recv_x, recv_count=recv_count, src_info=src_info,
                                    layout_range=layout_range)


def low_latency_dispatch(xs: list, topk_idxs: list, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                         use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False) -> list:
    """All ranks' low-latency dispatch, messages routed in memory. Returns [num_ranks] LowLatencyDispatchResult.

    Args:
        xs: [num_ranks] [T_s, hidden] bf16.
        topk_idxs: [num_ranks] [T_s, num_topk] int64.
    """
    num_ranks = len(xs)
    hidden = xs[0].shape[1]
    sent = [low_latency_dispatch_send(xs[s], topk_idxs[s], s, num_ranks, num_experts,
                                      num_max_dispatch_tokens_per_rank, use_fp8, round_scale, use_ue8m0)
            for s in range(num_ranks)]
    return [low_latency_dispatch_recv(received, r, num_ranks, num_experts, num_max_dispatch_tokens_per_rank,
                                      hidden, use_fp8, use_ue8m0)
            for r, received in enumerate(_route(sent))]


def low_latency_combine_send(y: np.ndarray, src_info: np.ndarray, layout_range: np.ndarray,
                             use_logfmt: bool = False) -> list:
    """Expert side of a low-latency combine: returns [num_ranks] LowLatencyMessage, one per source rank, holding the
    rows layout_range says came from it (ordered by local expert, then row).

    Args:
        y: [E_local, R * Tmax, hidden] bf16, the experts' outputs in the dispatch's row order.
        src_info: [E_local, R * Tmax] int32 and layout_range: [E_local, R] int64 from the dispatch.
        use_logfmt: the rows travel as LogFmtRows (logfmt_encode; hidden % 512 == 0) instead of bf16.
    """
    num_local_experts, num_ranks = layout_range.shape
    if not isinstance(y, np.ndarray) or y.ndim != 3 or y.dtype != bf16 or y.shape[:2] != src_info.shape \
            or y.shape[0] != num_local_experts:
        raise ConfigError(f"x: expected [{num_local_experts}, {src_info.shape[1]}, hidden] bf16, got {_describe(y)}")
    begins = (layout_range >> 32).astype(np.int64)
    counts = (layout_range & 0xFFFFFFFF).astype(np.int64)
    messages = []
    for src in range(num_ranks):
        spans = [(j, begins[j, src], begins[j, src] + counts[j, src]) for j in range(num_local_experts)]
        local_expert = np.concatenate([np.full(e - b, j, dtype=np.int32) for j, b, e in spans])
        src_idx = np.concatenate([src_info[j, b:e] for j, b, e in spans]).astype(np.int32)
        rows = _concat([y[j, b:e] for j, b, e in spans])
        messages.append(LowLatencyMessage(local_expert, src_idx, logfmt_encode(rows) if use_logfmt else rows))
    return messages


def low_latency_combine_recv(messages: list, topk_idx: np.ndarray, topk_weights: np.ndarray, rank: int,
                             num_ranks: int, num_experts: int) -> np.ndarray:
    """Source side of a low-latency combine: returns combined [num_tokens, hidden] bf16 with

    combined[t] = sum over k = 0..K-1 with topk_idx[t, k] >= 0 of float32(topk_weights[t, k]) * float32(row of (t, k)),
    accumulated in float32 in k order and rounded to bf16 once. The row of (t, k) is the row for token t from local
    expert topk_idx[t, k] % E_local in messages[topk_idx[t, k] // E_local]; when one token repeats an expert, its
    rows for that expert pair up with its k's in order. LogFmtRows are decoded to float32 (logfmt_decode) and
    accumulated as they are, with no bf16 rounding in between (as DeepEP's decode_and_accumulate).

    Args:
        messages: [num_ranks] LowLatencyMessage, indexed by the expert rank that sends back (rows bf16 or
            LogFmtRows).
        topk_idx: [num_tokens, num_topk] int64 and topk_weights: [num_tokens, num_topk] float32 of the dispatch.
    """
    num_local_experts = _check_experts(num_experts, num_ranks)
    _check_rank(rank, num_ranks)
    topk_idx = _check_topk_idx(topk_idx, num_experts)
    _check_topk_weights(topk_weights, topk_idx)
    if len(messages) != num_ranks:
        raise ConfigError(f"messages: expected one per expert rank ({num_ranks}), got {len(messages)}")
    num_tokens, num_topk = topk_idx.shape
    values = [logfmt_decode(m.rows) if isinstance(m.rows, LogFmtRows) else m.rows for m in messages]
    hidden = values[0].shape[1]

    # Match pairs to rows per expert rank: pairs sorted by (local expert, token, k) line up one to one with rows
    # sorted stably by (local expert, token).
    token_idx, k_idx = np.nonzero(topk_idx >= 0)
    experts = topk_idx[token_idx, k_idx]
    matched = []                                           # (expert rank, token [p], k [p], row [p])
    for dst, msg in enumerate(messages):
        mine = experts // num_local_experts == dst
        t, k, j = token_idx[mine], k_idx[mine], experts[mine] % num_local_experts
        pair_order = np.lexsort((k, t, j))
        row_order = np.lexsort((np.arange(len(msg.src_idx)), msg.src_idx, msg.local_expert))
        if len(row_order) != len(pair_order) or not (np.array_equal(msg.local_expert[row_order], j[pair_order])
                                                     and np.array_equal(msg.src_idx[row_order], t[pair_order])):
            raise ConfigError(f"messages[{dst}]: rows do not match the (token, expert) pairs of topk_idx on rank {dst}")
        matched.append((dst, t[pair_order], k[pair_order], row_order))

    combined = np.zeros((num_tokens, hidden), dtype=np.float32)
    for k in range(num_topk):
        for dst, t, pair_k, rows in matched:
            sel = pair_k == k                              # each token at most once per k
            rows_k = values[dst][rows[sel]].astype(np.float32)
            combined[t[sel]] += topk_weights[t[sel], k][:, None] * rows_k
    return combined.astype(bf16)


def low_latency_combine(ys: list, topk_idxs: list, topk_weights: list, results: list, num_experts: int,
                        use_logfmt: bool = False) -> list:
    """All ranks' low-latency combine, messages routed in memory. Returns [num_ranks] [T_s, hidden] bf16.

    Args:
        ys: [num_ranks] [E_local, R * Tmax, hidden] bf16 expert outputs.
        topk_idxs / topk_weights: [num_ranks] [T_s, num_topk] int64 / float32 of the dispatch.
        results: [num_ranks] LowLatencyDispatchResult of the dispatch.
        use_logfmt: rows travel in LogFMT-10 (section 6).
    """
    num_ranks = len(ys)
    sent = [low_latency_combine_send(ys[r], results[r].src_info, results[r].layout_range, use_logfmt)
            for r in range(num_ranks)]
    return [low_latency_combine_recv(received, topk_idxs[s], topk_weights[s], s, num_ranks, num_experts)
            for s, received in enumerate(_route(sent))]


# ---------------------------------------------------------------------------------------------------------------------
# 6. LogFMT-10: DeepEP's compressed transport of the low-latency combine (low_latency_combine(use_logfmt=True))
# ---------------------------------------------------------------------------------------------------------------------
# The rules below restate DeepEP's legacy low-latency combine (csrc/kernels/legacy/internode_ll.cu: logfmt_encode,
# logfmt_check_amaxmin, decode_and_accumulate, and the send loop of `combine`); docs/api.md lists them with sources.
# The GPU computes log2/exp2 with lg2.approx.f32 / ex2.approx.f32; here they are numpy's correctly rounded float32
# log2/exp2, so a GPU code may differ from this one by 1 where a value sits on a rounding boundary.

LOGFMT_DIVISION = 128        # channels per (amax, amin) pair: kNumDivisions = hidden / 128
LOGFMT_GROUP = 16            # values per 160-bit packed group: 16 x 9-bit codes + 16 sign bits = 20 bytes
LOGFMT_GROUP_BYTES = 20
LOGFMT_NUM_CODES = 1 << 9    # kNumValues: code 0 is zero, codes 1..511 are log-spaced magnitudes
LOGFMT_MIN_CLIP = np.float32(32.0)       # kMinClip: log_amin >= log_amax - 32 (a division spans at most 2^32)
LOGFMT_LOG_THRESHOLD = np.float32(0.0)   # kLogThreshold: a division casts only when log2(amax) < 0 (amax < 1)


class LogFmtRows(NamedTuple):
    """Rows in LogFMT-10 wire form (what one low-latency combine slot carries), m rows.

    Fields:
        wire: [m, num_bytes.max()] uint8, each row: the meta, [hidden / 128] x (bf16 amax, bf16 amin) of |x| per
            128-channel division (4 bytes each, little-endian), then every chunk of logfmt_chunk_size(hidden)
            channels in order, packed (chunk * 10 / 8 bytes: 20-byte groups of 16 values) or raw bf16 (chunk * 2
            bytes); bytes past num_bytes[i] are unused.
        num_bytes: [m] int64 bytes row i moves (meta + chunks).
        hidden: H.
    """
    wire: np.ndarray
    num_bytes: np.ndarray
    hidden: int


def logfmt_chunk_size(hidden: int) -> int:
    """Channels per cast decision: one warp iteration of DeepEP's send loop, 32 lanes x kNumSendUnrolls int4 x 8
    bf16 = 1024 when hidden % 1024 == 0 (kNumSendUnrolls = 4), else 512 (kNumSendUnrolls = 2). DeepEP's kernel
    requires hidden % 512 == 0 (static assert); so does this definition (ConfigError)."""
    if hidden <= 0 or hidden % 512:
        raise ConfigError(f"x: expected a hidden size that is a multiple of 512 with use_logfmt (DeepEP's LogFMT "
                          f"chunking), got {hidden}")
    return 1024 if hidden % 1024 == 0 else 512


def _fma32(a, b, c) -> np.ndarray:
    """float32 a * b + c rounded once (nvcc contracts these expressions into FMAs): the exact product of two float32
    fits a float64, so only the final sum rounds twice (float64, then float32), which is exact for almost all inputs."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _logfmt_division_logs(amax: np.ndarray, amin: np.ndarray):
    """(log_amax, log_amin, castable) per division from the |x| extremes (float32, exact bf16 values): log_amin is
    log2(amin) clipped below at log_amax - 32 (amin == 0 gives the clip); a division is castable when
    log_amax < 0 and log_amin < log_amax (so amax < 1 and the values are not all equal; all-zero is not castable)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_amax = np.log2(amax).astype(np.float32)
        log_amin = np.where(amin == 0, log_amax - LOGFMT_MIN_CLIP,
                            np.fmax(np.log2(amin), log_amax - LOGFMT_MIN_CLIP)).astype(np.float32)
        castable = (log_amax < LOGFMT_LOG_THRESHOLD) & (log_amin < log_amax)
    return log_amax, log_amin, castable


def _logfmt_chunk_cast(castable: np.ndarray, hidden: int) -> np.ndarray:
    """[n, num_chunks] bool: a chunk casts only if all its divisions do (the send side ANDs the decision over the
    warp, the receive side over the kNumSendUnrolls lanes that read the chunk's meta)."""
    per_chunk = logfmt_chunk_size(hidden) // LOGFMT_DIVISION
    return castable.reshape(castable.shape[0], hidden // logfmt_chunk_size(hidden), per_chunk).all(axis=2)


def _logfmt_steps(log_amax, log_amin):
    """step = (log_amax - log_amin) / 510 between adjacent codes (codes 1 and 511 decode to amin and amax)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return ((log_amax - log_amin) / np.float32(LOGFMT_NUM_CODES - 2)).astype(np.float32)


def logfmt_encode(x: np.ndarray) -> LogFmtRows:
    """Encodes bf16 rows [n, hidden] (hidden % 512 == 0) into LogFMT-10 wire form (see LogFmtRows).

    Per 128-channel division: amax / amin = max / min of |x| (NaN ignored, as __hmax2 / __hmin2 do);
    log_amax, log_amin, castable as _logfmt_division_logs; a chunk (logfmt_chunk_size) casts when all its divisions
    do, else it travels as raw bf16. A cast value v (sign bit kept apart) gets the 9-bit code
        floor(max(log2|v| / step + 2 - log2((1 + 2^step) / 2) / step - log_amin / step, 0))
    i.e. the nearest code in LINEAR space between the two neighbouring log-spaced levels; |v| = 0 (and NaN) gives
    code 0. Packing: each 16-value group is 160 little-endian bits, code j at bits [9j, 9j + 9), sign j at bit 144 + j.
    """
    _check_bf16(x, "x")
    n, hidden = x.shape
    chunk = logfmt_chunk_size(hidden)
    num_div = hidden // LOGFMT_DIVISION
    bits = np.ascontiguousarray(x).view(np.uint16)
    sign = (bits >> 15).astype(np.uint8)
    mag = (bits & 0x7FFF).view(bf16).astype(np.float32)
    blocks = mag.reshape(n, num_div, LOGFMT_DIVISION)
    amax = np.fmax.reduce(blocks, axis=2, initial=np.float32(0)) if n else np.zeros((0, num_div), np.float32)
    amin = np.fmin.reduce(blocks, axis=2, initial=np.float32(np.inf)) if n else np.zeros((0, num_div), np.float32)
    log_amax, log_amin, castable = _logfmt_division_logs(amax, amin)
    cast = _logfmt_chunk_cast(castable, hidden)

    meta = np.stack([amax.astype(bf16), amin.astype(bf16)], axis=2).reshape(n, 2 * num_div).view(np.uint8)
    chunk_bytes = np.where(cast, chunk * 10 // 8, chunk * 2)
    num_bytes = 4 * num_div + chunk_bytes.sum(axis=1, dtype=np.int64)
    wire = np.zeros((n, int(num_bytes.max()) if n else 4 * num_div), np.uint8)
    wire[:, :4 * num_div] = meta
    raw = np.ascontiguousarray(x).view(np.uint8).reshape(n, hidden // chunk, chunk * 2)

    step = _logfmt_steps(log_amax, log_amin)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        step_inv = (np.float32(1) / step).astype(np.float32)
        rounding = _fma32(-np.log2(((np.float32(1) + np.exp2(step)) * np.float32(0.5)).astype(np.float32)),
                          step_inv, np.float32(2))
        fused = _fma32(-log_amin, step_inv, rounding)
    offsets = 4 * num_div + np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(chunk_bytes, axis=1)[:, :-1]], 1)
    per_chunk = chunk // LOGFMT_DIVISION
    for c in range(hidden // chunk):
        rows = np.nonzero(cast[:, c])[0]
        plain = np.nonzero(~cast[:, c])[0]
        for i in plain:
            wire[i, offsets[i, c]:offsets[i, c] + chunk * 2] = raw[i, c]
        if len(rows) == 0:
            continue
        divs = slice(c * per_chunk, (c + 1) * per_chunk)
        v = blocks[rows, divs]                                                # [m, per_chunk, 128]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = _fma32(np.log2(v), step_inv[rows, divs, None], fused[rows, divs, None])
        codes = np.floor(np.fmax(u, np.float32(0))).astype(np.uint32).reshape(len(rows), -1, LOGFMT_GROUP)
        signs = sign[rows, c * chunk:(c + 1) * chunk].reshape(len(rows), -1, LOGFMT_GROUP)
        packed = _logfmt_pack(codes, signs)                                   # [m, chunk * 10 / 8]
        for j, i in enumerate(rows):
            wire[i, offsets[i, c]:offsets[i, c] + packed.shape[1]] = packed[j]
    return LogFmtRows(wire, num_bytes, hidden)


def _logfmt_pack(codes: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """[m, g, 16] 9-bit codes and sign bits -> [m, g * 20] uint8 (160-bit little-endian groups)."""
    code_bits = ((codes[..., None] >> np.arange(9, dtype=np.uint32)) & 1).astype(np.uint8)   # [m, g, 16, 9]
    stream = np.concatenate([code_bits.reshape(*codes.shape[:2], 144), signs.astype(np.uint8)], axis=2)
    return np.packbits(stream, axis=2, bitorder="little").reshape(codes.shape[0], -1)


def _logfmt_unpack(packed: np.ndarray):
    """Inverse of _logfmt_pack: [m, g * 20] uint8 -> (codes [m, g, 16] uint32, signs [m, g, 16] uint8)."""
    m = packed.shape[0]
    stream = np.unpackbits(packed.reshape(m, -1, LOGFMT_GROUP_BYTES), axis=2, bitorder="little")   # [m, g, 160]
    code_bits = stream[..., :144].reshape(m, -1, LOGFMT_GROUP, 9).astype(np.uint32)
    codes = (code_bits << np.arange(9, dtype=np.uint32)).sum(axis=3, dtype=np.uint32)
    return codes, stream[..., 144:]


def logfmt_decode(rows: LogFmtRows) -> np.ndarray:
    """Decodes LogFMT-10 wire rows to float32 [m, hidden] (what the receiver accumulates; never rounded to bf16).

    The receiver recomputes every division's log_amax / log_amin and each chunk's cast decision from the meta alone,
    so the chunk offsets need no extra header. Cast value: code 0 -> 0, else 2^((code - 1) * step + log_amin),
    negated when its sign bit is set; raw chunks are the bf16 values."""
    wire, hidden = rows.wire, rows.hidden
    chunk = logfmt_chunk_size(hidden)
    num_div = hidden // LOGFMT_DIVISION
    m = wire.shape[0]
    meta = np.ascontiguousarray(wire[:, :4 * num_div]).view(bf16).reshape(m, num_div, 2).astype(np.float32)
    log_amax, log_amin, castable = _logfmt_division_logs(meta[..., 0], meta[..., 1])
    cast = _logfmt_chunk_cast(castable, hidden)
    step = _logfmt_steps(log_amax, log_amin)
    chunk_bytes = np.where(cast, chunk * 10 // 8, chunk * 2)
    offsets = 4 * num_div + np.concatenate([np.zeros((m, 1), np.int64), np.cumsum(chunk_bytes, axis=1)[:, :-1]], 1)
    out = np.empty((m, hidden), np.float32)
    per_chunk = chunk // LOGFMT_DIVISION
    for c in range(hidden // chunk):
        cols = slice(c * chunk, (c + 1) * chunk)
        for i in range(m):
            b = offsets[i, c]
            if not cast[i, c]:
                out[i, cols] = wire[i, b:b + chunk * 2].view(bf16).astype(np.float32)
        rows_c = np.nonzero(cast[:, c])[0]
        if len(rows_c) == 0:
            continue
        packed = np.stack([wire[i, offsets[i, c]:offsets[i, c] + chunk * 10 // 8] for i in rows_c])
        codes, signs = _logfmt_unpack(packed)
        codes = codes.reshape(len(rows_c), per_chunk, LOGFMT_DIVISION)
        divs = slice(c * per_chunk, (c + 1) * per_chunk)
        with np.errstate(over="ignore"):
            mags = np.exp2(_fma32((codes.astype(np.float32) - np.float32(1)), step[rows_c, divs, None],
                                  log_amin[rows_c, divs, None])).astype(np.float32)
        mags = np.where(codes == 0, np.float32(0), mags).reshape(len(rows_c), chunk)
        out[rows_c, cols] = np.where(signs.reshape(len(rows_c), chunk) == 1, -mags, mags)
    return out


def logfmt_num_bytes(x: np.ndarray) -> np.ndarray:
    """[n] int64 bytes each bf16 row [n, hidden] moves with use_logfmt: 4 * hidden / 128 of meta, plus per chunk
    chunk * 10 / 8 when it casts, else chunk * 2 (DeepEP's benchmark counts hidden * 10 / 8 + hidden / 128 * 4, the
    all-cast case)."""
    return logfmt_encode(x).num_bytes
