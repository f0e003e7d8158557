"""Internode normal mode, the plan (pure data; no kernels yet, nothing registered): the RDMA (NVSHMEM symmetric) and
NVLink buffer layouts of docs/internode.md, their exact size hints, the per-leg byte counts of a routing, and
InternodeTuning. Nodes are groups of G consecutive ranks; a token crosses between nodes once per destination node, to
the rank with its local index there (its RDMA peer, the "forwarder"), which fans it out over NVLink."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import intranode as intra
from .errors import ConfigError

MAX_LOCAL_EXPERTS = intra.MAX_LOCAL_EXPERTS   # per-expert counts travel in fixed [.., MAX_LOCAL_EXPERTS] slots
MAX_CHUNKS = 1024          # chunk flags per remote block: a chunk is at least ceil(capacity_rows / MAX_CHUNKS) rows
NUM_NODE_FLAG_KINDS = 2    # RDMA per-node flags: kRdmaNotify 0 | kRdmaCombineReady 1
NUM_NVL_FLAG_KINDS = 4     # NVLink per-forwarder flags: kNotify 0 | kDispatchDone 1 | kCombineReady 2 | kCombineDone 3
DATA_ALIGN = 256           # every data array starts on this boundary
META_ALIGN = 128
PAGE = 4096
PUT_BYTES_TARGET = 64 * 1024   # the default chunk puts at least this many bytes (a NIC is near its peak from ~64 KiB)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def check_nodes(num_ranks: int, num_ranks_per_node: int) -> int:
    """The number of nodes Rn = R / G (at least 2: one node is the intranode family's)."""
    if not isinstance(num_ranks_per_node, int) or num_ranks_per_node < 1 or num_ranks % num_ranks_per_node:
        raise ConfigError(f"num_ranks_per_node: expected a positive divisor of num_ranks={num_ranks}, "
                          f"got {num_ranks_per_node!r}")
    num_nodes = num_ranks // num_ranks_per_node
    if num_nodes < 2:
        raise ConfigError(f"num_ranks_per_node: the internode family needs at least 2 nodes, got {num_nodes} "
                          f"({num_ranks} ranks of {num_ranks_per_node})")
    return num_nodes


def remote_block(my_node: int, other_node: int, num_nodes: int) -> int:
    """Index in [0, Rn - 1) of the RDMA data block that holds the rows exchanged with other_node: blocks are kept for
    remote nodes only, counted from the next node on (the same rule at both ends of a leg)."""
    if other_node == my_node:
        raise ConfigError(f"other_node: expected a node other than {my_node}")
    return (other_node - my_node) % num_nodes - 1


# -- RDMA (NVSHMEM symmetric) buffer: fixed meta area, then a data region used by one phase at a time ---------------
@dataclass(frozen=True)
class RdmaMeta:
    """Offsets of the RDMA buffer's meta area (fixed for the Buffer: depends on R and G only), at rank f = (node m,
    local l). Rn = R / G.

    counts [2][Rn][G + 1] int32: [p][n] = from the RDMA peer (n, l): its tokens for each rank of node m, then its tokens
        for node m (rows in its block); p = dispatch epoch & 1. Slot n = m is written by f itself.
    expert_counts [2][Rn][G][MAX_LOCAL_EXPERTS] int32: [p][n][g][j] = tokens of (n, l) for local expert j of rank (m, g).
    node_flags [NUM_NODE_FLAG_KINDS][Rn] u64: epochs signalled by the RDMA peer on node n (notify, combine-ready).
    dispatch_chunk_flags [Rn - 1][MAX_CHUNKS] u64: [b][c] = dispatch epoch once chunk c of remote block b has landed.
    combine_chunk_flags [Rn - 1][MAX_CHUNKS] u64: the same for combine's partial rows (combine epoch).
    """
    num_nodes: int
    num_ranks_per_node: int
    off_counts: int
    off_expert_counts: int
    off_node_flags: int
    off_dispatch_chunk_flags: int
    off_combine_chunk_flags: int
    meta_bytes: int

    @staticmethod
    def plan(num_ranks: int, num_ranks_per_node: int) -> "RdmaMeta":
        rn, g = check_nodes(num_ranks, num_ranks_per_node), num_ranks_per_node
        off_counts = 0
        off_expert_counts = _align(off_counts + 2 * rn * (g + 1) * 4, META_ALIGN)
        off_node_flags = _align(off_expert_counts + 2 * rn * g * MAX_LOCAL_EXPERTS * 4, META_ALIGN)
        off_dispatch_chunk_flags = _align(off_node_flags + NUM_NODE_FLAG_KINDS * rn * 8, META_ALIGN)
        off_combine_chunk_flags = _align(off_dispatch_chunk_flags + (rn - 1) * MAX_CHUNKS * 8, META_ALIGN)
        meta = _align(off_combine_chunk_flags + (rn - 1) * MAX_CHUNKS * 8, PAGE)
        return RdmaMeta(rn, g, off_counts, off_expert_counts, off_node_flags, off_dispatch_chunk_flags,
                        off_combine_chunk_flags, meta)

    def regions(self) -> list[tuple[str, int, int]]:
        """(name, begin, end) of every array, for overlap checks."""
        rn, g = self.num_nodes, self.num_ranks_per_node
        return [("counts", self.off_counts, self.off_counts + 2 * rn * (g + 1) * 4),
                ("expert_counts", self.off_expert_counts, self.off_expert_counts + 2 * rn * g * MAX_LOCAL_EXPERTS * 4),
                ("node_flags", self.off_node_flags, self.off_node_flags + NUM_NODE_FLAG_KINDS * rn * 8),
                ("dispatch_chunk_flags", self.off_dispatch_chunk_flags,
                 self.off_dispatch_chunk_flags + (rn - 1) * MAX_CHUNKS * 8),
                ("combine_chunk_flags", self.off_combine_chunk_flags,
                 self.off_combine_chunk_flags + (rn - 1) * MAX_CHUNKS * 8)]


@dataclass(frozen=True)
class RdmaMessage:
    """One dispatch row as it crosses between nodes (one put carries whole messages), byte offsets in the message:
    x [hidden_bytes] | scales [S] f32 | topk_idx [K] int32 (global expert ids, -1) | topk_weights [K] f32 |
    src_idx int32 | nvl_pos [G] int32 (the token's row among the source's rows for each rank of the destination node,
    send_pos[t, d]; -1 where it does not go). stride: 16-byte aligned."""
    off_x: int
    off_scales: int
    off_idx: int
    off_w: int
    off_src: int
    off_pos: int
    stride: int

    @staticmethod
    def plan(hidden_bytes: int, num_scales: int, num_topk: int, num_ranks_per_node: int) -> "RdmaMessage":
        if hidden_bytes % 16:
            raise ConfigError(f"hidden_bytes: expected a multiple of 16, got {hidden_bytes}")
        off_scales = hidden_bytes
        off_idx = off_scales + 4 * num_scales
        off_w = off_idx + 4 * num_topk
        off_src = off_w + 4 * num_topk
        off_pos = off_src + 4
        return RdmaMessage(0, off_scales, off_idx, off_w, off_src, off_pos,
                           _align(off_pos + 4 * num_ranks_per_node, 16))


@dataclass(frozen=True)
class PartialRow:
    """One combine partial (the fp32 sum of a node's rows of a token) as it crosses back:
    topk_weights [K] f32 | (to 16) row [H] f32. stride: 16-byte aligned."""
    off_w: int
    off_x: int
    stride: int

    @staticmethod
    def plan(hidden: int, num_topk: int) -> "PartialRow":
        off_x = _align(4 * num_topk, 16)
        return PartialRow(0, off_x, _align(off_x + 4 * hidden, 16))


@dataclass(frozen=True)
class RdmaLayout:
    """One phase's use of the RDMA data region (dispatch messages or combine partials): a send (staging) area and a
    receive area, each [Rn - 1 remote blocks][capacity_rows] slots of `stride` bytes. Offsets are relative to the data
    region (which starts at RdmaMeta.meta_bytes).

    dispatch at source s (node n): send[remote_block(n, m)][node_pos[t, m]] = s's message for node m; the put lands at
        recv[remote_block(m, n)][node_pos[t, m]] of the RDMA peer (m, local(s)).
    combine at forwarder f (node m): send[remote_block(m, n)][i] = the partial of row i that f received from (n, l);
        the put lands at recv[remote_block(n, m)][i] of (n, l), i = node_pos[t, m] there.
    """
    num_blocks: int
    capacity_rows: int
    stride: int
    off_send: int
    off_recv: int

    @staticmethod
    def plan(data_bytes: int, num_nodes: int, stride: int) -> "RdmaLayout":
        blocks = num_nodes - 1
        if blocks < 1:
            raise ConfigError(f"num_nodes: expected at least 2, got {num_nodes}")
        cap = max(0, (data_bytes - 2 * DATA_ALIGN) // (2 * blocks * stride))
        off_recv = _align(blocks * cap * stride, DATA_ALIGN)
        assert off_recv + blocks * cap * stride <= data_bytes
        return RdmaLayout(blocks, cap, stride, 0, off_recv)

    def send_offset(self, block: int, row: int) -> int:
        return self.off_send + (block * self.capacity_rows + row) * self.stride

    def recv_offset(self, block: int, row: int) -> int:
        return self.off_recv + (block * self.capacity_rows + row) * self.stride

    def end(self) -> int:
        return self.off_recv + self.num_blocks * self.capacity_rows * self.stride


def _rdma_data_bytes(rows: int, num_nodes: int, stride: int) -> int:
    """The smallest data region whose RdmaLayout holds `rows` rows per block (exact inverse of RdmaLayout.plan)."""
    return 2 * (num_nodes - 1) * rows * stride + 2 * DATA_ALIGN


def rdma_buffer_size_hint(num_max_tokens: int, hidden_bytes: int, num_ranks: int, num_ranks_per_node: int,
                          num_topk: int = 16) -> int:
    """Bytes of RDMA buffer for the worst case: a source sends all num_max_tokens tokens to every other node (a full
    block per remote node), for the dispatch message of hidden_bytes (bf16 2H; FP8 rows, hidden H plus H / 128 scales,
    are smaller) and for combine's fp32 partials of hidden = hidden_bytes // 2. Dispatch and combine use the data region
    in turn, so it is the larger of the two, after the fixed meta area."""
    num_nodes = check_nodes(num_ranks, num_ranks_per_node)
    hidden = max(hidden_bytes // 2, 128)
    msg = RdmaMessage.plan(hidden_bytes, hidden // 128, num_topk, num_ranks_per_node).stride
    part = PartialRow.plan(hidden, num_topk).stride
    data = _rdma_data_bytes(num_max_tokens, num_nodes, max(msg, part))
    return RdmaMeta.plan(num_ranks, num_ranks_per_node).meta_bytes + _align(data, PAGE)


# -- NVLink buffer: fixed meta area (node-sized), then intranode's RecvLayout / CombineLayout in turn ----------------
@dataclass(frozen=True)
class NvlMeta:
    """Offsets of the NVLink buffer's meta area at rank d = (node m, local g), written by the node's forwarders
    (G of them, local index l = the local index of the sources they forward for):

    counts [2][G][Rn][G] int32: [p][l][n][g'] = tokens source (n, l) sends to rank (m, g'), gathered by forwarder l
        from its RDMA counts; every rank of the node then holds the [R][G] matrix of its node's columns.
    expert_counts [2][G][MAX_LOCAL_EXPERTS] int32: [p][l][j] = tokens for d's local expert j from the Rn sources of
        forwarder l (summed by it).
    flags [NUM_NVL_FLAG_KINDS][G] u64: epochs from each node peer (notify, dispatch-done, combine-ready, combine-done).
    """
    num_nodes: int
    num_ranks_per_node: int
    off_counts: int
    off_expert_counts: int
    off_flags: int
    meta_bytes: int

    @staticmethod
    def plan(num_ranks: int, num_ranks_per_node: int) -> "NvlMeta":
        rn, g = check_nodes(num_ranks, num_ranks_per_node), num_ranks_per_node
        off_expert_counts = _align(2 * g * rn * g * 4, META_ALIGN)
        off_flags = _align(off_expert_counts + 2 * g * MAX_LOCAL_EXPERTS * 4, META_ALIGN)
        meta = _align(off_flags + NUM_NVL_FLAG_KINDS * g * 8, PAGE)
        return NvlMeta(rn, g, 0, off_expert_counts, off_flags, meta)

    def regions(self) -> list[tuple[str, int, int]]:
        rn, g = self.num_nodes, self.num_ranks_per_node
        return [("counts", self.off_counts, self.off_counts + 2 * g * rn * g * 4),
                ("expert_counts", self.off_expert_counts, self.off_expert_counts + 2 * g * MAX_LOCAL_EXPERTS * 4),
                ("flags", self.off_flags, self.off_flags + NUM_NVL_FLAG_KINDS * g * 8)]


def nvl_buffer_size_hint(num_max_tokens: int, hidden_bytes: int, num_ranks: int, num_ranks_per_node: int,
                         num_topk: int = 16, zero_copy: bool = False) -> int:
    """Bytes of NVLink buffer for the worst case: every rank of every node sends all num_max_tokens tokens to this
    rank (R * T rows at their final rows, as on one node: the data region is intranode's RecvLayout / CombineLayout,
    written by the G forwarders), after the node-sized meta area. zero_copy: dispatch outputs and combine staging
    side by side (intranode.zero_copy_split)."""
    area = (intra.nvl_buffer_size_hint(num_max_tokens, hidden_bytes, num_ranks, num_topk, zero_copy)
            - intra.meta_bytes(num_ranks))
    return NvlMeta.plan(num_ranks, num_ranks_per_node).meta_bytes + area


# -- tuning -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InternodeTuning:
    """How the internode kernels cut their RDMA traffic (results are identical for every setting).

    rdma_chunk_tokens: rows per put (and per chunk flag) on the cross-node legs; None: enough rows for
        PUT_BYTES_TARGET bytes. Larger chunks mean fewer NVSHMEM operations (what limits a proxy transport), smaller
        ones let the forwarder start earlier. Always raised to ceil(capacity_rows / MAX_CHUNKS) (the flag slots).
    rdma_send_sms: dispatch's SMs that stage and put rows to other nodes (the rest forward over NVLink); None: the
        launcher's default.
    Change it with Buffer.set_tuning("internode", **changes) (once the family is wired in).
    """
    rdma_chunk_tokens: int | None = None
    rdma_send_sms: int | None = None

    def __post_init__(self):
        for name in ("rdma_chunk_tokens", "rdma_send_sms"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"InternodeTuning.{name}: expected None or an int >= 1, got {v!r}")

    def chunk_tokens(self, stride: int, capacity_rows: int) -> int:
        """Rows per chunk for rows of `stride` bytes in blocks of capacity_rows."""
        rows = self.rdma_chunk_tokens or max(1, -(-PUT_BYTES_TARGET // stride))
        return max(rows, -(-capacity_rows // MAX_CHUNKS), 1)


def default_tuning(num_ranks: int) -> InternodeTuning:
    return InternodeTuning()


# -- one call's plan -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InternodePlan:
    """Everything one dispatch / combine pair addresses, the same on every rank (every rank passes the same shapes).

    rdma_meta / nvl_meta: the fixed meta areas. message / partial: row formats on the cross-node legs.
    rdma_dispatch / rdma_combine: RdmaLayouts of the RDMA data region (offsets from rdma_meta.meta_bytes).
    nvl_recv / nvl_combine: intranode.RecvLayout / CombineLayout of the NVLink data region (from nvl_meta.meta_bytes).
    dispatch_chunk / combine_chunk: rows per put on the cross-node legs.
    """
    rdma_meta: RdmaMeta
    nvl_meta: NvlMeta
    message: RdmaMessage
    partial: PartialRow
    rdma_dispatch: RdmaLayout
    rdma_combine: RdmaLayout
    nvl_recv: intra.RecvLayout
    nvl_combine: intra.CombineLayout
    dispatch_chunk: int
    combine_chunk: int

    @staticmethod
    def plan(num_rdma_bytes: int, num_nvl_bytes: int, num_ranks: int, num_ranks_per_node: int, hidden: int,
             hidden_bytes: int, num_scales: int, num_topk: int, tuning: InternodeTuning | None = None,
             zero_copy: bool = False) -> "InternodePlan":
        tuning = tuning or InternodeTuning()
        rmeta = RdmaMeta.plan(num_ranks, num_ranks_per_node)
        nmeta = NvlMeta.plan(num_ranks, num_ranks_per_node)
        rdata = num_rdma_bytes - rmeta.meta_bytes
        ndata = num_nvl_bytes - nmeta.meta_bytes
        if rdata <= 0 or ndata <= 0:
            raise ConfigError(f"num_rdma_bytes={num_rdma_bytes} / num_nvl_bytes={num_nvl_bytes}: expected more than "
                              f"the meta areas ({rmeta.meta_bytes} / {nmeta.meta_bytes} bytes)")
        msg = RdmaMessage.plan(hidden_bytes, num_scales, num_topk, num_ranks_per_node)
        part = PartialRow.plan(hidden, num_topk)
        rd = RdmaLayout.plan(rdata, rmeta.num_nodes, msg.stride)
        rc = RdmaLayout.plan(rdata, rmeta.num_nodes, part.stride)
        split = intra.zero_copy_split(ndata) if zero_copy else ndata
        recv = intra.RecvLayout.plan(split, hidden_bytes, num_scales, num_topk)
        comb = intra.CombineLayout.plan(ndata, hidden, num_topk, base=split if zero_copy else 0)
        return InternodePlan(rmeta, nmeta, msg, part, rd, rc, recv, comb,
                             tuning.chunk_tokens(msg.stride, rd.capacity_rows),
                             tuning.chunk_tokens(part.stride, rc.capacity_rows))


# -- what each leg carries ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LegBytes:
    """What one dispatch and its combine move, per leg, for a routing (docs/internode.md, "Bytes per leg").

    rdma_rows [R, Rn] int64: [s, n] = rows source s sends to node n != node(s) (one per token with an expert there;
        0 on its own node). The same rows come back in combine, one partial each.
    nvl_rows [R, R] int64: [f, d] = rows forwarder f stores into rank d's NVLink buffer (d != f, same node); combine
        reads the same rows back over NVLink (f pulls from d).
    local_rows [R] int64: rows whose forwarder is their destination (copied in HBM, never on a link).
    row_bytes, message_bytes, nvl_row_bytes, combine_nvl_row_bytes, partial_bytes: bytes per row of each leg.
    """
    num_ranks_per_node: int
    rdma_rows: np.ndarray
    nvl_rows: np.ndarray
    local_rows: np.ndarray
    row_bytes: int               # x payload + scales (DeepEP's accounting unit)
    message_bytes: int           # a dispatch message as put (RdmaMessage.stride)
    nvl_row_bytes: int           # dispatch row into the NVLink receive area: x, scales, int64 top-k, weights, src
    combine_nvl_row_bytes: int   # a bf16 row and its weights pulled over NVLink
    partial_bytes: int           # a combine partial as put (PartialRow.stride)

    @property
    def num_rdma_rows(self) -> int:
        return int(self.rdma_rows.sum())

    @property
    def num_nvl_rows(self) -> int:
        return int(self.nvl_rows.sum())

    def dispatch_rdma_bytes(self) -> int:
        return self.num_rdma_rows * self.message_bytes

    def dispatch_nvl_bytes(self) -> int:
        return self.num_nvl_rows * self.nvl_row_bytes

    def combine_rdma_bytes(self) -> int:
        return self.num_rdma_rows * self.partial_bytes

    def combine_nvl_bytes(self) -> int:
        return self.num_nvl_rows * self.combine_nvl_row_bytes

    def rdma_rows_received(self) -> np.ndarray:
        """[R] rows each rank receives over RDMA in dispatch (as forwarder) = partials it sends in combine."""
        g = self.num_ranks_per_node
        r, rn = self.rdma_rows.shape
        out = np.zeros(r, np.int64)
        for s in range(r):
            for n in range(rn):
                out[n * g + s % g] += self.rdma_rows[s, n]
        return out

    def num_puts(self, dispatch_chunk: int, combine_chunk: int) -> dict:
        """NVSHMEM operations of one dispatch and one combine: data puts (one per chunk, each with its chunk flag),
        notify's count put per remote node (with its flag), combine-ready signals per remote node."""
        rows = self.rdma_rows
        rn = rows.shape[1]
        remote = rows.shape[0] * (rn - 1)
        return {"dispatch_data": int((-(-rows // dispatch_chunk)).sum()), "notify": remote,
                "combine_data": int((-(-rows // combine_chunk)).sum()), "combine_ready": remote}


def leg_bytes(is_token_in_ranks: list, num_ranks_per_node: int, hidden: int, hidden_bytes: int, num_scales: int = 0,
              num_topk: int = 0) -> LegBytes:
    """Rows and bytes per leg for a routing: is_token_in_ranks[s] = source s's [T_s, R] bool (get_dispatch_layout).
    hidden_bytes: bytes of a dispatched row (bf16 2H, FP8 H with num_scales = H / 128); combine rows are bf16."""
    r = len(is_token_in_ranks)
    g = num_ranks_per_node
    rn = check_nodes(r, g)
    rdma_rows = np.zeros((r, rn), np.int64)
    nvl_rows = np.zeros((r, r), np.int64)
    local_rows = np.zeros(r, np.int64)
    for s, in_rank in enumerate(is_token_in_ranks):
        in_rank = np.asarray(in_rank, bool).reshape(-1, rn, g)
        per_node = in_rank.any(axis=2).sum(axis=0)          # [Rn] tokens of s with an expert on node n
        per_rank = in_rank.sum(axis=0)                       # [Rn, G] tokens of s for rank (n, g)
        per_node[s // g] = 0
        rdma_rows[s] = per_node
        for n in range(rn):
            f = n * g + s % g                                # s's forwarder on node n (s itself on its own node)
            for gg in range(g):
                d = n * g + gg
                if d == f:
                    local_rows[d] += per_rank[n, gg]
                else:
                    nvl_rows[f, d] += per_rank[n, gg]
    msg = RdmaMessage.plan(hidden_bytes, num_scales, num_topk, g)
    return LegBytes(g, rdma_rows, nvl_rows, local_rows, hidden_bytes + 4 * num_scales, msg.stride,
                    hidden_bytes + 4 * num_scales + 12 * num_topk + 4, 2 * hidden + 4 * num_topk,
                    PartialRow.plan(hidden, num_topk).stride)
