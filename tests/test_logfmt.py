"""LogFMT-10 (epcomm.reference section 6): hand-worked encodings, the wire layout, round-trip bounds, the combine
with use_logfmt, and its error against the fp32 reference on DeepEP's test shapes."""
from __future__ import annotations

import numpy as np
import pytest

from epcomm import reference as ref
from epcomm.errors import ConfigError
from epcomm.testing import calc_diff

BF16 = ref.bf16


def _row(values: dict, hidden: int = 512, fill=0.0) -> np.ndarray:
    """A [1, hidden] bf16 row: `fill` everywhere, values[i] at channel i."""
    x = np.full((1, hidden), fill, np.float32)
    for i, v in values.items():
        x[0, i] = v
    return x.astype(BF16)


def _group(wire_row: np.ndarray, offset: int):
    """(codes [16], signs [16]) of the 20-byte group at `offset`, read as one little-endian 160-bit integer."""
    v = int.from_bytes(wire_row[offset:offset + 20].tobytes(), "little")
    return [(v >> (9 * j)) & 0x1FF for j in range(16)], [(v >> (144 + j)) & 1 for j in range(16)]


def _castable_division(hidden=512):
    """A row whose every division casts: 0.5 at channel 0 of each division, 0.25 / -0.25 / 0 elsewhere."""
    x = np.full((1, hidden), 0.25, np.float32)
    x[0, ::128] = 0.5
    x[0, 1::128] = -0.25
    x[0, 2::128] = 0.0
    return x.astype(BF16)


def test_chunk_size_is_deepeps_warp_iteration():
    assert ref.logfmt_chunk_size(7168) == 1024 and ref.logfmt_chunk_size(4096) == 1024
    assert ref.logfmt_chunk_size(512) == 512 and ref.logfmt_chunk_size(2560) == 512
    for bad in (128, 384, 7000):
        with pytest.raises(ConfigError, match="multiple of 512"):
            ref.logfmt_chunk_size(bad)


def test_zeros_travel_as_bf16():
    x = np.zeros((2, 512), BF16)
    enc = ref.logfmt_encode(x)
    assert list(enc.num_bytes) == [4 * 4 + 512 * 2] * 2       # meta + one raw chunk: an all-zero division never casts
    assert not enc.wire[:, :16].any()                          # amax = amin = 0
    assert np.array_equal(ref.logfmt_decode(enc), np.zeros((2, 512), np.float32))


def test_equal_values_and_amax_at_least_one_travel_as_bf16():
    for fill in (0.25, -0.25, 1.0, 3e38):
        x = _row({}, fill=fill)
        enc = ref.logfmt_encode(x)
        assert enc.num_bytes[0] == 16 + 1024, fill             # amin == amax, or log2(amax) >= 0: raw
        assert np.array_equal(ref.logfmt_decode(enc), x.astype(np.float32))
    # One raw division makes its whole chunk raw (the cast decision is per 512 / 1024-channel chunk).
    x = _castable_division(1024)
    x[0, 300] = 1.5
    enc = ref.logfmt_encode(x)
    assert enc.num_bytes[0] == 8 * 4 + 1024 * 2
    assert np.array_equal(ref.logfmt_decode(enc), x.astype(np.float32))
    # With hidden 1536 (chunks of 512) only the chunk holding it stays raw.
    x = _castable_division(1536)
    x[0, 1500] = 1.5
    enc = ref.logfmt_encode(x)
    assert enc.num_bytes[0] == 12 * 4 + 2 * 640 + 1024


