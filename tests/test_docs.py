"""The docs stay true: README's environment table is config.env_table_markdown(), its CPU example runs under mpiexec,
every Python block parses, docs/api.md and docs/design.md name every public method, handle field and flag kind,
.ci/run runs the README's test command, and no document links to a file (or heading) that is not there."""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import epcomm
from epcomm.config import env_table_markdown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
API = ROOT / "docs" / "api.md"
DESIGN = ROOT / "docs" / "design.md"
PORTING = ROOT / "docs" / "porting.md"
FRAMEWORKS = ROOT / "docs" / "frameworks.md"
TIMEOUT_S = 120

# A fenced block preceded (blank lines allowed) by an HTML comment naming it: <!-- example: NAME -->
_EXAMPLE = re.compile(r"<!--\s*example:\s*([\w-]+)\s*-->\s*\n```python\n(.*?)\n```", re.S)
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)\n```", re.S | re.M)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def examples(name_prefix: str) -> list[tuple[str, str]]:
    """README's (name, code) example blocks whose name starts with name_prefix ('cpu', 'gpu-torch', ...)."""
    return [(m.group(1), m.group(2)) for m in _EXAMPLE.finditer(_text(README)) if m.group(1).startswith(name_prefix)]


def _home_as_tilde(text: str) -> str:
    """The table's defaults with this user's home written as ~ (EPCOMM_CACHE_DIR's default depends on $HOME)."""
    home = os.path.expanduser("~").rstrip("/")
    return text.replace(f"`{home}/", "`~/") if home else text


def test_readme_env_table_is_generated():
    text = _text(README)
    m = re.search(r"<!-- env-table:start -->\n(.*?)\n<!-- env-table:end -->", text, re.S)
    assert m is not None, "README.md lacks the <!-- env-table:start --> ... <!-- env-table:end --> markers"
    want = _home_as_tilde(env_table_markdown())
    assert m.group(1).strip() == want, (
        "README's environment table differs from epcomm.config.env_table_markdown(); paste this between the markers:\n"
        + want)


def test_readme_names_the_commands():
    text = _text(README)
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh", "bash scripts/gpu_suite.sh"):
        assert f"\n{command}" in text, f"README.md does not show `{command}` as a command"
        assert (ROOT / command.split()[1]).is_file(), f"{command}: no such script"
    ci = _text(ROOT / ".ci" / "run")
    assert re.search(r"^\s*(timeout\b.*\s)?bash scripts/test\.sh\s*$", ci, re.M), \
        ".ci/run must run the README's test command, bash scripts/test.sh"


@pytest.mark.parametrize("path", [README, API, DESIGN, PORTING, FRAMEWORKS], ids=lambda p: p.name)
def test_python_blocks_parse(path):
    blocks = _PYTHON_BLOCK.findall(_text(path))
    for i, code in enumerate(blocks):
        try:
            compile(code, f"{path.name} python block {i}", "exec")
        except SyntaxError as exc:
            # Call-form blocks in api.md are signatures, not statements; they must still parse as an expression list.
            pytest.fail(f"{path.name}: python block {i} does not parse: {exc}\n{code}")


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _mpi_env() -> dict:
    """This environment without the parent's MPI/PMI variables, with the checkout importable and the CPU backend."""
    env = {k: v for k, v in os.environ.items() if not re.match(r"(PMI|PMIX|MPI|HYDRA|OMPI)_", k)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["EPCOMM_BACKEND"] = "cpu"
    env.setdefault("EPCOMM_TIMEOUT_S", "20")
    return env


def test_readme_has_the_examples():
    names = [name for name, _ in examples("")]
    for want in ("cpu", "gpu-cupy", "gpu-torch", "gpu-jax"):
        assert want in names, f"README.md lacks the <!-- example: {want} --> block (found {names})"


@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks", [2])
def test_readme_cpu_example_runs(num_ranks, tmp_path):
    blocks = examples("cpu")
    assert blocks, "README.md has no <!-- example: cpu --> python block"
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found next to the interpreter or on PATH")
    for name, code in blocks:
        script = tmp_path / f"readme_{name}.py"
        script.write_text(code + "\n")
        cmd = [mpiexec, "-n", str(num_ranks), sys.executable, str(script)]
        try:
            proc = subprocess.run(cmd, cwd=tmp_path, env=_mpi_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"README example {name!r} did not finish in {TIMEOUT_S} s\n{exc.stdout}\n{exc.stderr}")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README example {name!r} failed under {' '.join(cmd)}:\n{out}"
        for r in range(num_ranks):
            assert f"rank {r}: ok" in proc.stdout, f"README example {name!r}: rank {r} did not finish\n{out}"


def _public_methods(cls) -> list[str]:
    return sorted(n for n, v in vars(cls).items() if not n.startswith("_") and callable(getattr(cls, n)))


def test_api_doc_covers_buffer_config_event():
    text = _text(API)
    for name in _public_methods(epcomm.Buffer):
        assert re.search(rf"\b{name}\(", text), f"docs/api.md does not document Buffer.{name}"
    for field in dataclasses.fields(epcomm.Config):
        assert f"`{field.name}" in text, f"docs/api.md does not document Config.{field.name}"
    for name in ("current_stream_wait", "synchronize", "query"):
        assert name in text, f"docs/api.md does not document Event.{name}"
    for name in epcomm.__all__:
        if name != "__version__":
            assert name in text, f"docs/api.md does not mention epcomm.{name}"


@pytest.mark.parametrize("cls", [epcomm.DispatchHandle, epcomm.LowLatencyHandle], ids=lambda c: c.__name__)
def test_handle_fields_documented(cls):
    for path in (API, DESIGN):
        text = _text(path)
        for field in dataclasses.fields(cls):
            assert f"`{field.name}`" in text, f"{path.name} does not document {cls.__name__}.{field.name}"


def test_design_doc_names_every_flag_kind():
    header = _text(ROOT / "cuda_src" / "epcomm" / "intranode.cuh")
    kinds = re.findall(r"\b(kFlag[A-Z]\w*)\s*=\s*\d+", header)  # kFlagNotify = 0, ...
    assert kinds, "no kFlag* constants found in intranode.cuh"
    text = _text(DESIGN)
    for kind in kinds:
        assert f"`{kind}`" in text, f"docs/design.md's flag table lacks {kind}"


# Documents whose links are checked, and the folders whose files they may name in backticks (`bench/results/x.jsonl`):
# benchmark logs and plots left the tree, so a name there must be checked, not trusted.
LINKED_DOCS = [README, API, DESIGN, PORTING, FRAMEWORKS, ROOT / "bench" / "NOTES.md"]
_CHECKED_PREFIXES = ("bench/", "docs/")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE_PATH = re.compile(r"`((?:%s)[\w./*-]*)`" % "|".join(re.escape(p) for p in _CHECKED_PREFIXES))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+\s+(.*?)\s*$", _text(path), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_that_exist(doc):
    text = _text(doc)
    missing = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            missing.append(f"link {target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            missing.append(f"link {target}: no heading with that anchor")
    for name in _CODE_PATH.findall(text):
        found = glob.glob(str(ROOT / name)) if "*" in name else (ROOT / name).exists()
        if not found:
            missing.append(f"`{name}`: no such file")
    assert not missing, f"{doc.relative_to(ROOT)} points at what is not in the tree:\n" + "\n".join(missing)
