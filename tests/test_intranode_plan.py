"""Host-side planning of the intranode kernels (no GPU): SM roles of dispatch_send, the zero-copy split of the data
region, and the size hints that must cover it."""
from __future__ import annotations

import pytest

from epcomm import Config
from epcomm import intranode as intra


@pytest.mark.parametrize("num_sms", [1, 2, 8, 24, 32, 132])
@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("fp8", [False, True])
def test_default_peer_sms_leaves_both_roles_an_sm(num_sms, num_ranks, fp8):
    peers = intra.default_peer_sms(num_sms, num_ranks, fp8)
    if num_sms < 2 or num_ranks < 2:
        assert peers == 0                                   # no split: every SM does both
    else:
        assert 1 <= peers <= num_sms - 1


@pytest.mark.parametrize("fp8", [False, True])
def test_default_peer_sms_gives_peers_more_with_more_ranks(fp8):
    shares = [intra.default_peer_sms(24, r, fp8) for r in (2, 4, 8)]
    assert shares == sorted(shares) and shares[0] < shares[-1]


def test_default_peer_sms_is_the_measured_split_at_ep2():
    assert intra.default_peer_sms(24, 2, fp8=True) == 12 and intra.default_peer_sms(24, 2, fp8=False) == 16


def test_zero_copy_split_keeps_dispatch_and_combine_apart():
    hidden, topk, rows = 7168, 8, 2 * 4096
    size = intra.nvl_buffer_size_hint(4096, hidden * 2, 2, topk, zero_copy=True)
    data = size - intra.meta_bytes(2)
    split = intra.zero_copy_split(data)
    assert split % 4096 == 0
    recv = intra.RecvLayout.plan(split, hidden * 2, 0, topk)   # a zero-copy BF16 dispatch: [0, split)
    comb = intra.CombineLayout.plan(data, hidden, topk, base=split)
    assert recv.capacity_rows >= rows and comb.capacity_rows >= rows
    assert recv.off_src + recv.capacity_rows * 4 <= split <= comb.off_x
    assert comb.off_w + comb.capacity_rows * topk * 4 <= data
    # Without zero_copy the hint is half the areas (one area serves dispatch and combine in turn).
    plain = intra.nvl_buffer_size_hint(4096, hidden * 2, 2, topk)
    assert plain - intra.meta_bytes(2) == (size - intra.meta_bytes(2)) // 2
    assert Config().get_nvl_buffer_size_hint(hidden * 2, 2, zero_copy=True) == intra.nvl_buffer_size_hint(
        4096, hidden * 2, 2, zero_copy=True)


def test_combine_layout_base_zero_is_unchanged():
    a = intra.CombineLayout.plan(1 << 24, 4096, 8)
    assert a.off_x == 0 and a.off_w >= a.capacity_rows * 4096 * 2


def test_make_rank_inputs_draws_every_rank_from_one_seed():
    """The GPU checks' inputs: the same seed gives the same arrays on every rank; the draw order is x, top-k,
    weights, so a check can recompute any rank's expected values."""
    import numpy as np
    from epcomm.testing import make_rank_inputs, make_topk, make_weights, make_x
    xs, idxs, ws = make_rank_inputs(7, [3, 0, 5], 256, 4, 16, drop=0.5)
    assert [x.shape for x in xs] == [(3, 256), (0, 256), (5, 256)]
    assert [i.shape for i in idxs] == [(3, 4), (0, 4), (5, 4)] and [w.shape for w in ws] == [(3, 4), (0, 4), (5, 4)]
    rng = np.random.default_rng(7)
    want_x = [make_x(rng, t, 256, r) for r, t in enumerate([3, 0, 5])]
    want_i = [make_topk(rng, t, 4, 16, drop=0.5) for t in [3, 0, 5]]
    want_w = [make_weights(rng, t, 4) for t in [3, 0, 5]]
    for got, want in ((xs, want_x), (idxs, want_i), (ws, want_w)):
        for g, w in zip(got, want):
            assert np.array_equal(g.view(np.uint8), w.view(np.uint8))
    assert (np.concatenate(idxs) == -1).any()  # drop=0.5 leaves some entries unused


def test_pairwise_cases_cover_every_pair_and_stay_small():
    from itertools import combinations
    from epcomm.testing import pairwise_cases
    factors = {"dtype": ["bf16", "fp8"], "topk": [True, False], "H": [2048, 4096, 7168, 7680], "K": [1, 6, 8],
               "E": [16, 64, 256], "tokens": [0, 1, 17, 4096], "worst": [False, True]}
    cases = pairwise_cases(factors, seed=3)
    for a, b in combinations(factors, 2):
        seen = {(c[a], c[b]) for c in cases}
        assert seen == {(x, y) for x in factors[a] for y in factors[b]}, (a, b)
    assert 16 <= len(cases) <= 30                          # 4 x 4 levels need 16; the full product is 2304
    assert cases == pairwise_cases(factors, seed=3)         # seeded: the same plan on every rank
    assert pairwise_cases({"x": [1, 2, 3]}) == [{"x": 1}, {"x": 2}, {"x": 3}]


def test_kernel_counters_mirror_the_header_and_do_not_overlap():
    """Each kernel's counters (blocks done + NUM_TICKETS tickets) sit at COUNTER_SLOTS in one int32 array; the last
    block out resets only its own, so two kernels' ranges must not overlap, and NUM_TICKETS mirrors kNumTickets."""
    import re
    from pathlib import Path
    header = (Path(__file__).resolve().parents[1] / "cuda_src" / "epcomm" / "dealing.cuh").read_text()
    assert int(re.search(r"constexpr int kNumTickets = (\d+);", header).group(1)) == intra.NUM_TICKETS
    ranges = sorted((start, start + 1 + intra.NUM_TICKETS) for start in intra.COUNTER_SLOTS.values())
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end <= start, ranges
    assert ranges[-1][1] <= intra.NUM_COUNTERS


def test_meta_bytes_match_intranode_cuh():
    """intranode.meta_bytes mirrors Meta<R>::kBytes (the data region starts there: a smaller mirror would let data
    overlap the flags): compiled and read back from the PTX."""
    import numpy as np
    from test_runtime import _ptx_global_bytes  # tests/ is on sys.path (pytest's prepend import mode)

    from epcomm.runtime import compiler

    source = ('#include "epcomm/intranode.cuh"\n'
              "__device__ const unsigned long long epcomm_meta[] = {epcomm::intranode::Meta<2>::kBytes, "
              "epcomm::intranode::Meta<4>::kBytes, epcomm::intranode::Meta<8>::kBytes};\n")
    options = [("-arch=compute_90" if o.startswith("-arch=") else o)
               for o in compiler.compile_options(intra.notify_spec(2), "sm_90a")]
    ptx, log = compiler._nvrtc_compile(source, "meta_check.cu", options, ptx=True)
    assert ptx is not None, log
    device = np.frombuffer(_ptx_global_bytes(ptx.decode(), "epcomm_meta", 24), dtype="<u8").tolist()
    assert device == [intra.meta_bytes(r) for r in (2, 4, 8)]


@pytest.mark.parametrize("changes", [dict(reduce_parts=0), dict(reduce_parts=9), dict(reduce_tail_warps=-1.0),
                                     dict(dynamic_tokens=1), dict(fuse_kernels="yes")])
def test_intranode_tuning_rejects_bad_values(changes):
    from epcomm.errors import ConfigError
    from epcomm.intranode import IntranodeTuning
    with pytest.raises(ConfigError, match="IntranodeTuning"):
        IntranodeTuning(**changes)
