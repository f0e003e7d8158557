"""Cross-rank agreement: every communicating call carries a small signature (call kind, sequence number and the
arguments that fix its shapes) in the messages it already exchanges; a mismatch is a ConfigError on every rank that
names the ranks and the differing values, before any received data is used (docs/design.md, Cross-rank agreement)."""
from __future__ import annotations

from typing import NamedTuple

from .errors import ConfigError

# Call kinds, numbered as the GPU word 0 will carry them (docs/design.md).
KINDS = ("dispatch", "cached_dispatch", "combine", "low_latency_dispatch", "low_latency_combine")
# The fields, in the order of the GPU words 2.. (absent fields are -1).
FIELDS = ("hidden", "dtype", "num_scales", "num_topk", "num_experts", "num_max_dispatch_tokens_per_rank",
          "num_worst_tokens", "expert_alignment", "flags")
DTYPES = {"bf16": 0, "fp8": 1}
FLAG_BITS = ("zero_copy", "use_fp8", "round_scale", "use_ue8m0", "use_logfmt", "with_topk", "with_weights")


class Signature(NamedTuple):
    """kind (index into KINDS), seq (this rank's count of communicating calls on the Buffer) and values (FIELDS)."""
    kind: int
    seq: int
    values: tuple


def make(kind: str, seq: int, dtype: str | None = None, flags: dict | None = None, **fields) -> Signature:
    unknown = set(fields) - set(FIELDS)
    assert not unknown, unknown                               # internal: callers name fields from FIELDS
    bits = 0
    for i, name in enumerate(FLAG_BITS):
        if (flags or {}).get(name):
            bits |= 1 << i
    values = dict(fields, flags=bits, dtype=DTYPES[dtype] if dtype else -1)
    return Signature(KINDS.index(kind), int(seq), tuple(int(values.get(f, -1)) for f in FIELDS))


def _show(field: str, value: int) -> str:
    if field == "dtype":
        return {v: k for k, v in DTYPES.items()}.get(value, str(value))
    if field == "flags":
        return "{" + ", ".join(n for i, n in enumerate(FLAG_BITS) if value >> i & 1) + "}"
    return str(value)


def check(signatures: list, rank: int) -> None:
    """ConfigError unless every rank's Signature is the same; the message names, per differing item, which ranks
    had which value (every rank sees the same list, so every rank raises the same error)."""
    first = signatures[0]
    if all(s == first for s in signatures):
        return
    items = [("call", lambda s: f"{KINDS[s.kind]} #{s.seq}")]
    items += [(f, (lambda i, f: lambda s: _show(f, s.values[i]))(i, f)) for i, f in enumerate(FIELDS)]
    parts = []
    for name, show in items:
        by_value: dict[str, list[int]] = {}
        for r, s in enumerate(signatures):
            by_value.setdefault(show(s), []).append(r)
        if len(by_value) > 1:
            parts.append(f"{name}: " + "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} "
                                                 f"{v}" for v, rs in by_value.items()))
    raise ConfigError(f"rank {rank}: the ranks disagree on this call (every rank must make the same calls with the "
                      f"same shapes): " + " | ".join(parts))
