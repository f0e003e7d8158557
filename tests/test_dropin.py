"""DeepEP's Buffer surface in one process (COMM_WORLD of size 1, CPU backend): Config's positional / named / JSON
forms and its table, the constructor's DeepEP keywords, events, operational calls, buffer-size errors that name the
size, lifetime (garbage collection frees the communicators; explicitly_destroy warns) and FP8 scale bits."""
from __future__ import annotations

import gc
import json
import re
import warnings

import numpy as np
import pytest

import epcomm
from epcomm import Buffer, Config, ConfigError, EventHandle, EventOverlap
from epcomm import reference as ref
from epcomm.group import _MpiTransport
from epcomm.testing import assert_bitwise_equal, make_rank_inputs


@pytest.fixture
def buf():
    b = Buffer(backend="cpu")
    yield b
    b.destroy()


def _layout(b, idx, e):
    per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(idx, e)
    return dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


# -- Config ---------------------------------------------------------------------------------------------------------

def test_config_takes_deepeps_fields_positionally_and_by_name():
    c = Config(24, 8, 256)
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens) == (24, 8, 256)
    assert c.num_max_tokens == 4096 and c.num_threads == 512      # epcomm's knobs untouched by DeepEP's fields
    d = Config(num_sms=24, num_max_nvl_chunked_send_tokens=8, num_max_nvl_chunked_recv_tokens=256,
               num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=128)
    assert d.num_max_rdma_chunked_recv_tokens == 132              # DeepEP aligns it up to a multiple of the send chunk
    assert Config().num_sms == 20
    with pytest.raises(TypeError):
        Config(24, 8, 256, 6, 128, 4096)                          # num_max_tokens is keyword-only
    assert Config(24, num_max_tokens=8192).num_max_tokens == 8192


def test_config_checks_as_deepep():
    with pytest.raises(ConfigError, match="num_max_nvl_chunked_send_tokens.*less than"):
        Config(24, 256, 256)
    with pytest.raises(ConfigError, match="at most half"):
        Config(24, 6, 256, 100, 50)            # 50 aligns up to 100: no room for two sends
    with pytest.raises(ConfigError, match="Config.num_max_nvl_chunked_recv_tokens: expected a positive int"):
        Config(24, 6, 0)


def test_config_from_deepep_json(tmp_path):
    fields = {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 16, "num_max_nvl_chunked_recv_tokens": 256,
              "num_max_rdma_chunked_send_tokens": 6, "num_max_rdma_chunked_recv_tokens": 128}
    path = tmp_path / "deepep.json"
    path.write_text(json.dumps(fields))
    for source in (fields, json.dumps(fields), str(path)):
        c = Config.from_json(source)
        assert c.num_max_nvl_chunked_send_tokens == 16 and c.num_max_rdma_chunked_recv_tokens == 132
    assert Config(**fields) == Config.from_json(fields)
    with pytest.raises(ConfigError, match="unknown field.*num_chunks"):
        Config.from_json({"num_chunks": 3})


def test_dispatch_and_combine_configs_follow_deepeps_table():
    old = Buffer.num_sms
    try:
        assert old == 20
        Buffer.set_num_sms(24)
        assert Buffer.get_dispatch_config(2) == Config(24, 24, 256, 6, 128)
        assert Buffer.get_dispatch_config(16) == Config(24, 36, 288, 20, 128)
        assert Buffer.get_combine_config(8) == Config(24, 4, 256, 6, 128)
        assert Buffer.get_combine_config(3) == Config(24)          # a rank count outside DeepEP's table
        with pytest.raises(ConfigError, match="num_sms: expected an even number"):
            Buffer.set_num_sms(25)
    finally:
        Buffer.set_num_sms(old)


# -- constructor ------------------------------------------------------------------------------------------------------

def test_constructor_takes_deepeps_keywords_in_order():
    from mpi4py import MPI
    b = Buffer(None, 1 << 20, 0, False, 24, True, False, False, False, False, MPI.COMM_WORLD, backend="cpu")
    assert b.group is MPI.COMM_WORLD and b.group_size == 1 and isinstance(b.ep_group, epcomm.Group)
    assert b.explicitly_destroy is False and b.enable_shrink is False
    b.destroy()
    # A Group passed in is the group; None gives the Buffer's own Group.
    g = epcomm.Group(None, use_gpu=False)
    with Buffer(g, backend="cpu") as b:
        assert b.group is g and b.ep_group is g
    g.close()
    with Buffer(backend="cpu") as b:
        assert b.group is b.ep_group


