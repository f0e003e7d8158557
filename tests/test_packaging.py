"""The built wheel: it ships cuda_src as epcomm/_cuda_src, and an installed copy (in a fresh venv, run from outside the
checkout) NVRTC-compiles a kernel from its own headers. No GPU needed."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_SRC = ROOT / "cuda_src" / "epcomm"
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited with {proc.returncode}\n" \
                                 f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _clean_env(**extra) -> dict:
    """This environment without anything that would put the checkout (or another venv) on the path."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONNOUSERSITE", "PYTHONSTARTUP", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """epcomm's wheel, built from the checkout: `python -m build --wheel` (without isolation when hatchling is already
    importable, so no download), else `pip wheel --no-deps`."""
    out = tmp_path_factory.mktemp("dist")
    if importlib.util.find_spec("build") is not None:
        cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out)]
        if importlib.util.find_spec("hatchling") is not None:
            cmd.append("--no-isolation")
        cmd.append(str(ROOT))
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(ROOT)]
    _run(cmd, cwd=out, env=_clean_env())
    wheels = sorted(out.glob("epcomm-*.whl"))
    assert len(wheels) == 1, f"expected one epcomm wheel in {out}, found {[w.name for w in out.iterdir()]}"
    return wheels[0]


def test_wheel_ships_the_cuda_sources(wheel):
    headers = sorted(CUDA_SRC.glob("*.cuh"))
    assert headers, f"no headers under {CUDA_SRC}"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for header in headers:
            member = f"epcomm/_cuda_src/epcomm/{header.name}"
            assert member in names, f"{wheel.name} lacks {member}"
            assert zf.read(member) == header.read_bytes(), f"{member} in the wheel differs from {header}"
        shipped = {n for n in names if n.startswith("epcomm/_cuda_src/")}
    assert shipped == {f"epcomm/_cuda_src/epcomm/{h.name}" for h in headers}, "unexpected files under _cuda_src"
    for module in ("epcomm/__init__.py", "epcomm/buffer.py", "epcomm/runtime/compiler.py", "epcomm/intranode.py"):
        assert module in names, f"{wheel.name} lacks {module}"


def _deps_env() -> dict:
    """Variables that let a fresh `venv --system-site-packages` see this interpreter's packages (the CUDA wheels,
    cupy, cuda-python...). In a venv, its site-packages become the new venv's user site (PYTHONUSERBASE): unlike a path
    added by a .pth file, the user site is also in site.getusersitepackages(), where cuda.pathfinder looks for the
    NVRTC library. Outside a venv, --system-site-packages alone does it."""
    return {"PYTHONUSERBASE": sys.prefix} if sys.prefix != sys.base_prefix else {}


@pytest.fixture(scope="module")
def installed_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (--system-site-packages) with the wheel installed --no-deps; its dependencies come from this
    interpreter's environment (see _deps_env)."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], env=_clean_env())
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "--no-index", str(wheel)],
         env=_clean_env())
    probe = "import site, sysconfig; print(site.getusersitepackages()); print(sysconfig.get_paths()['purelib'])"
    user_site, purelib = _run([python, "-c", probe], env=_clean_env(**_deps_env())).stdout.split()
    ours = os.path.realpath(sysconfig.get_paths()["purelib"])
    if _deps_env():
        assert os.path.realpath(user_site) == ours, \
            f"the new venv's user site {user_site} is not this venv's site-packages {ours}: unusual venv layout"
    assert os.path.realpath(purelib) != ours
    return venv


INSTALLED_CHECK = r"""
import os, sys, sysconfig
import epcomm
from epcomm import intranode
from epcomm.runtime import ELF_MAGIC, cache_dir, compile_to_cubin, cuda_src_dir

site_dir = os.path.realpath(sysconfig.get_paths()["purelib"]) + os.sep
for what, path in (("epcomm", epcomm.__file__), ("cuda_src_dir()", cuda_src_dir())):
    assert os.path.realpath(path).startswith(site_dir), f"{what} = {path} is not inside {site_dir}"
assert os.path.isfile(os.path.join(cuda_src_dir(), "epcomm", "intranode.cuh"))
spec = intranode.dispatch_send_spec(2)
cubin = compile_to_cubin(spec, "sm_90a")
assert isinstance(cubin, bytes) and cubin[:4] == ELF_MAGIC, cubin[:16]
assert spec.entry_name.encode() in cubin
assert os.listdir(os.path.join(cache_dir(), "kernels")), "nothing was written to the kernel cache"
print("installed epcomm", epcomm.__version__, "from", os.path.dirname(epcomm.__file__), "compiled", spec.entry_name,
      len(cubin), "bytes")
"""


def test_installed_copy_compiles_from_its_own_headers(installed_venv, tmp_path):
    cwd = tmp_path / "elsewhere"   # not the checkout: `import epcomm` must find the installed copy
    cwd.mkdir()
    cache = tmp_path / "cache"
    proc = _run([str(installed_venv / "bin" / "python"), "-c", INSTALLED_CHECK], cwd=cwd,
                env=_clean_env(EPCOMM_CACHE_DIR=str(cache), EPCOMM_JIT_QUIET="1", **_deps_env()))
    assert "compiled epcomm_intranode_dispatch_send" in proc.stdout, proc.stdout


@pytest.mark.parametrize("module", ["epcomm.env", "epcomm.config", "epcomm.intranode", "epcomm.low_latency",
                                    "epcomm.layout", "epcomm.runtime", "epcomm.gpu.backend", "epcomm.cpu_backend",
                                    "epcomm.buffer"])
def test_module_imports_alone(module):
    """Each module imports first in a fresh interpreter (an import circle fails here) and loads no CuPy."""
    code = f"import sys, {module}; assert 'cupy' not in sys.modules, 'imported cupy'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