def test_hand_worked_codes_and_wire_layout():
    # Division: amax 0.5 (log -1), amin 0 -> log_amin = -1 - 32 = -33, step s = 32 / 510.
    # 0.5 -> code 511 (the top level is amax). 0 -> code 0. 0.25: u = (log2 0.25 + 33) / s = 494.06; the levels of
    # codes 495 and 496 are 2^(494 s - 33) = 0.24932 and 2^(495 s - 33) = 0.26040, 0.25 is nearer 495.
    x = _castable_division(512)
    enc = ref.logfmt_encode(x)
    assert enc.num_bytes[0] == 16 + 640 and enc.num_bytes[0] == 512 * 10 // 8 + 512 // 128 * 4
    meta = enc.wire[0, :16].view(BF16).astype(np.float32).reshape(4, 2)
    assert np.array_equal(meta, [[0.5, 0.0]] * 4)
    codes, signs = _group(enc.wire[0], 16)
    assert codes[:4] == [511, 495, 0, 495] and signs[:4] == [0, 1, 0, 0]
    s = 32 / 510
    dec = ref.logfmt_decode(enc)
    assert dec[0, 0] == pytest.approx(0.5, rel=1e-5)             # 510 float32 steps above amin: not exact
    assert dec[0, 1] == pytest.approx(-2 ** (494 * s - 33), rel=1e-5) and dec[0, 2] == 0.0
    # -0.0 keeps its sign bit (code 0, sign 1) and decodes to -0.0.
    x[0, 2] = -0.0
    c2, s2 = _group(ref.logfmt_encode(x).wire[0], 16)
    assert c2[2] == 0 and s2[2] == 1
    assert np.signbit(ref.logfmt_decode(ref.logfmt_encode(x))[0, 2])


def test_clip_and_denormal_range():
    # amax 0.5: anything below 2^-33 is below the clipped amin; far below it -> code 0 (decodes to 0).
    x = _castable_division(512)
    x[0, 5] = 2.0 ** -40
    x[0, 6] = 2.0 ** -33
    codes, _ = _group(ref.logfmt_encode(x).wire[0], 16)
    assert codes[5] == 0 and codes[6] == 1
    # A division entirely in the float32-subnormal range (bf16 denormals) casts and round-trips within the bound.
    rng = np.random.default_rng(1)
    tiny = (rng.uniform(0.1, 1.0, (4, 512)) * 2.0 ** -128 * rng.choice([-1, 1], (4, 512))).astype(np.float32)
    xt = tiny.astype(BF16)
    enc = ref.logfmt_encode(xt)
    assert (enc.num_bytes == 16 + 640).all()
    dec = ref.logfmt_decode(enc)
    xf = xt.astype(np.float32)
    assert (np.sign(dec) == np.sign(xf)).all()
    assert (np.abs(dec - xf) <= 0.03 * np.abs(xf)).all()


