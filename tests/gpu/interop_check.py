"""DLPack interop on GPUs (mpirun -n N): the same dispatch/combine, and low-latency dispatch/combine with receive
hooks, with CuPy, PyTorch and JAX arrays; results come back in the caller's type and match each other bit for bit;
torch's current stream is honoured; every Event (hooks' included) names the caller's framework."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402
from _harness import Cases, exit_with  # noqa: E402

import epcomm  # noqa: E402
from epcomm import reference as ref  # noqa: E402
from epcomm.testing import make_topk, make_weights, make_x  # noqa: E402

from mpi4py import MPI  # noqa: E402

from epcomm.intranode import nvl_buffer_size_hint  # noqa: E402

h, k, e = 2048, 8, 64
TMAX = 64 + MPI.COMM_WORLD.size  # every rank's token count fits (low-latency mode)
buf = epcomm.Buffer(None, num_rdma_bytes=epcomm.Buffer.get_low_latency_rdma_size_hint(TMAX, h, MPI.COMM_WORLD.size, e),
                    num_nvl_bytes=nvl_buffer_size_hint(TMAX, h * 2, MPI.COMM_WORLD.size, k),  # normal mode too
                    low_latency_mode=True, backend="gpu")
R, rank = buf.num_ranks, buf.rank
cases = Cases(buf.group.comm)
tokens = [64 + r for r in range(R)]
rng = np.random.default_rng(3)
xs = [make_x(rng, t, h, r) for r, t in enumerate(tokens)]
idxs = [make_topk(rng, t, k, e) for t in tokens]
ws = [make_weights(rng, t, k) for t in tokens]
want = ref.dispatch(xs, idxs, ws, e)[rank]
n = want.num_recv_tokens


def ll_roundtrip(x, idx, w, to_np, type_check, fw):
    """Low-latency bf16 dispatch and combine (the experts return their rows unchanged), through receive hooks except
    for JAX, whose immutable arrays cannot be filled after the call: there a hook request is a ConfigError."""
    hooks = fw != "jax"
    if not hooks:
        try:
            buf.low_latency_dispatch(x, idx, TMAX, e, use_fp8=False, return_recv_hook=True)
        except epcomm.ConfigError as exc:
            assert "JAX" in str(exc), str(exc)
        else:
            raise AssertionError("a JAX caller's return_recv_hook=True was accepted")
    recv_x, recv_count, handle, ev, hook = buf.low_latency_dispatch(x, idx, TMAX, e, use_fp8=False,
                                                                     return_recv_hook=hooks)
    assert isinstance(ev, epcomm.Event) and ev.framework == fw, f"dispatch event {ev!r}"
    if hooks:
        ev2 = hook()
        assert isinstance(ev2, epcomm.Event) and ev2.framework == fw, f"dispatch hook returned {ev2!r}"
    assert type_check(recv_x) and type_check(recv_count), f"low-latency output types {type(recv_x)}, {type(recv_count)}"
    combined, ev3, hook2 = buf.low_latency_combine(recv_x, idx, w, handle, return_recv_hook=hooks)
    assert isinstance(ev3, epcomm.Event) and ev3.framework == fw, f"combine event {ev3!r}"
    if hooks:
        ev4 = hook2()
        assert isinstance(ev4, epcomm.Event) and ev4.framework == fw, f"combine hook returned {ev4!r}"
    assert type_check(combined)
    return to_np(combined), to_np(recv_count)


def roundtrip(to_fw, to_np, type_check, fw):
    x, idx, w = to_fw(xs[rank]), to_fw(idxs[rank]), to_fw(ws[rank])
    results["ll_" + fw] = ll_roundtrip(x, idx, w, to_np, type_check, fw)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, e)
    assert type_check(in_rank), f"layout output type {type(in_rank)}"
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx, topk_weights=w)
    assert type_check(recv_x), f"recv_x type {type(recv_x)}"
    got = to_np(recv_x)
    assert np.array_equal(got.view(np.uint16), want.recv_x.view(np.uint16)), "recv_x differs from the reference"
    combined, _, _ = buf.combine(recv_x, handle)
    assert type_check(combined)
    return to_np(combined)


results = {}


def cupy_case():
    return roundtrip(cp.asarray, lambda a: a.get(), lambda a: isinstance(a, cp.ndarray), "cupy")


cases.run("cupy", lambda: results.__setitem__("cupy", cupy_case()))


def torch_case():
    import torch
    dev = torch.device("cuda", cp.cuda.Device().id)

    def to_t(a):
        if a.dtype == ref.bf16:
            return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16).to(dev)
        return torch.from_numpy(a.copy()).to(dev)

    def to_np(t):
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).cpu().numpy().view(np.uint16).view(ref.bf16)
        return t.cpu().numpy()

    s = torch.cuda.Stream(dev)
    with torch.cuda.stream(s):  # epcomm must join torch's current stream
        out = roundtrip(to_t, to_np, lambda a: isinstance(a, torch.Tensor) and a.device == dev, "torch")
    results["torch"] = out


def jax_case():
    import jax
    import jax.numpy as jnp
    here = cp.cuda.Device().id
    gpu = [d for d in jax.devices() if getattr(d, "local_hardware_id", d.id) == here][0]
    out = roundtrip(lambda a: jax.device_put(jnp.asarray(a), gpu), lambda a: np.asarray(a),
                    lambda a: isinstance(a, jax.Array), "jax")
    results["jax"] = out


cases.run("torch", torch_case)
cases.run("jax", jax_case)


def same():
    base = results["cupy"].view(np.uint16)
    ll_base, ll_counts = results["ll_cupy"]
    assert int(ll_counts.sum()) == int((np.concatenate(idxs) // (e // R) == rank).sum()), "low-latency receive counts"
    for name in ("torch", "jax"):
        if name in results:
            assert np.array_equal(results[name].view(np.uint16), base), f"{name} combine differs from CuPy's"
        if "ll_" + name in results:
            got, counts = results["ll_" + name]
            assert np.array_equal(counts, ll_counts), f"{name} low-latency counts differ from CuPy's"
            assert np.array_equal(got.view(np.uint16), ll_base.view(np.uint16)), \
                f"{name} low-latency combine differs from CuPy's"


cases.run("frameworks_agree", same)


def wrong_device():  # an array on another GPU is a clear ConfigError, not a driver error
    if cp.cuda.runtime.getDeviceCount() < 2:
        return
    other = (cp.cuda.Device().id + 1) % cp.cuda.runtime.getDeviceCount()
    with cp.cuda.Device(other):
        idx = cp.asarray(idxs[rank])
    try:
        buf.get_dispatch_layout(idx, e)
    except epcomm.ConfigError as exc:
        assert "topk_idx" in str(exc) and f"cuda:{other}" in str(exc), str(exc)
        return
    raise AssertionError("an array on another GPU was accepted")


cases.run("wrong_device_is_config_error", wrong_device)
code = cases.finish()
buf.destroy()
exit_with(code)
