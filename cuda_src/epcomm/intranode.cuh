// Intranode normal mode (ranks that share NVLink): notify (count exchange + barrier), dispatch send, dispatch receive
// (copy-out), combine stage (rows into the rank's own region) and combine reduce (pulls the peers' staged rows).
// Design: fixed worst-case buffers with direct addressing; no queues. docs/design.md has the picture.
#pragma once
#include "epcomm/common.cuh"
#include "epcomm/copy.cuh"
#include "epcomm/dealing.cuh"
#include "epcomm/fp8.cuh"
#include "epcomm/ptx.cuh"
#include "epcomm/comm.cuh"
#include "epcomm/phases.cuh"
#include "epcomm/rows.cuh"
#include "epcomm/scan.cuh"
#include "epcomm/trace.cuh"

namespace epcomm {
namespace intranode {

// NOTES: the meta area at the start of every rank's NVLink buffer. epcomm/intranode.py (meta_bytes) mirrors
// these offsets; tests/test_intranode_plan.py (test_meta_bytes_match_intranode_cuh) checks the two agree.
//   counts[2][R][R] int32      counts[parity][s][d] = tokens source s sends to d (written by s into every peer)
//   expert_counts[2][R][kMaxLocalExperts] int32   tokens source s sends to each of my local experts
//   flags[kNumFlagKinds][R] uint64                flags[kind][s] = last epoch source s signalled here
constexpr int kMaxLocalExperts = 1024;
constexpr int kFlagNotify = 0, kFlagDispatchDone = 1, kFlagCombineReady = 2, kFlagCombineDone = 3;
constexpr int kNumFlagKinds = 4;
// host_info (host-mapped int32): [0] = N, [1 + j] = aligned count of local expert j, [kHostInfoEpoch] = epoch.
constexpr int kHostInfoEpoch = 1 + kMaxLocalExperts;
constexpr int kHostInfoInts = kHostInfoEpoch + 1;

template <int kNumRanks>
struct Meta {
    static constexpr size_t kCountsOffset = 0;
    static constexpr size_t kExpertCountsOffset = kCountsOffset + 2 * kNumRanks * kNumRanks * sizeof(int);
    static constexpr size_t kFlagsOffset =
        align_up<size_t>(kExpertCountsOffset + 2 * kNumRanks * kMaxLocalExperts * sizeof(int), 128);
    static constexpr size_t kBytes = align_up<size_t>(kFlagsOffset + kNumFlagKinds * kNumRanks * sizeof(uint64_t), 4096);

