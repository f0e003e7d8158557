"""Every invalid argument raises a ConfigError (an EpcommError and a ValueError) naming the argument and the
expected form, before anything runs. One process, a group of one rank, the CPU backend."""
from __future__ import annotations

import numpy as np
import pytest

import epcomm
from epcomm import interop
from epcomm import validate as v
from epcomm.config import Config, env
from epcomm.errors import ConfigError, EpcommError
from epcomm.reference import bf16, fp8, per_token_cast_to_fp8
from epcomm.testing import make_topk, make_weights, make_x

T, H, K, E = 6, 256, 2, 4


def raises(fn, *fragments):
    """fn() must raise ConfigError whose message contains every fragment (the argument and the expected form)."""
    with pytest.raises(ConfigError) as info:
        fn()
    assert isinstance(info.value, EpcommError) and isinstance(info.value, ValueError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert len(message) < 400, f"message too long: {message!r}"
    return message


@pytest.fixture(scope="module")
def buf():
    b = epcomm.Buffer(None, backend="cpu")
    assert b.num_ranks == 1
    yield b
    b.destroy()


@pytest.fixture()
def inputs():
    rng = np.random.default_rng(0)
    return make_x(rng, T, H, 0), make_topk(rng, T, K, E), make_weights(rng, T, K)


@pytest.fixture()
def layout(buf, inputs):
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(inputs[1], E)
    return dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


@pytest.fixture()
def dispatched(buf, inputs, layout):
    x, idx, w = inputs
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    return recv_x, recv_w, handle


# ---------------------------------------------------------------------------------------------------------------------
# topk_idx and num_experts
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16])
def test_topk_idx_wrong_dtype(buf, inputs, dtype):
    raises(lambda: buf.get_dispatch_layout(inputs[1].astype(dtype), E),
           "topk_idx", "[num_tokens, num_topk] int64", np.dtype(dtype).name)


def test_topk_idx_int32_is_widened(buf, inputs):
    # int32 is accepted on purpose (JAX without x64 has no int64) and gives the int64 results.
    narrow = buf.get_dispatch_layout(inputs[1].astype(np.int32), E)
    wide = buf.get_dispatch_layout(inputs[1], E)
    for i in (0, 2, 3):
        np.testing.assert_array_equal(narrow[i], wide[i])


def test_topk_idx_one_dimensional(buf, inputs):
    raises(lambda: buf.get_dispatch_layout(inputs[1][:, 0].copy(), E), "topk_idx", "[num_tokens, num_topk] int64")


def test_topk_idx_no_columns(buf):
    raises(lambda: buf.get_dispatch_layout(np.zeros((T, 0), np.int64), E), "topk_idx", "top-k column")


def test_topk_idx_wrong_rows(buf, inputs, layout):
    x, idx, w = inputs
    raises(lambda: buf.dispatch(x, topk_idx=np.vstack([idx, idx[:1]]), topk_weights=w, **layout),
           "topk_idx", f"num_tokens={T}")


@pytest.mark.parametrize("bad", [E, -2])
def test_topk_idx_out_of_range(buf, inputs, layout, bad):
    x, idx, w = inputs
    idx = idx.copy()
    idx[2, 1] = bad
    for call in (lambda: buf.get_dispatch_layout(idx, E),
                 lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout),
                 lambda: buf.low_latency_dispatch(x, idx, T, E)):
        raises(call, "topk_idx", f"[-1, {E})", str(bad), "(2, 1)")


def test_num_experts_not_divisible_by_ranks(buf, inputs):
    raises(lambda: v.check_num_experts(6, 4), "num_experts", "multiple of the number of ranks (4)", "6")
    raises(lambda: v.check_num_experts(0, 1), "num_experts", "an int >= 1")
    raises(lambda: v.check_num_experts(4.0, 1), "num_experts", "an int")
    # The same check through the API, as seen by a group of 4 (validation runs before any communication).
    fake = epcomm.Buffer(None, backend="cpu")
    try:
        fake.num_ranks = 4
        raises(lambda: fake.get_dispatch_layout(inputs[1], 6), "num_experts", "multiple of the number of ranks (4)")
        raises(lambda: fake.low_latency_dispatch(inputs[0], inputs[1], T, 6), "num_experts", "(4)")
    finally:
        fake.num_ranks = 1
        fake.destroy()


