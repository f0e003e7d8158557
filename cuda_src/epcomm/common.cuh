// Device basics shared by every epcomm kernel: fixed-width types, warp constants, integer helpers and warp reductions.
// NOTES: compiled by NVRTC with no host C++ library: include only <cuda/std/...> headers, annotate every function.
#pragma once

#include <cuda/std/cstdint>  // ::int32_t, ::uint64_t, ... under NVRTC (no <cstdint> there)

// Every device helper is a force-inlined device function.
#define EPCOMM_DEVICE_INLINE __device__ __forceinline__
// Helpers that are also used in constant expressions on the host side of a template (ceil_div and friends).
#define EPCOMM_HOST_DEVICE_INLINE __host__ __device__ __forceinline__

namespace epcomm {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

// a / b rounded up, for non-negative a and positive b.
template <typename T>
EPCOMM_HOST_DEVICE_INLINE constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}

// a rounded up to a multiple of b, for non-negative a and positive b.
template <typename T>
EPCOMM_HOST_DEVICE_INLINE constexpr T align_up(T a, T b) {
    return ceil_div(a, b) * b;
}

// Sum of value over the 32 lanes of the warp; every lane gets the result (all lanes must call it).
template <typename T>
EPCOMM_DEVICE_INLINE T warp_reduce_sum(T value) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
        value += __shfl_xor_sync(kFullWarpMask, value, offset);
    return value;
}

// Maximum of value over the 32 lanes of the warp; every lane gets the result (all lanes must call it).
template <typename T>
EPCOMM_DEVICE_INLINE T warp_reduce_max(T value) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        const T other = __shfl_xor_sync(kFullWarpMask, value, offset);
        value = other > value ? other : value;
    }
    return value;
}

}  // namespace epcomm
