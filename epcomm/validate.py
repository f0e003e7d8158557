"""Argument checks at the API boundary: every error names the argument and the expected form.

Arrays here are numpy or CuPy (after interop); shapes and dtypes are read without touching device data,
except index-range checks, which need values and so run only where the data is on the host.
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .interop import BF16, FP8

_NAMES = {BF16: "bf16", FP8: "float8_e4m3fn"}


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    return _NAMES.get(dt, str(dt))


def describe(a) -> str:
    return f"[{', '.join(str(s) for s in a.shape)}] {dtype_name(a.dtype)}"


def fail(name: str, expected: str, a=None, extra: str = "") -> None:
    if a is None:
        got = ""
    elif hasattr(a, "shape") and hasattr(a, "dtype"):
        got = f", got {describe(a)}"
    elif isinstance(a, (tuple, list)):
        got = f", got a {type(a).__name__} of {len(a)}"     # not the repr of the arrays inside
    else:
        got = f", got {a!r}"
    raise ConfigError(f"{name}: expected {expected}{got}{extra}")


def check_array(a, name: str, shape: tuple, dtype, expected: str, contiguous: bool = True):
    """shape entries: an int, or None for 'any'. dtype: one dtype or a tuple of allowed dtypes."""
    adt = getattr(a, "dtype", None)
    ashape = getattr(a, "shape", None)
    if a is None or adt is None or ashape is None:
        fail(name, expected, a)
    if not (any(adt == d for d in dtype) if isinstance(dtype, tuple) else adt == dtype):
        fail(name, expected, a)
    if len(ashape) != len(shape) or any(s is not None and s != g for s, g in zip(shape, ashape)):
        fail(name, expected, a)
    if contiguous and not a.flags.c_contiguous:
        fail(name, expected + " (C-contiguous)", a, " which is not contiguous")
    return a


def check_int(v, name: str, lo: int, hi: int | None = None, expected: str | None = None) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        fail(name, expected or f"an int >= {lo}", v)
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        fail(name, expected or (f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}"), v)
    return v


def check_num_experts(num_experts, num_ranks: int) -> int:
    e = check_int(num_experts, "num_experts", 1)
    if e % num_ranks:
        fail("num_experts", f"a multiple of the number of ranks ({num_ranks})", e)
    return e


def check_topk_idx(topk_idx, num_tokens: int | None = None, name: str = "topk_idx"):
    """[T, K] int64 (int32 is accepted and widened: JAX without x64 has no int64). Returns the int64 array."""
    check_array(topk_idx, name, (num_tokens, None), (np.int64, np.int32), "[num_tokens, num_topk] int64 (or int32)"
                + (f" with num_tokens={num_tokens}" if num_tokens is not None else ""))
    if topk_idx.shape[1] < 1:
        fail(name, "at least one top-k column", topk_idx)
    return topk_idx if topk_idx.dtype == np.int64 else topk_idx.astype(np.int64)


def check_topk_range_host(topk_idx: np.ndarray, num_experts: int, name: str = "topk_idx") -> None:
    """Values in [-1, num_experts) (host arrays only; the GPU layout kernel checks on the device)."""
    if topk_idx.size:
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < -1 or hi >= num_experts:
            bad = lo if lo < -1 else hi
            where = tuple(int(i) for i in np.argwhere(topk_idx == bad)[0])
            raise ConfigError(f"{name}: expected expert indices in [-1, {num_experts}), got {bad} at {where}")


def check_topk_weights(topk_weights, topk_idx, name: str = "topk_weights"):
    return check_array(topk_weights, name, tuple(topk_idx.shape), np.float32,
                       f"[{topk_idx.shape[0]}, {topk_idx.shape[1]}] float32 (the shape of topk_idx)")


def check_dispatch_x(x):
    """x: bf16 [T,H] or (e4m3 [T,H], scales [T,H/128] float32, any strides). Returns (data, scales or None)."""
    if isinstance(x, tuple):
        if len(x) != 2:
            fail("x", "a bf16 array or a (float8_e4m3fn [num_tokens, hidden], float32 scales) pair", x)
        data, scales = x
        # uint8 holds e4m3 bits where the array library has no float8 dtype (CuPy).
        check_array(data, "x[0]", (None, None), (FP8, np.uint8), "[num_tokens, hidden] float8_e4m3fn (or its uint8 bits)")
        t, h = data.shape
        if h % 128:
            fail("x[0]", "a hidden size that is a multiple of 128 for FP8", data)
        check_array(scales, "x[1]", (t, h // 128), np.float32,
                    f"[{t}, {h // 128}] float32 scales (one per 128 channels; any strides)", contiguous=False)
        return data, scales
    check_array(x, "x", (None, None), BF16, "[num_tokens, hidden] bf16, or an FP8 (data, scales) pair")
    if (x.shape[1] * 2) % 16:
        fail("x", "a hidden size with hidden * 2 bytes a multiple of 16", x)
    return x, None


def check_bias(bias, num_tokens: int, hidden: int):
    if bias is None:
        return ()
    items = bias if isinstance(bias, tuple) else (bias,)
    if len(items) not in (1, 2):
        fail("bias", "None, one [num_tokens, hidden] bf16 array or a pair of them", bias)
    for i, b in enumerate(items):
        check_array(b, f"bias[{i}]" if isinstance(bias, tuple) else "bias", (num_tokens, hidden), BF16,
                    f"[{num_tokens}, {hidden}] bf16")
    return items
