"""Host-side planning of the internode family (no GPU, no kernels yet): the RDMA and NVLink buffer layouts of
docs/internode.md (alignment, no overlap, exact worst-case size hints) and the rows / bytes each leg carries for a
routing, against a brute-force count from epcomm.reference's messages."""
from __future__ import annotations

import numpy as np
import pytest

from epcomm import internode as it
from epcomm import reference as ref
from epcomm.errors import ConfigError
from epcomm.testing import make_rank_inputs

LAYOUTS = [(2, 1), (2, 2), (2, 4), (4, 2)]            # (nodes, ranks per node)
BIG_LAYOUTS = LAYOUTS + [(2, 8), (4, 8), (8, 8)]


def _disjoint(regions, limit):
    spans = sorted((b, e, name) for name, b, e in regions)
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        assert e0 <= b1, (n0, n1)
    assert spans[0][0] >= 0 and spans[-1][1] <= limit


@pytest.mark.parametrize("nodes,g", BIG_LAYOUTS)
def test_meta_areas_are_aligned_and_disjoint(nodes, g):
    r = nodes * g
    rm, nm = it.RdmaMeta.plan(r, g), it.NvlMeta.plan(r, g)
    for meta in (rm, nm):
        assert meta.meta_bytes % it.PAGE == 0
        assert all(b % it.META_ALIGN == 0 for _, b, _ in meta.regions())
        _disjoint(meta.regions(), meta.meta_bytes)


