"""epcomm inside jax.jit and jax.grad: normal dispatch (num_worst_tokens: static shapes), cached dispatch, combine and
the low-latency pair as ordered host callbacks (CPU backend), with jax.custom_vjp rules mirroring epcomm.torch.
Importing this module imports jax; importing epcomm does not.

Mechanism: jax.experimental.io_callback(..., ordered=True). Every call is a collective, so every rank must run them in
the same (program) order: an ordered callback threads XLA's effect token through the program, so XLA can neither
reorder two calls, run them concurrently (XLA:CPU runs independent thunks in parallel), drop one whose outputs are
unused, nor run one twice, all of which jax.pure_callback allows. The GPU plan (an XLA FFI custom call on XLA's CUDA
stream) is described in docs/frameworks.md and is not built: a Buffer on the GPU backend is refused here.

Backward rules (DeepEP's README, as epcomm.torch): the backward of a dispatch is a combine of the received rows'
gradients with the dispatch's handle (the top-k weights' gradient is that combine's combined_topk_weights, masked to
the entries the dispatch kept); the backward of a combine is a cached dispatch of the output's gradient.
"""
from __future__ import annotations

import collections
import functools
import itertools
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from .buffer import Buffer
from .errors import ConfigError, EpcommError
from .handles import DispatchHandle, LowLatencyHandle
from .interop import BF16

__all__ = ["dispatch", "combine", "cached_dispatch", "low_latency_dispatch", "low_latency_combine", "JaxHandle",
           "handle_of", "MAX_LIVE_HANDLES"]

# Handles live in a registry keyed by an int id (traced values cannot carry Python objects, and nothing tells the
# host when a traced id dies). The oldest are dropped past this many: enough for the forward of every MoE layer of a
# large model before its backward runs. A dropped id raises EpcommError when used.
MAX_LIVE_HANDLES = 4096


# ---------------------------------------------------------------------------------------------------------------------
# Registries: Buffers by their op id (weakly, as epcomm.torch), handles by an int32 id
# ---------------------------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_ids = itertools.count(1)
_handles: "collections.OrderedDict[int, object]" = collections.OrderedDict()


def _buffer(bid: int) -> Buffer:
    from .buffer import buffer_by_op_id
    return buffer_by_op_id(bid, "epcomm.jax")


def _new_handle_id(handle) -> np.ndarray:
    with _lock:
        hid = next(_ids) % (2 ** 31 - 1)   # an int32 (jax's default integer width); wraps after 2^31 calls
        _handles[hid] = handle
        while len(_handles) > MAX_LIVE_HANDLES:
            _handles.popitem(last=False)
    return np.array(hid, np.int32)


def handle_of(handle_id):
    """The DispatchHandle / LowLatencyHandle a (concrete) handle id names; EpcommError once it was dropped."""
    hid = int(np.asarray(handle_id.id if isinstance(handle_id, JaxHandle) else handle_id))
    try:
        return _handles[hid]
    except KeyError:
        raise EpcommError(f"epcomm.jax: handle id {hid} is no longer registered (only the newest "
                          f"{MAX_LIVE_HANDLES} handles are kept: epcomm.jax.MAX_LIVE_HANDLES)") from None


def _num_live_handles() -> int:
    return len(_handles)


@jax.tree_util.register_pytree_node_class
class JaxHandle:
    """What epcomm.jax.dispatch returns as its handle, a pytree: id ([] int32, names the DispatchHandle in the host
    registry) and num_recv_tokens ([] int32, the true received row count; rows past it are padding) are its leaves;
    num_tokens (T of the dispatching rank) and num_rows (num_worst_tokens) are static."""

    def __init__(self, id, num_recv_tokens, num_tokens: int, num_rows: int):
        self.id, self.num_recv_tokens, self.num_tokens, self.num_rows = id, num_recv_tokens, num_tokens, num_rows

    def tree_flatten(self):
        return (self.id, self.num_recv_tokens), (self.num_tokens, self.num_rows)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def __repr__(self):
        return f"JaxHandle(id={self.id}, num_recv_tokens={self.num_recv_tokens}, num_tokens={self.num_tokens}, " \
               f"num_rows={self.num_rows})"


