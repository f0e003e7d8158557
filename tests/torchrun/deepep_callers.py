"""How four frameworks call DeepEP, written from their documented integration points (vLLM's deepep_ht / deepep_ll
all2all managers and prepare/finalize, SGLang's DeepEP dispatcher with a --deepep-config JSON, Megatron-Core's
fused_a2a autograd functions, torchtitan's DeepEP wrapper), against `deep_ep` names only. The one line that makes
them epcomm callers is the import below; everything else is what the DeepEP-calling code does: torch tensors, a
torch.distributed ProcessGroup, DeepEP's Config / EventOverlap / EventHandle, handles passed back unopened.

Each caller is device-neutral (tensors on `device`, "cpu" for the CPU backend, "cuda" on a GPU); the cases that
check the results against epcomm.reference are in dropin_check.py.
"""
from __future__ import annotations

import json
from typing import Optional

import torch

import epcomm as deep_ep                                     # the drop-in: was `import deep_ep`
from epcomm import Buffer, Config, EventHandle, EventOverlap  # was `from deep_ep import ...`


def hidden_bytes_of(x) -> int:
    """DeepEP's README: bytes per row for the size hints, at least 2 bytes per element (FP8 rows are sized as bf16)."""
    t = x[0] if isinstance(x, tuple) else x
    return t.size(1) * max(t.element_size(), 2)


# ---------------------------------------------------------------------------------------------------------------------
# DeepEP's README get_buffer pattern (Megatron-Core and torchtitan use it as is): one Buffer per process, reused
# unless the group changes or it is too small.
# ---------------------------------------------------------------------------------------------------------------------

_buffer: Optional[Buffer] = None


def get_buffer(group, hidden_bytes: int) -> Buffer:
    global _buffer
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    if (_buffer is None or _buffer.group != group or _buffer.num_nvl_bytes < num_nvl_bytes
            or _buffer.num_rdma_bytes < num_rdma_bytes):
        _buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)
    return _buffer


def drop_buffer() -> None:
    global _buffer
    _buffer = None


# ---------------------------------------------------------------------------------------------------------------------
# vLLM: the all2all manager owns one Buffer per kwargs (its handle cache); prepare dispatches, the experts run on the
# received rows, finalize combines. High-throughput (prefill) and low-latency (decode) managers.
# ---------------------------------------------------------------------------------------------------------------------

class VllmHighThroughput:
    def __init__(self, cpu_group, buffer_size_mb: int = 256, num_sms: int = 20):
        self.cpu_group = cpu_group
        self.buffer_size_mb = buffer_size_mb
        self.num_sms = num_sms
        self._cache: dict = {}

    def get_handle(self) -> Buffer:
        kwargs = dict(group=self.cpu_group, num_nvl_bytes=self.buffer_size_mb * 1024 * 1024, num_rdma_bytes=0,
                      low_latency_mode=False, num_qps_per_rank=1)
        key = tuple(sorted((k, id(v) if k == "group" else v) for k, v in kwargs.items()))
        if key not in self._cache:
            self._cache[key] = Buffer(**kwargs)
        return self._cache[key]

    def set_num_sms(self, num_sms: int) -> None:
        Buffer.set_num_sms(min(num_sms, self.num_sms))

    def prepare(self, a1, topk_weights, topk_ids, num_experts: int, async_prepare: bool = False):
        """a1: [T, H] bf16 or an FP8 (data, scales) pair. Returns (expert_x, expert_num_tokens, expert_topk_ids,
        expert_topk_weights, handle)."""
        buffer = self.get_handle()
        num_dispatchers = buffer.group_size
        previous_event = buffer.capture()
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
            buffer.get_dispatch_layout(topk_idx=topk_ids.to(torch.int64), num_experts=num_experts,
                                       previous_event=previous_event, async_finish=False,
                                       allocate_on_comm_stream=False)
        (expert_x, expert_topk_ids, expert_topk_weights, expert_num_tokens_per_expert_list, handle, event) = \
            buffer.dispatch(x=a1, handle=None, num_tokens_per_rank=num_tokens_per_rank,
                            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                            num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_ids.to(torch.int64),
                            topk_weights=topk_weights, expert_alignment=1,
                            config=Buffer.get_dispatch_config(num_dispatchers), previous_event=event,
                            async_finish=async_prepare, allocate_on_comm_stream=False)
        if async_prepare:
            event.current_stream_wait()
        expert_num_tokens = torch.tensor(expert_num_tokens_per_expert_list, dtype=torch.int32,
                                         device=expert_topk_ids.device)
        return expert_x, expert_num_tokens, expert_topk_ids, expert_topk_weights, handle

    def finalize(self, fused_expert_output, handle, async_finalize: bool = False):
        """fused_expert_output: [N, H] bf16, already weighted and summed over the rank's experts per row."""
        buffer = self.get_handle()
        combined_x, _, event = buffer.combine(x=fused_expert_output, handle=handle, topk_weights=None,
                                              config=Buffer.get_combine_config(buffer.group_size),
                                              previous_event=None, async_finish=async_finalize,
                                              allocate_on_comm_stream=False)
        if async_finalize:
            event.current_stream_wait()
        return combined_x

    def destroy(self):
        for buf in self._cache.values():
            buf.destroy()
        self._cache.clear()