def _bound_check(x: np.ndarray):
    """|decoded - x| <= |x| (2^s - 1) / (2^s + 1) (nearest of two levels a ratio 2^s apart) for |x| >= the lowest
    level 2^log_amin, and <= 2^log_amin below it; raw chunks exactly."""
    enc = ref.logfmt_encode(x)
    dec = ref.logfmt_decode(enc).astype(np.float64)
    xf = x.astype(np.float64)
    n, h = x.shape
    blocks = np.abs(xf).reshape(n, h // 128, 128)
    amax, amin = blocks.max(2), blocks.min(2)
    log_amax = np.log2(amax, where=amax > 0, out=np.full_like(amax, -np.inf))
    log_amin = np.where(amin == 0, log_amax - 32, np.fmax(np.log2(np.where(amin > 0, amin, 1)), log_amax - 32))
    s = (log_amax - log_amin) / 510
    rel = (2 ** s - 1) / (2 ** s + 1) * (1 + 1e-4) + 1e-6
    lowest = 2 ** log_amin
    err = np.abs(dec - xf).reshape(n, h // 128, 128)
    mag = np.abs(xf).reshape(n, h // 128, 128)
    ok = np.where(mag >= lowest[..., None], err <= rel[..., None] * mag, err <= lowest[..., None] * (1 + 1e-4))
    assert ok.all(), f"{(~ok).sum()} values outside the bound"
    return dec, xf


@pytest.mark.parametrize("hidden,scale", [(512, 0.1), (1536, 0.3), (2048, 0.5), (7168, 0.1)])
def test_round_trip_bounds(hidden, scale):
    rng = np.random.default_rng(hidden)
    x = (rng.standard_normal((16, hidden)) * scale).astype(np.float32).astype(BF16)
    dec, xf = _bound_check(x)
    assert calc_diff(dec, xf) < 5e-5


def test_combine_reference_with_logfmt_matches_decoded_rows():
    """The all-rank reference combine with use_logfmt sums the decoded rows (float32, k order, one bf16 rounding)."""
    rng = np.random.default_rng(3)
    num_ranks, experts, tokens, hidden, k, tmax = 2, 4, 6, 512, 2, 8
    xs = [(rng.standard_normal((tokens, hidden)) * 0.1).astype(np.float32).astype(BF16) for _ in range(num_ranks)]
    idxs = [np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int64)
            for _ in range(num_ranks)]
    idxs[0][1, 0] = -1
    ws = [rng.random((tokens, k), dtype=np.float32) for _ in range(num_ranks)]
    results = ref.low_latency_dispatch(xs, idxs, tmax, experts, use_fp8=False)
    ys = [r.recv_x for r in results]                       # identity experts
    got = ref.low_latency_combine(ys, idxs, ws, results, experts, use_logfmt=True)
    for s in range(num_ranks):
        dec = ref.logfmt_decode(ref.logfmt_encode(xs[s]))
        want = np.zeros((tokens, hidden), np.float32)
        for kk in range(k):
            sel = idxs[s][:, kk] >= 0
            want[sel] += ws[s][sel, kk][:, None] * dec[sel]
        assert np.array_equal(got[s].view(np.uint16), want.astype(BF16).view(np.uint16))


def deepep_combine_diff(x: np.ndarray, topk_idx, topk_weights, num_ranks: int, num_experts: int, use_logfmt: bool,
                        use_fp8: bool) -> float:
    """calc_diff of one source rank's low-latency combine against DeepEP's fp32 reference x * sum of weights, with
    identity experts (DeepEP's simulated GEMM: the dispatched rows, dequantised with FP8) and the reference's combine
    halves (the rows each expert rank sends back, LogFMT-encoded with use_logfmt)."""
    e_local = num_experts // num_ranks
    rows = ref.per_token_cast_back(*ref.per_token_cast_to_fp8(x)).astype(BF16) if use_fp8 else x
    t_idx, k_idx = np.nonzero(topk_idx >= 0)
    experts = topk_idx[t_idx, k_idx]
    msgs = []
    for dst in range(num_ranks):
        mine = experts // e_local == dst
        order = np.lexsort((t_idx[mine], experts[mine] % e_local))
        local, src = (experts[mine] % e_local)[order].astype(np.int32), t_idx[mine][order].astype(np.int32)
        payload = rows[src]
        msgs.append(ref.LowLatencyMessage(local, src, ref.logfmt_encode(payload) if use_logfmt else payload))
    combined = ref.low_latency_combine_recv(msgs, topk_idx, topk_weights, 0, num_ranks, num_experts)
    want = x.astype(np.float32) * np.where(topk_idx >= 0, topk_weights, 0).sum(1, keepdims=True)
    return calc_diff(want, combined.astype(np.float32))


def deepep_inputs(seed: int, num_tokens=128, hidden=7168, num_topk=8, num_experts=288):
    """DeepEP's test_low_latency inputs (shapes, routing by top-k of |randn| + 1, |randn| weights, 10 masked
    entries) in numpy."""
    rng = np.random.default_rng(seed)
    scores = np.abs(rng.standard_normal((num_tokens, num_experts))) + 1
    topk_idx = np.argsort(-scores, axis=1)[:, :num_topk].astype(np.int64)
    topk_weights = np.abs(rng.standard_normal((num_tokens, num_topk))).astype(np.float32)
    for _ in range(10):
        topk_idx[rng.integers(num_tokens), rng.integers(num_topk)] = -1
    return rng, topk_idx, topk_weights


@pytest.mark.parametrize("scale", [0.1, 0.5])
def test_combine_error_on_deepep_shapes(scale):
    """DeepEP's shapes (128 tokens, hidden 7168, top-8 of 288 experts, 8 ranks); its randn * scale inputs. Numbers
    in docs/api.md (LogFMT) come from bench/logfmt_error.py; here, bounds with margin."""
    rng, idx, w = deepep_inputs(0)
    x = (rng.standard_normal((128, 7168)) * scale).astype(np.float32).astype(BF16)
    plain = deepep_combine_diff(x, idx, w, 8, 288, False, False)
    logfmt = deepep_combine_diff(x, idx, w, 8, 288, True, False)
    cast = (ref.logfmt_encode(x).num_bytes < 7168 * 2).mean()
    assert plain < 1e-5 and logfmt < 2e-5 and logfmt >= plain
    assert (logfmt > plain) == (cast > 0)       # randn * 0.5 has amax >= 1 in every chunk: nothing casts


def test_zero_rows():
    enc = ref.logfmt_encode(np.zeros((0, 1024), BF16))
    assert enc.wire.shape[0] == 0 and enc.num_bytes.shape == (0,)
    assert ref.logfmt_decode(enc).shape == (0, 1024)
