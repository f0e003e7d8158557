"""Every launch in the family launchers (epcomm/gpu/*.py) names exactly its kernel's parameters: the keyword names of
the dict passed to Kernel.launch, plus the comm tail where **ctx.comm_args() / **comm is spread, against the spec's
param_names (read from the source, so no GPU is needed; Kernel.launch checks the same at run time)."""
from __future__ import annotations

import ast
import pathlib

import pytest

from epcomm.runtime import all_example_specs

GPU_DIR = pathlib.Path(__file__).resolve().parent.parent / "epcomm" / "gpu"
COMM = ("err_record", "timeout_ns", "rank")
PLAN_FAMILY = {"intranode.py": "intranode", "low_latency.py": "low_latency", "layout.py": "layout"}


def _param_names():
    return {(s.family, s.op): tuple(name for _, name in s.params) for s in all_example_specs()}


def _launches(path):
    """(spec function name, line, keyword names, spreads a comm dict) of every get_kernel(plan.X(...)).launch(...)
    call in path; a launch through a local spec variable is resolved to the plan function assigned to it."""
    tree = ast.parse(path.read_text())
    assigned = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            if isinstance(f, ast.Attribute) and f.attr.endswith("_spec"):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        assigned[t.id] = f.attr
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "launch"):
            continue
        target = node.func.value
        assert isinstance(target, ast.Call) and getattr(target.func, "id", None) == "get_kernel", ast.dump(target)
        arg = target.args[0]
        if isinstance(arg, ast.Call):
            spec_fn = arg.func.attr
        else:
            spec_fn = assigned[arg.id]
        args = node.args[1]
        assert isinstance(args, ast.Call) and getattr(args.func, "id", None) == "dict", \
            f"{path.name}:{node.lineno}: launch arguments must be dict(name=value, ...)"
        names = [kw.arg for kw in args.keywords if kw.arg is not None]
        spread = [kw.value for kw in args.keywords if kw.arg is None]
        out.append((spec_fn, node.lineno, names, bool(spread)))
    return out


CASES = [(p, launch) for p in sorted(GPU_DIR.glob("*.py")) if p.name in PLAN_FAMILY for launch in _launches(p)]


def test_every_launcher_launches():
    assert {p.name for p, _ in CASES} == set(PLAN_FAMILY), [p.name for p, _ in CASES]


@pytest.mark.parametrize("path,launch", CASES, ids=[f"{p.name}:{l[0]}:{l[1]}" for p, l in CASES])
def test_launch_names_match_spec(path, launch):
    spec_fn, line, names, spread = launch
    op = spec_fn.removesuffix("_spec")
    if op == "layout":
        op = "dispatch_layout"
    expected = _param_names()[(PLAN_FAMILY[path.name], op)]
    got = tuple(names) + (COMM if spread else ())
    assert sorted(got) == sorted(expected) and len(set(got)) == len(got), (
        f"{path.name}:{line} {spec_fn}: missing {sorted(set(expected) - set(got))}, "
        f"unknown {sorted(set(got) - set(expected))}")