class VllmLowLatency:
    def __init__(self, cpu_group, max_tokens_per_rank: int, hidden: int, num_experts: int):
        self.cpu_group = cpu_group
        self.max_tokens_per_rank, self.hidden, self.num_experts = max_tokens_per_rank, hidden, num_experts
        self._cache: dict = {}

    def get_handle(self) -> Buffer:
        num_ep_ranks = self.cpu_group.size()
        kwargs = dict(group=self.cpu_group, num_nvl_bytes=0,
                      num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(
                          num_max_dispatch_tokens_per_rank=self.max_tokens_per_rank, hidden=self.hidden,
                          num_ranks=num_ep_ranks, num_experts=self.num_experts),
                      low_latency_mode=True, num_qps_per_rank=self.num_experts // num_ep_ranks,
                      allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False)
        key = tuple(sorted((k, id(v) if k == "group" else v) for k, v in kwargs.items()))
        if key not in self._cache:
            self._cache[key] = Buffer(**kwargs)
        return self._cache[key]

    def prepare(self, a1, topk_ids, use_fp8: bool, round_scale: bool = False, use_ue8m0: bool = False):
        buffer = self.get_handle()
        expert_x, expert_num_tokens, handle, _, hook = buffer.low_latency_dispatch(
            a1, topk_ids.to(torch.int64), self.max_tokens_per_rank, self.num_experts, use_fp8=use_fp8,
            round_scale=round_scale, use_ue8m0=use_ue8m0, async_finish=False, return_recv_hook=True)
        hook()
        return expert_x, expert_num_tokens, handle

    def finalize(self, fused_expert_output, topk_weights, topk_ids, handle, output):
        buffer = self.get_handle()
        _, _, recv_hook = buffer.low_latency_combine(fused_expert_output, topk_ids.to(torch.int64), topk_weights,
                                                     handle, async_finish=False, zero_copy=False,
                                                     return_recv_hook=True, out=output)
        recv_hook()
        return output

    def destroy(self):
        for buf in self._cache.values():
            buf.destroy()
        self._cache.clear()


# ---------------------------------------------------------------------------------------------------------------------
# SGLang: a DeepEP config JSON (--deepep-config), one Buffer for normal and low-latency mode ("auto"), the normal
# dispatcher with async_finish and Buffer.capture(), expert_alignment for its grouped GEMM, then decode batches in
# low-latency mode after clean_low_latency_buffer.
# ---------------------------------------------------------------------------------------------------------------------

SGLANG_DEEPEP_CONFIG = json.dumps({
    "normal_dispatch": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 16, "num_max_nvl_chunked_recv_tokens": 256,
                        "num_max_rdma_chunked_send_tokens": 6, "num_max_rdma_chunked_recv_tokens": 128},
    "normal_combine": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 6, "num_max_nvl_chunked_recv_tokens": 256,
                       "num_max_rdma_chunked_send_tokens": 6, "num_max_rdma_chunked_recv_tokens": 128},
})