# ---------------------------------------------------------------------------------------------------------------------
# x
# ---------------------------------------------------------------------------------------------------------------------

def test_x_float32(buf, inputs, layout):
    x, idx, w = inputs
    raises(lambda: buf.dispatch(x.astype(np.float32), topk_idx=idx, topk_weights=w, **layout),
           "x", "[num_tokens, hidden] bf16", "float32")


def test_x_hidden_bytes_not_multiple_of_16(buf):
    rng = np.random.default_rng(1)
    x, idx = make_x(rng, T, 12, 0), make_topk(rng, T, K, E)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    raises(lambda: buf.dispatch(x, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert),
           "x", "hidden * 2 bytes a multiple of 16", "[6, 12] bf16")


def test_x_fp8_hidden_not_multiple_of_128(buf, layout):
    data = np.zeros((T, 192), fp8)
    scales = np.ones((T, 2), np.float32)
    raises(lambda: buf.dispatch((data, scales), **layout), "x[0]", "multiple of 128 for FP8", "[6, 192] float8_e4m3fn")


def test_x_fp8_wrong_scales(buf, inputs, layout):
    data, scales = per_token_cast_to_fp8(inputs[0])
    raises(lambda: buf.dispatch((data, scales[:, :1].copy()), **layout), "x[1]", f"[{T}, {H // 128}] float32 scales",
           "[6, 1] float32")
    raises(lambda: buf.dispatch((data, scales.astype(np.float64)), **layout), "x[1]", "float32", "float64")
    raises(lambda: buf.dispatch((data, scales, scales), **layout), "x", "pair", "a tuple of 3")


def test_x_fp8_column_major_scales_accepted(buf, inputs, layout):
    data, scales = per_token_cast_to_fp8(inputs[0])
    recv_x, *_ = buf.dispatch((data, np.ascontiguousarray(scales.T).T), **layout)
    np.testing.assert_array_equal(recv_x[1], scales)


def test_x_not_an_array(buf, layout):
    raises(lambda: buf.dispatch([[1.0, 2.0]], **layout), "x", "expected an array", "list")
    raises(lambda: buf.dispatch((), **layout), "x", "expected an array", "tuple")


def test_x_not_contiguous(buf, inputs, layout):
    x2 = make_x(np.random.default_rng(2), T, 2 * H, 0)[:, ::2]
    raises(lambda: buf.dispatch(x2, **layout), "x", "C-contiguous")


# ---------------------------------------------------------------------------------------------------------------------
# The other dispatch arguments
# ---------------------------------------------------------------------------------------------------------------------

def test_topk_weights_without_topk_idx(buf, inputs, layout):
    x, idx, w = inputs
    raises(lambda: buf.dispatch(x, topk_weights=w, **layout), "topk_weights", "both or neither")
    raises(lambda: buf.dispatch(x, topk_idx=idx, **layout), "topk_idx", "both or neither")


def test_topk_weights_wrong_shape_or_dtype(buf, inputs, layout):
    x, idx, w = inputs
    raises(lambda: buf.dispatch(x, topk_idx=idx, topk_weights=np.hstack([w, w]), **layout),
           "topk_weights", f"[{T}, {K}] float32", f"[{T}, {2 * K}] float32")
    raises(lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w.astype(np.float64), **layout),
           "topk_weights", f"[{T}, {K}] float32", "float64")


def test_is_token_in_rank_missing_or_wrong(buf, inputs, layout):
    x, idx, w = inputs
    rest = {k: a for k, a in layout.items() if k != "is_token_in_rank"}
    raises(lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, **rest), "is_token_in_rank", "bool")
    in_rank = layout["is_token_in_rank"]
    raises(lambda: buf.dispatch(x, is_token_in_rank=np.vstack([in_rank, in_rank]), **rest),
           "is_token_in_rank", f"[{T}, 1] bool", f"[{2 * T}, 1] bool")
    raises(lambda: buf.dispatch(x, is_token_in_rank=in_rank.astype(np.int32), **rest),
           "is_token_in_rank", f"[{T}, 1] bool", "int32")


