"""epcomm.jax: importing epcomm does not import jax; one-process checks (one rank: the trace-time argument checks, the
handle registry's bound, dispatch/combine/grad inside jax.jit); tests/mpi/jax_check.py under `mpiexec -n 2` (jit
against eager bit for bit, gradients against a JAX reference and finite differences); docs/frameworks.md's JAX example
runs. Everything but the first test skips where jax is not installed (it is not in the `test` extra: see
docs/frameworks.md)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from test_cpu_backend import ROOT, _run


def test_importing_epcomm_does_not_import_jax():
    code = "import sys, epcomm; assert 'jax' not in sys.modules, 'epcomm imported jax'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


try:
    import jax
    import jax.numpy as jnp
except ImportError:
    jax = jnp = None
needs_jax = pytest.mark.skipif(jax is None, reason="jax is not installed (not part of the test extra)")


@pytest.fixture(scope="module")
def buf():
    import epcomm
    b = epcomm.Buffer(None, backend="cpu")
    yield b
    b.destroy()


def _inputs():
    x = (jnp.arange(3 * 16).reshape(3, 16) % 7).astype(jnp.bfloat16)
    idx = jnp.array([[0, 1], [1, -1], [-1, -1]], jnp.int32)
    return x, idx, jnp.full((3, 2), 0.5, jnp.float32)


@needs_jax
def test_jit_dispatch_combine_and_grad_one_rank(buf):
    import epcomm.jax as epj
    x, idx, w = _inputs()

    def loss(x, w):
        recv_x, _, recv_w, handle, _ = epj.dispatch(buf, x, idx, w, num_experts=2, num_worst_tokens=4)
        combined, combined_w = epj.combine(buf, recv_x, handle, recv_w)
        return combined.astype(jnp.float32).sum() + combined_w.sum()

    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    # Token 0 goes to rank 0 once (both experts are local), token 1 once, token 2 nowhere.
    assert (gx == jnp.array([1, 1, 0], jnp.bfloat16)[:, None]).all()
    assert (gw == jnp.array([[1, 1], [1, 0], [0, 0]], jnp.float32)).all()
    out = jax.jit(lambda x, w: epj.dispatch(buf, x, idx, w, num_experts=2, num_worst_tokens=4))(x, w)
    assert out[0].shape == (4, 16) and int(out[3].num_recv_tokens) == 2 and out[4].tolist() == [1, 2]


@needs_jax
@pytest.mark.parametrize("call,match", [
    (lambda epj, b, x, i, w: epj.dispatch(b, x, i, w, num_experts=2, num_worst_tokens=0), "num_worst_tokens"),
    (lambda epj, b, x, i, w: epj.dispatch(b, x.astype(jnp.float32), i, w, num_experts=2, num_worst_tokens=4),
     r"x: expected a \[num_tokens, hidden\] bfloat16"),
    (lambda epj, b, x, i, w: epj.dispatch(b, x, i, None, num_experts=2, num_worst_tokens=4), "topk_weights"),
    (lambda epj, b, x, i, w: epj.dispatch(b, x, i, w[:2], num_experts=2, num_worst_tokens=4), "topk_weights"),
    (lambda epj, b, x, i, w: epj.dispatch(b, x, i.astype(jnp.float32), w, num_experts=2, num_worst_tokens=4),
     "topk_idx"),
    (lambda epj, b, x, i, w: epj.combine(b, x, object()), "handle: expected the JaxHandle"),
], ids=["no-worst", "x-dtype", "no-weights", "weights-shape", "idx-dtype", "handle"])
def test_trace_time_checks(buf, call, match):
    import epcomm
    import epcomm.jax as epj
    x, idx, w = _inputs()
    with pytest.raises(epcomm.ConfigError, match=match):
        jax.jit(lambda x, i, w: call(epj, buf, x, i, w))(x, idx, w)


@needs_jax
def test_handle_registry_keeps_the_newest(buf, monkeypatch):
    import epcomm
    import epcomm.jax as epj
    monkeypatch.setattr(epj, "MAX_LIVE_HANDLES", 2)
    x, idx, w = _inputs()
    handles = [epj.dispatch(buf, x, idx, w, num_experts=2, num_worst_tokens=4)[3] for _ in range(3)]
    assert epj._num_live_handles() == 2
    epj.handle_of(handles[2])
    with pytest.raises(epcomm.EpcommError, match="no longer registered"):
        epj.handle_of(handles[0])


@needs_jax
@pytest.mark.mpi
def test_jax_check_under_mpiexec():
    proc = _run(2, [str(ROOT / "tests" / "mpi" / "jax_check.py")], OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-20000:]
    assert "18 passed, 0 failed, 0 skipped" in proc.stdout, out[-20000:]


@needs_jax
@pytest.mark.mpi
def test_frameworks_doc_jax_example_runs(tmp_path):
    text = (ROOT / "docs" / "frameworks.md").read_text(encoding="utf-8")
    m = re.search(r"<!--\s*example:\s*frameworks-jax\s*-->\s*\n```python\n(.*?)\n```", text, re.S)
    assert m is not None, "docs/frameworks.md lost its frameworks-jax example"
    script = tmp_path / "frameworks_jax_example.py"
    script.write_text(m.group(1), encoding="utf-8")
    proc = _run(2, [str(script)], OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-20000:]
    assert proc.stdout.count("eager and jit-ed gradients agree") == 2, proc.stdout