class SglangDeepEP:
    def __init__(self, group, hidden: int, num_experts: int, num_max_dispatch_tokens_per_rank: int,
                 deepep_config: str = SGLANG_DEEPEP_CONFIG, async_finish: bool = True, expert_alignment: int = 128):
        parsed = json.loads(deepep_config)
        self.normal_dispatch_config = Config(**parsed["normal_dispatch"])
        self.normal_combine_config = Config(**parsed["normal_combine"])
        self.group, self.hidden, self.num_experts = group, hidden, num_experts
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.async_finish, self.expert_alignment = async_finish, expert_alignment
        hidden_bytes = hidden * 2
        num_nvl_bytes = max(self.normal_dispatch_config.get_nvl_buffer_size_hint(hidden_bytes, group.size()),
                            self.normal_combine_config.get_nvl_buffer_size_hint(hidden_bytes, group.size()))
        num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, group.size(),
                                                               num_experts)
        self.buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True,
                             num_qps_per_rank=num_experts // group.size())
        self.handle = None

    def dispatch_normal(self, hidden_states, topk_idx, topk_weights):
        previous_event = Buffer.capture() if self.async_finish else None
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
            self.buffer.get_dispatch_layout(topk_idx, self.num_experts, previous_event=previous_event,
                                            async_finish=self.async_finish,
                                            allocate_on_comm_stream=previous_event is not None)
        (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, self.handle, event) = \
            self.buffer.dispatch(hidden_states, topk_idx=topk_idx, topk_weights=topk_weights,
                                 num_tokens_per_rank=num_tokens_per_rank,
                                 num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                                 is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                                 previous_event=previous_event, async_finish=self.async_finish,
                                 allocate_on_comm_stream=(previous_event is not None) and self.async_finish,
                                 expert_alignment=self.expert_alignment, config=self.normal_dispatch_config)
        if self.async_finish:
            event.current_stream_wait()
        return recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list

    def combine_normal(self, hidden_states):
        previous_event = Buffer.capture() if self.async_finish else None
        combined_x, _, event = self.buffer.combine(hidden_states, self.handle, async_finish=self.async_finish,
                                                   previous_event=previous_event,
                                                   allocate_on_comm_stream=previous_event is not None,
                                                   config=self.normal_combine_config)
        if self.async_finish:
            event.current_stream_wait()
        self.handle = None
        return combined_x

    def switch_to_low_latency(self):
        self.buffer.clean_low_latency_buffer(self.num_max_dispatch_tokens_per_rank, self.hidden, self.num_experts)

    def dispatch_low_latency(self, hidden_states, topk_idx, use_fp8: bool = True, return_recv_hook: bool = False):
        recv, masked_m, self.handle, event, hook = self.buffer.low_latency_dispatch(
            hidden_states, topk_idx, self.num_max_dispatch_tokens_per_rank, self.num_experts, use_fp8=use_fp8,
            async_finish=not return_recv_hook, return_recv_hook=return_recv_hook)
        if return_recv_hook:
            hook()
        else:
            event.current_stream_wait()
        return recv, masked_m

    def combine_low_latency(self, hidden_states, topk_idx, topk_weights, return_recv_hook: bool = False):
        combined, event, hook = self.buffer.low_latency_combine(hidden_states, topk_idx, topk_weights, self.handle,
                                                                async_finish=not return_recv_hook,
                                                                return_recv_hook=return_recv_hook)
        if return_recv_hook:
            hook()
        else:
            event.current_stream_wait()
        self.handle = None
        return combined


# ---------------------------------------------------------------------------------------------------------------------
# Megatron-Core fused_a2a: dispatch and combine as autograd functions over get_buffer(); the backward of a dispatch
# is a combine of the gradients, the backward of a combine is a cached dispatch with the saved handle.
# ---------------------------------------------------------------------------------------------------------------------

class FusedDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False,
                allocate_on_comm_stream=False):
        previous_event = EventOverlap(EventHandle()) if async_finish else None
        buffer = get_buffer(group, hidden_bytes_of(x))
        (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event) = \
            buffer.get_dispatch_layout(token_indices, num_experts, previous_event=previous_event,
                                       async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        (recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle, after_event) = \
            buffer.dispatch(x, topk_idx=token_indices, topk_weights=token_probs.float(),
                            num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                            previous_event=previous_event, async_finish=async_finish,
                            allocate_on_comm_stream=allocate_on_comm_stream)
        if async_finish:
            after_event.current_stream_wait()
        ctx.group, ctx.handle = group, handle
        ctx.async_finish, ctx.allocate_on_comm_stream = async_finish, allocate_on_comm_stream
        tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list)
        return recv_x, recv_token_indices, recv_token_probs, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle):
        buffer = get_buffer(ctx.group, hidden_bytes_of(grad_output))
        previous_event = EventOverlap(EventHandle()) if ctx.async_finish else None
        grad_x, grad_token_probs, after_event = buffer.combine(
            grad_output.contiguous(), ctx.handle, topk_weights=grad_token_probs.float(), previous_event=previous_event,
            async_finish=ctx.async_finish, allocate_on_comm_stream=ctx.allocate_on_comm_stream)
        if ctx.async_finish:
            after_event.current_stream_wait()
        return grad_x, None, grad_token_probs, None, None, None, None


class FusedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        previous_event = EventOverlap(EventHandle()) if async_finish else None
        buffer = get_buffer(group, hidden_bytes_of(x))
        combined_x, _, after_event = buffer.combine(x, handle=handle, async_finish=async_finish,
                                                    previous_event=previous_event,
                                                    allocate_on_comm_stream=allocate_on_comm_stream)
        if async_finish:
            after_event.current_stream_wait()
        ctx.handle, ctx.group = handle, group
        ctx.async_finish, ctx.allocate_on_comm_stream = async_finish, allocate_on_comm_stream
        return combined_x, None

    @staticmethod
    def backward(ctx, grad_output, previous_event=None):
        buffer = get_buffer(ctx.group, hidden_bytes_of(grad_output))
        grad_x, _, _, _, _, after_event = buffer.dispatch(grad_output.contiguous(), handle=ctx.handle,
                                                          previous_event=previous_event,
                                                          async_finish=ctx.async_finish,
                                                          allocate_on_comm_stream=ctx.allocate_on_comm_stream)
        if ctx.async_finish:
            after_event.current_stream_wait()
        return grad_x, None, None, None, None


def megatron_fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                            allocate_on_comm_stream=False):
    return FusedDispatch.apply(x.contiguous(), token_indices, token_probs, num_experts, group, async_finish,
                               allocate_on_comm_stream)


def megatron_fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    return FusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)


# ---------------------------------------------------------------------------------------------------------------------
# torchtitan: a DeepEP wrapper around get_buffer() that dispatches, permutes the received (row, expert) pairs into
# contiguous per-expert groups for a grouped GEMM (sizes from num_recv_tokens_per_expert_list), and undoes it before
# the combine; handles are kept by an integer id between the two halves.
# ---------------------------------------------------------------------------------------------------------------------

class TorchtitanDeepEP:
    def __init__(self, group, num_experts: int):
        self.group, self.num_experts = group, num_experts
        self._handles: dict[int, object] = {}
        self._next_id = 0

    def dispatch(self, x, selected_experts_indices, top_scores):
        buffer = get_buffer(self.group, hidden_bytes_of(x))
        topk_idx = selected_experts_indices.to(deep_ep.topk_idx_t)
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
            buffer.get_dispatch_layout(topk_idx, self.num_experts)
        recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=top_scores.float(), num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert)
        handle_id = self._next_id
        self._next_id += 1
        self._handles[handle_id] = handle
        # Permute: one row per (received row, local expert) pair, grouped by expert, for the grouped GEMM.
        rows, ks = torch.nonzero(recv_topk_idx >= 0, as_tuple=True)
        experts = recv_topk_idx[rows, ks]
        order = torch.argsort(experts * recv_topk_idx.size(0) + rows, stable=True)
        permuted = recv_x[rows[order]]
        group_sizes = torch.bincount(experts, minlength=len(num_recv_tokens_per_expert_list))
        state = dict(rows=rows[order], ks=ks[order], weights=recv_topk_weights[rows[order], ks[order]],
                     num_rows=recv_x.size(0))
        return permuted, group_sizes, num_recv_tokens_per_expert_list, state, handle_id

    def combine(self, expert_out, state, handle_id):
        """expert_out: [pairs, H] in the permuted order; unpermute with the routing weights, then combine."""
        handle = self._handles.pop(handle_id)
        weighted = expert_out.float() * state["weights"][:, None]
        rows_out = torch.zeros(state["num_rows"], expert_out.size(1), dtype=torch.float32, device=expert_out.device)
        rows_out.index_add_(0, state["rows"], weighted)
        buffer = get_buffer(self.group, hidden_bytes_of(expert_out))
        combined, _, _ = buffer.combine(rows_out.to(torch.bfloat16), handle)
        return combined