# ---------------------------------------------------------------------------------------------------------------------
# Checks at trace time (shapes and dtypes are static)
# ---------------------------------------------------------------------------------------------------------------------

def _buffer_id(buffer) -> int:
    if not isinstance(buffer, Buffer):
        raise ConfigError(f"buffer: expected an epcomm.Buffer, got {type(buffer).__name__}")
    buffer._check_open()
    if buffer.backend != "cpu":
        raise ConfigError("buffer: epcomm.jax runs on the CPU backend only (host callbacks); the GPU path, an XLA "
                          "FFI custom call on XLA's stream, is not built (docs/frameworks.md); call Buffer's methods "
                          "eagerly with GPU JAX arrays instead")
    return buffer._op_id


def _desc(a) -> str:
    return f"[{', '.join(map(str, a.shape))}] {a.dtype}"


def _check(a, name, ndim, dtype, want):
    ok = hasattr(a, "shape") and hasattr(a, "dtype") and len(a.shape) == ndim
    ok = ok and (jnp.issubdtype(a.dtype, jnp.integer) if dtype == "int" else a.dtype == dtype)
    if not ok:
        got = _desc(a) if hasattr(a, "dtype") else type(a).__name__
        raise ConfigError(f"{name}: expected {want}, got {got}")


def _check_handle(handle):
    if not isinstance(handle, JaxHandle):
        raise ConfigError(f"handle: expected the JaxHandle of epcomm.jax.dispatch, got {type(handle).__name__}")


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jnp.dtype(dtype))


def _ordered(callback, shapes, *args):
    """One collective as an ordered host callback (see the module's docstring for why ordered)."""
    return io_callback(callback, shapes, *args, ordered=True)


def _np(a, dtype=None):
    out = np.ascontiguousarray(a)
    return out if dtype is None else out.astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------------------------------
# Host callbacks (numpy in, numpy out; they run on every rank in program order)
# ---------------------------------------------------------------------------------------------------------------------

class _DispatchStatic(NamedTuple):
    buffer_id: int
    num_experts: int
    num_worst_tokens: int
    expert_alignment: int


def _cb_dispatch(s: _DispatchStatic, x, topk_idx, topk_weights):
    buf = _buffer(s.buffer_id)
    x, topk_idx = _np(x), _np(topk_idx)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, s.num_experts)
    recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
        x, topk_idx=topk_idx, topk_weights=_np(topk_weights), num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        expert_alignment=s.expert_alignment, num_worst_tokens=s.num_worst_tokens)
    e_local = s.num_experts // buf.num_ranks
    counts = np.bincount(recv_idx[recv_idx >= 0], minlength=e_local)
    a = s.expert_alignment
    counts = (counts + a - 1) // a * a
    return (_np(recv_x), _np(recv_idx, topk_idx.dtype), _np(recv_w, np.float32), _new_handle_id(handle),
            np.array(handle.num_recv_tokens, np.int32), counts.astype(np.int32))


def _cb_combine(buffer_id: int, x, topk_weights, hid):
    handle = handle_of(hid)
    w = _np(topk_weights) if topk_weights.shape[1] else None
    combined, combined_w, _ = _buffer(buffer_id).combine(_np(x), handle, topk_weights=w)
    if combined_w is None:
        combined_w = np.zeros((handle.num_tokens, 0), np.float32)
    return _np(combined), _np(combined_w, np.float32)


def _cb_cached_dispatch(buffer_id: int, x, hid):
    return _np(_buffer(buffer_id).dispatch(_np(x), handle=handle_of(hid))[0])


