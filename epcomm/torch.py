"""epcomm inside torch's machinery: autograd Functions for normal dispatch and combine (eager, any shapes) and
torch.library custom ops with fake implementations (torch.compile, static shapes). Importing this module imports
torch; importing epcomm does not.

Backward rules (DeepEP's README): the backward of a dispatch is a combine of the received rows' gradients with the
dispatch's handle (the top-k weights' gradient is that combine's combined_topk_weights); the backward of a combine is
a cached dispatch of the output's gradient with the same handle.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from typing import NamedTuple

import torch

from .buffer import Buffer
from .config import Config
from .errors import ConfigError, EpcommError
from .handles import DispatchHandle

__all__ = ["dispatch", "combine", "cached_dispatch", "DispatchFunction", "CombineFunction", "register_buffer",
           "handle_of", "OpHandle", "low_latency_dispatch", "low_latency_combine"]


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared by the eager Functions and the custom ops
# ---------------------------------------------------------------------------------------------------------------------

def _check_bf16(x, name):
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2:
        got = f"[{', '.join(map(str, x.shape))}] {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"{name}: expected a [num_tokens, hidden] torch.bfloat16 tensor (epcomm.torch "
                          f"differentiates bf16 rows only; FP8 dispatch has no gradient), got {got}")


def _layout_and_dispatch(buffer: Buffer, x, topk_idx, topk_weights, num_experts, num_worst_tokens,
                         expert_alignment, config):
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    return buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
                           num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                           num_tokens_per_expert=per_expert, expert_alignment=expert_alignment,
                           num_worst_tokens=num_worst_tokens, config=config)[:5]


def _dispatch_backward(buffer, handle, config, grad_recv_x, grad_recv_w, recv_topk_idx, hidden):
    """Combine of the received rows' gradients (and of the received weights' gradients, masked to the entries the
    forward kept: the others are constant zeros). Returns (grad_x, grad_topk_weights or None)."""
    if grad_recv_x is None:
        grad_recv_x = torch.zeros(handle.num_rows, hidden, dtype=torch.bfloat16)
    w = None
    if recv_topk_idx is not None:
        g = torch.zeros(recv_topk_idx.shape, dtype=torch.float32) if grad_recv_w is None else grad_recv_w.float()
        w = torch.where(recv_topk_idx >= 0, g, torch.zeros((), dtype=torch.float32)).contiguous()
    grad_x, grad_w, _ = buffer.combine(grad_recv_x.to(torch.bfloat16).contiguous(), handle, topk_weights=w,
                                       config=config)
    return grad_x, grad_w


def _cached_dispatch_f32(buffer, handle, a):
    """A cached dispatch of float32 rows [T, K] (the gradient of combine's topk_weights): the float32 bits travel as
    bf16 pairs (a dispatch copies rows bit for bit), padded to 8 bf16 columns (a row must be a multiple of 16 bytes)."""
    t, k = a.shape
    kp = -(-k // 4) * 4
    padded = torch.zeros(t, kp, dtype=torch.float32)
    padded[:, :k] = a
    recv = buffer.dispatch(padded.view(torch.bfloat16), handle=handle)[0]
    return recv.contiguous().view(torch.float32)[:, :k].contiguous()


def _combine_backward(buffer, handle, config, grad_out, grad_out_w, has_w, hidden, num_topk):
    if grad_out is None:
        grad_out = torch.zeros(handle.num_tokens, hidden, dtype=torch.bfloat16)
    grad_x = buffer.dispatch(grad_out.to(torch.bfloat16).contiguous(), handle=handle, config=config)[0]
    grad_w = None
    if has_w:
        g = torch.zeros(handle.num_tokens, num_topk, dtype=torch.float32) if grad_out_w is None else grad_out_w.float()
        grad_w = _cached_dispatch_f32(buffer, handle, g)
    return grad_x, grad_w


# ---------------------------------------------------------------------------------------------------------------------
# Eager autograd Functions (any shapes; handles are Python objects carried on ctx)
# ---------------------------------------------------------------------------------------------------------------------

class DispatchFunction(torch.autograd.Function):
    """Normal dispatch with a backward. Inputs: (x [T, H] bf16, topk_weights [T, K] float32 or None, buffer, topk_idx
    [T, K] int64, num_experts, num_worst_tokens, expert_alignment, config). Outputs: (recv_x, recv_topk_idx,
    recv_topk_weights, handle, num_recv_tokens_per_expert_list); only recv_x and recv_topk_weights have gradients."""

    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx, num_experts, num_worst_tokens, expert_alignment, config):
        _check_bf16(x, "x")
        w = None if topk_weights is None else topk_weights.detach()
        recv_x, recv_idx, recv_w, per_expert, handle = _layout_and_dispatch(
            buffer, x.detach(), topk_idx, w, num_experts, num_worst_tokens, expert_alignment, config)
        ctx.buffer, ctx.handle, ctx.config, ctx.hidden = buffer, handle, config, x.shape[1]
        ctx.has_w = w is not None
        if recv_idx is not None:
            ctx.mark_non_differentiable(recv_idx)
            ctx.save_for_backward(recv_idx)
        return recv_x, recv_idx, recv_w, handle, per_expert

    @staticmethod
    def backward(ctx, grad_recv_x, _grad_idx, grad_recv_w, _grad_handle, _grad_list):
        recv_idx = ctx.saved_tensors[0] if ctx.has_w else None
        grad_x, grad_w = _dispatch_backward(ctx.buffer, ctx.handle, ctx.config, grad_recv_x, grad_recv_w, recv_idx,
                                            ctx.hidden)
        return grad_x, grad_w, None, None, None, None, None, None


class CombineFunction(torch.autograd.Function):
    """Normal combine with a backward. Inputs: (x [N, H] bf16, topk_weights [N, K] float32 or None, buffer, handle,
    config). Outputs: (combined_x [T, H] bf16, combined_topk_weights [T, K] float32 or None)."""

    @staticmethod
    def forward(ctx, x, topk_weights, buffer, handle, config):
        _check_bf16(x, "x")
        w = None if topk_weights is None else topk_weights.detach()
        combined, combined_w, _ = buffer.combine(x.detach(), handle, topk_weights=w, config=config)
        ctx.buffer, ctx.handle, ctx.config, ctx.hidden = buffer, handle, config, x.shape[1]
        ctx.has_w, ctx.num_topk = w is not None, (0 if w is None else w.shape[1])
        return combined, combined_w

    @staticmethod
    def backward(ctx, grad_out, grad_out_w):
        grad_x, grad_w = _combine_backward(ctx.buffer, ctx.handle, ctx.config, grad_out, grad_out_w, ctx.has_w,
                                           ctx.hidden, ctx.num_topk)
        return grad_x, grad_w, None, None, None


def _is_op_handle(handle) -> bool:
    return isinstance(handle, OpHandle)


def dispatch(buffer: Buffer, x, topk_idx, topk_weights=None, *, num_experts: int, num_worst_tokens: int = 0,
             expert_alignment: int = 1, config: Config | None = None):
    """Differentiable normal dispatch (layout included): gradients flow to x and topk_weights.

    x: [T, H] bf16; topk_idx: [T, K] int64; topk_weights: [T, K] float32 or None.
    Returns (recv_x [N, H] bf16, recv_topk_idx [N, K] int64, recv_topk_weights [N, K] float32 or None, handle,
    num_recv_tokens_per_expert_list). N = num_worst_tokens when > 0 (padded rows), else the received row count.
    With num_worst_tokens > 0 the call is the custom op torch.ops.epcomm.dispatch (compiles without a graph break)
    and handle is an OpHandle (an opaque int64 id tensor plus static row counts); otherwise it is DispatchFunction (eager: under torch.compile a graph
    break, as its output size depends on the data) and handle is the DispatchHandle, with the per-expert list.
    Every rank calls it (a collective), with the same requires_grad choices (the backward is a collective too)."""
    if num_worst_tokens:
        if topk_weights is None:
            raise ConfigError("topk_weights: the custom op dispatch (num_worst_tokens > 0) needs them; pass "
                              "torch.ones_like(topk_idx, dtype=torch.float32) if the weights are not used")
        recv_x, recv_idx, recv_w, hid = torch.ops.epcomm.dispatch(
            x, topk_idx, topk_weights, register_buffer(buffer), num_experts, num_worst_tokens, expert_alignment)
        return recv_x, recv_idx, recv_w, OpHandle(hid, x.shape[0], num_worst_tokens), []
    return _eager_dispatch(x, topk_weights, buffer, topk_idx, num_experts, num_worst_tokens, expert_alignment, config)


@torch.compiler.disable
def _eager_dispatch(*args):
    """Outside any compiled graph (a graph break under torch.compile): the output row count depends on the data."""
    return DispatchFunction.apply(*args)


@torch.compiler.disable
def _eager_combine(*args):
    """Outside any compiled graph: its handle is a Python object, which custom ops cannot take."""
    return CombineFunction.apply(*args)


def combine(buffer: Buffer, x, handle, topk_weights=None, *, config: Config | None = None):
    """Differentiable normal combine of x [N, H] bf16 (N as the dispatch's recv_x) with a handle from dispatch():
    gradients flow to x and topk_weights [N, K] float32. Returns (combined_x [T, H] bf16, combined_topk_weights
    [T, K] float32 or None). A handle id tensor (custom-op dispatch) uses the custom op torch.ops.epcomm.combine."""
    if _is_op_handle(handle):
        w = topk_weights if topk_weights is not None else x.new_empty((x.shape[0], 0), dtype=torch.float32)
        combined, combined_w = torch.ops.epcomm.combine(x, w, handle.id, register_buffer(buffer), handle.num_tokens)
        return combined, (combined_w if topk_weights is not None else None)
    if not isinstance(handle, DispatchHandle):
        raise ConfigError(f"handle: expected the handle of epcomm.torch.dispatch, got {type(handle).__name__}")
    return _eager_combine(x, topk_weights, buffer, handle, config)


def cached_dispatch(buffer: Buffer, x, handle):
    """A cached dispatch of x [T, H] bf16 with a handle id tensor (custom op torch.ops.epcomm.cached_dispatch;
    differentiable: its backward is a combine). Returns recv_x [N, H] bf16."""
    if not _is_op_handle(handle):
        raise ConfigError("handle: expected the OpHandle of epcomm.torch.dispatch(num_worst_tokens > 0); "
                          "for a DispatchHandle call Buffer.dispatch(x, handle=handle)")
    return torch.ops.epcomm.cached_dispatch(x, handle.id, register_buffer(buffer), handle.num_rows)


# ---------------------------------------------------------------------------------------------------------------------
# Registries: custom ops take tensors and plain scalars only, so Buffers and handles travel as ints
# ---------------------------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_ids = itertools.count(1)
_handles: dict[int, object] = {}


def register_buffer(buffer: Buffer) -> int:
    """The int id the custom ops name a Buffer by (every Buffer gets one when made; epcomm.buffer keeps them in a
    weak registry)."""
    if not isinstance(buffer, Buffer):
        raise ConfigError(f"buffer: expected an epcomm.Buffer, got {type(buffer).__name__}")
    return buffer._op_id


def _buffer(bid: int) -> Buffer:
    from .buffer import buffer_by_op_id
    return buffer_by_op_id(bid, "epcomm.torch")


def _new_handle_id(handle) -> torch.Tensor:
    """A [] int64 tensor naming handle in the registry; the entry lives as long as that tensor (autograd keeps it for
    the backward)."""
    with _lock:
        hid = next(_ids)
        _handles[hid] = handle
    t = torch.tensor(hid, dtype=torch.int64)
    weakref.finalize(t, _handles.pop, hid, None)
    return t


def handle_of(handle_id: torch.Tensor):
    """The DispatchHandle / LowLatencyHandle an id tensor names (EpcommError once every copy of the id is gone)."""
    hid = int(handle_id.item())
    try:
        return _handles[hid]
    except KeyError:
        raise EpcommError(f"epcomm.torch: handle id {hid} is no longer registered (its id tensor was freed)") from None


def _num_live_handles() -> int:
    return len(_handles)


# ---------------------------------------------------------------------------------------------------------------------
# torch.library custom ops (static output shapes; fake implementations for torch.compile)
# ---------------------------------------------------------------------------------------------------------------------

class OpHandle(NamedTuple):
    """What epcomm.torch.dispatch(num_worst_tokens > 0) returns as its handle: the opaque [] int64 id tensor that the
    custom ops take (the registry maps it to the DispatchHandle while the tensor lives), plus the static row counts
    the fake implementations need (num_tokens: T of the dispatching rank; num_rows: num_worst_tokens)."""
    id: torch.Tensor
    num_tokens: int
    num_rows: int


@torch.library.custom_op("epcomm::dispatch", mutates_args=())
def _op_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, buffer_id: int,
                 num_experts: int, num_worst_tokens: int, expert_alignment: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_bf16(x, "x")
    if num_worst_tokens <= 0:
        raise ConfigError("num_worst_tokens: the custom op dispatch needs a fixed row count (> 0)")
    recv_x, recv_idx, recv_w, _, handle = _layout_and_dispatch(
        _buffer(buffer_id), x.detach(), topk_idx, topk_weights.detach(), num_experts, num_worst_tokens,
        expert_alignment, None)
    return recv_x, recv_idx, recv_w, _new_handle_id(handle)


@_op_dispatch.register_fake
def _(x, topk_idx, topk_weights, buffer_id, num_experts, num_worst_tokens, expert_alignment):
    k = topk_idx.shape[1]
    return (x.new_empty((num_worst_tokens, x.shape[1])), topk_idx.new_empty((num_worst_tokens, k)),
            topk_weights.new_empty((num_worst_tokens, k)), x.new_empty((), dtype=torch.int64))


@torch.library.custom_op("epcomm::combine", mutates_args=())
def _op_combine(x: torch.Tensor, topk_weights: torch.Tensor, handle_id: torch.Tensor, buffer_id: int,
                num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_weights: [N, K] float32, or [N, 0] for none (then combined_topk_weights is [T, 0])."""
    _check_bf16(x, "x")
    handle = handle_of(handle_id)
    w = topk_weights.detach().contiguous() if topk_weights.shape[1] else None
    combined, combined_w, _ = _buffer(buffer_id).combine(x.detach().contiguous(), handle, topk_weights=w)
    if combined_w is None:
        combined_w = torch.zeros(handle.num_tokens, 0, dtype=torch.float32)
    return combined, combined_w


@_op_combine.register_fake
def _(x, topk_weights, handle_id, buffer_id, num_tokens):
    return x.new_empty((num_tokens, x.shape[1])), topk_weights.new_empty((num_tokens, topk_weights.shape[1]))


@torch.library.custom_op("epcomm::cached_dispatch", mutates_args=())
def _op_cached_dispatch(x: torch.Tensor, handle_id: torch.Tensor, buffer_id: int, num_rows: int) -> torch.Tensor:
    _check_bf16(x, "x")
    return _buffer(buffer_id).dispatch(x.detach().contiguous(), handle=handle_of(handle_id))[0]


@_op_cached_dispatch.register_fake
def _(x, handle_id, buffer_id, num_rows):
    return x.new_empty((num_rows, x.shape[1]))


@torch.library.custom_op("epcomm::cached_dispatch_f32", mutates_args=())
def _op_cached_dispatch_f32(a: torch.Tensor, handle_id: torch.Tensor, buffer_id: int, num_rows: int) -> torch.Tensor:
    """float32 rows [T, K] (a weights gradient) dispatched with a handle; see _cached_dispatch_f32."""
    return _cached_dispatch_f32(_buffer(buffer_id), handle_of(handle_id), a.detach())


@_op_cached_dispatch_f32.register_fake
def _(a, handle_id, buffer_id, num_rows):
    return a.new_empty((num_rows, a.shape[1]))


# Autograd of the ops: the same rules as the eager Functions, written with the ops, so a compiled backward has no
# graph break either. ctx keeps the id tensor (so the registry entry lives until the backward has run).

def _setup_dispatch(ctx, inputs, output):
    x, topk_idx, topk_weights, buffer_id = inputs[:4]
    ctx.buffer_id, ctx.num_tokens = buffer_id, x.shape[0]
    ctx.save_for_backward(output[1], output[3])


def _backward_dispatch(ctx, grad_recv_x, _grad_idx, grad_recv_w, _grad_id):
    recv_idx, hid = ctx.saved_tensors
    if grad_recv_w is None:
        grad_recv_w = torch.zeros(recv_idx.shape, dtype=torch.float32)
    w = torch.where(recv_idx >= 0, grad_recv_w.float(), 0.0)
    grad_x, grad_w = torch.ops.epcomm.combine(grad_recv_x.to(torch.bfloat16), w, hid, ctx.buffer_id, ctx.num_tokens)
    return grad_x, None, grad_w, None, None, None, None


_op_dispatch.register_autograd(_backward_dispatch, setup_context=_setup_dispatch)


def _setup_combine(ctx, inputs, output):
    x, topk_weights, handle_id, buffer_id, _ = inputs
    ctx.buffer_id, ctx.num_rows, ctx.num_topk = buffer_id, x.shape[0], topk_weights.shape[1]
    ctx.save_for_backward(handle_id)


def _backward_combine(ctx, grad_out, grad_out_w):
    (hid,) = ctx.saved_tensors
    grad_x = torch.ops.epcomm.cached_dispatch(grad_out.to(torch.bfloat16), hid, ctx.buffer_id, ctx.num_rows)
    grad_w = None
    if ctx.num_topk:
        grad_w = torch.ops.epcomm.cached_dispatch_f32(grad_out_w.float(), hid, ctx.buffer_id, ctx.num_rows)
    return grad_x, grad_w, None, None, None


_op_combine.register_autograd(_backward_combine, setup_context=_setup_combine)


def _setup_cached_dispatch(ctx, inputs, output):
    x, handle_id, buffer_id, _ = inputs
    ctx.buffer_id, ctx.num_tokens = buffer_id, x.shape[0]
    ctx.save_for_backward(handle_id)


def _backward_cached_dispatch(ctx, grad):
    (hid,) = ctx.saved_tensors
    none_w = torch.zeros(grad.shape[0], 0, dtype=torch.float32)
    grad_x, _ = torch.ops.epcomm.combine(grad.to(torch.bfloat16), none_w, hid, ctx.buffer_id, ctx.num_tokens)
    return grad_x, None, None, None


_op_cached_dispatch.register_autograd(_backward_cached_dispatch, setup_context=_setup_cached_dispatch)


# Low-latency pair (bf16 transport; fixed shapes by construction), with autograd (bf16 only; no FP8, no hooks).
#
# Adjoints (epcomm.reference): the dispatch copies x[t] into the slot (expert e, row s) of every (t, k) with
# topk_idx[t, k] = e, so its adjoint sums those slots back: grad_x[t] = sum_k grad_recv_x[slot(t, k)], a low-latency
# combine of grad_recv_x with unit weights (the slots of other tokens and unused rows get nothing). The combine is
# out[t] = sum_k w[t, k] * y[slot(t, k)], so grad_y[slot(t, k)] = w[t, k] * grad_out[t] (0 in unused rows) and
# grad_w[t, k] = <y[slot(t, k)], grad_out[t]>. Both need, on the expert side, each slot's k: one low-latency dispatch
# of [grad_out[t] | topk_weights[t] | topk_idx[t]] (the last two as bit-exact bf16 pairs) brings grad_out[t], the
# weights and the expert ids to every slot of t; the slot's k is the m-th k of t with topk_idx = its expert, m its
# position among the slots of (source rank, t) in that expert's block (rows of a token repeating an expert pair with
# its k's in order, as in the combine). The dot products go back by one low-latency combine with unit weights (with
# that dispatch's handle) of rows holding each dot product as three bf16 pieces (hi + mid + lo == the float32
# exactly) in columns 3k..3k+2: each column gets one nonzero term, so the combine's float32 sum and bf16 rounding
# leave the pieces exact.

def _pad_cols(a, mult=8):
    pad = -a.shape[-1] % mult
    return a if not pad else torch.cat([a, a.new_zeros(a.shape[:-1] + (pad,))], -1)


def _bf16_split3(d):
    """float32 d as three bf16 pieces with hi + mid + lo == d exactly (in that order, in float32)."""
    hi = d.to(torch.bfloat16)
    r = d - hi.float()
    mid = r.to(torch.bfloat16)
    lo = (r - mid.float()).to(torch.bfloat16)
    return hi, mid, lo


def _ll_slot_k(src_info, layout_range, slot_idx, rank):
    """Each slot's k ([E_local, S] int64; -1 in unused rows) from the expert ids of its token (slot_idx
    [E_local, S, K], topk_idx[t] as dispatched to the slot)."""
    e_local, s = src_info.shape
    begins = (layout_range >> 32).long()
    rows = torch.arange(s, device=src_info.device)
    source = (rows[None, :, None] >= begins[:, None, :]).sum(-1) - 1          # [E_local, S] source rank of the row
    valid = src_info >= 0
    key = torch.where(valid, source * (2 ** 32) + src_info.long(), torch.full_like(source, 2 ** 62))
    first = torch.searchsorted(key.contiguous(), key.contiguous(), side="left")  # first row of (source, t) in block
    m = rows[None, :] - first                                                   # occurrence of the expert in t
    experts = rank * e_local + torch.arange(e_local, device=src_info.device)
    match = slot_idx == experts[:, None, None]
    occ = match.long().cumsum(-1) - 1
    sel = match & (occ == m[..., None]) & valid[..., None]
    k = torch.where(sel.any(-1), sel.long().argmax(-1), torch.full_like(m, -1))
    return k


def _ll_combine_backward(buffer, handle, grad_out, y, topk_idx, topk_weights):
    """(grad_y [E_local, R*Tmax, H] bf16, grad_w [T, K] float32) of out = low_latency_combine(y, topk_idx, w, handle)."""
    t, h = grad_out.shape
    k = topk_idx.shape[1]
    rows = torch.cat([grad_out.to(torch.bfloat16), topk_weights.float().contiguous().view(torch.bfloat16),
                      topk_idx.to(torch.int32).contiguous().view(torch.bfloat16)], 1)
    rows = _pad_cols(rows).contiguous()
    recv, _, h2, _, _ = buffer.low_latency_dispatch(rows, topk_idx, handle.num_max_dispatch_tokens_per_rank,
                                                    handle.num_experts, use_fp8=False)
    src_info, layout_range = torch.as_tensor(h2.src_info), torch.as_tensor(h2.layout_range)
    if not (torch.equal(src_info.cpu(), torch.as_tensor(handle.src_info).cpu())
            and torch.equal(layout_range.cpu(), torch.as_tensor(handle.layout_range).cpu())):
        raise EpcommError("low-latency combine backward: the dispatch of the gradient rows laid them out unlike the "
                          "forward's dispatch (topk_idx differs from the dispatch's?)")
    g_slot = recv[..., :h].float()
    w_slot = recv[..., h:h + 2 * k].contiguous().view(torch.float32)
    idx_slot = recv[..., h + 2 * k:h + 4 * k].contiguous().view(torch.int32)
    slot_k = _ll_slot_k(src_info, layout_range, idx_slot, buffer.rank)
    used = slot_k >= 0
    kk = slot_k.clamp(min=0)
    w = torch.where(used, torch.gather(w_slot, -1, kk[..., None])[..., 0], 0.0)
    grad_y = (w[..., None] * g_slot).to(torch.bfloat16)
    dot = torch.where(used, (y.float() * g_slot).sum(-1), 0.0)
    pieces = torch.stack(_bf16_split3(dot), -1)                                 # [E_local, S, 3]
    cols = torch.zeros(dot.shape + (k, 3), dtype=torch.bfloat16, device=dot.device)
    onehot = torch.nn.functional.one_hot(kk, k).bool() & used[..., None]
    cols = torch.where(onehot[..., None], pieces[..., None, :], cols).flatten(-2)
    # The combine takes rows as wide as its dispatch's (the handle's hidden): 3K <= H + 4K columns, zeros after.
    cols = torch.cat([cols, cols.new_zeros(cols.shape[:-1] + (rows.shape[1] - 3 * k,))], -1).contiguous()
    ones = torch.ones(topk_idx.shape, dtype=torch.float32, device=grad_out.device)
    back = buffer.low_latency_combine(cols, topk_idx, ones, h2)[0][:, :3 * k].float().view(t, k, 3)
    grad_w = (back[..., 0] + back[..., 1]) + back[..., 2]
    return grad_y, grad_w


@torch.library.custom_op("epcomm::low_latency_dispatch", mutates_args=())
def _op_ll_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, buffer_id: int, num_max_dispatch_tokens_per_rank: int,
                    num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    recv_x, recv_count, handle, _, _ = _buffer(buffer_id).low_latency_dispatch(
        x.detach(), topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=False)
    return recv_x.clone(), recv_count.clone(), _new_handle_id(handle)


@_op_ll_dispatch.register_fake
def _(x, topk_idx, buffer_id, num_max_dispatch_tokens_per_rank, num_experts):
    r = _buffer(buffer_id).num_ranks
    e_local = num_experts // r
    return (x.new_empty((e_local, r * num_max_dispatch_tokens_per_rank, x.shape[1])),
            x.new_empty((e_local,), dtype=torch.int32), x.new_empty((), dtype=torch.int64))


@torch.library.custom_op("epcomm::low_latency_combine", mutates_args=())
def _op_ll_combine(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle_id: torch.Tensor,
                   buffer_id: int) -> torch.Tensor:
    combined, _, _ = _buffer(buffer_id).low_latency_combine(x.detach().contiguous(), topk_idx, topk_weights.detach(),
                                                            handle_of(handle_id))
    return combined


@_op_ll_combine.register_fake
def _(x, topk_idx, topk_weights, handle_id, buffer_id):
    return x.new_empty((topk_idx.shape[0], x.shape[2]))


@torch.library.custom_op("epcomm::low_latency_combine_backward", mutates_args=())
def _op_ll_combine_backward(grad_out: torch.Tensor, x: torch.Tensor, topk_idx: torch.Tensor,
                            topk_weights: torch.Tensor, handle_id: torch.Tensor, buffer_id: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x [E_local, R*Tmax, H] bf16, grad_topk_weights [T, K] float32) of a low-latency combine: one low-latency
    dispatch and one low-latency combine (see _ll_combine_backward)."""
    handle = handle_of(handle_id)
    return _ll_combine_backward(_buffer(buffer_id), handle, grad_out.detach().to(torch.bfloat16).contiguous(),
                                x.detach(), topk_idx, topk_weights.detach())


@_op_ll_combine_backward.register_fake
def _(grad_out, x, topk_idx, topk_weights, handle_id, buffer_id):
    return x.new_empty(x.shape), topk_weights.new_empty(topk_weights.shape, dtype=torch.float32)


def _setup_ll_dispatch(ctx, inputs, output):
    x, topk_idx, buffer_id = inputs[:3]
    ctx.buffer_id = buffer_id
    ctx.save_for_backward(topk_idx, output[2])


def _backward_ll_dispatch(ctx, grad_recv_x, _grad_count, _grad_id):
    topk_idx, hid = ctx.saved_tensors
    ones = torch.ones(topk_idx.shape, dtype=torch.float32, device=topk_idx.device)
    grad_x = torch.ops.epcomm.low_latency_combine(grad_recv_x.to(torch.bfloat16).contiguous(), topk_idx, ones, hid,
                                                  ctx.buffer_id)
    return grad_x, None, None, None, None


_op_ll_dispatch.register_autograd(_backward_ll_dispatch, setup_context=_setup_ll_dispatch)


def _setup_ll_combine(ctx, inputs, output):
    x, topk_idx, topk_weights, handle_id, buffer_id = inputs
    ctx.buffer_id = buffer_id
    ctx.save_for_backward(x, topk_idx, topk_weights, handle_id)


def _backward_ll_combine(ctx, grad_out):
    x, topk_idx, topk_weights, hid = ctx.saved_tensors
    grad_x, grad_w = torch.ops.epcomm.low_latency_combine_backward(grad_out, x, topk_idx, topk_weights, hid,
                                                                   ctx.buffer_id)
    return grad_x, None, grad_w, None, None


_op_ll_combine.register_autograd(_backward_ll_combine, setup_context=_setup_ll_combine)


def low_latency_dispatch(buffer: Buffer, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int):
    """Low-latency dispatch as a custom op (bf16, no hook, no FP8; compiles without a graph break). Differentiable
    in x: the backward is a low-latency combine of the rows' gradient with unit weights.
    Returns (recv_x [E_local, R*Tmax, H] bf16, recv_count [E_local] int32, handle id tensor)."""
    return torch.ops.epcomm.low_latency_dispatch(x, topk_idx, register_buffer(buffer),
                                                 num_max_dispatch_tokens_per_rank, num_experts)


def low_latency_combine(buffer: Buffer, x, topk_idx, topk_weights, handle_id):
    """Low-latency combine as a custom op: [T, H] bf16. Differentiable in x and topk_weights (the backward is
    torch.ops.epcomm.low_latency_combine_backward: one low-latency dispatch and one low-latency combine)."""
    return torch.ops.epcomm.low_latency_combine(x, topk_idx, topk_weights, handle_id, register_buffer(buffer))
