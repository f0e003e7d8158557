"""DeepEP callers on the CPU backend: tests/torchrun/dropin_check.py (vLLM, SGLang, Megatron-Core and torchtitan call
sequences with torch tensors over torch.distributed, DeepEP's API surface, the get_buffer loop and 10^4 Buffer
create/destroy cycles with flat resource counts) under `torchrun --nproc-per-node 2` and 4 and under `mpiexec -n 2`;
the README's torchrun example under torchrun; a torchrun launch without a group is a ConfigError, never a world of
1-rank worlds."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tests" / "torchrun" / "dropin_check.py"
TIMEOUT_S = 600


def _env(**extra) -> dict:
    """This checkout first on PYTHONPATH, the CPU backend, none of this process's MPI/PMI or torchrun variables."""
    env = {k: v for k, v in os.environ.items()
           if not re.match(r"(PMI|PMIX|MPI|HYDRA|OMPI)_", k)
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "TORCHELASTIC_RUN_ID")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["EPCOMM_BACKEND"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("EPCOMM_TIMEOUT_S", "60")
    env.update(extra)
    return env


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT_S} s (a hang?)\nstdout:\n{exc.stdout}\n"
                    f"stderr:\n{exc.stderr}")


def _summary(proc) -> tuple[int, int, int]:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{out[-20000:]}"
    m = re.search(r"^(\d+) passed, (\d+) failed, (\d+) skipped$", proc.stdout, re.M)
    assert m is not None, f"no summary line\n{out[-20000:]}"
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(CHECK),
            *args]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_deepep_callers_under_torchrun(nproc):
    passed, failed, skipped = _summary(_run(_torchrun(nproc)))
    assert failed == 0 and passed >= 18, (passed, failed, skipped)
    assert skipped == 2   # the two mpi4py cases need mpiexec


@pytest.mark.mpi
@pytest.mark.slow
def test_deepep_callers_under_mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(beside) if beside.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found next to the interpreter or on PATH")
    passed, failed, skipped = _summary(_run([mpiexec, "-n", "2", sys.executable, str(CHECK)]))
    assert failed == 0 and skipped == 0 and passed >= 20, (passed, failed, skipped)


TORCHRUN_WITHOUT_GROUP = """
import epcomm
try:
    epcomm.Buffer()
except epcomm.ConfigError as exc:
    assert "torchrun" in str(exc) and "WORLD_SIZE=2" in str(exc), str(exc)
    print("ConfigError:", exc)
else:
    raise SystemExit("a 1-rank MPI world under torchrun's WORLD_SIZE=2 must be a ConfigError")
"""


@pytest.mark.mpi
def test_torchrun_without_a_group_is_a_config_error():
    """torchrun sets WORLD_SIZE but starts no MPI job: each process would be rank 0 of its own world."""
    proc = _run(_torchrun(2)[:5] + ["--no-python", sys.executable, "-c", TORCHRUN_WITHOUT_GROUP])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert out.count("ConfigError:") == 2, out[-5000:]


@pytest.mark.mpi
def test_readme_torchrun_example_runs(tmp_path):
    from test_docs import examples
    blocks = examples("torchrun-cpu")
    assert blocks, "README.md has no <!-- example: torchrun-cpu --> python block"
    for name, code in blocks:
        script = tmp_path / f"readme_{name}.py"
        script.write_text(code + "\n")
        proc = _run(_torchrun(2)[:5] + [str(script)])
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README example {name!r} failed under torchrun:\n{out[-10000:]}"
        for r in range(2):
            assert f"rank {r}: ok" in proc.stdout, f"README example {name!r}: rank {r} did not finish\n{out[-10000:]}"