@pytest.mark.parametrize("nodes,g", BIG_LAYOUTS)
@pytest.mark.parametrize("hidden,fp8,topk", [(7168, True, 8), (7168, False, 8), (4096, False, 1), (2560, True, 16)])
def test_row_formats_are_aligned_and_disjoint(nodes, g, hidden, fp8, topk):
    hb, s = (hidden, hidden // 128) if fp8 else (2 * hidden, 0)
    m = it.RdmaMessage.plan(hb, s, topk, g)
    assert m.stride % 16 == 0
    _disjoint([("x", m.off_x, m.off_x + hb), ("scales", m.off_scales, m.off_scales + 4 * s),
               ("idx", m.off_idx, m.off_idx + 4 * topk), ("w", m.off_w, m.off_w + 4 * topk),
               ("src", m.off_src, m.off_src + 4), ("pos", m.off_pos, m.off_pos + 4 * g)], m.stride)
    assert m.off_scales % 4 == 0 and m.off_src % 4 == 0
    p = it.PartialRow.plan(hidden, topk)
    assert p.stride % 16 == 0 and p.off_x % 16 == 0
    _disjoint([("w", p.off_w, p.off_w + 4 * topk), ("x", p.off_x, p.off_x + 4 * hidden)], p.stride)


@pytest.mark.parametrize("nodes,g", BIG_LAYOUTS)
def test_rdma_layout_blocks_are_aligned_disjoint_and_inside(nodes, g):
    for data, stride in ((1 << 20, 7504), ((1 << 24) + 12345, 28704), (4096, 16)):
        lay = it.RdmaLayout.plan(data, nodes, stride)
        assert lay.num_blocks == nodes - 1
        assert lay.off_send % it.DATA_ALIGN == 0 and lay.off_recv % it.DATA_ALIGN == 0
        size = lay.num_blocks * lay.capacity_rows * stride
        _disjoint([("send", lay.off_send, lay.off_send + size), ("recv", lay.off_recv, lay.off_recv + size)], data)
        if lay.capacity_rows:
            last = lay.recv_offset(lay.num_blocks - 1, lay.capacity_rows - 1) + stride
            assert last == lay.end() <= data


@pytest.mark.parametrize("nodes", [2, 3, 4, 8])
def test_remote_blocks_number_the_other_nodes(nodes):
    for m in range(nodes):
        blocks = sorted(it.remote_block(m, n, nodes) for n in range(nodes) if n != m)
        assert blocks == list(range(nodes - 1))
    with pytest.raises(ConfigError):
        it.remote_block(1, 1, nodes)


def test_one_node_is_refused():
    with pytest.raises(ConfigError, match="at least 2 nodes"):
        it.rdma_buffer_size_hint(128, 256, 4, 4)
    with pytest.raises(ConfigError, match="divisor"):
        it.RdmaMeta.plan(6, 4)


def test_size_hints_grow_with_their_inputs():
    base = dict(num_max_tokens=1024, hidden_bytes=4096, num_ranks=8, num_ranks_per_node=4, num_topk=8)
    for hint in (it.rdma_buffer_size_hint, it.nvl_buffer_size_hint):
        b = hint(**base)
        for key, bigger in (("num_max_tokens", 2048), ("hidden_bytes", 8192), ("num_topk", 16)):
            assert hint(**{**base, key: bigger}) > b, (hint.__name__, key)
        assert hint(**{**base, "num_ranks": 16}) > b            # more nodes (G fixed)
    # The RDMA buffer grows with the number of remote nodes, not with ranks per node beyond the meta area.
    assert it.rdma_buffer_size_hint(1024, 4096, 16, 4, 8) > it.rdma_buffer_size_hint(1024, 4096, 8, 4, 8)
    assert it.nvl_buffer_size_hint(1024, 4096, 8, 4, 8, zero_copy=True) > it.nvl_buffer_size_hint(1024, 4096, 8, 4, 8)


def _plan(t, hidden, fp8, topk, nodes, g, zero_copy=False, rdma_bytes=None):
    r = nodes * g
    hb = 2 * hidden
    rdma = it.rdma_buffer_size_hint(t, hb, r, g, topk) if rdma_bytes is None else rdma_bytes
    nvl = it.nvl_buffer_size_hint(t, hb, r, g, topk, zero_copy=zero_copy)
    row_bytes, scales = (hidden, hidden // 128) if fp8 else (hb, 0)
    return it.InternodePlan.plan(rdma, nvl, r, g, hidden, row_bytes, scales, topk, zero_copy=zero_copy)


@pytest.mark.parametrize("nodes,g", BIG_LAYOUTS)
@pytest.mark.parametrize("t,hidden,topk", [(4096, 7168, 8), (1, 256, 1), (333, 2560, 16)])
@pytest.mark.parametrize("fp8", [False, True])
def test_size_hints_cover_the_worst_case(nodes, g, t, hidden, fp8, topk):
    """Every token of every rank to one node fills a whole RDMA block per remote source (T rows); every token of every
    rank to one rank puts R * T rows into its NVLink receive area; combine stages as many and sends T partials."""
    r = nodes * g
    for zero_copy in (False, True):
        p = _plan(t, hidden, fp8, topk, nodes, g, zero_copy)
        assert p.rdma_dispatch.capacity_rows >= t and p.rdma_combine.capacity_rows >= t
        assert p.nvl_recv.capacity_rows >= r * t and p.nvl_combine.capacity_rows >= r * t
        assert -(-p.rdma_dispatch.capacity_rows // p.dispatch_chunk) <= it.MAX_CHUNKS
        assert -(-p.rdma_combine.capacity_rows // p.combine_chunk) <= it.MAX_CHUNKS
        assert p.rdma_dispatch.end() <= p.rdma_meta.meta_bytes + it.rdma_buffer_size_hint(t, 2 * hidden, r, g, topk)


@pytest.mark.parametrize("nodes,g", BIG_LAYOUTS)
@pytest.mark.parametrize("t,hidden,topk", [(4096, 7168, 8), (100, 256, 3)])
def test_rdma_hint_is_exact(nodes, g, t, hidden, topk):
    """A page less than the hint no longer holds T rows per block (for the wider of message and partial)."""
    r = nodes * g
    hint = it.rdma_buffer_size_hint(t, 2 * hidden, r, g, topk)
    small = _plan(t, hidden, False, topk, nodes, g, rdma_bytes=hint - it.PAGE)
    assert min(small.rdma_dispatch.capacity_rows, small.rdma_combine.capacity_rows) < t


def _brute_force_legs(is_token_in_ranks, g):
    """Rows per leg by walking every (source, token, destination) of the reference's dispatch messages."""
    r = len(is_token_in_ranks)
    rn = r // g
    rdma = np.zeros((r, rn), np.int64)
    nvl = np.zeros((r, r), np.int64)
    local = np.zeros(r, np.int64)
    for s, in_rank in enumerate(is_token_in_ranks):
        t = in_rank.shape[0]
        msgs = ref.dispatch_send(np.zeros((t, 16), ref.bf16), None, None, in_rank)
        crossing = set()
        for d, msg in enumerate(msgs):
            f = (d // g) * g + s % g
            for tok in msg.src_idx.tolist():
                if d // g != s // g:
                    crossing.add((tok, d // g))
                if d == f:
                    local[d] += 1
                else:
                    nvl[f, d] += 1
        for _, n in crossing:
            rdma[s, n] += 1
    return rdma, nvl, local


def _routings(nodes, g, seed):
    """(name, tokens per rank, [topk_idx per rank], num_experts): uniform, unequal counts, skewed."""
    r = nodes * g
    e = 8 * r
    rng = np.random.default_rng(seed)
    tokens = [0, 1] + [int(x) for x in rng.integers(2, 300, r - 2)]
    out = []
    _, idxs, _ = make_rank_inputs(seed, tokens, 16, 4, e)
    out.append(("uniform-unequal", tokens, idxs, e))
    _, idxs, _ = make_rank_inputs(seed + 1, [64] * r, 16, 6, e, drop=0.4)
    out.append(("dropped", [64] * r, idxs, e))
    _, idxs, _ = make_rank_inputs(seed + 2, [50] * r, 16, 3, e, skew="one_expert")   # everything to rank 0
    out.append(("one-rank", [50] * r, idxs, e))
    # Every token to node nodes - 1 only (another node receives nothing).
    node_experts = np.arange((nodes - 1) * g * 8, nodes * g * 8)
    idxs = [node_experts[np.argsort(rng.random((40, len(node_experts))), axis=1)[:, :4]].astype(np.int64)
            for _ in range(r)]
    out.append(("one-node", [40] * r, idxs, e))
    _, idxs, _ = make_rank_inputs(seed + 3, [80] * r, 16, 5, e, skew=f"avoid_rank:{r}:{r - 1}")
    out.append(("avoid-last-rank", [80] * r, idxs, e))
    return out


@pytest.mark.parametrize("nodes,g", LAYOUTS)
def test_leg_bytes_match_a_brute_force_count(nodes, g):
    r = nodes * g
    for name, tokens, idxs, e in _routings(nodes, g, seed=10 * nodes + g):
        layouts = [ref.get_dispatch_layout(idx, e, r, nodes) for idx in idxs]
        in_ranks = [lay[3] for lay in layouts]
        legs = it.leg_bytes(in_ranks, g, hidden=7168, hidden_bytes=7168, num_scales=56, num_topk=idxs[0].shape[1])
        rdma, nvl, local = _brute_force_legs(in_ranks, g)
        assert np.array_equal(legs.rdma_rows, rdma), name
        assert np.array_equal(legs.nvl_rows, nvl), name
        assert np.array_equal(legs.local_rows, local), name
        for s, (per_rank, per_rdma, _, _) in enumerate(layouts):
            # One row per (token, destination node): DeepEP's num_tokens_per_rdma_rank, less the own node.
            want = per_rdma.astype(np.int64).copy()
            want[s // g] = 0
            assert np.array_equal(legs.rdma_rows[s], want), (name, s)
        # Every received row arrives exactly once, over NVLink or from its own forwarder.
        received = np.sum([lay[0] for lay in layouts], axis=0)
        assert np.array_equal(legs.nvl_rows.sum(axis=0) + legs.local_rows, received), name
        # No NVLink row leaves its node; a forwarder never stores to itself over NVLink.
        f, d = np.nonzero(legs.nvl_rows)
        assert (f // g == d // g).all() and (f != d).all(), name
        # What forwarders receive over RDMA is what sources send.
        assert legs.rdma_rows_received().sum() == legs.num_rdma_rows
        assert legs.dispatch_rdma_bytes() == legs.num_rdma_rows * legs.message_bytes
        assert legs.combine_rdma_bytes() == legs.num_rdma_rows * legs.partial_bytes
        if name == "one-node":
            assert legs.rdma_rows[:, :-1].sum() == 0             # nothing goes to the other nodes
            assert (legs.rdma_rows_received()[: (nodes - 1) * g] == 0).all()
        if g == 1:
            assert legs.num_nvl_rows == 0                        # one rank per node: no NVLink leg at all


def test_leg_bytes_worst_case_fills_but_fits_the_blocks():
    """All tokens to one node: every forwarder of that node receives T rows per remote source, the block size."""
    nodes, g, t, hidden, topk = 4, 2, 96, 512, 4
    r = nodes * g
    e = 4 * r
    idx = np.full((t, topk), -1, np.int64)
    idx[:, 0] = e - 1                                            # the last rank's last expert
    in_rank = ref.get_dispatch_layout(idx, e, r, nodes)[3]
    legs = it.leg_bytes([in_rank] * r, g, hidden, 2 * hidden, 0, topk)
    p = _plan(t, hidden, False, topk, nodes, g)
    per_block = legs.rdma_rows.max()
    assert per_block == t and p.rdma_dispatch.capacity_rows >= per_block
    assert legs.nvl_rows[:, r - 1].sum() + legs.local_rows[r - 1] == r * t <= p.nvl_recv.capacity_rows


def test_num_puts_counts_chunks():
    legs = it.LegBytes(2, np.array([[0, 10], [7, 0]]), np.zeros((2, 2), np.int64), np.zeros(2, np.int64),
                       1, 16, 1, 1, 16)
    assert legs.num_puts(4, 3) == {"dispatch_data": 3 + 2, "notify": 2, "combine_data": 4 + 3, "combine_ready": 2}


def test_tuning_validates_and_bounds_chunks():
    with pytest.raises(ConfigError, match="rdma_chunk_tokens"):
        it.InternodeTuning(rdma_chunk_tokens=0)
    with pytest.raises(ConfigError, match="rdma_send_sms"):
        it.InternodeTuning(rdma_send_sms=True)
    tun = it.InternodeTuning()
    assert tun.chunk_tokens(7504, 4096) * 7504 >= it.PUT_BYTES_TARGET           # default: >= 64 KiB per put
    assert it.InternodeTuning(rdma_chunk_tokens=1).chunk_tokens(7504, 100_000) == -(-100_000 // it.MAX_CHUNKS)
    assert it.InternodeTuning(rdma_chunk_tokens=3).chunk_tokens(7504, 100) == 3


def test_plan_is_pure_data_and_not_registered():
    """The plan is importable without a GPU and declares no kernels yet (the kernel session registers them)."""
    from epcomm.runtime.registry import registered_families
    assert "internode" not in registered_families()
    src = open(it.__file__, encoding="utf-8").read()
    assert "cupy" not in src and "register_family(" not in src


def _two_stage_combine(xs_back, in_rank, g, bias=None):
    """The order the internode combine will sum in (docs/internode.md): per destination node an fp32 partial over its
    ranks in rank order, then bias0 + bias1 + the partials in node order, rounded to bf16 once."""
    t, r = in_rank.shape
    acc = np.zeros((t, xs_back[0].shape[1]), np.float32)
    for b in ([] if bias is None else [bias]):
        acc += b.astype(np.float32)
    for n in range(r // g):
        part = np.zeros_like(acc)
        for d in range(n * g, (n + 1) * g):
            rows = np.nonzero(in_rank[:, d])[0]
            part[rows] += xs_back[d].astype(np.float32)
        acc += part
    return acc.astype(ref.bf16)


@pytest.mark.parametrize("nodes,g", LAYOUTS)
def test_two_stage_combine_order_is_fp32_and_close_to_the_reference(nodes, g):
    """fp32 through both stages: against the reference's one-chain sum the two-stage order differs only by float32
    reassociation (at most one bf16 ulp per element here), and not at all with one rank per node."""
    r = nodes * g
    e = 4 * r
    xs, idxs, ws = make_rank_inputs(7 + r, [60] * r, 256, 6, e)
    results = ref.dispatch(xs, idxs, ws, e)
    in_ranks = [ref.get_dispatch_layout(i, e, r)[3] for i in idxs]
    rng = np.random.default_rng(r)
    ys = [rng.standard_normal(res.recv_x.shape, dtype=np.float32).astype(ref.bf16) for res in results]
    expected = ref.combine(ys, results, in_ranks)
    sent = [ref.combine_send(ys[d], results[d].num_recv_tokens_per_source) for d in range(r)]
    for s in range(r):
        back = [sent[d][s][0] for d in range(r)]
        got = _two_stage_combine(back, in_ranks[s], g)
        want = expected[s][0]
        if g == 1:
            assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
        else:
            diff = np.abs(got.astype(np.float32) - want.astype(np.float32))
            ulp = np.abs(want.astype(np.float32)) * 2.0 ** -7 + 1e-30
            assert (diff <= ulp).all()