def test_num_tokens_per_expert_missing_or_wrong(buf, inputs, layout):
    x = inputs[0]
    rest = {k: a for k, a in layout.items() if k != "num_tokens_per_expert"}
    raises(lambda: buf.dispatch(x, **rest), "num_tokens_per_expert", "[num_experts] int32")
    raises(lambda: buf.dispatch(x, num_tokens_per_expert=layout["num_tokens_per_expert"].astype(np.int64), **rest),
           "num_tokens_per_expert", "[num_experts] int32", "int64")


def test_num_tokens_per_rank_wrong(buf, inputs, layout):
    rest = dict(layout, num_tokens_per_rank=np.zeros(2, np.int32))
    raises(lambda: buf.dispatch(inputs[0], **rest), "num_tokens_per_rank", "[1] int32", "[2] int32")


def test_negative_num_worst_tokens(buf, inputs, layout):
    raises(lambda: buf.dispatch(inputs[0], num_worst_tokens=-1, **layout), "num_worst_tokens", "an int >= 0", "-1")


def test_expert_alignment_zero(buf, inputs, layout):
    raises(lambda: buf.dispatch(inputs[0], expert_alignment=0, **layout), "expert_alignment", "an int >= 1", "0")
    raises(lambda: buf.dispatch(inputs[0], expert_alignment=True, **layout), "expert_alignment", "an int")


def test_config_and_event_types(buf, inputs, layout):
    raises(lambda: buf.dispatch(inputs[0], config={"num_sms": 8}, **layout), "config", "epcomm.Config", "dict")
    raises(lambda: buf.dispatch(inputs[0], previous_event=object(), **layout), "previous_event", "Event")


def test_cached_dispatch_arguments(buf, inputs, dispatched):
    x, idx, w = inputs
    handle = dispatched[2]
    raises(lambda: buf.dispatch(x[:-1].copy(), handle=handle), "x", f"[{T}, hidden] rows")
    raises(lambda: buf.dispatch(x, handle=handle, topk_idx=idx, topk_weights=w), "topk_idx/topk_weights", "neither")
    raises(lambda: buf.dispatch(x, handle="h"), "handle", "DispatchHandle", "str")


# ---------------------------------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------------------------------

def test_combine_x_wrong_rows(buf, dispatched):
    recv_x, _, handle = dispatched
    n = handle.num_recv_tokens
    raises(lambda: buf.combine(recv_x[:-1].copy(), handle), "x", f"[{n}, {H}] bf16", f"[{n - 1}, {H}] bf16")
    raises(lambda: buf.combine(recv_x.astype(np.float32), handle), "x", f"[{n}, {H}] bf16", "float32")


def test_combine_bias_wrong_shape(buf, dispatched):
    recv_x, _, handle = dispatched
    good = np.zeros((T, H), bf16)
    raises(lambda: buf.combine(recv_x, handle, bias=np.zeros((T + 1, H), bf16)), "bias", f"[{T}, {H}] bf16",
           f"[{T + 1}, {H}] bf16")
    raises(lambda: buf.combine(recv_x, handle, bias=(good, np.zeros((T, H), np.float32))), "bias[1]",
           f"[{T}, {H}] bf16", "float32")
    raises(lambda: buf.combine(recv_x, handle, bias=(good, good, good)), "bias", "a pair", "a tuple of 3")


def test_combine_topk_weights_and_handle(buf, dispatched):
    recv_x, recv_w, handle = dispatched
    raises(lambda: buf.combine(recv_x, handle, topk_weights=recv_w[:-1].copy()), "topk_weights",
           f"[{handle.num_recv_tokens}, num_topk] float32")
    raises(lambda: buf.combine(recv_x, None), "handle", "DispatchHandle", "NoneType")


# ---------------------------------------------------------------------------------------------------------------------
# Low-latency mode
# ---------------------------------------------------------------------------------------------------------------------

