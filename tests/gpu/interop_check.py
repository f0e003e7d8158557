"""DLPack interop on GPUs (mpirun -n N): the same dispatch/combine with CuPy, PyTorch and JAX arrays; results come
back in the caller's type and match each other bit for bit; torch's current stream is honoured."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402
from _harness import Cases, exit_with  # noqa: E402

import epcomm  # noqa: E402
from epcomm import reference as ref  # noqa: E402
from epcomm.testing import make_topk, make_weights, make_x  # noqa: E402

buf = epcomm.Buffer(None, backend="gpu")
R, rank = buf.num_ranks, buf.rank
cases = Cases(buf.group.comm)
h, k, e = 2048, 8, 64
tokens = [64 + r for r in range(R)]
rng = np.random.default_rng(3)
xs = [make_x(rng, t, h, r) for r, t in enumerate(tokens)]
idxs = [make_topk(rng, t, k, e) for t in tokens]
ws = [make_weights(rng, t, k) for t in tokens]
want = ref.dispatch(xs, idxs, ws, e)[rank]
n = want.num_recv_tokens


def roundtrip(to_fw, to_np, type_check):
    x, idx, w = to_fw(xs[rank]), to_fw(idxs[rank]), to_fw(ws[rank])
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


def cupy_case():
    return roundtrip(cp.asarray, lambda a: a.get(), lambda a: isinstance(a, cp.ndarray))


results = {}
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
        out = roundtrip(to_t, to_np, lambda a: isinstance(a, torch.Tensor) and a.device == dev)
    results["torch"] = out


def jax_case():
    import jax
    import jax.numpy as jnp
    here = cp.cuda.Device().id
    gpu = [d for d in jax.devices() if getattr(d, "local_hardware_id", d.id) == here][0]
    out = roundtrip(lambda a: jax.device_put(jnp.asarray(a), gpu), lambda a: np.asarray(a),
                    lambda a: isinstance(a, jax.Array))
    results["jax"] = out


cases.run("torch", torch_case)
cases.run("jax", jax_case)


def same():
    base = results["cupy"].view(np.uint16)
    for name in ("torch", "jax"):
        if name in results:
            assert np.array_equal(results[name].view(np.uint16), base), f"{name} combine differs from CuPy's"


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
