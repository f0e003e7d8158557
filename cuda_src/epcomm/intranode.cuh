// Intranode normal mode (ranks that share NVLink): routing layout, notify (count exchange + barrier),
// dispatch send, dispatch receive (copy-out), combine send (push), combine reduce.
// Design: fixed worst-case buffers with direct addressing; no queues. docs/design.md has the picture.
#pragma once
#include "epcomm/common.cuh"
#include "epcomm/ptx.cuh"
#include "epcomm/comm.cuh"
#include "epcomm/phases.cuh"

namespace epcomm {
namespace intranode {

// NOTES: the meta area at the start of every rank's NVLink buffer. epcomm/intranode.py (meta_bytes) mirrors
// these offsets; tests/test_intranode_layout.py checks the two agree.
//   counts[2][R][R + 1] int32   counts[parity][s][d] = tokens source s sends to d; [s][R] = s's token count
//   expert_counts[2][R][kMaxLocalExperts] int32   tokens source s sends to each of my local experts
//   flags[kNumFlagKinds][R] uint64                flags[kind][s] = last epoch source s signalled here
//   dispatch_chunks[R][kMaxChunks] uint64         (epoch << 32) | rows of s's block here written through chunk c
//   combine_chunks[R][kMaxChunks] uint64          (epoch << 32): sender s returned its rows of my token chunk c
// A chunk is kChunkTokens consecutive tokens of the source; one warp sends a chunk and then publishes it, so the
// receiver copies (dispatch) or reduces (combine) chunk by chunk while the rest is still in flight.
constexpr int kMaxLocalExperts = 1024;
constexpr int kFlagNotify = 0, kFlagCombineReady = 1;
constexpr int kNumFlagKinds = 2;
constexpr int kChunkTokens = 16;
constexpr int kMaxChunks = 2048;  // tokens per rank <= kChunkTokens * kMaxChunks (checked in intranode.py)
// host_info (host-mapped int32): [0] = N, [1 + j] = aligned count of local expert j, [kHostInfoEpoch] = host_seq.
constexpr int kHostInfoEpoch = 1 + kMaxLocalExperts;
constexpr int kHostInfoInts = kHostInfoEpoch + 1;

template <int kNumRanks>
struct Meta {
    static constexpr int kCols = kNumRanks + 1;
    static constexpr size_t kCountsOffset = 0;
    static constexpr size_t kExpertCountsOffset = kCountsOffset + 2 * kNumRanks * kCols * sizeof(int);
    static constexpr size_t kFlagsOffset =
        align_up<size_t>(kExpertCountsOffset + 2 * kNumRanks * kMaxLocalExperts * sizeof(int), 128);
    static constexpr size_t kDispatchChunksOffset =
        align_up<size_t>(kFlagsOffset + kNumFlagKinds * kNumRanks * sizeof(uint64_t), 128);
    static constexpr size_t kCombineChunksOffset = kDispatchChunksOffset + kNumRanks * kMaxChunks * sizeof(uint64_t);
    static constexpr size_t kBytes = align_up<size_t>(kCombineChunksOffset + kNumRanks * kMaxChunks * sizeof(uint64_t), 4096);

    EPCOMM_DEVICE_INLINE static int* counts(uint8_t* base, uint64_t epoch) {
        return reinterpret_cast<int*>(base + kCountsOffset) + (epoch & 1) * kNumRanks * kCols;
    }
    EPCOMM_DEVICE_INLINE static int* expert_counts(uint8_t* base, uint64_t epoch) {
        return reinterpret_cast<int*>(base + kExpertCountsOffset) + (epoch & 1) * kNumRanks * kMaxLocalExperts;
    }
    EPCOMM_DEVICE_INLINE static uint64_t* flag(uint8_t* base, int kind, int src) {
        return reinterpret_cast<uint64_t*>(base + kFlagsOffset) + kind * kNumRanks + src;
    }
    EPCOMM_DEVICE_INLINE static uint64_t* dispatch_chunk(uint8_t* base, int src, int chunk) {
        return reinterpret_cast<uint64_t*>(base + kDispatchChunksOffset) + src * kMaxChunks + chunk;
    }
    EPCOMM_DEVICE_INLINE static uint64_t* combine_chunk(uint8_t* base, int src, int chunk) {
        return reinterpret_cast<uint64_t*>(base + kCombineChunksOffset) + src * kMaxChunks + chunk;
    }
};

// Inclusive prefix sum over the lanes of a warp (all lanes must call it).
EPCOMM_DEVICE_INLINE int warp_inclusive_sum(int v) {
    const int lane = threadIdx.x % kWarpSize;
    #pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
        int other = __shfl_up_sync(kFullWarpMask, v, offset);
        if (lane >= offset) v += other;
    }
    return v;
}

// acc[0..7] += the 8 bf16 values packed in v (exact widening to float32).
EPCOMM_DEVICE_INLINE void accumulate_bf16x8(float* acc, int4 v) {
    const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                               static_cast<uint32_t>(v.w)};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        acc[2 * i] += __uint_as_float(words[i] << 16);
        acc[2 * i + 1] += __uint_as_float(words[i] & 0xffff0000u);
    }
}

