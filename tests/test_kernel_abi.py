"""The kernel ABI is written once: every spec's params (names, order, C types) match the device function its stub calls,
``epcomm::<family>::<op>`` in cuda_src/epcomm/<family>.cuh. The stub passes the arguments positionally, so without this
check two swapped parameters of one type would compile and run."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from epcomm.runtime import all_example_specs, cuda_src_dir
from epcomm.runtime.spec import _normalise_ctype

SPECS = all_example_specs()


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def device_signature(header_text: str, family: str, op: str) -> list[tuple[str, str]]:
    """[(normalised C type, name)] of the one ``EPCOMM_DEVICE_INLINE void <op>(...)`` in the family's namespace."""
    text = _strip_comments(header_text)
    if not re.search(rf"namespace\s+(epcomm::)?{family}\s*\{{", text):
        raise AssertionError(f"the header does not open namespace epcomm::{family}")
    found = list(re.finditer(rf"EPCOMM_DEVICE_INLINE\s+void\s+{op}\s*\(", text))
    if len(found) != 1:
        raise AssertionError(f"expected one device function {op}(...) in the header, found {len(found)}")
    start = found[0].end()
    depth, end = 1, start
    while depth:
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        end += 1
    params = []
    for param in _split_top_level(text[start:end - 1]):
        m = re.match(r"(.*?)\s*\b([A-Za-z_]\w*)\s*$", param, re.S)
        if m is None:
            raise AssertionError(f"cannot read parameter {param!r} of {op}")
        params.append((_normalise_ctype(m.group(1)), m.group(2)))
    return params


def abi_mismatches(spec, header_text: str) -> list[str]:
    """What differs between spec.params and the device function (empty: they agree)."""
    device = device_signature(header_text, spec.family, spec.op)
    expected = [(_normalise_ctype(ctype), name) for ctype, name in spec.params]
    problems = []
    if [n for _, n in device] != [n for _, n in expected]:
        problems.append(f"names/order: spec {[n for _, n in expected]} vs header {[n for _, n in device]}")
    for i, (want, have) in enumerate(zip(expected, device)):
        if want[0] != have[0] and want[1] == have[1]:
            problems.append(f"parameter {i} {want[1]}: spec type {want[0]!r}, header type {have[0]!r}")
    if len(device) != len(expected):
        problems.append(f"count: spec {len(expected)}, header {len(device)}")
    return problems


def _header(spec) -> str:
    return (Path(cuda_src_dir()) / spec.header).read_text()


def _ids(specs):
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        name = s.describe().replace(" ", "")
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_spec_params_match_the_device_function(spec):
    problems = abi_mismatches(spec, _header(spec))
    assert not problems, f"{spec.describe()} vs epcomm::{spec.family}::{spec.op} in {spec.header}:\n" + \
        "\n".join(problems)


def test_every_family_and_op_is_covered():
    ops = {(s.family, s.op) for s in SPECS}
    assert {("layout", "dispatch_layout"), ("intranode", "dispatch_send"), ("low_latency", "combine_send"),
            ("probe", "write_peer")} <= ops


def _swap(params, a, b):
    params = list(params)
    i, j = [k for k, (_, n) in enumerate(params) if n in (a, b)]
    params[i], params[j] = params[j], params[i]
    return tuple(params)


def test_two_swapped_parameters_of_one_type_are_caught():
    spec = next(s for s in SPECS if s.family == "intranode" and s.op == "dispatch_recv")
    swapped = dataclasses.replace(spec, params=_swap(spec.params, "off_x", "off_scales"))  # both long long
    problems = abi_mismatches(swapped, _header(spec))
    assert problems and "off_scales" in problems[0] and "off_x" in problems[0]
    # And on the header side: a parameter renamed in the device function.
    text = _header(spec)
    assert "long long off_x,\n" in text
    assert abi_mismatches(spec, text.replace("long long off_x,\n", "long long off_x_bytes,\n", 1))


def test_a_changed_type_is_caught():
    spec = next(s for s in SPECS if s.family == "low_latency" and s.op == "combine_recv")
    params = tuple(("long long", n) if n == "tmax" else (c, n) for c, n in spec.params)
    problems = abi_mismatches(dataclasses.replace(spec, params=params), _header(spec))
    assert any("tmax" in p and "long long" in p for p in problems), problems


def test_the_parser_reads_pointer_and_qualified_types():
    text = ("namespace epcomm::demo {\n"
            "template <int kN>\n"
            "EPCOMM_DEVICE_INLINE void run(const int4 *x, unsigned long long* marks,  // a comment, with a comma\n"
            "                              long long  n, uint8_t* const* bases) {}\n}\n")
    assert device_signature(text, "demo", "run") == [("const int4*", "x"), ("unsigned long long*", "marks"),
                                                     ("long long", "n"), ("uint8_t* const*", "bases")]