def test_ll_more_tokens_than_tmax(buf, inputs):
    raises(lambda: buf.low_latency_dispatch(inputs[0], inputs[1], T - 1, E), "x",
           f"num_max_dispatch_tokens_per_rank={T - 1}", f"[{T}, {H}] bf16")
    raises(lambda: buf.low_latency_dispatch(inputs[0], inputs[1], 0, E), "num_max_dispatch_tokens_per_rank",
           "an int >= 1")


def test_ll_ue8m0_without_round_scale(buf, inputs):
    raises(lambda: buf.low_latency_dispatch(inputs[0], inputs[1], T, E, use_ue8m0=True), "use_ue8m0", "round_scale")
    raises(lambda: buf.low_latency_dispatch(inputs[0], inputs[1], T, E, use_fp8=False, round_scale=True,
                                            use_ue8m0=True), "use_ue8m0", "use_fp8")


def test_ll_stats_dtype(buf, inputs):
    raises(lambda: buf.low_latency_dispatch(inputs[0], inputs[1], T, E,
                                            cumulative_local_expert_recv_stats=np.zeros(E, np.int64)),
           "cumulative_local_expert_recv_stats", f"[{E}] int32", "int64")
    raises(lambda: buf.low_latency_dispatch(inputs[0], inputs[1], T, E,
                                            cumulative_local_expert_recv_stats=np.zeros(E + 1, np.int32)),
           "cumulative_local_expert_recv_stats", f"[{E}] int32", f"[{E + 1}] int32")
    raises(lambda: buf.low_latency_dispatch(inputs[0], inputs[1], T, E,
                                            dispatch_wait_recv_cost_stats=np.zeros(1, np.int32)),
           "dispatch_wait_recv_cost_stats", "[1] int64", "int32")


def test_ll_x_forms(buf, inputs):
    x, idx, _ = inputs
    raises(lambda: buf.low_latency_dispatch(x.astype(np.float32), idx, T, E), "x", "bf16", "float32")
    x192 = make_x(np.random.default_rng(3), T, 192, 0)
    raises(lambda: buf.low_latency_dispatch(x192, idx, T, E, use_fp8=True), "x", "multiple of 128 with use_fp8")
    raises(lambda: buf.low_latency_dispatch(x, idx[:-1].copy(), T, E), "topk_idx", f"num_tokens={T}")


def test_ll_combine_arguments(buf, inputs):
    x, idx, w = inputs
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    raises(lambda: buf.low_latency_combine(recv_x[:, :-1].copy(), idx, w, handle), "x", f"[{E}, {T}, {H}] bf16")
    raises(lambda: buf.low_latency_combine(recv_x, idx, w[:, :1].copy(), handle), "topk_weights", f"[{T}, {K}] float32")
    raises(lambda: buf.low_latency_combine(recv_x, idx, w, handle, out=np.zeros((T, H), np.float32)), "out",
           f"[{T}, {H}] bf16", "float32")
    raises(lambda: buf.low_latency_combine(recv_x, idx, w, "h"), "handle", "LowLatencyHandle")
    raises(lambda: buf.get_next_low_latency_combine_buffer(None), "handle", "LowLatencyHandle")
    buf.low_latency_combine(recv_x, idx, w, handle)          # the valid call still works afterwards


# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------

def test_config_num_sms_zero():
    raises(lambda: Config(num_sms=0), "Config.num_sms", "a positive int", "0")
    raises(lambda: Config(num_max_tokens=0), "Config.num_max_tokens", "a positive int")
    raises(lambda: epcomm.Buffer.set_num_sms(0), "num_sms", "an int >= 1")


def test_config_num_threads():
    for bad in (100, 96, 2048, 0, "512"):
        raises(lambda: Config(num_threads=bad), "Config.num_threads", "a multiple of 32 in 128..1024", repr(bad))
    assert Config(num_threads=1024).num_threads == 1024 and Config().num_threads == 512


def test_config_send_peer_sms():
    for bad in (-1, 1.5, "8"):
        raises(lambda: Config(send_peer_sms=bad), "Config.send_peer_sms", "None or an int >= 0", repr(bad))
    assert Config().send_peer_sms is None and Config(send_peer_sms=0).send_peer_sms == 0