// Round a float32 to bf16 bits, to nearest even (NaN stays NaN).
EPCOMM_DEVICE_INLINE uint32_t float_to_bf16_bits(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}

// Pack 8 float32 values into 8 bf16 (one 16-byte vector), each rounded once to nearest even.
EPCOMM_DEVICE_INLINE int4 pack_bf16x8(const float* acc) {
    uint32_t w[4];
    #pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = float_to_bf16_bits(acc[2 * i]) | (float_to_bf16_bits(acc[2 * i + 1]) << 16);
    return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

// Loads in flight per lane in the row copies: a lane issues kCopyUnroll 16-byte loads before its first store,
// so a warp keeps 32 * kCopyUnroll * 16 bytes moving instead of one load's latency per step.
constexpr int kCopyUnroll = 8;

// Copy one row of row_int4 16-byte vectors (read once, read-only source) to up to kNumDst destinations (nullptr
// entries skipped) with non-allocating stores. All lanes of the warp call it.
template <int kNumDst>
EPCOMM_DEVICE_INLINE void warp_copy_row(const int4* src, int4* const (&dst)[kNumDst], int row_int4, int lane) {
    for (int base = lane; base < row_int4; base += kWarpSize * kCopyUnroll) {
        int4 v[kCopyUnroll];
        #pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
            const int i = base + u * kWarpSize;
            if (i < row_int4) v[u] = ld_global_nc_na_v4(src + i);
        }
        #pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
            const int i = base + u * kWarpSize;
            if (i < row_int4) {
                #pragma unroll
                for (int d = 0; d < kNumDst; ++d)
                    if (dst[d] != nullptr) st_global_na_v4(dst[d] + i, v[u]);
            }
        }
    }
}

// Same for data other GPUs wrote before an acquire we already did: plain (coherent) loads, plain stores.
EPCOMM_DEVICE_INLINE void warp_copy_row_coherent(const int4* src, int4* dst, int row_int4, int lane) {
    for (int base = lane; base < row_int4; base += kWarpSize * kCopyUnroll) {
        int4 v[kCopyUnroll];
        #pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
            const int i = base + u * kWarpSize;
            if (i < row_int4) v[u] = ld_global_v4(src + i);
        }
        #pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
            const int i = base + u * kWarpSize;
            if (i < row_int4) st_global_v4(dst + i, v[u]);
        }
    }
}

EPCOMM_DEVICE_INLINE uint8_t* peer_base(const uint64_t* peer_bases, int r) {
    return reinterpret_cast<uint8_t*>(peer_bases[r]);
}

