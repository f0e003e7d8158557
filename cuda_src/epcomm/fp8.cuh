// Numerics shared by kernels that convert data: bf16 <-> float32 and the per-token, per-128-channel FP8 (e4m3) cast,
// bit-exact with epcomm/reference.py (per_token_cast_to_fp8, pack_ue8m0, low_latency_combine_recv's bf16 rounding).
// NOTES: every float operation here is written with explicit round-to-nearest intrinsics (__fmul_rn, __fdiv_rn, ...)
// so that no contraction into FMA or fast-math approximation can make the device differ from numpy.
#pragma once

#include <cuda_fp8.h>

#include "epcomm/common.cuh"

namespace epcomm::fp8 {

constexpr float kFp8Max = 448.0f;     // largest finite e4m3 value (reference.FP8_MAX)
constexpr int kBlock = 128;           // channels per scale (reference.FP8_BLOCK)
constexpr float kAmaxFloor = 1e-4f;   // amax of an all-zero block (reference.FP8_AMAX_FLOOR, as float32)

// ---- bf16 (raw bits in uint32 words, two values per word, element 0 in the low half: little-endian memory order).

// The float32 value of the bf16 in the low / high 16 bits of w (exact widening).
EPCOMM_DEVICE_INLINE float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
EPCOMM_DEVICE_INLINE float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// The 8 float32 values of the 8 bf16 packed in a 16-byte vector, in memory order.
EPCOMM_DEVICE_INLINE void unpack_bf16x8(int4 v, float (&out)[8]) {
    const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                               static_cast<uint32_t>(v.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = bf16_lo(words[i]);
        out[2 * i + 1] = bf16_hi(words[i]);
    }
}

// 8 float32 -> 8 bf16 in one 16-byte vector, each rounded once to nearest even (as numpy's astype(bfloat16),
// ml_dtypes), with the hardware's paired conversion: one `cvt.rn.bf16x2.f32` per two values instead of ~7 integer
// operations per value (the combine's reduce is partly bound by instruction issue: bench/NOTES.md v17). A NaN becomes
// a quiet NaN (its payload is not kept, where ml_dtypes keeps the top bits).
EPCOMM_DEVICE_INLINE int4 pack_bf16x8(const float (&v)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)  // the first operand goes to the high half: element 2i + 1
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w[i]) : "f"(v[2 * i + 1]), "f"(v[2 * i]));
    return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

// ---- FP8 scales.

// Smallest power of two >= v, exactly, for a positive normal float32 v (reference._ceil_pow2: frexp on the bits, no
// log2): v itself when its mantissa bits are zero, else 2^(exponent + 1).
EPCOMM_DEVICE_INLINE float ceil_pow2(float v) {
    const uint32_t bits = __float_as_uint(v);
    if ((bits & 0x007fffffu) == 0u) return v;
    return __uint_as_float(((bits >> 23) + 1u) << 23);
}

// The multiplier applied before the cast (scale) and the dequantisation factor stored beside the data (scale_inv) of
// one 128-channel block whose max |x| is amax (before the floor).
//   plain:        scale_inv = amax * (1 / 448),                      scale = 448 / amax
//   round_scale:  scale_inv = 2^ceil(log2(amax * (1 / 448))) exactly, scale = 1 / scale_inv (exact: a power of two)
// The product, not amax / 448, as DeepEP's kernel computes it (they differ in the last bit for about half the blocks).
struct Scales {
    float scale;
    float scale_inv;
};

template <bool kRoundScale>
EPCOMM_DEVICE_INLINE Scales block_scales(float amax) {
    // DeepEP's kFinfoAmaxInvE4M3 (reference.FP8_MAX_INV); function-local, as a namespace-scope constexpr would add a
    // device global to every kernel that includes this header.
    constexpr float kFp8MaxInv = 1.0f / 448.0f;
    amax = fmaxf(amax, kAmaxFloor);
    Scales s;
    if constexpr (kRoundScale) {
        s.scale_inv = ceil_pow2(__fmul_rn(amax, kFp8MaxInv));
        s.scale = __fdiv_rn(1.0f, s.scale_inv);
    } else {
        s.scale_inv = __fmul_rn(amax, kFp8MaxInv);
        s.scale = __fdiv_rn(kFp8Max, amax);
    }
    return s;
}

// The UE8M0 byte of a power-of-two scale: its float32 exponent field (reference.pack_ue8m0).
EPCOMM_DEVICE_INLINE uint32_t ue8m0_byte(float scale_inv) { return (__float_as_uint(scale_inv) >> 23) & 0xffu; }

// ---- The cast itself.

// e4m3 bits of x * scale, rounded to nearest even (the product is one float32 rounding, as numpy's); the satfinite
// conversion clamps finite values to +-448 and keeps a NaN a NaN (0x7f), as DeepEP's cast (an fminf/fmaxf clamp
// before it would turn a NaN into -448).
EPCOMM_DEVICE_INLINE uint32_t to_e4m3x2(float a, float b, float scale) {
    float2 v;
    v.x = __fmul_rn(a, scale);
    v.y = __fmul_rn(b, scale);
    // x lands in the low byte (memory order), y in the high byte.
    return static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E4M3));
}

// 16 float32 values -> 16 e4m3 bytes (one 16-byte vector, memory order), all with the same scale.
EPCOMM_DEVICE_INLINE int4 to_e4m3x16(const float (&v)[16], float scale) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        w[i] = to_e4m3x2(v[4 * i], v[4 * i + 1], scale) | (to_e4m3x2(v[4 * i + 2], v[4 * i + 3], scale) << 16);
    }
    return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

// max |v_i| of 16 values (NaN-free inputs; fmaxf ignores a NaN operand).
EPCOMM_DEVICE_INLINE float abs_max16(const float (&v)[16]) {
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) m = fmaxf(m, fabsf(v[i]));
    return m;
}

}  // namespace epcomm::fp8