    EPCOMM_DEVICE_INLINE static int* counts(uint8_t* base, uint64_t epoch) {
        return reinterpret_cast<int*>(base + kCountsOffset) + (epoch & 1) * kNumRanks * kNumRanks;
    }
    EPCOMM_DEVICE_INLINE static int* expert_counts(uint8_t* base, uint64_t epoch) {
        return reinterpret_cast<int*>(base + kExpertCountsOffset) + (epoch & 1) * kNumRanks * kMaxLocalExperts;
    }
    EPCOMM_DEVICE_INLINE static uint64_t* flag(uint8_t* base, int kind, int src) {
        return reinterpret_cast<uint64_t*>(base + kFlagsOffset) + kind * kNumRanks + src;
    }
};

// Loads in flight per lane in the row copies: a lane issues kUnroll 16-byte loads before its first store, so a warp
// keeps 32 * kUnroll * 16 bytes moving per memory latency; 14 covers an FP8 row of H 7168 in one step. More ranks hold
// more per-destination registers, so the unroll shrinks with kNumRanks to stay within 128 registers (no spills).
template <int kNumRanks>
constexpr int kCopyUnrollFor = kNumRanks <= 4 ? 14 : 8;
// dispatch_send keeps a row pointer per destination live as well.
template <int kNumRanks>
constexpr int kSendUnrollFor = kNumRanks <= 2 ? 14 : (kNumRanks <= 4 ? 12 : 8);

EPCOMM_DEVICE_INLINE uint8_t* peer_base(const uint64_t* peer_bases, int r) {
    return reinterpret_cast<uint8_t*>(peer_bases[r]);
}

// ---------------------------------------------------------------------------------------------------------
// Notify: one block. (1) send_pos[t, d] = exclusive prefix of is_token_in_rank[:, d] (skipped when cached);
// (2) write my counts row to every peer (and my per-expert counts for its experts), release flag;
// (3) wait for every peer's flag; (4) publish the count matrix, per-expert receive counts and N.
// info_out (device, also host-mapped copy host_info): [0] = N, [1 + j] = aligned count of local expert j;
// host_info[kHostInfoEpoch] = host_seq (the host's call number), written last with release so the host reads a
// complete record (pairs with the host's poll in gpu_backend._wait_host_info).
template <int kNumRanks, int kNumThreads>
EPCOMM_DEVICE_INLINE void notify(const bool* is_token_in_rank, int num_tokens, const int* num_tokens_per_expert,
                                 int num_experts, int expert_alignment, int* send_pos, int* count_matrix,
                                 int* prefix_matrix, int* info_out, int* host_info, int capacity_rows,
                                 const uint64_t* peer_bases,
                                 uint64_t* epoch_counter, int do_count, int host_seq, uint64_t err_record, long long timeout_ns,
                                 int rank) {
    using M = Meta<kNumRanks>;
    // NOTES: epochs live on the device so that CUDA-graph replays advance them; this single-block kernel owns the
    // dispatch epoch: it uses counter + 1 and stores it back at the end, where the send/receive kernels read it.
    const uint64_t epoch = *epoch_counter + 1;
    constexpr int kNumWarps = kNumThreads / kWarpSize;
    __shared__ int warp_totals[kNumWarps][kNumRanks];
    __shared__ int running[kNumRanks];
    __shared__ int matrix[kNumRanks][kNumRanks];
    comm::Waiter waiter(err_record, timeout_ns, rank);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int experts_per_rank = num_experts / kNumRanks;

    if (do_count) {
        // (1) Exclusive scan over tokens, one pass per chunk of kNumThreads tokens, all ranks at once.
        if (threadIdx.x < kNumRanks) running[threadIdx.x] = 0;
        __syncthreads();
        for (int base = 0; base < num_tokens; base += kNumThreads) {
            int t = base + threadIdx.x;
            int incl[kNumRanks];
            #pragma unroll
            for (int d = 0; d < kNumRanks; ++d) {
                int v = (t < num_tokens) ? static_cast<int>(is_token_in_rank[static_cast<int64_t>(t) * kNumRanks + d]) : 0;
                incl[d] = warp_inclusive_sum(v);
                if (lane == kWarpSize - 1) warp_totals[warp][d] = incl[d];
                incl[d] -= v;  // exclusive within the warp
            }
            __syncthreads();
            #pragma unroll
            for (int d = 0; d < kNumRanks; ++d) {
                int before = running[d];
                for (int w = 0; w < warp; ++w) before += warp_totals[w][d];
                if (t < num_tokens) {
                    bool in = is_token_in_rank[static_cast<int64_t>(t) * kNumRanks + d];
                    send_pos[static_cast<int64_t>(t) * kNumRanks + d] = in ? before + incl[d] : -1;
                }
            }
            __syncthreads();
            if (threadIdx.x < kNumRanks) {
                int sum = 0;
                for (int w = 0; w < kNumWarps; ++w) sum += warp_totals[w][threadIdx.x];
                running[threadIdx.x] += sum;
            }
            __syncthreads();
        }
        // (2) My row of counts into every peer, and my per-expert counts into each expert's owner.
        for (int i = threadIdx.x; i < kNumRanks * kNumRanks; i += kNumThreads) {
            int p = i / kNumRanks, d = i % kNumRanks;
            M::counts(peer_base(peer_bases, p), epoch)[rank * kNumRanks + d] = running[d];
        }
        for (int i = threadIdx.x; i < num_experts; i += kNumThreads) {
            int d = i / experts_per_rank, j = i % experts_per_rank;
            M::expert_counts(peer_base(peer_bases, d), epoch)[rank * kMaxLocalExperts + j] =
                num_tokens_per_expert[i];
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
    for (int i = threadIdx.x; i < kNumRanks * kNumRanks; i += kNumThreads) {
        int v = M::counts(mine, epoch)[i];
        matrix[i / kNumRanks][i % kNumRanks] = v;
        count_matrix[i] = v;
    }
    __syncthreads();
    // The handle's rank_prefix_matrix: [s, d] = rows d receives from sources 0..s (inclusive prefix over sources).
    for (int d = threadIdx.x; d < kNumRanks; d += kNumThreads) {
        int sum = 0;
        for (int src = 0; src < kNumRanks; ++src) {
            sum += matrix[src][d];
            prefix_matrix[src * kNumRanks + d] = sum;
        }
    }
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

#ifndef EPCOMM_DEBUG_SEND_ROLES
#define EPCOMM_DEBUG_SEND_ROLES 7
#endif

// Dispatch send: one warp per token; the row is read once and stored to each destination's final row.
// Rows for this rank itself go directly to the outputs (out_*; rows >= num_out_rows are dropped: dispatch_recv
// reports that case as a capacity error), so the receive kernel copies only other ranks' rows.
// Roles: with 0 < peer_blocks < gridDim.x, blocks [0, peer_blocks) store the rows bound for peers (link-bound) and
// the other blocks copy this rank's own rows (bound by what an SM moves), so the two run side by side on different
// SMs instead of taking turns in every warp; otherwise every block does both. EPCOMM_DEBUG_SEND_ROLES (diagnostics, a
// compile-time switch; 7 in normal use) leaves out the peer rows (bit 0 clear), the own rows (bit 1 clear) or every
// row's scales, top-k and source index (bit 2 clear), to time each part alone. off_src < 0: no source index is sent
// (a cached dispatch: the handle has it). dynamic: warps take tokens from their role's ticket counter (TokenDealer), else statically.
// fused_barrier (a cached dispatch, which runs no notify): this kernel is the barrier and owns the dispatch epoch,
// as notify does otherwise: every block releases kFlagNotify to every peer at its start and waits for all R
// flags before its first row (any rank's earlier combine may still read a peer's region, see docs/design.md), and the
// last block out stores the epoch. fused_recv (a zero-copy call with nothing to copy out): the last block out also
// waits for every source's done flag, which dispatch_recv would otherwise wait for (the kernel ends when every row
// has arrived).
template <int kNumRanks, int kNumThreads>
EPCOMM_DEVICE_INLINE void dispatch_send(const int4* x, int row_int4, const float* scales, long long scale_stride_t,
                                        long long scale_stride_s, int num_scales, const int64_t* topk_idx,
                                        const float* topk_weights, int num_topk, int num_experts,
                                        const int* send_pos, const int* count_matrix,
                                        int num_tokens, const uint64_t* peer_bases, long long data_offset,
                                        long long off_x, long long off_scales, long long off_idx, long long off_w,
                                        long long off_src, int4* out_x, float* out_scales, int64_t* out_idx,
                                        float* out_w, int* out_src, int num_out_rows, int peer_blocks, int dynamic,
                                        int fused_barrier, int fused_recv, int* counters, uint64_t* epoch_counter,
                                        uint64_t err_record, long long timeout_ns, int rank) {
    trace::mark(trace::kStart);
    using M = Meta<kNumRanks>;
    // The epoch: advanced by this call's notify, or (fused_barrier) by this kernel.
    const uint64_t epoch = *epoch_counter + (fused_barrier ? 1 : 0);
    if (fused_barrier && threadIdx.x < kNumRanks)  // every block: no wait depends on one block being resident
        st_release_sys_u64(M::flag(peer_base(peer_bases, threadIdx.x), kFlagNotify, rank), epoch);
    const bool split = peer_blocks > 0 && peer_blocks < static_cast<int>(gridDim.x);
    const bool peer_role = !split || static_cast<int>(blockIdx.x) < peer_blocks;
    const bool own_role = !split || static_cast<int>(blockIdx.x) >= peer_blocks;
    constexpr int kRoles = EPCOMM_DEBUG_SEND_ROLES;
    const bool do_peers = peer_role && (kRoles & 1), do_own = own_role && (kRoles & 2), do_meta = kRoles & 4;
    const int role_block = (split && !peer_role) ? blockIdx.x - peer_blocks : blockIdx.x;
    const int role_blocks = !split ? gridDim.x : (peer_role ? peer_blocks : gridDim.x - peer_blocks);
    const int lane = threadIdx.x % kWarpSize;
    const int warps = kNumThreads / kWarpSize * role_blocks;
    const int experts_per_rank = num_experts / kNumRanks;
    // The next token's routing (load_route) is loaded before this token's row copy, so no load latency separates one
    // row from the next.
    const auto route = [&](int t) { return load_route<kNumRanks>(send_pos, t, num_tokens, lane); };
    TokenDealer dealer(dynamic ? counters + 1 + (split && !peer_role ? 1 : 0) : nullptr, warps, lane);
    int t = dealer.first(role_block * (kNumThreads / kWarpSize) + threadIdx.x / kWarpSize);
    int next_pos = route(t);  // the first token's routing and ticket are on their way during the set-up below
    __shared__ int matrix[kNumRanks][kNumRanks];
    __shared__ int my_start[kNumRanks];
    for (int i = threadIdx.x; i < kNumRanks * kNumRanks; i += kNumThreads) matrix[i / kNumRanks][i % kNumRanks] = count_matrix[i];
    __syncthreads();
    if (threadIdx.x < kNumRanks) my_start[threadIdx.x] = block_start<kNumRanks>(&matrix[0][0], rank, threadIdx.x);
    comm::Waiter waiter(err_record, timeout_ns, rank);
    if (fused_barrier && threadIdx.x < kNumRanks)  // pairs with the release above at every peer
        comm::wait_geq(M::flag(peer_base(peer_bases, rank), kFlagNotify, threadIdx.x), epoch, waiter, threadIdx.x,
                       phase::kNotify);
    __syncthreads();
    trace::mark(trace::kWaited);
    const bool skip = comm::block_has_error(waiter);  // e.g. a capacity error from notify: address nothing
    // In shared memory: kNumRanks x 5 pointers in registers would spill at 8 ranks.
    __shared__ RowSink sink[kNumRanks];
    if (threadIdx.x < kNumRanks) {
        const int d = threadIdx.x;
        if (d == rank) {
            sink[d] = RowSink{out_x, out_scales, out_idx, out_w, out_src};
        } else {
            uint8_t* data = peer_base(peer_bases, d) + data_offset;
            sink[d] = RowSink{reinterpret_cast<int4*>(data + off_x), reinterpret_cast<float*>(data + off_scales),
                              reinterpret_cast<int64_t*>(data + off_idx), reinterpret_cast<float*>(data + off_w),
                              off_src < 0 ? nullptr : reinterpret_cast<int*>(data + off_src)};
        }
    }
    __syncthreads();
    trace::mark(trace::kRowsStart);
    for (int t_next; t < num_tokens && !skip; t = t_next) {
        const long long tt = t;
        const int my_pos = next_pos;
        t_next = dealer.next(t);
        next_pos = route(t_next);
        long long row[kNumRanks];
        int4* dst[kNumRanks];
        bool any = false;
        #pragma unroll
        for (int d = 0; d < kNumRanks; ++d) {
            const int pos = __shfl_sync(kFullWarpMask, my_pos, d);
            const bool in = pos >= 0 && (d == rank ? do_own : do_peers);
            long long r = in ? my_start[d] + pos : -1;
            if (d == rank && r >= num_out_rows) r = -1;
            row[d] = r;
            dst[d] = r >= 0 ? sink[d].x + r * row_int4 : nullptr;
            any |= r >= 0;
        }
        if (!any) continue;  // uniform across the warp: every lane read the same flags
        const float* scale_row = scales + tt * scale_stride_t;
        RowMeta meta;
        if (do_meta) {
            load_row_scales(meta, scale_row, scale_stride_s, num_scales, lane);
            meta.idx = (topk_idx && lane < num_topk) ? topk_idx[tt * num_topk + lane] : -1;
            meta.w = (topk_idx && lane < num_topk) ? topk_weights[tt * num_topk + lane] : 0.0f;
        }
        warp_copy<kSendUnrollFor<kNumRanks>, true, true, kNumRanks>(x + tt * row_int4, dst, row_int4, lane);
        #pragma unroll
        for (int d = 0; d < kNumRanks; ++d) {
            if (row[d] < 0 || !do_meta) continue;
            store_row_scales(meta, sink[d].scales + row[d] * num_scales, scale_row, scale_stride_s, num_scales, lane);
            if (topk_idx) {
                const int64_t lo = static_cast<int64_t>(d) * experts_per_rank, hi = lo + experts_per_rank;
                if (lane < num_topk) {
                    const bool mine = meta.idx >= lo && meta.idx < hi;
                    sink[d].idx[row[d] * num_topk + lane] = mine ? meta.idx - lo : -1;
                    sink[d].w[row[d] * num_topk + lane] = mine ? meta.w : 0.0f;
                }
                for (int k = lane + kWarpSize; k < num_topk; k += kWarpSize) {
                    const int64_t e = topk_idx[tt * num_topk + k];
                    const bool mine = e >= lo && e < hi;
                    sink[d].idx[row[d] * num_topk + k] = mine ? e - lo : -1;
                    sink[d].w[row[d] * num_topk + k] = mine ? topk_weights[tt * num_topk + k] : 0.0f;
                }
            }
            if (lane == 0 && sink[d].src) sink[d].src[row[d]] = t;
        }
    }
    dealer.finish();
    trace::mark(trace::kRowsDone);
    const auto done_flag = [&](int d) { return M::flag(peer_base(peer_bases, d), kFlagDispatchDone, rank); };
    const bool is_last = grid_done_signal<kNumRanks>(counters, done_flag, epoch,
                                                     fused_barrier ? epoch_counter : nullptr);
    if (fused_recv && is_last) {
        if (threadIdx.x < kNumRanks)  // pairs with each source's done release (grid_done_signal)
            comm::wait_geq(M::flag(peer_base(peer_bases, rank), kFlagDispatchDone, threadIdx.x), epoch, waiter,
                           threadIdx.x, phase::kDispatch);
        if (threadIdx.x == 0) {
            int n = 0;
            for (int s = 0; s < kNumRanks; ++s) n += matrix[s][rank];
            if (n > num_out_rows)
                comm::record_error(waiter, comm::kErrCapacity, rank, phase::kDispatch, n, num_out_rows);
        }
        __syncthreads();
        if (threadIdx.x == 0) trace::stamp(trace::kAllReceived);
    }
}

// Dispatch receive: wait for every source's done flag, then copy other sources' rows of [0, N) from the receive
// area to the outputs (this rank's own block was written there by dispatch_send); rows [N, num_out_rows)
// (num_worst_tokens padding) get topk_idx = -1, weight 0, src_idx -1.
// zero_copy: the outputs are views of the receive area itself (dispatch_send wrote this rank's own rows there too),
// so after the wait only src_idx (a fresh array: the handle keeps it past the next dispatch) and the padding rows
// are written.
template <int kNumRanks, int kNumThreads>
EPCOMM_DEVICE_INLINE void dispatch_recv(const uint8_t* local_base, long long data_offset, long long off_x,
                                        long long off_scales, long long off_idx, long long off_w, long long off_src,
                                        int row_int4, int num_scales, int num_topk, const int* info,
                                        const int* count_matrix, int num_out_rows, int4* out_x, float* out_scales,
                                        int64_t* out_idx, float* out_w, int* out_src, int zero_copy,
                                        const uint64_t* epoch_counter, uint64_t err_record, long long timeout_ns,
                                        int rank) {
    trace::mark(trace::kStart);
    using M = Meta<kNumRanks>;
    const uint64_t epoch = *epoch_counter;  // advanced by this call's notify
    comm::Waiter waiter(err_record, timeout_ns, rank);
    if (threadIdx.x < kNumRanks)
        comm::wait_geq(M::flag(const_cast<uint8_t*>(local_base), kFlagDispatchDone, threadIdx.x), epoch, waiter,
                       threadIdx.x, phase::kDispatch);
    __syncthreads();
    trace::mark(trace::kWaited);
    if (comm::block_has_error(waiter)) return;
    trace::mark(trace::kRowsStart);
    const int n = info[0];
    const int copy_rows = n < num_out_rows ? n : num_out_rows;
    const int self_begin = block_start<kNumRanks>(count_matrix, rank, rank);
    const int self_end = self_begin + count_matrix[rank * kNumRanks + rank];
    if (n > num_out_rows && blockIdx.x == 0 && threadIdx.x == 0)
        comm::record_error(waiter, comm::kErrCapacity, rank, phase::kDispatch, n, num_out_rows);
    const uint8_t* data = local_base + data_offset;
    const int lane = threadIdx.x % kWarpSize;
    const int warps = kNumThreads / kWarpSize * gridDim.x;
    if (zero_copy && out_src) {  // one row per thread: many independent loads in flight, not one per warp
        const int* in_src = reinterpret_cast<const int*>(data + off_src);
        for (int r = blockIdx.x * kNumThreads + threadIdx.x; r < copy_rows; r += kNumThreads * gridDim.x)
            if (r < self_begin || r >= self_end) out_src[r] = in_src[r];
    }
    const int first_row = zero_copy ? copy_rows : 0;  // zero_copy: rows [0, n) are in place (src_idx done above)
    for (int r = first_row + blockIdx.x * (kNumThreads / kWarpSize) + threadIdx.x / kWarpSize; r < num_out_rows;
         r += warps) {
        if (r >= self_begin && r < self_end) continue;  // written directly by dispatch_send
        if (r < copy_rows) {
            const long long rr = r;
            const float* in_scales = reinterpret_cast<const float*>(data + off_scales) + rr * num_scales;
            const int64_t* in_idx = reinterpret_cast<const int64_t*>(data + off_idx) + rr * num_topk;
            const float* in_w = reinterpret_cast<const float*>(data + off_w) + rr * num_topk;
            RowMeta meta;
            load_row_scales(meta, in_scales, 1, num_scales, lane);
            meta.idx = (out_idx && lane < num_topk) ? in_idx[lane] : -1;
            meta.w = (out_idx && lane < num_topk) ? in_w[lane] : 0.0f;
            const int src_idx = (lane == 0 && out_src) ? reinterpret_cast<const int*>(data + off_src)[r] : -1;
            warp_copy<kCopyUnrollFor<kNumRanks>, false, false>(
                reinterpret_cast<const int4*>(data + off_x) + rr * row_int4, out_x + rr * row_int4, row_int4, lane);
            store_row_scales(meta, out_scales + rr * num_scales, in_scales, 1, num_scales, lane);
            if (out_idx) {
                if (lane < num_topk) {
                    out_idx[rr * num_topk + lane] = meta.idx;
                    out_w[rr * num_topk + lane] = meta.w;
                }
                for (int k = lane + kWarpSize; k < num_topk; k += kWarpSize) {
                    out_idx[rr * num_topk + k] = in_idx[k];
                    out_w[rr * num_topk + k] = in_w[k];
                }
            }
            if (lane == 0 && out_src) out_src[r] = src_idx;
        } else {
            if (out_idx)
                for (int k = lane; k < num_topk; k += kWarpSize) {
                    out_idx[static_cast<long long>(r) * num_topk + k] = -1;
                    out_w[static_cast<long long>(r) * num_topk + k] = 0.0f;
                }
            if (lane == 0 && out_src) out_src[r] = -1;
        }
    }
    trace::mark(trace::kRowsDone);
}

// ---------------------------------------------------------------------------------------------------------
// Combine is pull-based: every rank stages the rows it returns to OTHER ranks in its own data region, at their
// receive-order row n (a local copy), and signals every peer; each token's owner then reads the rows of its tokens
// straight from the peers' regions over NVLink while it reduces. Link time (the pulls) overlaps the reduce's local
// reads and writes in one kernel, and the staged rows cross HBM once instead of twice (push + reduce re-read).

// Combine stage: barrier (every peer finished reading my region: its earlier kernels are done), then one warp per
// received row n whose source is another rank copies x[n] (and its top-k weights) to row n of my own region.
// zero_copy: the caller wrote x into that region itself (Buffer.get_combine_buffer), so only the weights are copied.
template <int kNumRanks, int kNumThreads>
EPCOMM_DEVICE_INLINE void combine_stage(const int4* x, int row_int4, const float* topk_weights, int num_topk,
                                        const int* count_matrix, int num_rows, const uint64_t* peer_bases,
                                        long long data_offset, long long off_cx, long long off_cw, int zero_copy,
                                        int* counters, uint64_t* epoch_counter, uint64_t err_record,
                                        long long timeout_ns, int rank) {
    trace::mark(trace::kStart);
    using M = Meta<kNumRanks>;
    // NOTES: this kernel owns the combine epoch: every block reads counter + 1 at its start; the last block out
    // stores it back (after every block has read it), where combine_reduce reads it.
    const uint64_t epoch = *epoch_counter + 1;
    __shared__ int recv_start[kNumRanks + 1];   // my receive order: block of source s is [recv_start[s], recv_start[s+1])
    comm::Waiter waiter(err_record, timeout_ns, rank);
    if (blockIdx.x == 0 && threadIdx.x < kNumRanks)
        st_release_sys_u64(M::flag(peer_base(peer_bases, threadIdx.x), kFlagCombineReady, rank), epoch);
    if (threadIdx.x == 0) {
        recv_start[0] = 0;
        for (int s = 0; s < kNumRanks; ++s) recv_start[s + 1] = recv_start[s] + count_matrix[s * kNumRanks + rank];
    }
    if (threadIdx.x < kNumRanks)  // pairs with the ready release above, at every peer: it no longer reads my region
        comm::wait_geq(M::flag(peer_base(peer_bases, rank), kFlagCombineReady, threadIdx.x), epoch, waiter,
                       threadIdx.x, phase::kCombine);
    __syncthreads();
    trace::mark(trace::kWaited);
    const bool skip = comm::block_has_error(waiter);
    trace::mark(trace::kRowsStart);
    const int lane = threadIdx.x % kWarpSize;
    const int warps = kNumThreads / kWarpSize * gridDim.x;
    const int all_rows = num_rows < recv_start[kNumRanks] ? num_rows : recv_start[kNumRanks];
    const int rows = (zero_copy && !topk_weights) ? 0 : all_rows;
    uint8_t* data = peer_base(peer_bases, rank) + data_offset;
    for (int n = blockIdx.x * (kNumThreads / kWarpSize) + threadIdx.x / kWarpSize; n < rows && !skip; n += warps) {
        if (n >= recv_start[rank] && n < recv_start[rank + 1]) continue;  // my own tokens: the reduce reads x
        const long long nn = n;
        const float w = (topk_weights && lane < num_topk) ? topk_weights[nn * num_topk + lane] : 0.0f;
        int4* const dst[1] = {reinterpret_cast<int4*>(data + off_cx) + nn * row_int4};
        if (!zero_copy) warp_copy<kCopyUnrollFor<kNumRanks>, true, true, 1>(x + nn * row_int4, dst, row_int4, lane);
        if (topk_weights) {
            float* cw = reinterpret_cast<float*>(data + off_cw) + nn * num_topk;
            if (lane < num_topk) cw[lane] = w;
            for (int k = lane + kWarpSize; k < num_topk; k += kWarpSize) cw[k] = topk_weights[nn * num_topk + k];
        }
    }
    trace::mark(trace::kRowsDone);
    const auto done_flag = [&](int d) { return M::flag(peer_base(peer_bases, d), kFlagCombineDone, rank); };
    grid_done_signal<kNumRanks>(counters, done_flag, epoch, epoch_counter);
}

// Combine reduce: wait until every rank has staged its rows, then out[t] = bias0 + bias1 + sum over ranks d (in
// order) of d's row for t, read from d's region over NVLink (my own rows: from x), accumulated in float32 and rounded
// to bf16 once. One warp per item, 8 channels per lane step; dynamic: warps take items from a ticket counter
// (TokenDealer). Items: the first num_tokens - tail_tokens tokens are whole, each of the last tail_tokens tokens is
// num_parts items (channel ranges): the items dealt last are small, so the warps finish together (with hundreds of
// warps sharing the link a whole token is a long item: the last warps would still work on one after the others are
// done), while most items stay whole (every item costs its own routing, ticket and ramp).
// fused_stage (a zero-copy combine without weights: the caller wrote the rows into the staging region itself, so
// combine_stage would have nothing to copy): this kernel owns the combine epoch and every block releases the
// combine-done flag to every peer at its start (a system-scope release store: the caller's earlier writes of the
// rows first); the last block out stores the epoch.
template <int kNumRanks, int kNumThreads>
EPCOMM_DEVICE_INLINE void combine_reduce(const uint64_t* peer_bases, long long data_offset, long long off_cx,
                                         long long off_cw, int row_int4, int num_topk,
                                         const int* send_pos, const int* count_matrix, int num_tokens,
                                         const int4* bias0, const int4* bias1, const int4* x_local,
                                         const float* w_local, int4* out, float* out_w, int num_parts,
                                         int tail_tokens, int dynamic, int fused_stage,
                                         int* counters, uint64_t* epoch_counter, uint64_t err_record,
                                         long long timeout_ns, int rank) {
    trace::mark(trace::kStart);
    using M = Meta<kNumRanks>;
    // Advanced by this call's combine_stage, or (fused_stage) by this kernel.
    const uint64_t epoch = *epoch_counter + (fused_stage ? 1 : 0);
    // Every block: no wait depends on one block being resident. The release store is a system-scope release by
    // itself (a release pattern: the caller's earlier writes of the rows first); it pairs with the acquire waits
    // below at every peer.
    if (fused_stage && threadIdx.x < kNumRanks)
        st_release_sys_u64(M::flag(peer_base(peer_bases, threadIdx.x), kFlagCombineDone, rank), epoch);
    const int lane = threadIdx.x % kWarpSize;
    const int warps = kNumThreads / kWarpSize * gridDim.x;
    // An item's routing is its token's (load_route); the next item's is loaded before this item's rows, so no load
    // latency separates one item from the next (as in dispatch_send).
    const int parts = num_parts > 1 ? num_parts : 1;
    const int tail = tail_tokens < 0 ? 0 : (tail_tokens < num_tokens ? tail_tokens : num_tokens);
    const int head = num_tokens - tail;  // whole-token items [0, head), then `parts` items per tail token
    const int num_items = head + tail * parts;
    // A tail item's channel range: `chunk` channels (x8) from part * chunk, chunk a multiple of the warp width.
    const int chunk = ((row_int4 + parts - 1) / parts + kWarpSize - 1) / kWarpSize * kWarpSize;
    const auto token_of = [&](int item) { return item < head ? item : head + (item - head) / parts; };
    const auto route = [&](int item) { return load_route<kNumRanks>(send_pos, token_of(item), num_tokens, lane); };
    TokenDealer dealer(dynamic ? counters + 1 : nullptr, warps, lane);
    int item = dealer.first(blockIdx.x * (kNumThreads / kWarpSize) + threadIdx.x / kWarpSize);
    int next_pos = route(item);  // the first item's routing and ticket are on their way during the wait below
    __shared__ int area_start[kNumRanks];   // my block in rank d's receive order (= in d's staged rows, or in x_local)
    __shared__ const uint8_t* area[kNumRanks];
    comm::Waiter waiter(err_record, timeout_ns, rank);
    bool waited = true;
    if (threadIdx.x < kNumRanks) {
        const int d = threadIdx.x;
        area_start[d] = block_start<kNumRanks>(count_matrix, rank, d);
        area[d] = peer_base(peer_bases, d) + data_offset;
        // Pairs with d's combine_stage release (last block out), or its release above: its staged rows are complete.
        waited = comm::wait_geq(M::flag(peer_base(peer_bases, rank), kFlagCombineDone, d), epoch, waiter, d,
                                phase::kCombine);
    }
    trace::mark(trace::kWaited);
    const bool skip = comm::block_failed(waited, waiter);
    trace::mark(trace::kRowsStart);
    for (int item_next; item < num_items && !skip; item = item_next) {
        const int my_pos = next_pos;
        item_next = dealer.next(item);
        next_pos = route(item_next);
        const int t = token_of(item);
        const int lo = item < head ? 0 : (item - head) % parts * chunk;
        const int hi = item < head ? row_int4 : (lo + chunk < row_int4 ? lo + chunk : row_int4);
        const int4* src[kNumRanks];
        long long rows[kNumRanks];
        #pragma unroll
        for (int d = 0; d < kNumRanks; ++d) {
            const int pos = __shfl_sync(kFullWarpMask, my_pos, d);
            rows[d] = pos >= 0 ? area_start[d] + pos : -1;
            src[d] = rows[d] < 0 ? nullptr
                     : d == rank ? x_local + rows[d] * row_int4
                                 : reinterpret_cast<const int4*>(area[d] + off_cx) + rows[d] * row_int4;
        }
        // kReduceUnroll vectors per lane per source in flight, every source's loads issued before the first add.
        constexpr int kReduceUnroll = kNumRanks <= 2 ? 8 : (kNumRanks <= 4 ? 4 : 2);
        for (int base = lo + lane; base < hi; base += kWarpSize * kReduceUnroll) {
            int4 v[kNumRanks][kReduceUnroll];
            #pragma unroll
            for (int d = 0; d < kNumRanks; ++d)
                #pragma unroll
                for (int u = 0; u < kReduceUnroll; ++u) {
                    const int i = base + u * kWarpSize;
                    if (src[d] != nullptr && i < hi)
                        v[d][u] = d == rank ? ld_global_nc_na_v4(src[d] + i) : ld_global_v4(src[d] + i);
                }
            #pragma unroll
            for (int u = 0; u < kReduceUnroll; ++u) {
                const int i = base + u * kWarpSize;
                if (i >= hi) continue;
                float acc[8];
                #pragma unroll
                for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
                if (bias0) accumulate_bf16x8(acc, ld_global_nc_na_v4(bias0 + static_cast<long long>(t) * row_int4 + i));
                if (bias1) accumulate_bf16x8(acc, ld_global_nc_na_v4(bias1 + static_cast<long long>(t) * row_int4 + i));
                #pragma unroll
                for (int d = 0; d < kNumRanks; ++d)
                    if (src[d] != nullptr) accumulate_bf16x8(acc, v[d][u]);
                st_global_v4(out + static_cast<long long>(t) * row_int4 + i, fp8::pack_bf16x8(acc));
            }
        }
        if (out_w && lo == 0) {
            for (int k = lane; k < num_topk; k += kWarpSize) {
                float w = 0.0f;
                #pragma unroll
                for (int d = 0; d < kNumRanks; ++d)
                    if (rows[d] >= 0)
                        w += d == rank ? w_local[rows[d] * num_topk + k]
                                       : reinterpret_cast<const float*>(area[d] + off_cw)[rows[d] * num_topk + k];
                out_w[static_cast<long long>(t) * num_topk + k] = w;
            }
        }
    }
    dealer.finish();
    trace::mark(trace::kRowsDone);
    if (last_block_out_reset<false>(counters) && fused_stage && threadIdx.x == 0)
        *epoch_counter = epoch;  // every block has read the old value (all counted in)
}

}  // namespace intranode
}  // namespace epcomm
