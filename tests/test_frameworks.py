"""epcomm.torch: importing epcomm does not import torch; the plain API refuses requires-grad tensors while autograd
records (one process, CPU backend); tests/torchrun/autograd_check.py under `mpiexec -n 2` (gradients against a torch
reference and finite differences, torch.compile fullgraph with the custom ops); docs/frameworks.md's example runs."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from test_cpu_backend import ROOT, _run

torch = pytest.importorskip("torch")


def test_importing_epcomm_does_not_import_torch():
    code = "import sys, epcomm; assert 'torch' not in sys.modules, 'epcomm imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_plain_api_refuses_requires_grad():
    import epcomm
    buf = epcomm.Buffer(None, backend="cpu")
    try:
        x = torch.zeros(4, 16, dtype=torch.bfloat16, requires_grad=True)
        idx = torch.zeros(4, 2, dtype=torch.int64)
        _, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 2)
        with pytest.raises(epcomm.ConfigError, match=r"x: this tensor requires grad.*epcomm\.torch"):
            buf.dispatch(x, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        w = torch.ones(4, 2, requires_grad=True)
        with pytest.raises(epcomm.ConfigError, match="topk_weights: this tensor requires grad"):
            buf.dispatch(x.detach(), is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
                         topk_weights=w)
        with torch.no_grad():   # the caller's explicit choice: no graph is recorded, nothing is lost
            recv_x = buf.dispatch(x, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)[0]
        assert recv_x.shape == (4, 16)
    finally:
        buf.destroy()


def test_handle_registry_frees_with_the_id_tensor():
    import gc

    import epcomm
    import epcomm.torch as ept
    buf = epcomm.Buffer(None, backend="cpu")
    try:
        before = ept._num_live_handles()
        x = torch.ones(3, 16, dtype=torch.bfloat16, requires_grad=True)
        idx = torch.tensor([[0, 1], [1, -1], [-1, -1]])
        w = torch.full((3, 2), 0.5, requires_grad=True)
        recv_x, _, recv_w, handle, _ = ept.dispatch(buf, x, idx, w, num_experts=2, num_worst_tokens=4)
        combined, _ = ept.combine(buf, recv_x, handle, recv_w)
        combined.float().sum().backward()
        assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]).to(torch.bfloat16)[:, None].expand(3, 16))
        assert ept._num_live_handles() == before + 1
        del recv_x, recv_w, handle, combined
        gc.collect()
        assert ept._num_live_handles() == before
    finally:
        buf.destroy()


@pytest.mark.mpi
def test_autograd_and_compile_under_mpiexec():
    proc = _run(2, [str(ROOT / "tests" / "torchrun" / "autograd_check.py")], OMP_NUM_THREADS="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-20000:]
    assert "17 passed, 0 failed, 0 skipped" in proc.stdout, out[-20000:]


@pytest.mark.mpi
def test_frameworks_doc_example_runs(tmp_path):
    text = (ROOT / "docs" / "frameworks.md").read_text(encoding="utf-8")
    m = re.search(r"<!--\s*example:\s*frameworks-torch\s*-->\s*\n```python\n(.*?)\n```", text, re.S)
    assert m is not None, "docs/frameworks.md lost its frameworks-torch example"
    script = tmp_path / "frameworks_example.py"
    script.write_text(m.group(1), encoding="utf-8")
    proc = _run(2, [str(script)], OMP_NUM_THREADS="1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-20000:]
    assert proc.stdout.count("eager and compiled gradients agree") == 2, proc.stdout
