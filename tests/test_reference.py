"""Tests of epcomm.reference on small hand-worked cases (expected arrays written out) plus a few properties."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from epcomm import reference as ref
from epcomm.errors import ConfigError
from epcomm.testing import assert_bitwise_equal, calc_diff, make_topk, make_weights, make_x

bf16 = ml_dtypes.bfloat16
fp8 = ml_dtypes.float8_e4m3fn
i32, i64, f32 = np.int32, np.int64, np.float32


def _bf(rows) -> np.ndarray:
    return np.array(rows, dtype=f32).astype(bf16)


# ---------------------------------------------------------------------------------------------------------------------
# The worked example used throughout: R = 2 ranks, E = 4 experts (rank 0 owns 0, 1; rank 1 owns 2, 3), K = 2.
#
#   rank 0, T = 3:  t0 -> [0, 3]   (ranks 0 and 1)    weights [0.5,  0.25  ]   x [1, 2]
#                   t1 -> [1, 0]   (rank 0)           weights [0.75, 0.125 ]   x [3, 4]
#                   t2 -> [2, -1]  (rank 1)           weights [1.0,  0.0625]   x [5, 6]
#   rank 1, T = 2:  t0 -> [3, -1]  (rank 1)           weights [0.5,  0.5   ]   x [7, 8]
#                   t1 -> [-1, 0]  (rank 0)           weights [2.0,  0.25  ]   x [9, 10]
# ---------------------------------------------------------------------------------------------------------------------

R, E = 2, 4
TOPK = [np.array([[0, 3], [1, 0], [2, -1]], dtype=i64), np.array([[3, -1], [-1, 0]], dtype=i64)]
WEIGHTS = [np.array([[0.5, 0.25], [0.75, 0.125], [1.0, 0.0625]], dtype=f32),
           np.array([[0.5, 0.5], [2.0, 0.25]], dtype=f32)]
XS = [_bf([[1, 2], [3, 4], [5, 6]]), _bf([[7, 8], [9, 10]])]
IN_RANK = [np.array([[True, True], [True, False], [False, True]]), np.array([[False, True], [True, False]])]


def test_layout_hand_worked():
    per_rank, per_rdma, per_expert, in_rank = ref.get_dispatch_layout(TOPK[0], E, R)
    # Expert 0 is picked by t0 and t1, experts 1, 2, 3 once each; t0 goes to both ranks.
    assert_bitwise_equal(per_expert, np.array([2, 1, 1, 1], dtype=i32), "num_tokens_per_expert")
    assert_bitwise_equal(in_rank, IN_RANK[0], "is_token_in_rank")
    assert_bitwise_equal(per_rank, np.array([2, 2], dtype=i32), "num_tokens_per_rank")
    assert per_rdma is None

    per_rank, _, per_expert, in_rank = ref.get_dispatch_layout(TOPK[1], E, R)
    assert_bitwise_equal(per_expert, np.array([1, 0, 0, 1], dtype=i32), "num_tokens_per_expert")
    assert_bitwise_equal(in_rank, IN_RANK[1], "is_token_in_rank")
    assert_bitwise_equal(per_rank, np.array([1, 1], dtype=i32), "num_tokens_per_rank")


def test_layout_two_nodes():
    # R = 4, E = 8 (2 per rank), 2 nodes: node 0 = ranks 0, 1 (experts 0-3), node 1 = ranks 2, 3 (experts 4-7).
    topk_idx = np.array([[0, 2],     # ranks 0, 1   -> node 0
                         [1, 7],     # ranks 0, 3   -> nodes 0, 1
                         [-1, -1],   # nowhere
                         [5, 4]],    # rank 2       -> node 1
                        dtype=i64)
    per_rank, per_rdma, per_expert, in_rank = ref.get_dispatch_layout(topk_idx, 8, 4, num_nodes=2)
    assert_bitwise_equal(per_rank, np.array([2, 1, 1, 1], dtype=i32), "num_tokens_per_rank")
    assert_bitwise_equal(per_rdma, np.array([2, 2], dtype=i32), "num_tokens_per_rdma_rank")
    assert_bitwise_equal(per_expert, np.array([1, 1, 1, 0, 1, 1, 0, 1], dtype=i32), "num_tokens_per_expert")
    assert_bitwise_equal(in_rank[2], np.zeros(4, dtype=bool), "is_token_in_rank[2]")


@pytest.mark.parametrize("bad", [-2, 4, 100])
def test_layout_rejects_out_of_range_expert(bad):
    topk_idx = np.array([[0, bad]], dtype=i64)
    with pytest.raises(ConfigError, match="topk_idx"):
        ref.get_dispatch_layout(topk_idx, E, R)


def test_layout_rejects_bad_shapes_and_experts():
    with pytest.raises(ConfigError, match="num_experts"):
        ref.get_dispatch_layout(TOPK[0], 5, 2)
    with pytest.raises(ConfigError, match="topk_idx"):
        ref.get_dispatch_layout(np.array([0, 1], dtype=i64), E, R)
    with pytest.raises(ConfigError, match="topk_idx"):
        ref.get_dispatch_layout(TOPK[0].astype(f32), E, R)
    with pytest.raises(ConfigError, match="num_nodes"):
        ref.get_dispatch_layout(TOPK[0], E, R, num_nodes=3)


# ---------------------------------------------------------------------------------------------------------------------
# Normal dispatch
#   rank 0 receives: s0 t0 [0, 3], s0 t1 [1, 0], s1 t1 [-1, 0]
#       recv_topk_idx [[0, -1], [1, 0], [-1, 0]]; weights [[.5, 0], [.75, .125], [0, .25]]
#       local expert 0: 3 (t0, t1 of s0, t1 of s1), local expert 1: 1
#   rank 1 receives: s0 t0 [0, 3], s0 t2 [2, -1], s1 t0 [3, -1]
#       recv_topk_idx [[-1, 1], [0, -1], [1, -1]]; weights [[0, .25], [1, 0], [.5, 0]]
#       local expert 0 (global 2): 1, local expert 1 (global 3): 2
# ---------------------------------------------------------------------------------------------------------------------

def test_dispatch_hand_worked():
    out = ref.dispatch(XS, TOPK, WEIGHTS, E)
    r0, r1 = out
    assert_bitwise_equal(r0.recv_x, _bf([[1, 2], [3, 4], [9, 10]]), "rank 0 recv_x")
    assert_bitwise_equal(r0.recv_src_idx, np.array([0, 1, 1], dtype=i32), "rank 0 recv_src_idx")
    assert_bitwise_equal(r0.num_recv_tokens_per_source, np.array([2, 1], dtype=i32), "rank 0 per source")
    assert_bitwise_equal(r0.recv_topk_idx, np.array([[0, -1], [1, 0], [-1, 0]], dtype=i64), "rank 0 recv_topk_idx")
    assert_bitwise_equal(r0.recv_topk_weights, np.array([[0.5, 0], [0.75, 0.125], [0, 0.25]], dtype=f32),
                         "rank 0 recv_topk_weights")
    assert r0.num_recv_tokens_per_expert_list == [3, 1]
    assert r0.num_recv_tokens == 3

    assert_bitwise_equal(r1.recv_x, _bf([[1, 2], [5, 6], [7, 8]]), "rank 1 recv_x")
    assert_bitwise_equal(r1.recv_src_idx, np.array([0, 2, 0], dtype=i32), "rank 1 recv_src_idx")
    assert_bitwise_equal(r1.num_recv_tokens_per_source, np.array([2, 1], dtype=i32), "rank 1 per source")
    assert_bitwise_equal(r1.recv_topk_idx, np.array([[-1, 1], [0, -1], [1, -1]], dtype=i64), "rank 1 recv_topk_idx")
    assert_bitwise_equal(r1.recv_topk_weights, np.array([[0, 0.25], [1.0, 0], [0.5, 0]], dtype=f32),
                         "rank 1 recv_topk_weights")
    assert r1.num_recv_tokens_per_expert_list == [1, 2]
    assert r1.num_recv_tokens == 3


def test_dispatch_send_messages():
    messages = ref.dispatch_send(XS[0], TOPK[0], WEIGHTS[0], IN_RANK[0])
    assert len(messages) == 2
    assert_bitwise_equal(messages[0].src_idx, np.array([0, 1], dtype=i32), "to rank 0 src_idx")
    assert_bitwise_equal(messages[1].src_idx, np.array([0, 2], dtype=i32), "to rank 1 src_idx")
    assert_bitwise_equal(messages[1].x, _bf([[1, 2], [5, 6]]), "to rank 1 x")
    assert_bitwise_equal(messages[1].topk_idx, np.array([[0, 3], [2, -1]], dtype=i64), "to rank 1 topk_idx")
    assert_bitwise_equal(messages[1].topk_weights, np.array([[0.5, 0.25], [1.0, 0.0625]], dtype=f32),
                         "to rank 1 topk_weights")


@pytest.mark.parametrize("alignment, expected", [(1, ([3, 1], [1, 2])), (2, ([4, 2], [2, 2])),
                                                 (4, ([4, 4], [4, 4])), (3, ([3, 3], [3, 3]))])
def test_dispatch_expert_alignment(alignment, expected):
    r0, r1 = ref.dispatch(XS, TOPK, WEIGHTS, E, expert_alignment=alignment)
    assert r0.num_recv_tokens_per_expert_list == expected[0]
    assert r1.num_recv_tokens_per_expert_list == expected[1]
    assert r0.recv_x.shape == (3, 2)  # only the counts are aligned


def test_dispatch_num_worst_tokens_padding():
    r0, r1 = ref.dispatch(XS, TOPK, WEIGHTS, E, num_worst_tokens=5)
    assert_bitwise_equal(r0.recv_x, _bf([[1, 2], [3, 4], [9, 10], [0, 0], [0, 0]]), "recv_x")
    assert_bitwise_equal(r0.recv_topk_idx, np.array([[0, -1], [1, 0], [-1, 0], [-1, -1], [-1, -1]], dtype=i64),
                         "recv_topk_idx")
    assert_bitwise_equal(r0.recv_topk_weights,
                         np.array([[0.5, 0], [0.75, 0.125], [0, 0.25], [0, 0], [0, 0]], dtype=f32),
                         "recv_topk_weights")
    assert_bitwise_equal(r0.recv_src_idx, np.array([0, 1, 1, -1, -1], dtype=i32), "recv_src_idx")
    assert r0.num_recv_tokens_per_expert_list == []
    assert r0.num_recv_tokens == 3
    assert r1.recv_x.shape == (5, 2) and r1.num_recv_tokens == 3
    with pytest.raises(ConfigError, match="num_worst_tokens"):
        ref.dispatch(XS, TOPK, WEIGHTS, E, num_worst_tokens=2)


def test_dispatch_without_weights_and_fp8_pair():
    # FP8 pair: data rows and scale rows travel together; the scales may be column-major at the source.
    datas = [np.arange(3 * 128).reshape(3, 128).astype(f32).astype(fp8), np.full((2, 128), 2.0, dtype=fp8)]
    scales = [np.asfortranarray(np.array([[1.0], [2.0], [3.0]], dtype=f32)), np.array([[4.0], [5.0]], dtype=f32)]
    r0, r1 = ref.dispatch(list(zip(datas, scales)), TOPK, None, E)
    data, scale = r0.recv_x
    assert_bitwise_equal(data, np.concatenate([datas[0][:2], datas[1][1:]]), "rank 0 fp8 rows")
    assert_bitwise_equal(scale, np.array([[1.0], [2.0], [5.0]], dtype=f32), "rank 0 scales")
    assert scale.flags.c_contiguous
    assert_bitwise_equal(r1.recv_x[1], np.array([[1.0], [3.0], [4.0]], dtype=f32), "rank 1 scales")
    assert r0.recv_topk_weights is None
    assert_bitwise_equal(r0.recv_topk_idx, np.array([[0, -1], [1, 0], [-1, 0]], dtype=i64), "recv_topk_idx")


def test_dispatch_repeated_expert_sent_once():
    # One token picks expert 1 twice: sent once to rank 0, and both (t, k) pairs count for local expert 1.
    topk = [np.array([[1, 1]], dtype=i64), np.zeros((0, 2), dtype=i64)]
    xs = [_bf([[3, 4]]), np.zeros((0, 2), dtype=bf16)]
    r0, r1 = ref.dispatch(xs, topk, None, E)
    assert r0.num_recv_tokens == 1 and r1.num_recv_tokens == 0
    assert_bitwise_equal(r0.recv_topk_idx, np.array([[1, 1]], dtype=i64), "recv_topk_idx")
    assert r0.num_recv_tokens_per_expert_list == [0, 2]
    assert r1.num_recv_tokens_per_expert_list == [0, 0]


def test_cached_dispatch_hand_worked():
    results = ref.dispatch(XS, TOPK, WEIGHTS, E)
    new_xs = [_bf([[2, 4], [6, 8], [10, 12]]), _bf([[14, 16], [18, 20]])]
    recv0, recv1 = ref.cached_dispatch(new_xs, results, IN_RANK)
    assert_bitwise_equal(recv0, _bf([[2, 4], [6, 8], [18, 20]]), "rank 0 recv_x")
    assert_bitwise_equal(recv1, _bf([[2, 4], [10, 12], [14, 16]]), "rank 1 recv_x")

    padded = ref.dispatch(XS, TOPK, WEIGHTS, E, num_worst_tokens=4)
    recv0, _ = ref.cached_dispatch(new_xs, padded, IN_RANK)
    assert_bitwise_equal(recv0, _bf([[2, 4], [6, 8], [18, 20], [0, 0]]), "padded rank 0 recv_x")

    with pytest.raises(ConfigError, match="is_token_in_ranks"):
        ref.cached_dispatch(new_xs, results, [IN_RANK[1][[0, 1, 0]], IN_RANK[1]])


# ---------------------------------------------------------------------------------------------------------------------
# Normal combine. Rank 0 returns y0 = [[1, 1], [2, 2], [4, 4]] for (s0 t0, s0 t1, s1 t1);
#                 rank 1 returns y1 = [[8, 8], [16, 16], [32, 32]] for (s0 t0, s0 t2, s1 t0).
#   source 0: t0 = 1 + 8 = 9, t1 = 2, t2 = 16        source 1: t0 = 32, t1 = 4
# ---------------------------------------------------------------------------------------------------------------------

YS = [_bf([[1, 1], [2, 2], [4, 4]]), _bf([[8, 8], [16, 16], [32, 32]])]


def test_combine_hand_worked():
    results = ref.dispatch(XS, TOPK, WEIGHTS, E)
    recv_weights = [r.recv_topk_weights for r in results]
    (c0, w0), (c1, w1) = ref.combine(YS, results, IN_RANK, topk_weights=recv_weights)
    assert_bitwise_equal(c0, _bf([[9, 9], [2, 2], [16, 16]]), "source 0 combined_x")
    assert_bitwise_equal(c1, _bf([[32, 32], [4, 4]]), "source 1 combined_x")
    # Weights come back summed: the original weights wherever topk_idx >= 0, zero elsewhere.
    assert_bitwise_equal(w0, np.array([[0.5, 0.25], [0.75, 0.125], [1.0, 0]], dtype=f32), "source 0 weights")
    assert_bitwise_equal(w1, np.array([[0.5, 0], [0, 0.25]], dtype=f32), "source 1 weights")

    (c0, w0), _ = ref.combine(YS, results, IN_RANK)
    assert w0 is None
    assert_bitwise_equal(c0, _bf([[9, 9], [2, 2], [16, 16]]), "combined_x without weights")


def test_combine_biases():
    results = ref.dispatch(XS, TOPK, WEIGHTS, E)
    bias0 = [_bf([[100, 100], [0, 0], [-16, -16]]), _bf([[1, 1], [1, 1]])]
    bias1 = [_bf([[0.5, 0.5], [0.5, -0.5], [0, 0]]), _bf([[-32, 0], [0, 0]])]
    (c0, _), (c1, _) = ref.combine(YS, results, IN_RANK, biases=bias0)
    assert_bitwise_equal(c0, _bf([[109, 109], [2, 2], [0, 0]]), "one bias, source 0")
    assert_bitwise_equal(c1, _bf([[33, 33], [5, 5]]), "one bias, source 1")
    (c0, _), (c1, _) = ref.combine(YS, results, IN_RANK, biases=list(zip(bias0, bias1)))
    assert_bitwise_equal(c0, _bf([[109.5, 109.5], [2.5, 1.5], [0, 0]]), "two biases, source 0")
    assert_bitwise_equal(c1, _bf([[1, 33], [5, 5]]), "two biases, source 1")


def test_combine_rounds_once():
    # 256 + 1 + 1 + 1 = 259 in float32 -> bf16 260 (spacing 2 above 256). Rounding after each add would give 256.
    results = ref.dispatch(XS, TOPK, WEIGHTS, E)
    ones = [_bf(np.ones((3, 2))), _bf(np.ones((3, 2)))]
    bias = (_bf([[256, 256], [0, 0], [0, 0]]), _bf([[1, 1], [0, 0], [0, 0]]))
    (c0, _), _ = ref.combine(ones, results, IN_RANK, biases=[bias, None])
    assert_bitwise_equal(c0, _bf([[260, 260], [1, 1], [1, 1]]), "combined_x")


def test_combine_token_sent_nowhere_gets_bias_only():
    topk = [np.array([[-1, -1], [0, 2]], dtype=i64), np.zeros((0, 2), dtype=i64)]
    xs = [_bf([[5, 5], [6, 6]]), np.zeros((0, 2), dtype=bf16)]
    results = ref.dispatch(xs, topk, None, E)
    in_rank = [ref.get_dispatch_layout(t, E, R)[3] for t in topk]
    ys = [r.recv_x for r in results]
    (c0, _), (c1, _) = ref.combine(ys, results, in_rank, biases=[_bf([[3, -3], [0, 0]]), None])
    assert_bitwise_equal(c0, _bf([[3, -3], [12, 12]]), "combined_x")
    assert c1.shape == (0, 2)
    (c0, _), _ = ref.combine(ys, results, in_rank)
    assert_bitwise_equal(c0, _bf([[0, 0], [12, 12]]), "combined_x without bias")


def test_combine_send_ignores_padding_rows():
    y = _bf([[1, 1], [2, 2], [3, 3], [99, 99]])  # last row is num_worst_tokens padding
    parts = ref.combine_send(y, np.array([1, 2], dtype=i32), None)
    assert_bitwise_equal(parts[0][0], _bf([[1, 1]]), "to source 0")
    assert_bitwise_equal(parts[1][0], _bf([[2, 2], [3, 3]]), "to source 1")
    assert parts[0][1] is None
    with pytest.raises(ConfigError, match="x"):
        ref.combine_send(y, np.array([3, 2], dtype=i32))


# ---------------------------------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------------------------------

def _block(amax: float, *values: float, hidden: int = 128) -> np.ndarray:
    row = np.zeros(hidden, dtype=f32)
    row[0] = amax
    row[1: 1 + len(values)] = values
    return row


def test_fp8_plain_scales():
    # Block 0 has amax 448 -> scale_inv 1, values stored as is (17 -> 16: round to nearest even in e4m3).
    # Block 1 has amax 896 -> scale_inv 2, values halved. Block 2 is all zero -> amax floored at 1e-4.
    x = np.concatenate([_block(448, 1.0, -2.5, 17.0), _block(-896, 6.0, 3.0), np.zeros(128, f32)])[None]
    data, scales = ref.per_token_cast_to_fp8(x)
    assert_bitwise_equal(scales, np.array([[1.0, 2.0, f32(1e-4) / f32(448)]], dtype=f32), "scales")
    got = data.astype(f32)
    assert got[0, :4].tolist() == [448.0, 1.0, -2.5, 16.0]
    assert got[0, 128:131].tolist() == [-448.0, 3.0, 1.5]
    assert not got[0, 256:].any()
    assert data.dtype == fp8 and data.shape == (1, 384)


def test_fp8_round_scale():
    # amax 300: 300/448 < 1 -> 2**0 = 1.   amax 1344: 1344/448 = 3 -> 4 (stored x/4: 1344 -> 336 -> e4m3 320).
    # amax 896: 896/448 = 2 exactly -> 2.  amax 0.5: 1/896 -> 2**-9.
    x = np.concatenate([_block(300, 3.0), _block(1344, 4.0, -8.0), _block(896, 1.0), _block(0.5, 0.25)])[None]
    data, scales = ref.per_token_cast_to_fp8(x.astype(bf16), round_scale=True)
    assert_bitwise_equal(scales, np.array([[1.0, 4.0, 2.0, 2.0 ** -9]], dtype=f32), "scales")
    got = data.astype(f32)
    assert got[0, [0, 1]].tolist() == [288.0, 3.0]           # 300 -> 288 (spacing 32 above 256, nearest)
    assert got[0, [128, 129, 130]].tolist() == [320.0, 1.0, -2.0]
    assert got[0, [256, 257]].tolist() == [448.0, 0.5]
    assert got[0, [384, 385]].tolist() == [256.0, 128.0]


def test_fp8_scale_is_deepeps_product():
    # DeepEP's kernel: scale_inv = amax * (1 / 448.0f), a float32 product. amax 1344 shows the difference from a
    # division (1344 / 448 = 3 exactly; 1344 * fl(1 / 448) = 3.0000002); 448 and 896 agree either way.
    assert ref.FP8_MAX_INV == np.float32(1.0) / np.float32(448.0)
    x = np.concatenate([_block(1344, 7.0), _block(448), _block(896)])[None]
    _, scales = ref.per_token_cast_to_fp8(x)
    want = np.array([[f32(1344) * ref.FP8_MAX_INV, 1.0, 2.0]], dtype=f32)
    assert_bitwise_equal(scales, want, "scales")
    assert scales[0, 0] != f32(1344) / f32(448)
    # Over many random blocks the product and the quotient differ in about half (the independent check).
    amax = np.random.default_rng(0).random((64, 512), dtype=f32) * 1000
    _, scales = ref.per_token_cast_to_fp8((amax[:, :, None] * np.linspace(-1, 1, 128, dtype=f32)).reshape(64, -1))
    amax_used = np.abs((amax[:, :, None] * np.linspace(-1, 1, 128, dtype=f32))).max(axis=2)
    assert_bitwise_equal(scales, amax_used * ref.FP8_MAX_INV, "scales")
    assert 0.3 < np.mean(scales != amax_used / f32(448)) < 0.8


def test_fp8_nan_and_inf_as_deepeps_cast():
    # amax ignores NaN (fmaxf); a NaN value becomes the e4m3 NaN 0x7F (the satfinite conversion) and its neighbours
    # keep their values; an inf makes the block's scale 0 (448 / inf), so inf * 0 = NaN -> 0x7F and the rest 0.
    x = np.concatenate([_block(448, np.nan, -2.5), _block(np.inf, 3.0)])[None]
    data, scales = ref.per_token_cast_to_fp8(x.astype(bf16))
    bits = data.view(np.uint8)
    assert scales[0, 0] == 1.0 and np.isinf(scales[0, 1])
    assert bits[0, 1] == ref.FP8_NAN_BITS and data[0, [0, 2]].astype(f32).tolist() == [448.0, -2.5]
    assert bits[0, 128] == ref.FP8_NAN_BITS and not data[0, 129:].astype(f32).any()
    # A negative NaN is the same 0x7F (the conversion writes the canonical NaN).
    neg = np.concatenate([_block(1.0, -np.nan)])[None]
    neg[0, 1] = -np.abs(neg[0, 1])
    assert np.signbit(neg[0, 1])
    assert ref.per_token_cast_to_fp8(neg)[0].view(np.uint8)[0, 1] == ref.FP8_NAN_BITS


def test_ue8m0_packing():
    # Exponent fields: 1.0 -> 127, 2.0 -> 128, 0.5 -> 126, 4.0 -> 129; block j in byte j % 4 of word j // 4.
    scale_inv = np.array([[1.0, 2.0, 0.5, 4.0, 1.0]], dtype=f32)
    packed = ref.pack_ue8m0(scale_inv)
    expected = np.array([[0x817E807F, 0x0000007F]], dtype=np.uint32).view(i32)
    assert_bitwise_equal(packed, expected, "packed")
    assert_bitwise_equal(ref.unpack_ue8m0(packed, 5), scale_inv, "unpacked")


def test_fp8_cast_with_ue8m0():
    x = np.concatenate([_block(448), _block(896), _block(224), _block(1792), _block(300)])[None]
    data, scales = ref.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    assert_bitwise_equal(scales, np.array([[0x817E807F, 0x7F]], dtype=np.uint32).view(i32), "scales")
    back = ref.per_token_cast_back(data, scales, use_ue8m0=True)
    assert back[0, [0, 128, 256, 384]].tolist() == [448.0, 896.0, 224.0, 1792.0]


@pytest.mark.parametrize("round_scale, use_ue8m0", [(False, False), (True, False), (True, True)])
def test_fp8_round_trip(round_scale, use_ue8m0):
    x = np.random.default_rng(0).standard_normal((16, 512), dtype=f32) * 5
    data, scales = ref.per_token_cast_to_fp8(x.astype(bf16), round_scale, use_ue8m0)
    back = ref.per_token_cast_back(data, scales, use_ue8m0)
    diff = calc_diff(back, x.astype(bf16).astype(f32))
    assert 0 < diff < 1e-3


def test_fp8_errors():
    with pytest.raises(ConfigError, match="128"):
        ref.per_token_cast_to_fp8(np.zeros((2, 100), dtype=bf16))
    with pytest.raises(ConfigError, match="round_scale"):
        ref.per_token_cast_to_fp8(np.zeros((2, 128), dtype=bf16), use_ue8m0=True)
    with pytest.raises(ConfigError, match="x"):
        ref.per_token_cast_to_fp8(np.zeros((2, 128), dtype=np.float16))


# ---------------------------------------------------------------------------------------------------------------------
# Low-latency mode, same routing as above, Tmax = 4 (R * Tmax = 8 rows per expert).
#   rank 0, local 0 (expert 0): s0 t0, s0 t1, s1 t1 -> src_info [0, 1, 1], ranges (0, 2), (2, 1)
#   rank 0, local 1 (expert 1): s0 t1               -> src_info [1],       ranges (0, 1), (1, 0)
#   rank 1, local 0 (expert 2): s0 t2               -> src_info [2],       ranges (0, 1), (1, 0)
#   rank 1, local 1 (expert 3): s0 t0, s1 t0        -> src_info [0, 0],    ranges (0, 1), (1, 1)
# ---------------------------------------------------------------------------------------------------------------------

TMAX = 4


def _range(begin: int, count: int) -> int:
    return (begin << 32) | count


def _src_info(*rows) -> np.ndarray:
    out = np.full((len(rows), R * TMAX), -1, dtype=i32)
    for j, row in enumerate(rows):
        out[j, : len(row)] = row
    return out


def _ll_x(*rows) -> np.ndarray:
    out = np.zeros((len(rows), R * TMAX, 2), dtype=f32)
    for j, row in enumerate(rows):
        out[j, : len(row)] = row
    return out.astype(bf16)


def test_low_latency_dispatch_hand_worked():
    r0, r1 = ref.low_latency_dispatch(XS, TOPK, TMAX, E, use_fp8=False)
    assert_bitwise_equal(r0.recv_count, np.array([3, 1], dtype=i32), "rank 0 recv_count")
    assert_bitwise_equal(r0.src_info, _src_info([0, 1, 1], [1]), "rank 0 src_info")
    assert_bitwise_equal(r0.layout_range, np.array([[_range(0, 2), _range(2, 1)], [_range(0, 1), _range(1, 0)]],
                                                   dtype=i64), "rank 0 layout_range")
    assert_bitwise_equal(r0.recv_x, _ll_x([[1, 2], [3, 4], [9, 10]], [[3, 4]]), "rank 0 recv_x")

    assert_bitwise_equal(r1.recv_count, np.array([1, 2], dtype=i32), "rank 1 recv_count")
    assert_bitwise_equal(r1.src_info, _src_info([2], [0, 0]), "rank 1 src_info")
    assert_bitwise_equal(r1.layout_range, np.array([[_range(0, 1), _range(1, 0)], [_range(0, 1), _range(1, 1)]],
                                                   dtype=i64), "rank 1 layout_range")
    assert_bitwise_equal(r1.recv_x, _ll_x([[5, 6]], [[1, 2], [7, 8]]), "rank 1 recv_x")


def test_low_latency_dispatch_send_messages():
    to0, to1 = ref.low_latency_dispatch_send(XS[0], TOPK[0], 0, R, E, TMAX, use_fp8=False)
    # To rank 0, in (local expert, token) order: (0, t0), (0, t1), (1, t1).
    assert_bitwise_equal(to0.local_expert, np.array([0, 0, 1], dtype=i32), "local_expert")
    assert_bitwise_equal(to0.src_idx, np.array([0, 1, 1], dtype=i32), "src_idx")
    assert_bitwise_equal(to0.rows, _bf([[1, 2], [3, 4], [3, 4]]), "rows")
    assert_bitwise_equal(to1.local_expert, np.array([0, 1], dtype=i32), "local_expert")
    assert_bitwise_equal(to1.src_idx, np.array([2, 0], dtype=i32), "src_idx")


def test_low_latency_dispatch_errors():
    with pytest.raises(ConfigError, match="num_max_dispatch_tokens_per_rank"):
        ref.low_latency_dispatch(XS, TOPK, 2, E, use_fp8=False)    # rank 0 has 3 tokens
    with pytest.raises(ConfigError, match="topk_idx"):
        ref.low_latency_dispatch(XS, [TOPK[0], np.array([[4, 0], [0, 0]], dtype=i64)], TMAX, E, use_fp8=False)
    with pytest.raises(ConfigError, match="num_experts"):
        ref.low_latency_dispatch(XS, TOPK, TMAX, 3, use_fp8=False)
    with pytest.raises(ConfigError, match="128"):
        ref.low_latency_dispatch(XS, TOPK, TMAX, E, use_fp8=True)  # hidden 2


@pytest.mark.parametrize("round_scale, use_ue8m0", [(False, False), (True, False), (True, True)])
def test_low_latency_dispatch_fp8_layout(round_scale, use_ue8m0):
    rng = np.random.default_rng(1)
    xs = [make_x(rng, 3, 256, 0), make_x(rng, 2, 256, 1)]
    r0, _ = ref.low_latency_dispatch(xs, TOPK, TMAX, E, True, round_scale, use_ue8m0)
    data, scales = r0.recv_x
    num_cols = 1 if use_ue8m0 else 2
    assert data.shape == (2, R * TMAX, 256) and data.dtype == fp8
    assert scales.shape == (2, R * TMAX, num_cols)
    assert scales.dtype == (i32 if use_ue8m0 else f32)
    assert scales.transpose(0, 2, 1).flags.c_contiguous           # column-major in the last two dims
    # Rows of local expert 0 are (s0 t0, s0 t1, s1 t1): the sender's cast rows, copied.
    cast = [ref.per_token_cast_to_fp8(x, round_scale, use_ue8m0) for x in xs]
    assert_bitwise_equal(data[0, :3], np.stack([cast[0][0][0], cast[0][0][1], cast[1][0][1]]), "fp8 rows")
    assert_bitwise_equal(scales[0, :3], np.stack([cast[0][1][0], cast[0][1][1], cast[1][1][1]]), "scales")
    assert not data[0, 3:].astype(f32).any() and not scales[0, 3:].any()
    back = ref.per_token_cast_back(data[0, :3], scales[0, :3], use_ue8m0)
    assert calc_diff(back, np.stack([xs[0][0], xs[0][1], xs[1][1]]).astype(f32)) < 1e-3


# Low-latency combine. Expert outputs (unused rows hold 1000, which must be ignored):
#   rank 0: local 0 rows (s0 t0, s0 t1, s1 t1) = 1, 2, 4     local 1 row (s0 t1) = 8
#   rank 1: local 0 row (s0 t2) = 16                         local 1 rows (s0 t0, s1 t0) = 32, 64
#   source 0: t0 = .5 * 1 + .25 * 32 = 8.5    t1 = .75 * 8 + .125 * 2 = 6.25    t2 = 1.0 * 16 = 16
#   source 1: t0 = .5 * 64 = 32               t1 = .25 * 4 = 1

def _ll_y(*rows) -> np.ndarray:
    out = np.full((len(rows), R * TMAX, 2), 1000, dtype=f32)
    for j, row in enumerate(rows):
        out[j, : len(row)] = np.array(row, dtype=f32)[:, None]
    return out.astype(bf16)


def test_low_latency_combine_hand_worked():
    results = ref.low_latency_dispatch(XS, TOPK, TMAX, E, use_fp8=False)
    ys = [_ll_y([1, 2, 4], [8]), _ll_y([16], [32, 64])]
    c0, c1 = ref.low_latency_combine(ys, TOPK, WEIGHTS, results, E)
    assert_bitwise_equal(c0, _bf([[8.5, 8.5], [6.25, 6.25], [16, 16]]), "source 0 combined")
    assert_bitwise_equal(c1, _bf([[32, 32], [1, 1]]), "source 1 combined")


def test_low_latency_combine_send_messages():
    results = ref.low_latency_dispatch(XS, TOPK, TMAX, E, use_fp8=False)
    to0, to1 = ref.low_latency_combine_send(_ll_y([1, 2, 4], [8]), results[0].src_info, results[0].layout_range)
    assert_bitwise_equal(to0.local_expert, np.array([0, 0, 1], dtype=i32), "to source 0 local_expert")
    assert_bitwise_equal(to0.src_idx, np.array([0, 1, 1], dtype=i32), "to source 0 src_idx")
    assert_bitwise_equal(to0.rows, _bf([[1, 1], [2, 2], [8, 8]]), "to source 0 rows")
    assert_bitwise_equal(to1.local_expert, np.array([0], dtype=i32), "to source 1 local_expert")
    assert_bitwise_equal(to1.rows, _bf([[4, 4]]), "to source 1 rows")


def test_low_latency_repeated_expert_is_two_rows():
    # R = 1, E = 2: the token picks expert 1 twice -> two rows; combine pairs them with k in order.
    topk = [np.array([[1, 1], [0, -1]], dtype=i64)]
    xs = [_bf([[3, 3], [5, 5]])]
    (res,) = ref.low_latency_dispatch(xs, topk, 2, 2, use_fp8=False)
    assert_bitwise_equal(res.recv_count, np.array([1, 2], dtype=i32), "recv_count")
    assert_bitwise_equal(res.src_info, np.array([[1, -1], [0, 0]], dtype=i32), "src_info")
    y = _bf([[[7, 7], [0, 0]], [[10, 10], [100, 100]]])
    weights = [np.array([[0.5, 2.0], [1.0, 9.0]], dtype=f32)]
    (combined,) = ref.low_latency_combine([y], topk, weights, [res], 2)
    # t0 = 0.5 * 10 + 2.0 * 100 = 205;  t1 = 1.0 * 7 = 7 (weight 9 of the -1 entry is ignored).
    assert_bitwise_equal(combined, _bf([[205, 205], [7, 7]]), "combined")
    with pytest.raises(ConfigError, match="num_max_dispatch_tokens_per_rank"):
        ref.low_latency_dispatch([_bf([[3, 3]])], [np.array([[1, 1]], dtype=i64)], 1, 2, use_fp8=False)


# ---------------------------------------------------------------------------------------------------------------------
# Properties on random inputs
# ---------------------------------------------------------------------------------------------------------------------

CASES = [(4, 16, [5, 0, 1, 7], 4, None), (4, 8, [6, 6, 6, 6], 2, "one_expert"), (2, 8, [9, 3], 3, "avoid_rank:2:1"),
         (8, 16, [4] * 8, 2, None)]


@pytest.mark.parametrize("num_ranks, num_experts, num_tokens, num_topk, skew", CASES)
@pytest.mark.parametrize("num_worst_tokens", [0, 64])
def test_dispatch_combine_identity(num_ranks, num_experts, num_tokens, num_topk, skew, num_worst_tokens):
    rng = np.random.default_rng(num_ranks * 100 + num_experts)
    topk = [make_topk(rng, t, num_topk, num_experts, skew=skew, drop=0.2) for t in num_tokens]
    weights = [make_weights(rng, t, num_topk) for t in num_tokens]
    xs = [rng.integers(-8, 8, size=(t, 32)).astype(f32).astype(bf16) for t in num_tokens]
    in_rank = [ref.get_dispatch_layout(t, num_experts, num_ranks)[3] for t in topk]
    results = ref.dispatch(xs, topk, weights, num_experts, num_worst_tokens=num_worst_tokens)
    # Send the received rows straight back: every token comes back once per rank it went to.
    combined = ref.combine([r.recv_x for r in results], results, in_rank,
                           topk_weights=[r.recv_topk_weights for r in results])
    for s in range(num_ranks):
        # Accumulation starts from +0, so a token sent nowhere gives +0 (never -0): hence the `0 +`.
        expected = 0 + xs[s].astype(f32) * in_rank[s].sum(axis=1, keepdims=True)
        assert_bitwise_equal(combined[s][0], expected.astype(bf16), f"rank {s} combined_x")
        expected_weights = np.where(topk[s] >= 0, weights[s], f32(0))
        assert_bitwise_equal(combined[s][1], expected_weights, f"rank {s} combined_topk_weights")


@pytest.mark.parametrize("num_ranks, num_experts, num_tokens, num_topk, skew", CASES)
def test_dispatch_rows_say_where_they_came_from(num_ranks, num_experts, num_tokens, num_topk, skew):
    rng = np.random.default_rng(7)
    topk = [make_topk(rng, t, num_topk, num_experts, skew=skew) for t in num_tokens]
    xs = [make_x(rng, t, 16, s) for s, t in enumerate(num_tokens)]
    for r, res in enumerate(ref.dispatch(xs, topk, None, num_experts)):
        x = res.recv_x.astype(f32)
        sources = np.repeat(np.arange(num_ranks), res.num_recv_tokens_per_source)
        assert_bitwise_equal(x[:, 0], sources.astype(f32), f"rank {r} source encoded in recv_x")
        assert_bitwise_equal(x[:, 1] + 256 * x[:, 2], res.recv_src_idx.astype(f32), f"rank {r} token in recv_x")
        for s in range(num_ranks):
            idx = res.recv_src_idx[sources == s]
            assert (np.diff(idx) > 0).all()
            expected_tokens = np.nonzero(((topk[s] // (num_experts // num_ranks)) == r).any(axis=1))[0]
            assert_bitwise_equal(idx, expected_tokens.astype(i32), f"rank {r} tokens from {s}")


@pytest.mark.parametrize("num_ranks, num_experts, num_tokens, num_topk, skew", CASES)
def test_low_latency_dispatch_combine_identity(num_ranks, num_experts, num_tokens, num_topk, skew):
    rng = np.random.default_rng(11)
    tmax = max(num_tokens)
    topk = [make_topk(rng, t, num_topk, num_experts, skew=skew, drop=0.2) for t in num_tokens]
    xs = [make_x(rng, t, 8, s) for s, t in enumerate(num_tokens)]
    xs = [(np.round(x.astype(f32)) + 0).astype(bf16) for x in xs]  # small integers (no -0): sums exact
    results = ref.low_latency_dispatch(xs, topk, tmax, num_experts, use_fp8=False)
    num_local = num_experts // num_ranks
    for r, res in enumerate(results):
        for j in range(num_local):
            counts = res.layout_range[j] & 0xFFFFFFFF
            begins = res.layout_range[j] >> 32
            assert_bitwise_equal(begins, np.concatenate([[0], np.cumsum(counts)[:-1]]), f"rank {r} begins")
            assert counts.sum() == res.recv_count[j]
            expected = [np.nonzero((topk[s] == r * num_local + j).any(axis=1))[0] for s in range(num_ranks)]
            assert_bitwise_equal(res.src_info[j, :res.recv_count[j]], np.concatenate(expected).astype(i32),
                                 f"rank {r} expert {j} src_info")
    ones = [np.ones(t.shape, dtype=f32) for t in topk]
    combined = ref.low_latency_combine([r.recv_x for r in results], topk, ones, results, num_experts)
    for s in range(num_ranks):
        expected = 0 + xs[s].astype(f32) * (topk[s] >= 0).sum(axis=1, keepdims=True)
        assert_bitwise_equal(combined[s], expected.astype(bf16), f"rank {s} combined")


# ---------------------------------------------------------------------------------------------------------------------
# Test helpers
# ---------------------------------------------------------------------------------------------------------------------

def test_calc_diff():
    x = np.array([1.0, 2.0, 3.0])
    assert calc_diff(x, x) == 0.0
    assert calc_diff(np.zeros(3), np.zeros(3)) == 0.0
    assert calc_diff(x, -x) == pytest.approx(2.0)
    # x = [1, 0], y = [0, 1]: 1 - 0 / 2 = 1
    assert calc_diff(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)


def test_assert_bitwise_equal_names_coordinate():
    a = np.zeros((2, 3), dtype=f32)
    b = a.copy()
    b[1, 2] = 1.0
    assert_bitwise_equal(a, a.copy(), "a")
    with pytest.raises(AssertionError, match=r"recv_x: first difference at \[1, 2\]"):
        assert_bitwise_equal(a, b, "recv_x")
    with pytest.raises(AssertionError, match="-0"):
        assert_bitwise_equal(np.array([-0.0], f32), np.array([0.0], f32), "signed zero")
    with pytest.raises(AssertionError, match="int32"):
        assert_bitwise_equal(a.astype(i32), a, "dtype")


def test_make_topk_variants():
    rng = np.random.default_rng(3)
    topk = make_topk(rng, 50, 4, 16)
    assert topk.dtype == i64 and topk.shape == (50, 4)
    assert all(len(set(row)) == 4 for row in topk.tolist())
    one = make_topk(rng, 5, 3, 16, skew="one_expert")
    assert (one[:, 0] == 0).all() and (one[:, 1:] == -1).all()
    avoid = make_topk(rng, 50, 4, 16, skew="avoid_rank:4:2")
    assert not ((avoid >= 8) & (avoid < 12)).any()
    dropped = make_topk(rng, 200, 4, 16, drop=0.5)
    assert 0 < (dropped == -1).sum() < dropped.size
    x = make_x(rng, 300, 8, 5)
    assert (x[:, 0].astype(f32) == 5).all()
    assert_bitwise_equal(x[:, 1].astype(f32) + 256 * x[:, 2].astype(f32), np.arange(300, dtype=f32), "token index")
