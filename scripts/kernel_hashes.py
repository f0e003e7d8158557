"""Cubin hashes of every registered kernel, against a recorded list: which kernels a change left byte-identical.

Compiles every spec of epcomm.runtime.all_example_specs() for sm_90a and sm_80 (NVRTC, no GPU; through the kernel
cache, so compiles already done are not repeated) and takes the sha256 of each cubin.

    python scripts/kernel_hashes.py             # check against tests/data/kernel_hashes.json: exit 1 on any difference
    python scripts/kernel_hashes.py --record    # write the list (after a change whose cubin changes are intended)

The check prints one row per (kernel, arch): identical, same code, changed, new (not in the list) or missing (in the
list, no longer compiled). "same code": the bytes differ but code_digest() does not, i.e. only the names or the order
of the module's global constants did (NVRTC gives every namespace-scope constexpr a device global, so moving a
constant to another namespace or header renames or reorders it without changing any instruction). Only "identical"
passes. Cubins depend on the compiler, so a list recorded with another NVRTC build is not compared (exit 0
with a skip message); NVSHMEM kernels likewise need the recorded NVSHMEM version. tests/test_kernel_hashes.py runs the
check in CI.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RECORD = os.path.join(ROOT, "tests", "data", "kernel_hashes.json")
ARCHS = ("sm_90a", "sm_80")

IDENTICAL, SAME_CODE, CHANGED, NEW, MISSING = "identical", "same code", "changed", "new", "missing"
# Sections code_digest() leaves out: symbol names and their table, and the global initialisers (hashed per symbol).
_NAME_SECTIONS = (".strtab", ".symtab", ".symtab_shndx", ".nv.global.init")


def _runtime():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import epcomm.runtime as runtime
    return runtime


def nvrtc_identity() -> str:
    """The compiler a cubin came from: NVRTC's major.minor, and the nvrtc wheel's build when it is installed from one
    (two builds of one minor version may emit different code)."""
    runtime = _runtime()
    text = runtime.nvrtc_version()
    try:
        import importlib.metadata as metadata
        for dist in ("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12"):
            try:
                return f"{text} ({dist} {metadata.version(dist)})"
            except metadata.PackageNotFoundError:
                continue
    except ImportError:
        pass
    return text


def _elf_sections(data: bytes) -> list[tuple[str, tuple, bytes]]:
    """(name, (type, flags, link, info, align, entsize), content) of every section of an ELF64 little-endian file."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    out = []
    for name, kind, flags, _addr, offset, size, link, info, align, entsize in headers:
        text = data[names_at + name:data.index(b"\0", names_at + name)].decode()
        content = data[offset:offset + size] if kind != 8 else b""  # SHT_NOBITS has no content
        out.append((text, (kind, flags, link, info, align, entsize), content))
    return out


def code_digest(cubin: bytes) -> str:
    """sha256 of a cubin's code and data without the names of its symbols: every section but the symbol and string
    tables and the global initialisers, by name, and the initial bytes of each global as a sorted list (so renaming or
    reordering constants leaves it unchanged, while a changed instruction, attribute or initial value changes it)."""
    sections = _elf_sections(cubin)
    index = {name: i for i, (name, _, _) in enumerate(sections)}
    h = hashlib.sha256()
    for name, attrs, content in sorted(sections):
        if name in _NAME_SECTIONS or not name:
            continue
        h.update(f"{name}\0{attrs}\0{len(content)}\0".encode())
        h.update(content)
    inits = []
    if ".symtab" in index and ".nv.global.init" in index:
        init_section = sections[index[".nv.global.init"]][2]
        symtab = sections[index[".symtab"]][2]
        for at in range(0, len(symtab), 24):
            _name, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", symtab, at)
            if shndx == index[".nv.global.init"]:
                inits.append(init_section[value:value + size])
    for blob in sorted(inits):
        h.update(len(blob).to_bytes(8, "little") + blob)
    return h.hexdigest()


def spec_name(spec) -> str:
    """The record's name of a spec: describe(), which names the entry, the template arguments and any defines."""
    return spec.describe()


def _hash_one(item):
    spec, arch = item
    runtime = _runtime()
    cubin = runtime.compile_to_cubin(spec, arch)
    return hashlib.sha256(cubin).hexdigest(), code_digest(cubin)


def current_hashes(archs=ARCHS, jobs: int = 1) -> list[dict]:
    """One entry per (distinct spec name, arch): kernel, entry, arch, nvrtc, nvshmem ("" unless an NVSHMEM spec),
    sha256 (the cubin), code_sha256 (its code_digest). Specs that share a name compile the same stub (they differ only in launch settings such as dynamic shared
    memory); one entry stands for them, and differing cubins among them raise."""
    runtime = _runtime()
    from epcomm.config import env
    if env("EPCOMM_JIT_DEBUG"):
        raise RuntimeError("EPCOMM_JIT_DEBUG is set: cubins carry line info and differ from the recorded ones; unset it")
    specs = {}
    for spec in runtime.all_example_specs():
        specs.setdefault(spec_name(spec), []).append(spec)
    items = [(group[0], arch) for group in specs.values() for arch in archs]
    if jobs > 1:
        with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
            digests = list(pool.map(_hash_one, items))
    else:
        digests = [_hash_one(item) for item in items]
    nvrtc = nvrtc_identity()
    entries = []
    for (spec, arch), digest in zip(items, digests):
        for other in specs[spec_name(spec)][1:]:
            other_digest = _hash_one((other, arch))
            if other_digest[0] != digest[0]:
                raise RuntimeError(f"{spec_name(spec)} ({arch}): specs of one name compile to different cubins")
        entries.append({"kernel": spec_name(spec), "entry": spec.entry_name, "arch": arch, "nvrtc": nvrtc,
                        "nvshmem": runtime.nvshmem_version() if spec.uses_nvshmem else "", "sha256": digest[0],
                        "code_sha256": digest[1]})
    return sorted(entries, key=lambda e: (e["kernel"], e["arch"]))


