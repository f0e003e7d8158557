"""DLPack bridge at the API boundary: any array in (numpy, CuPy, PyTorch, JAX, anything with __dlpack__),
results back in the caller's array type, and the caller's stream.

Inside epcomm arrays are numpy (CPU backend) or CuPy (GPU backend) with ml_dtypes dtypes for bf16 and fp8.
DLPack carries bf16/fp8 between torch, JAX and CuPy, but numpy refuses both: those cross as same-width
unsigned-integer bit views (uint16 / uint8), which costs no copy.

Ordering promise: GPU work of a call is issued on the Buffer's communication stream after it waits on the
caller's stream (CuPy's current stream, torch.cuda.current_stream(), an object's __cuda_stream__, or the
stream= argument). Without async_finish the caller's stream waits for the call's work before the call
returns, so anything the caller queues next on its stream sees the results. JAX has no stream to join:
its inputs are waited for (block_until_ready) and its outputs are complete when returned.
"""
from __future__ import annotations

import sys

import ml_dtypes
import numpy as np

from .errors import ConfigError

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
_BITS = {BF16: np.dtype(np.uint16), FP8: np.dtype(np.uint8)}


def framework_of(a, name: str | None = None) -> str:
    """'numpy', 'cupy', 'torch', 'jax' or 'dlpack' (any other object with __dlpack__); name is the argument
    the error message names."""
    mod = type(a).__module__.split(".")[0]
    if isinstance(a, np.ndarray):
        return "numpy"
    if mod in ("cupy", "torch"):
        return mod
    if mod in ("jax", "jaxlib"):
        return "jax"
    if hasattr(a, "__dlpack__"):
        return "dlpack"
    raise ConfigError(f"{name + ': ' if name else ''}expected an array (numpy, CuPy, PyTorch, JAX or any __dlpack__ "
                      f"object), got {type(a).__name__}")


def _torch_bits_view(a):
    import torch
    if a.dtype == torch.bfloat16:
        return a.view(torch.uint16), BF16
    if a.dtype == getattr(torch, "float8_e4m3fn", None):
        return a.view(torch.uint8), FP8
    return a, None


def _jax_bits_view(a):
    import jax
    import jax.numpy as jnp
    if a.dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(a, jnp.uint16), BF16
    if a.dtype == jnp.float8_e4m3fn:
        return jax.lax.bitcast_convert_type(a, jnp.uint8), FP8
    return a, None


def as_numpy(a, name: str) -> np.ndarray:
    """Host view of a CPU array (no copy where the framework allows it)."""
    fw = framework_of(a)
    if fw == "numpy":
        return a
    if fw == "torch":
        if a.device.type != "cpu":
            raise ConfigError(f"{name}: the CPU backend needs a CPU tensor, got one on {a.device}")
        bits, logical = _torch_bits_view(a)
        out = np.from_dlpack(bits.detach())
        return out.view(logical) if logical is not None else out
    if fw == "jax":
        return np.asarray(a)
    if fw == "cupy":
        raise ConfigError(f"{name}: the CPU backend needs host arrays, got a CuPy (GPU) array")
    return np.from_dlpack(a)


def as_cupy(a, name: str):
    """CuPy view of a GPU array (zero copy for CuPy and PyTorch)."""
    import cupy
    fw = framework_of(a)
    if fw == "cupy":
        return _on_current_device(a, name)
    if fw == "numpy":
        raise ConfigError(f"{name}: the GPU backend needs device arrays, got a numpy array")
    if fw == "torch":
        if a.device.type != "cuda":
            raise ConfigError(f"{name}: expected a CUDA tensor, got one on {a.device}")
        bits, logical = _torch_bits_view(a.detach())
        out = _on_current_device(cupy.from_dlpack(bits), name)
        return out.view(logical) if logical == BF16 else out  # CuPy has bf16 but no float8: e4m3 stays uint8
    if fw == "jax":
        a.block_until_ready()
        bits, logical = _jax_bits_view(a)
        out = _on_current_device(cupy.from_dlpack(bits), name)
        return out.view(logical) if logical == BF16 else out
    return _on_current_device(cupy.from_dlpack(a), name)


def _on_current_device(out, name: str):
    import cupy
    here = cupy.cuda.Device().id
    if out.device.id != here:
        raise ConfigError(f"{name}: expected an array on cuda:{here} (this rank's GPU), got one on cuda:{out.device.id}")
    return out


def to_framework(arr, framework: str, logical=None):
    """Return a numpy or CuPy result in the caller's framework (views where possible). logical=FP8 marks a uint8
    array that holds e4m3 bits (CuPy has no float8 dtype), so torch and JAX get float8_e4m3fn back."""
    if arr is None or framework in ("numpy", "cupy", "dlpack"):
        return arr
    logical = arr.dtype if arr.dtype in _BITS else (FP8 if logical == FP8 and arr.dtype == np.uint8 else None)
    bits = arr.view(_BITS[logical]) if logical is not None else arr
    if framework == "torch":
        import torch
        out = torch.from_dlpack(bits)
        if logical == BF16:
            out = out.view(torch.bfloat16)
        elif logical == FP8:
            out = out.view(torch.float8_e4m3fn)
        return out
    if framework == "jax":
        import jax
        import jax.numpy as jnp
        if isinstance(arr, np.ndarray):
            return jnp.asarray(arr)
        out = jax.dlpack.from_dlpack(bits) if hasattr(jax, "dlpack") else jnp.from_dlpack(bits)
        if logical == BF16:
            out = jax.lax.bitcast_convert_type(out, jnp.bfloat16)
        elif logical == FP8:
            out = jax.lax.bitcast_convert_type(out, jnp.float8_e4m3fn)
        return out
    raise ConfigError(f"unknown framework {framework!r}")


def caller_stream(a=None, stream=None, framework: str | None = None):
    """The CuPy stream the caller's work runs on: an explicit stream (CuPy Stream, torch Stream, an object
    with __cuda_stream__, or a raw handle int), else the current stream of a's framework (or of `framework`
    when no array is given), else CuPy's current stream."""
    import cupy
    if stream is not None:
        if isinstance(stream, (cupy.cuda.Stream, cupy.cuda.ExternalStream)):
            return stream
        if hasattr(stream, "__cuda_stream__"):
            return cupy.cuda.ExternalStream(int(stream.__cuda_stream__()[1]))
        if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
            return cupy.cuda.ExternalStream(int(stream.cuda_stream))
        if isinstance(stream, int):
            return cupy.cuda.ExternalStream(stream)
        raise ConfigError(f"stream: expected a CuPy/torch stream, a __cuda_stream__ object or a handle, got {stream!r}")
    fw = framework_of(a) if a is not None else (framework or "cupy")
    if fw == "torch" and "torch" in sys.modules:
        import torch
        device = a.device if a is not None else torch.device("cuda", cupy.cuda.Device().id)
        return cupy.cuda.ExternalStream(int(torch.cuda.current_stream(device).cuda_stream))
    return cupy.cuda.get_current_stream()
