// The warp-strided row copy every kernel uses: the owner of how a warp moves n 16-byte vectors.
// A lane issues kUnroll loads (vectors lane, lane + 32, ...) before its first store, so a warp keeps
// 32 * kUnroll * 16 bytes in flight per memory latency; then it stores each vector to every non-null destination.
// kReadOnlySrc: the source is read-only for the whole kernel (non-coherent, non-allocating loads); otherwise plain
// loads, for data another GPU wrote before an acquire the caller already did. kStreamingStore: stores that do not
// allocate in L1 (rows bound for a peer or a receive area); otherwise plain stores. All lanes of the warp call it.
#pragma once

#include "epcomm/common.cuh"
#include "epcomm/ptx.cuh"

namespace epcomm {

template <int kUnroll, bool kReadOnlySrc, bool kStreamingStore, int kNumDst>
EPCOMM_DEVICE_INLINE void warp_copy(const int4* src, int4* const (&dst)[kNumDst], int n, int lane) {
    for (int base = lane; base < n; base += kWarpSize * kUnroll) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kWarpSize;
            if (i < n) v[u] = kReadOnlySrc ? ld_global_nc_na_v4(src + i) : ld_global_v4(src + i);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kWarpSize;
            if (i >= n) continue;
#pragma unroll
            for (int d = 0; d < kNumDst; ++d) {
                if (dst[d] == nullptr) continue;
                if (kStreamingStore) st_global_na_v4(dst[d] + i, v[u]);
                else st_global_v4(dst[d] + i, v[u]);
            }
        }
    }
}

// One destination (never null).
template <int kUnroll, bool kReadOnlySrc, bool kStreamingStore>
EPCOMM_DEVICE_INLINE void warp_copy(const int4* src, int4* dst, int n, int lane) {
    int4* const dsts[1] = {dst};
    warp_copy<kUnroll, kReadOnlySrc, kStreamingStore, 1>(src, dsts, n, lane);
}

}  // namespace epcomm
