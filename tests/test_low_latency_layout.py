"""CPU checks of the low-latency buffer layout (epcomm/low_latency.py), its parity with low_latency.cuh, and numpy
mirrors of the bit tricks the kernels use (fp8.cuh), against epcomm.reference."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from epcomm import low_latency as ll
from epcomm import reference as ref
from epcomm.errors import ConfigError
from epcomm.runtime import cuda_src_dir

SHAPES = [(1, 8, 1, 1), (128, 7168, 2, 256), (128, 7168, 8, 288), (7, 2048, 4, 16), (256, 4096, 3, 9),
          (33, 136, 2, 64), (1, 128, 256, 256)]


@pytest.mark.parametrize("tmax,hidden,ranks,experts", SHAPES)
def test_regions_aligned_disjoint_and_inside_half(tmax, hidden, ranks, experts):
    lay = ll.LowLatencyLayout.plan(tmax, hidden, ranks, experts)
    regions = lay.regions()
    assert [name for name, _, _ in regions] == ["dispatch_signals", "combine_signals", "weight_signals",
                                                "dispatch_recv", "combine_recv", "combine_send", "dispatch_send",
                                                "dispatch_tokens", "combine_weights", "combine_partial"]
    end = 0
    for name, off, size in regions:
        assert off % ll.ALIGN == 0, name
        assert off >= end, f"{name} overlaps the region before it"
        assert size > 0, name
        end = off + size
    assert end <= lay.half_bytes and lay.half_bytes % ll.ALIGN == 0
    assert lay.signal_bytes == lay.off_dispatch_recv  # clean zeroes exactly the signal regions
    assert lay.signal_bytes >= lay.off_weight_signals + ranks * 8
    assert lay.total_bytes == 2 * lay.half_bytes == ll.rdma_size_hint(tmax, hidden, ranks, experts)
    assert lay.half_offset(1) == lay.half_bytes and lay.half_offset(0) == 0
    with pytest.raises(ValueError):
        lay.half_offset(2)


@pytest.mark.parametrize("tmax,hidden,ranks,experts", SHAPES)
def test_slot_addresses_stay_in_their_region(tmax, hidden, ranks, experts):
    """The last slot of every addressed array (as the kernels compute it) ends inside its region."""
    lay = ll.LowLatencyLayout.plan(tmax, hidden, ranks, experts)
    e_local = experts // ranks
    regions = {name: (off, size) for name, off, size in lay.regions()}

    def inside(name, start, nbytes):
        off, size = regions[name]
        assert off <= start and start + nbytes <= off + size, (name, start, nbytes, off, size)

    # dispatch_send: message of (local expert j, source rank, slot) at the owner
    j, src, slot = e_local - 1, ranks - 1, tmax - 1
    for fp8 in (False, True):
        assert ll.message_bytes(hidden, fp8) <= lay.msg_stride
        inside("dispatch_recv", lay.off_dispatch_recv + ((j * ranks + src) * tmax + slot) * lay.msg_stride,
               ll.message_bytes(hidden, fp8))
        inside("dispatch_send", lay.off_dispatch_send + (tmax - 1) * lay.msg_stride, ll.message_bytes(hidden, fp8))
        # once_per_rank: token t of source rank src, once per destination rank
        inside("dispatch_tokens", lay.off_dispatch_tokens + (src * tmax + tmax - 1) * lay.msg_stride,
               ll.message_bytes(hidden, fp8))
    inside("dispatch_signals", lay.off_dispatch_signals + (j * ranks + src) * 8, 8)
    # combine_send: row (global expert e, token t) at the source; signal [e]
    inside("combine_recv", lay.off_combine_recv + ((experts - 1) * tmax + tmax - 1) * 2 * hidden, 2 * hidden)
    inside("combine_signals", lay.off_combine_signals + (experts - 1) * 8, 8)
    inside("combine_send", lay.off_combine_send + ((e_local - 1) * ranks * tmax + ranks * tmax - 1) * 2 * hidden,
           2 * hidden)
    # once-per-rank combine: the weight of (source src, token t, local expert j) at the expert's owner, its signal
    # [src], and rank src's partial row for token t at the token's owner (float32 [H], 16-byte stores)
    inside("combine_weights", lay.off_combine_weights + ((src * tmax + tmax - 1) * ll.MAX_TOPK + ll.MAX_TOPK - 1) * 4,
           4)
    inside("weight_signals", lay.off_weight_signals + src * 8, 8)
    inside("combine_partial", lay.off_combine_partial + (src * tmax + tmax - 1) * hidden * 4, hidden * 4)
    assert lay.off_combine_partial % 16 == 0 and (hidden * 4) % 16 == 0
    # 16-byte alignment of every vector access
    assert lay.msg_stride % 16 == 0 and (2 * hidden) % 16 == 0
    if hidden % 128 == 0:  # FP8: the scales after the e4m3 row start 16-aligned
        assert (ll.LL_MSG_HEADER_BYTES + hidden) % 16 == 0


def test_layout_independent_of_dtype_and_rejects_bad_shapes():
    assert ll.LowLatencyLayout.plan(128, 7168, 2, 256).key == (128, 7168, 2, 256)
    with pytest.raises(ConfigError):
        ll.LowLatencyLayout.plan(0, 7168, 2, 256)
    with pytest.raises(ConfigError):
        ll.LowLatencyLayout.plan(128, 7168, 2, 255)
    with pytest.raises(ConfigError):
        ll.LowLatencyLayout.plan(128, 7164, 2, 256)


def test_message_bytes():
    assert ll.message_bytes(7168, False) == 16 + 2 * 7168
    assert ll.message_bytes(7168, True) == 16 + 7168 + 56 * 4
    assert ll.message_bytes(128, True) == 16 + 144  # 128 + 4 = 132 rounded up to 16
    assert ll.ll_message_bytes(7168) == ll.message_bytes(7168, False)


def test_blocks_per_expert():
    assert ll.blocks_per_expert(128, 132) == 2
    assert ll.blocks_per_expert(8, 132) == 17
    assert ll.blocks_per_expert(1, 132) == ll.MAX_BLOCKS_PER_EXPERT
    assert ll.blocks_per_expert(500, 132) == 1


def _header_constant(text: str, name: str) -> int:
    m = re.search(rf"constexpr int {name} = (\d+);", text)
    assert m, name
    return int(m.group(1))


def test_constants_match_the_header():
    with open(os.path.join(cuda_src_dir(), "epcomm", "low_latency.cuh")) as f:
        text = f.read()
    assert _header_constant(text, "kMaxRanks") == ll.MAX_RANKS
    assert _header_constant(text, "kMaxTopk") == ll.MAX_TOPK
    assert _header_constant(text, "kMsgHeaderBytes") == ll.LL_MSG_HEADER_BYTES


def test_specs_registered_and_nvshmem_only_where_needed():
    specs = ll.example_specs()
    ops = {(s.op, s.uses_nvshmem) for s in specs}
    assert ops == {("dispatch_send", True), ("combine_send", True), ("dispatch_recv", False),
                   ("combine_recv", False)}
    for s in specs:
        assert s.params[-3:] == ll.COMM_PARAMS, s.describe()
    assert ll.dispatch_send_spec(False, True) == ll.dispatch_send_spec(False, False)  # round_scale needs FP8


# -- numpy mirrors of fp8.cuh's bit tricks ------------------------------------------------------------------------

def _ceil_pow2_bits(v: np.ndarray) -> np.ndarray:
    """fp8::ceil_pow2: v when its mantissa bits are zero, else the next exponent (positive normal v)."""
    bits = v.astype(np.float32).view(np.uint32)
    up = (((bits >> 23) + 1) << 23).astype(np.uint32)
    return np.where((bits & 0x7FFFFF) == 0, bits, up).view(np.float32)


def test_ceil_pow2_bit_trick_matches_reference():
    rng = np.random.default_rng(0)
    amax = np.concatenate([rng.random(100000).astype(np.float32) * 1000,
                           np.float32(2.0) ** np.arange(-14, 12, dtype=np.float32) * 448,  # exact powers * 448
                           np.array([1e-4, 448.0, 447.99997, 448.00003], np.float32)])
    v = np.maximum(amax, np.float32(ref.FP8_AMAX_FLOOR)) * ref.FP8_MAX_INV   # fp8::block_scales' argument
    np.testing.assert_array_equal(_ceil_pow2_bits(v).view(np.uint32), ref._ceil_pow2(v).view(np.uint32))


def test_ue8m0_byte_matches_pack():
    scale_inv = np.float32(2.0) ** np.arange(-20, 8, dtype=np.float32)
    words = ref.pack_ue8m0(scale_inv[None, :])[0].view(np.uint32)
    bytes_ = (scale_inv.view(np.uint32) >> 23) & 0xFF
    for s, b in enumerate(bytes_):
        assert (words[s // 4] >> (8 * (s % 4))) & 0xFF == b


@pytest.mark.parametrize("changes", [dict(once_per_rank=1), dict(combine_once_per_rank="no"),
                                     dict(combine_send_blocks_per_expert=0), dict(force_nvshmem=None)])
def test_low_latency_tuning_rejects_bad_values(changes):
    from epcomm.errors import ConfigError
    from epcomm.low_latency import LowLatencyTuning
    with pytest.raises(ConfigError, match="LowLatencyTuning"):
        LowLatencyTuning(**changes)