def test_unsupported_deepep_options():
    with pytest.raises(ConfigError, match="num_qps_per_rank"):
        Buffer(low_latency_mode=True, num_qps_per_rank=0, backend="cpu")
    # GPU transport switches are documented no-ops on the CPU backend.
    with Buffer(allow_mnnvl=True, use_fabric=True, allow_nvlink_for_low_latency_mode=False, backend="cpu") as b:
        assert b.backend == "cpu"
        for call in (lambda: b.low_latency_update_mask_buffer(0, True), lambda: b.low_latency_clean_mask_buffer(),
                     lambda: b.low_latency_query_mask_buffer(np.zeros(1, np.int32))):
            with pytest.raises(ConfigError, match="enable_shrink=True"):
                call()


def test_shrink_mode_one_rank():
    """enable_shrink=True on the CPU backend: the three mask calls (multi-rank: tests/mpi/shrink_check.py)."""
    with Buffer(enable_shrink=True, backend="cpu") as b:
        status = np.full(1, 7, np.int32)
        b.low_latency_query_mask_buffer(status)
        assert status.tolist() == [0]
        b.low_latency_update_mask_buffer(0, True)
        b.low_latency_query_mask_buffer(status)
        assert status.tolist() == [1]
        b.low_latency_clean_mask_buffer()
        b.low_latency_query_mask_buffer(status)
        assert status.tolist() == [0]
        with pytest.raises(ConfigError, match="rank_to_mask"):
            b.low_latency_update_mask_buffer(1, True)
        with pytest.raises(ConfigError, match="mask_status"):
            b.low_latency_query_mask_buffer(np.zeros(2, np.int32))
        b.reset()                                  # one rank: a barrier of itself


def test_module_names():
    assert epcomm.EventOverlap is epcomm.Event
    assert Buffer.is_sm90_compiled() is True
    tt = epcomm.topk_idx_t
    try:
        import torch
        assert tt is torch.int64
    except ImportError:
        assert tt == np.int64


# -- events -----------------------------------------------------------------------------------------------------------

def test_events_without_a_gpu(buf):
    ev = Buffer.capture()
    assert isinstance(ev, EventOverlap) and ev.event is None and ev.query()
    ev.current_stream_wait()
    keep = np.zeros(3)
    ov = EventOverlap(EventHandle(), (keep,))
    assert ov.extra_tensors[0] is keep and ov.event is None
    idx = np.array([[0, -1]], np.int64)
    *_, done = buf.get_dispatch_layout(idx, 2, previous_event=ov, async_finish=True, allocate_on_comm_stream=True)
    with done as entered:
        assert entered is done
    with pytest.raises(ConfigError, match="previous_event"):
        buf.get_dispatch_layout(idx, 2, previous_event=object())


# -- operational calls ------------------------------------------------------------------------------------------------

def test_local_buffer_tensor_and_comm_stream():
    with Buffer(None, 1 << 16, 1 << 12, backend="cpu") as b:
        a = b.get_local_buffer_tensor(np.float32, (4, 8), offset=64)
        assert a.shape == (4, 8) and a.dtype == np.float32
        a[...] = 3.0
        again = b.get_local_buffer_tensor(np.float32, offset=64)
        assert again.size == ((1 << 16) - 64) // 4 and (again[:32] == 3.0).all()
        assert b.get_local_buffer_tensor(np.uint8, use_rdma_buffer=True).size == 1 << 12
        assert b.get_comm_stream() is None
        with pytest.raises(ConfigError, match="size"):
            b.get_local_buffer_tensor(np.float32, (1 << 20,))
    with Buffer(backend="cpu") as b, pytest.raises(ConfigError, match="num_rdma_bytes=0"):
        b.get_local_buffer_tensor(np.uint8, use_rdma_buffer=True)


def test_low_latency_combine_in_deepeps_order(buf):
    xs, idxs, ws = make_rank_inputs(3, [6], 128, 2, 4)
    recv, count, handle, _, _ = buf.low_latency_dispatch(xs[0], idxs[0], 8, 4, use_fp8=False)
    plain, _, _ = buf.low_latency_combine(recv, idxs[0], ws[0], handle)
    target = buf.get_next_low_latency_combine_buffer(handle)
    target[...] = recv
    stats = np.zeros(1, np.int64)
    # x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook, out, stats
    out = np.empty_like(plain)
    got, _, hook = buf.low_latency_combine(None, idxs[0], ws[0], handle, False, True, False, False, out, stats)
    assert got is out and hook is None
    assert_bitwise_equal(out, plain, "zero-copy combine")
    assert stats[0] >= 0
    with pytest.raises(ConfigError, match="use_logfmt: needs a hidden size that is a multiple of 512"):
        buf.low_latency_combine(recv, idxs[0], ws[0], handle, True)  # LogFMT itself: tests/test_logfmt.py
    with pytest.raises(ConfigError, match="combine_wait_recv_cost_stats"):
        buf.low_latency_combine(recv, idxs[0], ws[0], handle, combine_wait_recv_cost_stats=np.zeros(2, np.int64))


