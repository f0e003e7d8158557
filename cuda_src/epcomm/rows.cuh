// Per-row helpers of the normal-mode row copies: a row's small fields (scales, top-k) carried around its copy, and
// the bf16 accumulation of the reduces.
#pragma once

#include "epcomm/common.cuh"
#include "epcomm/fp8.cuh"

namespace epcomm {

// acc[0..7] += the 8 bf16 values packed in v (exact widening to float32).
EPCOMM_DEVICE_INLINE void accumulate_bf16x8(float (&acc)[8], int4 v) {
    float f[8];
    fp8::unpack_bf16x8(v, f);
    #pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] += f[j];
}

// A row's small per-row fields, loaded by the lanes of a warp BEFORE its row copy and stored after it, so that
// their latency hides behind the copy's: scales s = lane and lane + 32 (the rest, H > 8192, is copied directly),
// top-k entry k = lane (the rest, K > 32, likewise).
// NOTES: scales travel as their 32-bit patterns (never as float values: a float select or move may quieten a NaN's
// payload), so a dispatch moves the caller's bits unchanged.
struct RowMeta {
    uint32_t scale[2];
    int64_t idx;
    float w;
};

// A row's scales: lanes load s = lane and lane + 32 into the RowMeta before the row copy ...
EPCOMM_DEVICE_INLINE void load_row_scales(RowMeta& meta, const float* row, long long stride, int num_scales, int lane) {
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(row);
    #pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int s = lane + j * kWarpSize;
        meta.scale[j] = s < num_scales ? bits[s * stride] : 0u;
    }
}

// ... and store them after it; the tail past 64 scales (H > 8192) is copied straight from the source row.
EPCOMM_DEVICE_INLINE void store_row_scales(const RowMeta& meta, float* out, const float* row, long long stride,
                                           int num_scales, int lane) {
    uint32_t* out_bits = reinterpret_cast<uint32_t*>(out);
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(row);
    #pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int s = lane + j * kWarpSize;
        if (s < num_scales) out_bits[s] = meta.scale[j];
    }
    for (int s = lane + 2 * kWarpSize; s < num_scales; s += kWarpSize) out_bits[s] = bits[s * stride];
}

}  // namespace epcomm