def _cb_cached_dispatch_f32(buffer_id: int, a, hid):
    """float32 rows [T, K] (a weights gradient) dispatched with a handle: the float32 bits travel as bf16 pairs (a
    dispatch copies rows bit for bit), padded to a multiple of 8 bf16 columns (a row is a multiple of 16 bytes)."""
    t, k = a.shape
    padded = np.zeros((t, -(-k // 4) * 4), np.float32)
    padded[:, :k] = a
    recv = _buffer(buffer_id).dispatch(padded.view(BF16), handle=handle_of(hid))[0]
    return np.ascontiguousarray(np.ascontiguousarray(recv).view(np.float32)[:, :k])


# ---------------------------------------------------------------------------------------------------------------------
# The primitives as JAX functions (shapes from the static arguments)
# ---------------------------------------------------------------------------------------------------------------------

def _dispatch_call(s: _DispatchStatic, num_local_experts: int, x, topk_idx, topk_weights):
    w, k = s.num_worst_tokens, topk_idx.shape[1]
    shapes = (_sds((w, x.shape[1]), x.dtype), _sds((w, k), topk_idx.dtype), _sds((w, k), jnp.float32),
              _sds((), jnp.int32), _sds((), jnp.int32), _sds((num_local_experts,), jnp.int32))
    return _ordered(functools.partial(_cb_dispatch, s), shapes, x, topk_idx, topk_weights)


def _combine_call(buffer_id, num_tokens, x, topk_weights, hid):
    shapes = (_sds((num_tokens, x.shape[1]), x.dtype), _sds((num_tokens, topk_weights.shape[1]), jnp.float32))
    return _ordered(functools.partial(_cb_combine, buffer_id), shapes, x, topk_weights, hid)


def _cached_dispatch_call(buffer_id, num_rows, x, hid):
    return _ordered(functools.partial(_cb_cached_dispatch, buffer_id), _sds((num_rows, x.shape[1]), x.dtype), x, hid)


def _cached_dispatch_f32_call(buffer_id, num_rows, a, hid):
    return _ordered(functools.partial(_cb_cached_dispatch_f32, buffer_id), _sds((num_rows, a.shape[1]), jnp.float32),
                    a, hid)


# Differentiable wrappers. The static tuple (nondiff argument 0) carries the Buffer's id and the row counts.

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dispatch_vjp(s: _DispatchStatic, num_local_experts: int, x, topk_idx, topk_weights):
    return _dispatch_call(s, num_local_experts, x, topk_idx, topk_weights)


def _dispatch_fwd(s, num_local_experts, x, topk_idx, topk_weights):
    out = _dispatch_call(s, num_local_experts, x, topk_idx, topk_weights)
    return out, (out[1], out[3], x.shape[0])


def _dispatch_bwd(s, num_local_experts, residuals, cotangents):
    recv_idx, hid, num_tokens = residuals
    grad_recv_x, _, grad_recv_w = cotangents[:3]
    # Entries the dispatch zeroed (experts of other ranks, padding rows) are constants: no gradient flows back.
    w = jnp.where(recv_idx >= 0, grad_recv_w.astype(jnp.float32), jnp.float32(0))
    grad_x, grad_w = _combine_call(s.buffer_id, num_tokens, grad_recv_x.astype(jnp.bfloat16), w, hid)
    return grad_x, None, grad_w


_dispatch_vjp.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _combine_vjp(buffer_id: int, num_tokens: int, x, topk_weights, hid):
    return _combine_call(buffer_id, num_tokens, x, topk_weights, hid)


def _combine_fwd(buffer_id, num_tokens, x, topk_weights, hid):
    return _combine_call(buffer_id, num_tokens, x, topk_weights, hid), (hid, x.shape[0], topk_weights.shape[1])


def _combine_bwd(buffer_id, num_tokens, residuals, cotangents):
    hid, num_rows, num_topk = residuals
    grad_out, grad_out_w = cotangents
    grad_x = _cached_dispatch_call(buffer_id, num_rows, grad_out.astype(jnp.bfloat16), hid)
    if num_topk:
        grad_w = _cached_dispatch_f32_call(buffer_id, num_rows, grad_out_w.astype(jnp.float32), hid)
    else:
        grad_w = jnp.zeros((num_rows, 0), jnp.float32)
    return grad_x, grad_w, None


_combine_vjp.defvjp(_combine_fwd, _combine_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _cached_dispatch_vjp(buffer_id: int, num_tokens: int, num_rows: int, x, hid):
    return _cached_dispatch_call(buffer_id, num_rows, x, hid)


def _cached_dispatch_fwd(buffer_id, num_tokens, num_rows, x, hid):
    return _cached_dispatch_call(buffer_id, num_rows, x, hid), hid


def _cached_dispatch_bwd(buffer_id, num_tokens, num_rows, hid, grad):
    none_w = jnp.zeros((num_rows, 0), jnp.float32)
    grad_x, _ = _combine_call(buffer_id, num_tokens, grad.astype(jnp.bfloat16), none_w, hid)
    return grad_x, None


_cached_dispatch_vjp.defvjp(_cached_dispatch_fwd, _cached_dispatch_bwd)


# ---------------------------------------------------------------------------------------------------------------------
# Public calls
# ---------------------------------------------------------------------------------------------------------------------

def dispatch(buffer: Buffer, x, topk_idx, topk_weights, *, num_experts: int, num_worst_tokens: int,
             expert_alignment: int = 1):
    """Differentiable normal dispatch (layout included), callable inside jax.jit: gradients flow to x and topk_weights.

    x: [T, H] bf16; topk_idx: [T, K] int32 or int64 (-1 = none); topk_weights: [T, K] float32.
    num_worst_tokens W > 0 (static shapes): every rank must receive at most W rows.
    Returns (recv_x [W, H] bf16, recv_topk_idx [W, K] (topk_idx's dtype, local expert ids, -1 elsewhere and in padding
    rows), recv_topk_weights [W, K] float32, handle (JaxHandle; handle.num_recv_tokens: [] int32 rows received, the
    rest is padding), num_recv_tokens_per_expert [num_experts / R] int32 (rows per local expert, each rounded up to
    expert_alignment: DeepEP's list, as an array)).
    Every rank calls it (a collective), in the same program order, with the same jax.grad choices."""
    bid = _buffer_id(buffer)
    _check(x, "x", 2, jnp.bfloat16, "a [num_tokens, hidden] bfloat16 array (FP8 dispatch has no JAX path)")
    t = x.shape[0]
    _check(topk_idx, "topk_idx", 2, "int", f"a [{t}, num_topk] integer array")
    if topk_idx.shape[0] != t:
        raise ConfigError(f"topk_idx: expected [{t}, num_topk] (x's token count), got {_desc(topk_idx)}")
    if topk_weights is None:
        raise ConfigError("topk_weights: epcomm.jax.dispatch needs them; pass jnp.ones(topk_idx.shape, jnp.float32) "
                          "if the weights are not used")
    _check(topk_weights, "topk_weights", 2, jnp.float32, f"a [{t}, {topk_idx.shape[1]}] float32 array")
    if topk_weights.shape != topk_idx.shape:
        raise ConfigError(f"topk_weights: expected [{t}, {topk_idx.shape[1]}] float32, got {_desc(topk_weights)}")
    if isinstance(num_worst_tokens, bool) or not isinstance(num_worst_tokens, int) or num_worst_tokens <= 0:
        raise ConfigError(f"num_worst_tokens: epcomm.jax needs a fixed row count (an int > 0; static shapes inside "
                          f"jax.jit), got {num_worst_tokens!r}")
    if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % buffer.num_ranks:
        raise ConfigError(f"num_experts: expected a positive multiple of the {buffer.num_ranks} ranks, "
                          f"got {num_experts!r}")
    if not isinstance(expert_alignment, int) or expert_alignment < 1:
        raise ConfigError(f"expert_alignment: expected an int >= 1, got {expert_alignment!r}")
    s = _DispatchStatic(bid, num_experts, num_worst_tokens, expert_alignment)
    recv_x, recv_idx, recv_w, hid, num_recv, per_expert = _dispatch_vjp(
        s, num_experts // buffer.num_ranks, x, topk_idx, topk_weights)
    return recv_x, recv_idx, recv_w, JaxHandle(hid, num_recv, t, num_worst_tokens), per_expert


def combine(buffer: Buffer, x, handle: JaxHandle, topk_weights=None):
    """Differentiable normal combine of x [W, H] bf16 (the dispatch's padded rows; padding rows are ignored) with the
    handle of epcomm.jax.dispatch: gradients flow to x and topk_weights [W, K] float32. Returns (combined_x [T, H]
    bf16, combined_topk_weights [T, K] float32, or None without topk_weights)."""
    bid = _buffer_id(buffer)
    _check_handle(handle)
    want = f"a [{handle.num_rows}, hidden] bfloat16 array (the dispatch's rows)"
    _check(x, "x", 2, jnp.bfloat16, want)
    if x.shape[0] != handle.num_rows:
        raise ConfigError(f"x: expected {want}, got {_desc(x)}")
    w = topk_weights
    if w is None:
        w = jnp.zeros((handle.num_rows, 0), jnp.float32)
    else:
        _check(w, "topk_weights", 2, jnp.float32, f"a [{handle.num_rows}, num_topk] float32 array")
        if w.shape[0] != handle.num_rows:
            raise ConfigError(f"topk_weights: expected [{handle.num_rows}, num_topk] float32, got {_desc(w)}")
    combined, combined_w = _combine_vjp(bid, handle.num_tokens, x, w, handle.id)
    return combined, (combined_w if topk_weights is not None else None)


def cached_dispatch(buffer: Buffer, x, handle: JaxHandle):
    """A cached dispatch of x [T, H] bf16 with the handle of epcomm.jax.dispatch (differentiable: its backward is a
    combine). Returns recv_x [W, H] bf16 (padding rows zero)."""
    bid = _buffer_id(buffer)
    _check_handle(handle)
    want = f"a [{handle.num_tokens}, hidden] bfloat16 array (the handle's token count)"
    _check(x, "x", 2, jnp.bfloat16, want)
    if x.shape[0] != handle.num_tokens:
        raise ConfigError(f"x: expected {want}, got {_desc(x)}")
    return _cached_dispatch_vjp(bid, handle.num_tokens, handle.num_rows, x, handle.id)


# Low-latency pair (bf16 transport; fixed shapes by construction), with jax.custom_vjp rules: the adjoints of
# epcomm.torch (see the comment above its _ll_combine_backward). The dispatch's backward is a low-latency combine of
# the rows' gradient with unit weights; the combine's backward is one host callback running one low-latency dispatch of
# [grad_out | topk_weights | topk_idx] (bit-exact bf16 pairs) and one low-latency combine of the dot products.

def _cb_ll_dispatch(buffer_id, tmax, num_experts, x, topk_idx):
    recv_x, recv_count, handle, _, _ = _buffer(buffer_id).low_latency_dispatch(
        _np(x), _np(topk_idx), tmax, num_experts, use_fp8=False)
    return np.array(recv_x), _np(recv_count, np.int32), _new_handle_id(handle)


def _ll_handle(hid) -> LowLatencyHandle:
    handle = handle_of(hid)
    if not isinstance(handle, LowLatencyHandle):
        raise EpcommError(f"handle id {int(hid)}: names a {type(handle).__name__}, not a low-latency dispatch's")
    return handle


def _cb_ll_combine(buffer_id, x, topk_idx, topk_weights, hid):
    handle = _ll_handle(hid)
    return _np(_buffer(buffer_id).low_latency_combine(_np(x), _np(topk_idx), _np(topk_weights), handle)[0])


def _ll_slot_k(src_info, layout_range, slot_idx, rank):
    """Each slot's k ([E_local, S]; -1 in unused rows): the m-th k of its token whose expert is the slot's, m its
    position among the rows of (source rank, token) in the expert's block."""
    e_local, s = src_info.shape
    begins = (layout_range >> 32).astype(np.int64)
    rows = np.arange(s)
    source = (rows[None, :, None] >= begins[:, None, :]).sum(-1) - 1
    valid = src_info >= 0
    key = np.where(valid, source * 2 ** 32 + src_info.astype(np.int64), 2 ** 62)
    first = np.stack([np.searchsorted(key[j], key[j], side="left") for j in range(e_local)]).reshape(e_local, s)
    m = rows[None, :] - first
    experts = rank * e_local + np.arange(e_local)
    match = slot_idx == experts[:, None, None]
    occ = match.cumsum(-1) - 1
    sel = match & (occ == m[..., None]) & valid[..., None]
    return np.where(sel.any(-1), sel.argmax(-1), -1)


def _bf16_split3(d):
    hi = d.astype(BF16)
    r = d - hi.astype(np.float32)
    mid = r.astype(BF16)
    lo = (r - mid.astype(np.float32)).astype(BF16)
    return hi, mid, lo


def _cb_ll_combine_bwd(buffer_id, grad_out, x, topk_idx, topk_weights, hid):
    """(grad_x [E_local, R*Tmax, H] bf16, grad_topk_weights [T, K] float32) of a low-latency combine."""
    buf, handle = _buffer(buffer_id), _ll_handle(hid)
    grad_out, y, topk_idx, topk_weights = _np(grad_out), _np(x), _np(topk_idx), _np(topk_weights, np.float32)
    t, h = grad_out.shape
    k = topk_idx.shape[1]
    rows = np.concatenate([grad_out, topk_weights.view(BF16), _np(topk_idx, np.int32).view(BF16)], 1)
    rows = np.concatenate([rows, np.zeros((t, -rows.shape[1] % 8), BF16)], 1)
    recv, _, h2, _, _ = buf.low_latency_dispatch(rows, topk_idx, handle.num_max_dispatch_tokens_per_rank,
                                                 handle.num_experts, use_fp8=False)
    recv, src_info, layout_range = np.asarray(recv), np.asarray(h2.src_info), np.asarray(h2.layout_range)
    if not (np.array_equal(src_info, np.asarray(handle.src_info))
            and np.array_equal(layout_range, np.asarray(handle.layout_range))):
        raise EpcommError("low-latency combine backward: the dispatch of the gradient rows laid them out unlike the "
                          "forward's dispatch (topk_idx differs from the dispatch's?)")
    g_slot = recv[..., :h].astype(np.float32)
    w_slot = np.ascontiguousarray(recv[..., h:h + 2 * k]).view(np.float32)
    idx_slot = np.ascontiguousarray(recv[..., h + 2 * k:h + 4 * k]).view(np.int32)
    slot_k = _ll_slot_k(src_info, layout_range, idx_slot, buf.rank)
    used = slot_k >= 0
    kk = np.maximum(slot_k, 0)
    w = np.where(used, np.take_along_axis(w_slot, kk[..., None], -1)[..., 0], np.float32(0))
    grad_y = (w[..., None] * g_slot).astype(BF16)
    dot = np.where(used, (y.astype(np.float32) * g_slot).sum(-1, dtype=np.float32), np.float32(0))
    cols = np.zeros(dot.shape + (rows.shape[1],), BF16)
    e_i, s_i = np.nonzero(used)
    for p, piece in enumerate(_bf16_split3(dot)):
        cols[e_i, s_i, 3 * kk[e_i, s_i] + p] = piece[e_i, s_i]
    ones = np.ones(topk_idx.shape, np.float32)
    back = np.asarray(buf.low_latency_combine(cols, topk_idx, ones, h2)[0])[:, :3 * k].astype(np.float32)
    back = back.reshape(t, k, 3)
    grad_w = (back[..., 0] + back[..., 1]) + back[..., 2]
    return np.ascontiguousarray(grad_y), np.ascontiguousarray(grad_w, np.float32)


def _ll_dispatch_call(bid, tmax, num_experts, e_local, r, x, topk_idx):
    shapes = (_sds((e_local, r * tmax, x.shape[1]), jnp.bfloat16), _sds((e_local,), jnp.int32), _sds((), jnp.int32))
    return _ordered(functools.partial(_cb_ll_dispatch, bid, tmax, num_experts), shapes, x, topk_idx)


def _ll_combine_call(bid, x, topk_idx, topk_weights, hid):
    return _ordered(functools.partial(_cb_ll_combine, bid), _sds((topk_idx.shape[0], x.shape[2]), jnp.bfloat16),
                    x, topk_idx, topk_weights, hid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _ll_dispatch_vjp(bid, tmax, num_experts, e_local, r, x, topk_idx):
    return _ll_dispatch_call(bid, tmax, num_experts, e_local, r, x, topk_idx)


def _ll_dispatch_fwd(bid, tmax, num_experts, e_local, r, x, topk_idx):
    out = _ll_dispatch_call(bid, tmax, num_experts, e_local, r, x, topk_idx)
    return out, (topk_idx, out[2])


def _ll_dispatch_bwd(bid, tmax, num_experts, e_local, r, residuals, cotangents):
    topk_idx, hid = residuals
    ones = jnp.ones(topk_idx.shape, jnp.float32)
    grad_x = _ll_combine_call(bid, cotangents[0].astype(jnp.bfloat16), topk_idx, ones, hid)
    return grad_x, None


_ll_dispatch_vjp.defvjp(_ll_dispatch_fwd, _ll_dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ll_combine_vjp(bid, x, topk_idx, topk_weights, hid):
    return _ll_combine_call(bid, x, topk_idx, topk_weights, hid)


def _ll_combine_fwd(bid, x, topk_idx, topk_weights, hid):
    return _ll_combine_call(bid, x, topk_idx, topk_weights, hid), (x, topk_idx, topk_weights, hid)


def _ll_combine_bwd(bid, residuals, grad_out):
    x, topk_idx, topk_weights, hid = residuals
    shapes = (_sds(x.shape, jnp.bfloat16), _sds(topk_weights.shape, jnp.float32))
    grad_x, grad_w = _ordered(functools.partial(_cb_ll_combine_bwd, bid), shapes, grad_out.astype(jnp.bfloat16), x,
                              topk_idx, topk_weights, hid)
    return grad_x, None, grad_w, None


_ll_combine_vjp.defvjp(_ll_combine_fwd, _ll_combine_bwd)


def low_latency_dispatch(buffer: Buffer, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int):
    """Low-latency dispatch inside jax.jit (bf16, no hook, no FP8; differentiable in x: its backward is a
    low-latency combine of the rows' gradient with unit weights). x: [T, H] bf16 with
    T <= num_max_dispatch_tokens_per_rank; topk_idx [T, K] integer. Returns (recv_x [E_local, R*Tmax, H] bf16,
    recv_count [E_local] int32, handle id [] int32)."""
    bid = _buffer_id(buffer)
    _check(x, "x", 2, jnp.bfloat16, "a [num_tokens, hidden] bfloat16 array")
    _check(topk_idx, "topk_idx", 2, "int", f"a [{x.shape[0]}, num_topk] integer array")
    r = buffer.num_ranks
    if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % r:
        raise ConfigError(f"num_experts: expected a positive multiple of the {r} ranks, got {num_experts!r}")
    tmax = int(num_max_dispatch_tokens_per_rank)
    return _ll_dispatch_vjp(bid, tmax, num_experts, num_experts // r, r, x, topk_idx)


def low_latency_combine(buffer: Buffer, x, topk_idx, topk_weights, handle_id):
    """Low-latency combine inside jax.jit: x [E_local, R*Tmax, H] bf16 expert outputs, topk_idx / topk_weights
    [T, K] (float32 weights), handle_id from low_latency_dispatch. Returns [T, H] bf16. Differentiable in x and
    topk_weights (the backward: one low-latency dispatch and one low-latency combine, in one ordered callback)."""
    bid = _buffer_id(buffer)
    _check(x, "x", 3, jnp.bfloat16, "an [E_local, R*Tmax, hidden] bfloat16 array")
    _check(topk_weights, "topk_weights", 2, jnp.float32, "a [num_tokens, num_topk] float32 array")
    return _ll_combine_vjp(bid, x, topk_idx, topk_weights, handle_id)