def test_zero_copy_refused_for_jax_callers():
    raises(lambda: epcomm.Buffer._check_zero_copy_framework(True, "jax"), "zero_copy", "JAX")
    epcomm.Buffer._check_zero_copy_framework(False, "jax")
    epcomm.Buffer._check_zero_copy_framework(True, "torch")


def test_epcomm_backend_bad_value(monkeypatch):
    monkeypatch.setenv("EPCOMM_BACKEND", "tpu")
    raises(lambda: env("EPCOMM_BACKEND"), "EPCOMM_BACKEND", "auto, cpu or gpu", "'tpu'")
    raises(lambda: epcomm.Buffer(None), "EPCOMM_BACKEND", "auto, cpu or gpu")
    raises(lambda: epcomm.Buffer(None, backend="tpu"), "backend", "'auto', 'cpu' or 'gpu'", "'tpu'")


def test_epcomm_timeout_unparsable(monkeypatch, buf, inputs, layout):
    monkeypatch.setenv("EPCOMM_TIMEOUT_S", "soon")
    raises(lambda: env("EPCOMM_TIMEOUT_S"), "EPCOMM_TIMEOUT_S", "'soon'", "seconds")
    # The CPU backend reads it at every exchange, before anything is sent.
    raises(lambda: buf.dispatch(inputs[0], **layout), "EPCOMM_TIMEOUT_S", "'soon'")
    monkeypatch.setenv("EPCOMM_TIMEOUT_S", "0")               # a bound of zero would fail every wait at once
    raises(lambda: env("EPCOMM_TIMEOUT_S"), "EPCOMM_TIMEOUT_S", "positive number of seconds", "'0'")
    monkeypatch.delenv("EPCOMM_TIMEOUT_S")
    buf.dispatch(inputs[0], **layout)                        # and the buffer is still usable


def test_buffer_sizes():
    raises(lambda: epcomm.Buffer(None, num_nvl_bytes=-1, backend="cpu"), "num_nvl_bytes", "an int >= 0")
    raises(lambda: epcomm.Buffer.get_low_latency_rdma_size_hint(0, 256, 1, 4), "num_max_dispatch_tokens_per_rank")


# ---------------------------------------------------------------------------------------------------------------------
# Interop
# ---------------------------------------------------------------------------------------------------------------------

def test_numpy_bf16_round_trip(buf, inputs):
    x = inputs[0]
    assert interop.framework_of(x) == "numpy"
    inside = interop.as_numpy(x, "x")
    assert inside.dtype == bf16 and np.shares_memory(inside, x)       # no copy
    back = interop.to_framework(inside, "numpy")
    assert back.dtype == bf16
    np.testing.assert_array_equal(back.view(np.uint16), x.view(np.uint16))
    # Through the API: numpy in, numpy bf16 out, the same bits (one rank: the rows come back in order).
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(np.zeros((T, 1), np.int64), 1)
    recv_x, *_ = buf.dispatch(x, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    assert isinstance(recv_x, np.ndarray) and recv_x.dtype == bf16
    np.testing.assert_array_equal(recv_x.view(np.uint16), x.view(np.uint16))


@pytest.mark.parametrize("thing", [3, [1, 2], "array", None])
def test_framework_of_non_array(thing):
    raises(lambda: interop.framework_of(thing), "expected an array", type(thing).__name__)
    raises(lambda: interop.framework_of(thing, "topk_idx"), "topk_idx: expected an array")


def test_cpu_backend_refuses_device_arrays():
    class FakeCupy:                                           # looks like a CuPy array to framework_of
        __module__ = "cupy._core.core"
    raises(lambda: interop.as_numpy(FakeCupy(), "x"), "x", "host arrays", "CuPy")


def test_fp8_as_uint8_bits_accepted(buf, inputs, layout):
    # FP8 data may come as its uint8 bits (array libraries without a float8 dtype); the CPU backend views them.
    data, scales = per_token_cast_to_fp8(inputs[0])
    recv_x, *_ = buf.dispatch((data.view(np.uint8), scales), **layout)
    np.testing.assert_array_equal(recv_x[0].view(np.uint8), data.view(np.uint8))
    np.testing.assert_array_equal(recv_x[1], scales)