// ---------------------------------------------------------------------------------------------------------
// Layout: one thread per token. is_token_in_rank[t, r], per-rank and per-expert counts (outputs pre-zeroed).
// Out-of-range expert indices are counted into *num_bad_indices and otherwise ignored (never addressed).
template <int kNumThreads>
EPCOMM_DEVICE_INLINE void layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts,
                                 int num_ranks, int* num_tokens_per_rank, int* num_tokens_per_expert,
                                 bool* is_token_in_rank, int* num_bad_indices) {
    extern __shared__ int smem_counts[];  // [num_experts + num_ranks]
    int* expert_counts = smem_counts;
    int* rank_counts = smem_counts + num_experts;
    for (int i = threadIdx.x; i < num_experts + num_ranks; i += kNumThreads) smem_counts[i] = 0;
    __syncthreads();
    const int experts_per_rank = num_experts / num_ranks;
    int t = blockIdx.x * kNumThreads + threadIdx.x;
    if (t < num_tokens) {
        uint64_t mask = 0;
        for (int k = 0; k < num_topk; ++k) {
            int64_t e = topk_idx[static_cast<int64_t>(t) * num_topk + k];
            if (e < -1 || e >= num_experts) { atomicAdd(num_bad_indices, 1); continue; }
            if (e < 0) continue;
            atomicAdd(&expert_counts[e], 1);
            mask |= 1ull << (e / experts_per_rank);
        }
        for (int r = 0; r < num_ranks; ++r) {
            bool in = (mask >> r) & 1;
            is_token_in_rank[static_cast<int64_t>(t) * num_ranks + r] = in;
            if (in) atomicAdd(&rank_counts[r], 1);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < num_experts; i += kNumThreads)
        if (expert_counts[i]) atomicAdd(&num_tokens_per_expert[i], expert_counts[i]);
    for (int i = threadIdx.x; i < num_ranks; i += kNumThreads)
        if (rank_counts[i]) atomicAdd(&num_tokens_per_rank[i], rank_counts[i]);
}

// ---------------------------------------------------------------------------------------------------------
// Notify: one block. (1) send_pos[t, d] = exclusive prefix of is_token_in_rank[:, d] and chunk_end[c, d] = rows for
// d in tokens [0, (c + 1) * kChunkTokens) (both skipped when cached); (2) write my counts row (and my token count)
// to every peer, my per-expert counts to each expert's owner, release flag; (3) wait for every peer's flag;
// (4) publish the count matrix [R, R + 1], per-expert receive counts and N.
// info_out (device, also host-mapped copy host_info): [0] = N, [1 + j] = aligned count of local expert j;
// host_info[kHostInfoEpoch] = host_seq (the host's call number), written last with release so the host reads a
// complete record (pairs with the host's poll in gpu_backend._wait_host_info).
template <int kNumRanks, int kNumThreads>
EPCOMM_DEVICE_INLINE void notify(const bool* is_token_in_rank, int num_tokens, const int* num_tokens_per_expert,
                                 int num_experts, int expert_alignment, int* send_pos, int* chunk_end,
                                 int* count_matrix, int* info_out, int* host_info, int capacity_rows,
                                 const uint64_t* peer_bases, uint64_t* epoch_counter, int do_count, int host_seq,
                                 uint64_t err_record, long long timeout_ns, int rank) {
    using M = Meta<kNumRanks>;
    constexpr int kCols = M::kCols;
    // NOTES: epochs live on the device so that CUDA-graph replays advance them; this single-block kernel owns the
    // dispatch epoch: it uses counter + 1 and stores it back at the end, where the dispatch kernel reads it.
    const uint64_t epoch = *epoch_counter + 1;
    constexpr int kNumWarps = kNumThreads / kWarpSize;
    __shared__ int warp_totals[kNumWarps][kNumRanks];
    __shared__ int running[kNumRanks];
    __shared__ int matrix[kNumRanks][kCols];
    comm::Waiter waiter(err_record, timeout_ns, rank);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int experts_per_rank = num_experts / kNumRanks;

    if (do_count) {
        // (1) Exclusive scan over tokens, kNumThreads tokens per step, all destinations at once.
        if (threadIdx.x < kNumRanks) running[threadIdx.x] = 0;
        __syncthreads();
        for (int base = 0; base < num_tokens; base += kNumThreads) {
            const int t = base + threadIdx.x;
            int v[kNumRanks], incl[kNumRanks];
            #pragma unroll
            for (int d = 0; d < kNumRanks; ++d) {
                v[d] = (t < num_tokens) ? static_cast<int>(is_token_in_rank[static_cast<int64_t>(t) * kNumRanks + d]) : 0;
                incl[d] = warp_inclusive_sum(v[d]);
                if (lane == kWarpSize - 1) warp_totals[warp][d] = incl[d];
            }
            __syncthreads();
            const bool chunk_last = t < num_tokens && ((t + 1) % kChunkTokens == 0 || t == num_tokens - 1);
            #pragma unroll
            for (int d = 0; d < kNumRanks; ++d) {
                int before = running[d];
                for (int w = 0; w < warp; ++w) before += warp_totals[w][d];
                const int exclusive = before + incl[d] - v[d];
                if (t < num_tokens) send_pos[static_cast<int64_t>(t) * kNumRanks + d] = v[d] ? exclusive : -1;
                if (chunk_last) chunk_end[(t / kChunkTokens) * kNumRanks + d] = exclusive + v[d];
            }
            __syncthreads();
            if (threadIdx.x < kNumRanks) {
                int sum = 0;
                for (int w = 0; w < kNumWarps; ++w) sum += warp_totals[w][threadIdx.x];
                running[threadIdx.x] += sum;
            }
            __syncthreads();
        }
        // (2) My row of counts (and token count) into every peer; my per-expert counts into each owner.
        for (int i = threadIdx.x; i < kNumRanks * kCols; i += kNumThreads) {
            const int p = i / kCols, d = i % kCols;
            M::counts(peer_base(peer_bases, p), epoch)[rank * kCols + d] = d < kNumRanks ? running[d] : num_tokens;
        }
        for (int i = threadIdx.x; i < num_experts; i += kNumThreads) {
            const int d = i / experts_per_rank, j = i % experts_per_rank;
            M::expert_counts(peer_base(peer_bases, d), epoch)[rank * kMaxLocalExperts + j] = num_tokens_per_expert[i];
        }
    }
    __syncthreads();
    if (threadIdx.x < kNumRanks) {
        // Pairs with the acquire wait below on every peer: counts written above are visible once the flag is.
        fence_acq_rel_sys();
        st_release_sys_u64(M::flag(peer_base(peer_bases, threadIdx.x), kFlagNotify, rank), epoch);
    }
    __syncthreads();
    // (3) Wait for every source's flag (bounded).
    if (threadIdx.x < kNumRanks) {
        uint8_t* mine = peer_base(peer_bases, rank);
        comm::wait_geq(M::flag(mine, kFlagNotify, threadIdx.x), epoch, waiter, threadIdx.x, phase::kNotify);
    }
    __syncthreads();
    if (threadIdx.x == 0) *epoch_counter = epoch;
    if (comm::block_has_error(waiter) || !do_count) return;
    // (4) Publish the count matrix and this rank's receive totals.
    uint8_t* mine = peer_base(peer_bases, rank);
    for (int i = threadIdx.x; i < kNumRanks * kCols; i += kNumThreads) {
        const int v = M::counts(mine, epoch)[i];
        matrix[i / kCols][i % kCols] = v;
        count_matrix[i] = v;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < experts_per_rank; j += kNumThreads) {
        int sum = 0;
        for (int s = 0; s < kNumRanks; ++s) sum += M::expert_counts(mine, epoch)[s * kMaxLocalExperts + j];
        sum = (sum + expert_alignment - 1) / expert_alignment * expert_alignment;
        info_out[1 + j] = sum;
        if (host_info) host_info[1 + j] = sum;
    }
    if (threadIdx.x == 0) {
        int n = 0, worst_dest = -1, worst_rows = 0;
        for (int d = 0; d < kNumRanks; ++d) {
            int rows = 0;
            for (int s = 0; s < kNumRanks; ++s) rows += matrix[s][d];
            if (d == rank) n = rows;
            if (rows > capacity_rows && rows > worst_rows) { worst_dest = d; worst_rows = rows; }
        }
        info_out[0] = n;
        if (worst_dest >= 0) comm::record_error(waiter, comm::kErrCapacity, worst_dest, phase::kNotify,
                                                worst_rows, capacity_rows);
        if (host_info) host_info[0] = n;
    }
    __syncthreads();
    if (host_info && threadIdx.x == 0) {
        fence_acq_rel_sys();
        st_release_sys_s32(host_info + kHostInfoEpoch, host_seq);
    }
}

// Per-call geometry every dispatch/combine block derives from the count matrix [R][R + 1] (in shared memory).
template <int kNumRanks>
struct Geometry {
    int matrix[kNumRanks][kNumRanks + 1];
    int my_start[kNumRanks];      // start of my block in destination d's receive order
    int recv_start[kNumRanks];    // start of source s's block in my receive order
    int origin_start[kNumRanks];  // start of my block inside source s's combine area
    int area_start[kNumRanks];    // start of sender d's block inside my combine area
    int num_chunks[kNumRanks];    // chunks of source s (ceil(T_s / kChunkTokens))
    int remote_pairs;             // sum of num_chunks over sources other than me

    EPCOMM_DEVICE_INLINE void load(const int* count_matrix, int rank) {
        constexpr int kCols = kNumRanks + 1;
        for (int i = threadIdx.x; i < kNumRanks * kCols; i += blockDim.x) matrix[i / kCols][i % kCols] = count_matrix[i];
        __syncthreads();
        if (threadIdx.x < kNumRanks) {
            const int r = threadIdx.x;
            int a = 0, b = 0, c = 0, e = 0;
            for (int s = 0; s < rank; ++s) a += matrix[s][r];
            for (int s = 0; s < r; ++s) b += matrix[s][rank];
            for (int d = 0; d < rank; ++d) c += matrix[r][d];
            for (int d = 0; d < r; ++d) e += matrix[rank][d];
            my_start[r] = a;
            recv_start[r] = b;
            origin_start[r] = c;
            area_start[r] = e;
            num_chunks[r] = (matrix[r][kNumRanks] + kChunkTokens - 1) / kChunkTokens;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int pairs = 0;
            for (int s = 0; s < kNumRanks; ++s) if (s != rank) pairs += num_chunks[s];
            remote_pairs = pairs;
        }
        __syncthreads();
    }

    // The p-th (source, chunk) pair over sources other than me, in source order.
    EPCOMM_DEVICE_INLINE void pair(int p, int rank, int& src, int& chunk) const {
        src = 0;
        for (;; ++src) {
            if (src == rank) continue;
            if (p < num_chunks[src]) break;
            p -= num_chunks[src];
        }
        chunk = p;
    }
};

// ---------------------------------------------------------------------------------------------------------
// Where one destination's copy of the dispatched rows goes: a peer's receive area, or, for this rank's own
// rows, straight into the caller's output arrays (the same row numbers: outputs are in receive order).
struct RowSink {
    int4* x;
    float* scales;
    int64_t* idx;
    float* w;
    int* src;
};

// Dispatch: sender warps [0, kSendWarps) of every block take chunks of kChunkTokens of my tokens; a token's row
// is read once and stored to its final row at each destination (my own rows straight into the outputs), then the
// warp publishes the chunk to every peer: (epoch << 32) | rows of my block there written so far. Receiver warps
// copy each arrived (source, chunk) from the receive area into the outputs, so the copy-out overlaps the
// transfer. Rows [N, num_out_rows) (num_worst_tokens padding) get topk_idx -1, weight 0, src_idx -1.
template <int kNumRanks, int kNumThreads, int kRecvWarps>
EPCOMM_DEVICE_INLINE void dispatch(const int4* x, int row_int4, const float* scales, long long scale_stride_t,
                                   long long scale_stride_s, int num_scales, const int64_t* topk_idx,
                                   const float* topk_weights, int num_topk, int num_experts,
                                   const bool* is_token_in_rank, const int* send_pos, const int* chunk_end,
                                   const int* count_matrix, int num_tokens, const uint64_t* peer_bases,
                                   long long data_offset, long long off_x, long long off_scales, long long off_idx,
                                   long long off_w, long long off_src, int4* out_x, float* out_scales,
                                   int64_t* out_idx, float* out_w, int* out_src, int num_out_rows,
                                   int* recv_chunk_end, const uint64_t* epoch_counter, uint64_t err_record,
                                   long long timeout_ns, int rank) {
    using M = Meta<kNumRanks>;
    constexpr int kWarps = kNumThreads / kWarpSize;
    constexpr int kSendWarps = kWarps - kRecvWarps;
    static_assert(kRecvWarps > 0 && kSendWarps > 0, "dispatch needs sender and receiver warps");
    const uint64_t epoch = *epoch_counter;  // advanced by this call's notify
    __shared__ Geometry<kNumRanks> geo;
    geo.load(count_matrix, rank);
    comm::Waiter waiter(err_record, timeout_ns, rank);
    const bool skip = comm::block_has_error(waiter);  // e.g. a capacity error from notify: address nothing
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    uint8_t* const local = peer_base(peer_bases, rank);

    if (warp < kSendWarps) {
        RowSink sink[kNumRanks];
        #pragma unroll
        for (int d = 0; d < kNumRanks; ++d) {
            if (d == rank) {
                sink[d] = RowSink{out_x, out_scales, out_idx, out_w, out_src};
            } else {
                uint8_t* data = peer_base(peer_bases, d) + data_offset;
                sink[d] = RowSink{reinterpret_cast<int4*>(data + off_x), reinterpret_cast<float*>(data + off_scales),
                                  reinterpret_cast<int64_t*>(data + off_idx), reinterpret_cast<float*>(data + off_w),
                                  reinterpret_cast<int*>(data + off_src)};
            }
        }
        const int experts_per_rank = num_experts / kNumRanks;
        const int num_chunks = (num_tokens + kChunkTokens - 1) / kChunkTokens;
        for (int c = blockIdx.x * kSendWarps + warp; c < num_chunks && !skip; c += gridDim.x * kSendWarps) {
            const int t_end = min(num_tokens, (c + 1) * kChunkTokens);
            for (int t = c * kChunkTokens; t < t_end; ++t) {
                long long row[kNumRanks];
                int4* dst[kNumRanks];
                #pragma unroll
                for (int d = 0; d < kNumRanks; ++d) {
                    const bool in = is_token_in_rank[static_cast<long long>(t) * kNumRanks + d];
                    row[d] = in ? geo.my_start[d] + send_pos[static_cast<long long>(t) * kNumRanks + d] : -1;
                    if (d == rank && row[d] >= num_out_rows) row[d] = -1;  // reported by the receivers
                    dst[d] = row[d] >= 0 ? sink[d].x + row[d] * row_int4 : nullptr;
                }
                warp_copy_row<kNumRanks>(x + static_cast<long long>(t) * row_int4, dst, row_int4, lane);
                #pragma unroll
                for (int d = 0; d < kNumRanks; ++d) {
                    if (row[d] < 0) continue;
                    for (int s = lane; s < num_scales; s += kWarpSize)
                        sink[d].scales[row[d] * num_scales + s] = scales[t * scale_stride_t + s * scale_stride_s];
                    if (topk_idx) {
                        for (int k = lane; k < num_topk; k += kWarpSize) {
                            const int64_t e = topk_idx[static_cast<long long>(t) * num_topk + k];
                            const bool mine = e >= static_cast<int64_t>(d) * experts_per_rank &&
                                              e < static_cast<int64_t>(d + 1) * experts_per_rank;
                            sink[d].idx[row[d] * num_topk + k] = mine ? e - static_cast<int64_t>(d) * experts_per_rank : -1;
                            sink[d].w[row[d] * num_topk + k] = mine ? topk_weights[static_cast<long long>(t) * num_topk + k] : 0.0f;
                        }
                    }
                    if (lane == 0 && sink[d].src) sink[d].src[row[d]] = t;
                }
            }
            // Publish the chunk: the warp's stores (ordered by __syncwarp) before the release store. Pairs with
            // the receiver warps' acquire wait on dispatch_chunk(src = me, c) at peer d.
            __syncwarp();
            if (lane < kNumRanks && lane != rank) {
                fence_acq_rel_sys();
                st_release_sys_u64(M::dispatch_chunk(peer_base(peer_bases, lane), rank, c),
                                   (epoch << 32) | static_cast<uint32_t>(chunk_end[c * kNumRanks + lane]));
            }
        }
        return;
    }

    // Receiver warps.
    const int n = geo.recv_start[kNumRanks - 1] + geo.matrix[kNumRanks - 1][rank];  // N
    const int recv_warp = blockIdx.x * kRecvWarps + (warp - kSendWarps);
    const int recv_warps = gridDim.x * kRecvWarps;
    if (n > num_out_rows && recv_warp == 0 && lane == 0)
        comm::record_error(waiter, comm::kErrCapacity, rank, phase::kDispatch, n, num_out_rows);
    const uint8_t* data = local + data_offset;
    for (int p = recv_warp; p < geo.remote_pairs && !skip; p += recv_warps) {
        int src, c;
        geo.pair(p, rank, src, c);
        bool ok = true;
        uint32_t begin = 0, end = 0;
        if (lane == 0) {
            // Acquire: pairs with the sender warp's release store of this chunk (and of the chunk before it).
            const uint64_t want = epoch << 32;
            ok = comm::wait_geq(M::dispatch_chunk(local, src, c), want, waiter, src, phase::kDispatch);
            if (ok) end = static_cast<uint32_t>(ld_acquire_sys_u64(M::dispatch_chunk(local, src, c)));
            if (ok && c > 0) {
                ok = comm::wait_geq(M::dispatch_chunk(local, src, c - 1), want, waiter, src, phase::kDispatch);
                if (ok) begin = static_cast<uint32_t>(ld_acquire_sys_u64(M::dispatch_chunk(local, src, c - 1)));
            }
            if (ok && recv_chunk_end) recv_chunk_end[src * kMaxChunks + c] = static_cast<int>(end);
        }
        ok = __shfl_sync(kFullWarpMask, ok, 0);
        begin = __shfl_sync(kFullWarpMask, begin, 0);
        end = __shfl_sync(kFullWarpMask, end, 0);
        if (!ok) break;
        for (uint32_t j = begin; j < end; ++j) {
            const long long r = geo.recv_start[src] + j;
            if (r >= num_out_rows) break;
            warp_copy_row_coherent(reinterpret_cast<const int4*>(data + off_x) + r * row_int4, out_x + r * row_int4,
                                   row_int4, lane);
            for (int s = lane; s < num_scales; s += kWarpSize)
                out_scales[r * num_scales + s] = reinterpret_cast<const float*>(data + off_scales)[r * num_scales + s];
            if (out_idx) {
                for (int k = lane; k < num_topk; k += kWarpSize) {
                    out_idx[r * num_topk + k] = reinterpret_cast<const int64_t*>(data + off_idx)[r * num_topk + k];
                    out_w[r * num_topk + k] = reinterpret_cast<const float*>(data + off_w)[r * num_topk + k];
                }
            }
            if (lane == 0 && out_src) out_src[r] = reinterpret_cast<const int*>(data + off_src)[r];
        }
    }
    for (int r = n + recv_warp; r < num_out_rows; r += recv_warps) {  // num_worst_tokens padding
        if (out_idx)
            for (int k = lane; k < num_topk; k += kWarpSize) {
                out_idx[static_cast<long long>(r) * num_topk + k] = -1;
                out_w[static_cast<long long>(r) * num_topk + k] = 0.0f;
            }
        if (lane == 0 && out_src) out_src[r] = -1;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Combine: after a barrier (every peer finished reading its combine area), pusher warps send each received row
// back to its source s, chunk by chunk of s's tokens (the chunk rows the dispatch receivers recorded), and publish
// each chunk to s; rows whose source is me stay in x. Reducer warps take my token chunks as soon as every peer
// published them: out[t] = bias0 + bias1 + sum over ranks d (in order) of d's row for t, accumulated in float32
// and rounded to bf16 once. The last block out stores the combine epoch back (see the epoch NOTES below).
template <int kNumRanks, int kNumThreads, int kRecvWarps>
EPCOMM_DEVICE_INLINE void combine(const int4* x, int row_int4, const float* topk_weights, int num_topk,
                                  const int* count_matrix, const int* recv_chunk_end, const bool* is_token_in_rank,
                                  const int* send_pos, int num_tokens, const int4* bias0, const int4* bias1,
                                  int4* out, float* out_w, const uint64_t* peer_bases, long long data_offset,
                                  long long off_cx, long long off_cw, int* block_counter, uint64_t* epoch_counter,
                                  uint64_t err_record, long long timeout_ns, int rank) {
    using M = Meta<kNumRanks>;
    constexpr int kWarps = kNumThreads / kWarpSize;
    constexpr int kSendWarps = kWarps - kRecvWarps;
    static_assert(kRecvWarps > 0 && kSendWarps > 0, "combine needs pusher and reducer warps");
    // NOTES: this kernel owns the combine epoch: every block reads counter + 1 at its start; the last block out
    // stores it back (after every block has read it and counted itself out).
    const uint64_t epoch = *epoch_counter + 1;
    __shared__ Geometry<kNumRanks> geo;
    comm::Waiter waiter(err_record, timeout_ns, rank);
    uint8_t* const local = peer_base(peer_bases, rank);
    // Barrier: I finished reading my combine area (all earlier work on this stream is done). Pairs with the
    // acquire waits below at every peer.
    if (blockIdx.x == 0 && threadIdx.x < kNumRanks)
        st_release_sys_u64(M::flag(peer_base(peer_bases, threadIdx.x), kFlagCombineReady, rank), epoch);
    if (threadIdx.x < kNumRanks)
        comm::wait_geq(M::flag(local, kFlagCombineReady, threadIdx.x), epoch, waiter, threadIdx.x, phase::kCombine);
    geo.load(count_matrix, rank);
    const bool skip = comm::block_has_error(waiter);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;

    if (warp < kSendWarps) {
        for (int p = blockIdx.x * kSendWarps + warp; p < geo.remote_pairs && !skip; p += gridDim.x * kSendWarps) {
            int src, c;
            geo.pair(p, rank, src, c);
            const int begin = c > 0 ? recv_chunk_end[src * kMaxChunks + c - 1] : 0;
            const int end = recv_chunk_end[src * kMaxChunks + c];
            uint8_t* data = peer_base(peer_bases, src) + data_offset;
            for (int j = begin; j < end; ++j) {
                const long long n = geo.recv_start[src] + j;
                const long long dst_row = geo.origin_start[src] + j;
                int4* const dst[1] = {reinterpret_cast<int4*>(data + off_cx) + dst_row * row_int4};
                warp_copy_row<1>(x + n * row_int4, dst, row_int4, lane);
                if (topk_weights)
                    for (int k = lane; k < num_topk; k += kWarpSize)
                        reinterpret_cast<float*>(data + off_cw)[dst_row * num_topk + k] = topk_weights[n * num_topk + k];
            }
            // Publish the chunk to its source; pairs with the reducer's acquire wait there.
            __syncwarp();
            if (lane == 0) {
                fence_acq_rel_sys();
                st_release_sys_u64(M::combine_chunk(peer_base(peer_bases, src), rank, c), epoch << 32);
            }
        }
    } else {
        const uint8_t* data = local + data_offset;
        const int4* area = reinterpret_cast<const int4*>(data + off_cx);
        const float* area_w = reinterpret_cast<const float*>(data + off_cw);
        const int num_chunks = (num_tokens + kChunkTokens - 1) / kChunkTokens;
        const int recv_warps = gridDim.x * kRecvWarps;
        for (int c = blockIdx.x * kRecvWarps + (warp - kSendWarps); c < num_chunks && !skip; c += recv_warps) {
            bool ok = true;
            if (lane < kNumRanks && lane != rank)  // acquire: pairs with the pushers' release of chunk c
                ok = comm::wait_geq(M::combine_chunk(local, lane, c), epoch << 32, waiter, lane, phase::kCombine);
            if (!__all_sync(kFullWarpMask, ok)) break;
            const int t_end = min(num_tokens, (c + 1) * kChunkTokens);
            for (int t = c * kChunkTokens; t < t_end; ++t) {
                long long rows[kNumRanks];
                #pragma unroll
                for (int d = 0; d < kNumRanks; ++d) {
                    const bool in = is_token_in_rank[static_cast<long long>(t) * kNumRanks + d];
                    const int pos = in ? send_pos[static_cast<long long>(t) * kNumRanks + d] : -1;
                    rows[d] = !in ? -1 : (d == rank ? geo.recv_start[rank] + pos : geo.area_start[d] + pos);
                }
                constexpr int kReduceUnroll = kNumRanks <= 2 ? 4 : (kNumRanks <= 4 ? 2 : 1);
                for (int base = lane; base < row_int4; base += kWarpSize * kReduceUnroll) {
                    int4 v[kNumRanks][kReduceUnroll];
                    #pragma unroll
                    for (int d = 0; d < kNumRanks; ++d)
                        #pragma unroll
                        for (int u = 0; u < kReduceUnroll; ++u) {
                            const int i = base + u * kWarpSize;
                            if (rows[d] >= 0 && i < row_int4)
                                v[d][u] = d == rank ? ld_global_nc_na_v4(x + rows[d] * row_int4 + i)
                                                    : ld_global_v4(area + rows[d] * row_int4 + i);
                        }
                    #pragma unroll
                    for (int u = 0; u < kReduceUnroll; ++u) {
                        const int i = base + u * kWarpSize;
                        if (i >= row_int4) continue;
                        float acc[8];
                        #pragma unroll
                        for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
                        if (bias0) accumulate_bf16x8(acc, ld_global_nc_na_v4(bias0 + static_cast<long long>(t) * row_int4 + i));
                        if (bias1) accumulate_bf16x8(acc, ld_global_nc_na_v4(bias1 + static_cast<long long>(t) * row_int4 + i));
                        #pragma unroll
                        for (int d = 0; d < kNumRanks; ++d)
                            if (rows[d] >= 0) accumulate_bf16x8(acc, v[d][u]);
                        st_global_v4(out + static_cast<long long>(t) * row_int4 + i, pack_bf16x8(acc));
                    }
                }
                if (out_w) {
                    for (int k = lane; k < num_topk; k += kWarpSize) {
                        float w = 0.0f;
                        #pragma unroll
                        for (int d = 0; d < kNumRanks; ++d)
                            if (rows[d] >= 0)
                                w += d == rank ? topk_weights[rows[d] * num_topk + k] : area_w[rows[d] * num_topk + k];
                        out_w[static_cast<long long>(t) * num_topk + k] = w;
                    }
                }
            }
        }
    }
    // Last block out stores the epoch back: every block read the old value at its start.
    __syncthreads();
    __shared__ int is_last;
    if (threadIdx.x == 0) is_last = atomicAdd(block_counter, 1) == static_cast<int>(gridDim.x) - 1;
    __syncthreads();
    if (is_last && threadIdx.x == 0) {
        *block_counter = 0;
        *epoch_counter = epoch;
    }
}

}  // namespace intranode
}  // namespace epcomm