def load_record(path: str = DEFAULT_RECORD) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_record(entries: list[dict], path: str = DEFAULT_RECORD, notes: dict | None = None) -> None:
    """Write the list; notes: {kernel name: text} kept on those entries (why a cubin changed at this record)."""
    notes = notes or {}
    out = []
    for e in entries:
        e = dict(e)
        if e["kernel"] in notes:
            e["note"] = notes[e["kernel"]]
        out.append(e)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


def compare(recorded: list[dict], current: list[dict]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(rows, skipped): rows are (status, kernel, arch) in name order; skipped says which comparisons were left out
    because the recorded compiler differs from the local one."""
    nvrtc = {e["nvrtc"] for e in current}
    old = {(e["kernel"], e["arch"]): e for e in recorded}
    new = {(e["kernel"], e["arch"]): e for e in current}
    skipped = []
    rec_nvrtc = {e["nvrtc"] for e in recorded}
    if recorded and rec_nvrtc != nvrtc:
        skipped.append(f"recorded with NVRTC {', '.join(sorted(rec_nvrtc))}, this machine has "
                       f"{', '.join(sorted(nvrtc))}: cubins are not comparable, nothing checked")
        return [], skipped
    local_nvshmem = {e["nvshmem"] for e in current if e["nvshmem"]}
    rec_nvshmem = {e["nvshmem"] for e in recorded if e.get("nvshmem")}
    skip_nvshmem = bool(rec_nvshmem and local_nvshmem and rec_nvshmem != local_nvshmem)
    if skip_nvshmem:
        skipped.append(f"NVSHMEM kernels recorded with NVSHMEM {', '.join(sorted(rec_nvshmem))}, this machine has "
                       f"{', '.join(sorted(local_nvshmem))}: those are not checked")
    rows = []
    for key in sorted(set(old) | set(new)):
        entry = new.get(key) or old[key]
        if skip_nvshmem and entry.get("nvshmem"):
            continue
        if key not in new:
            status = MISSING
        elif key not in old:
            status = NEW
        elif old[key]["sha256"] == new[key]["sha256"]:
            status = IDENTICAL
        else:
            same = old[key].get("code_sha256") and old[key].get("code_sha256") == new[key].get("code_sha256")
            status = SAME_CODE if same else CHANGED
        rows.append((status, key[0], key[1]))
    return rows, skipped


def format_table(rows, skipped) -> str:
    lines = [f"skipped: {s}" for s in skipped]
    if rows:
        width = max(len(k) for _, k, _ in rows)
        lines += [f"{'status':<9}  {'kernel':<{width}}  arch"]
        lines += [f"{status:<9}  {kernel:<{width}}  {arch}" for status, kernel, arch in rows]
        counts = {s: sum(1 for r in rows if r[0] == s) for s in (IDENTICAL, SAME_CODE, CHANGED, NEW, MISSING)}
        lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def check(path: str = DEFAULT_RECORD, current: list[dict] | None = None, jobs: int = 1) -> tuple[str, str]:
    """(result, report): result is "differ" when any compared (kernel, arch) is not identical, "skipped"
    when nothing could be compared (another NVRTC), else "ok"."""
    recorded = load_record(path)
    if current is None:
        current = current_hashes(jobs=jobs)
    rows, skipped = compare(recorded, current)
    if not rows and skipped:
        result = "skipped"
    else:
        result = "ok" if all(status == IDENTICAL for status, _, _ in rows) else "differ"
    return result, format_table(rows, skipped)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", action="store_true", help="write the list instead of checking against it")
    p.add_argument("--file", default=DEFAULT_RECORD, help="the recorded list (default: %(default)s)")
    p.add_argument("--against", default=None, help="with --record: also print the table against this older list")
    p.add_argument("--note", action="append", default=[], metavar="KERNEL_PREFIX::TEXT",
                   help="with --record: keep TEXT on the entries whose name starts with KERNEL_PREFIX "
                        "(why their cubin changed; a later --note wins; notes of unchanged cubins are kept); "
                        "repeatable")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    args = p.parse_args(argv)
    current = current_hashes(jobs=args.jobs)
    if args.record:
        notes = {}
        if os.path.isfile(args.file):  # a note stays while its kernel's cubin does
            sha = {(e["kernel"], e["arch"]): e["sha256"] for e in current}
            notes.update({e["kernel"]: e["note"] for e in load_record(args.file)
                          if e.get("note") and sha.get((e["kernel"], e["arch"])) == e["sha256"]})
        for item in args.note:
            prefix, sep, text = item.partition("::")
            if not sep:
                p.error(f"--note: expected KERNEL_PREFIX::TEXT, got {item!r}")
            notes.update({e["kernel"]: text for e in current if e["kernel"].startswith(prefix)})
        write_record(current, args.file, notes)
        print(f"recorded {len(current)} cubin hashes in {args.file}")
        if args.against:
            rows, skipped = compare(load_record(args.against), current)
            print(format_table(rows, skipped))
        return 0
    if not os.path.isfile(args.file):
        print(f"no recorded list at {args.file}: run with --record first")
        return 1
    result, report = check(args.file, current)
    print(report)
    return 1 if result == "differ" else 0


if __name__ == "__main__":
    sys.exit(main())