def test_per_expert_list_without_topk(buf):
    xs, idxs, ws = make_rank_inputs(4, [20], 128, 3, 8)
    _, _, _, lst, _, _ = buf.dispatch(xs[0], expert_alignment=4, **_layout(buf, idxs[0], 8))
    counts = np.bincount(idxs[0][idxs[0] >= 0], minlength=8)
    assert lst == [int(-(-c // 4) * 4) for c in counts]
    _, _, _, with_topk, _, _ = buf.dispatch(xs[0], topk_idx=idxs[0], topk_weights=ws[0], expert_alignment=4,
                                            **_layout(buf, idxs[0], 8))
    assert lst == with_topk


def test_fp8_scale_bits_pass_through(buf):
    xs, idxs, ws = make_rank_inputs(5, [16], 256, 2, 4)
    data, scales = ref.per_token_cast_to_fp8(xs[0])
    bits = scales.view(np.uint32)
    bits[:3, 0] = [0x7FC00000, 0x7FA12345, 0xFFC00001]            # quiet, signalling, negative NaN payloads
    bits[3, 1] = 0x80000000                                       # -0.0
    (recv, recv_scales), *_ = buf.dispatch((data, scales), topk_idx=idxs[0], topk_weights=ws[0],
                                           **_layout(buf, idxs[0], 4))
    rows = np.nonzero(_layout(buf, idxs[0], 4)["is_token_in_rank"][:, 0])[0]
    assert_bitwise_equal(recv_scales.view(np.uint32), bits[rows], "scale bits")


# -- buffer sizes -----------------------------------------------------------------------------------------------------

def test_dispatch_past_the_buffer_names_the_size():
    xs, idxs, ws = make_rank_inputs(6, [300], 256, 2, 4)
    small = Config(num_max_tokens=64).get_nvl_buffer_size_hint(512, 1)
    with Buffer(None, small, backend="cpu") as b:
        with pytest.raises(ConfigError, match=r"rank 0 receives 300 rows.*num_nvl_bytes >= (\d+)") as info:
            b.dispatch(xs[0], topk_idx=idxs[0], topk_weights=ws[0], **_layout(b, idxs[0], 4))
    need = int(re.search(r"num_nvl_bytes >= (\d+)", str(info.value)).group(1))
    with Buffer(None, need, backend="cpu") as b:                  # exactly the named size takes it
        b.dispatch(xs[0], topk_idx=idxs[0], topk_weights=ws[0], **_layout(b, idxs[0], 4))
    with Buffer(None, need - 4096, backend="cpu") as b, pytest.raises(ConfigError):   # and it is the smallest
        b.dispatch(xs[0], topk_idx=idxs[0], topk_weights=ws[0], **_layout(b, idxs[0], 4))
    # The default (num_nvl_bytes=0: the GPU's 4096 tokens of hidden 7168) takes a 4096-token prefill of that shape
    # per rank, not 8192 (rows are counted, nothing of that size is allocated here).
    from epcomm import sizing
    assert sizing.dispatch_capacity(0, 1, 7168 * 2, 0, 8) >= 4096
    assert sizing.dispatch_capacity(0, 1, 7168 * 2, 0, 8) < 8192


def test_low_latency_past_num_rdma_bytes():
    xs, idxs, _ = make_rank_inputs(7, [8], 128, 2, 4)
    need = Buffer.get_low_latency_rdma_size_hint(8, 128, 1, 4)
    with Buffer(None, 0, need - 1, low_latency_mode=True, num_qps_per_rank=4, backend="cpu") as b:
        with pytest.raises(ConfigError, match=f"need {need} bytes"):
            b.low_latency_dispatch(xs[0], idxs[0], 8, 4)
    with Buffer(None, 0, need, low_latency_mode=True, num_qps_per_rank=4, backend="cpu") as b:
        b.low_latency_dispatch(xs[0], idxs[0], 8, 4)


# -- lifetime -----------------------------------------------------------------------------------------------------------

def _live_transports() -> int:
    gc.collect()
    return sum(type(o) is _MpiTransport for o in gc.get_objects())


def test_garbage_collection_frees_the_communicators():
    """10^4 Buffers made and dropped (each makes two MPI communicators): MPICH's 2048 context ids would run out
    after about 1000 without the finalizer."""
    before = _live_transports()
    for _ in range(10_000):
        Buffer(None, 1 << 20, backend="cpu")
    assert _live_transports() == before


def test_explicitly_destroy_warns_and_leaks_like_deepep():
    b = Buffer(None, 1 << 20, explicitly_destroy=True, backend="cpu")
    transport = b.ep_group._transport
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del b
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) and "explicitly_destroy" in str(w.message) for w in caught)
    transport.close()                                              # the test frees what the warning says leaked
    b = Buffer(None, 1 << 20, explicitly_destroy=True, backend="cpu")
    b.destroy()
    b.destroy()                                                    # twice is fine
    with pytest.raises(epcomm.EpcommError, match="destroyed"):
        b.get_dispatch_layout(np.zeros((1, 1), np.int64), 1)
