// Low-latency (decoding) mode: expert-major dispatch with an on-the-fly FP8 cast, and the weighted combine back, over
// an NVSHMEM symmetric buffer (direct 16-byte stores to NVLink peers through nvshmem_ptr, NVSHMEM puts otherwise).
// Each operation is a send kernel (never waits, except the once-per-rank combine's bounded wait for the sources' top-k
// weights) and a receive kernel (bounded waits), so a hook can run the receive.
//
// Buffer (offsets from epcomm/low_latency.py, LowLatencyLayout, passed in as kernel arguments; two halves):
//   dispatch_signals [E_local][R] u64      [j][s] = (epoch << 32) | (count + 1): source s sent `count` messages to
//                                           my local expert j in the dispatch numbered `epoch` on this half
//   combine_signals  [E] u64               [d * E_local] = (epoch << 1) | partial: owner d sent back all its rows
//                                           for me; partial: as one sum per token in combine_partial (other slots
//                                           unused)
//   weight_signals   [R] u64               [s] = epoch: source s stored its top-k weights in combine_weights
//   dispatch_recv    [E_local][R][Tmax] messages of msg_stride bytes: [j][s][slot]
//                    message = 16-byte header (int32 source token index t, int32 kPayloadInTokens or 0, int32 k + 1
//                    of direct stores (0 if staged), 4 bytes unused) + payload; payload = bf16 [H], or e4m3 [H]
//                    followed by float32 scale_inv [H / 128]
//   dispatch_tokens  [R][Tmax] messages: [s][t] = the payload of source s's token t, stored once per destination rank
//                    (once_per_rank, NVLink peers); the (token, expert) messages then carry only their header
//   combine_recv     [E][Tmax] bf16 [H] rows: [e][t] = expert e's output for my token t
//   combine_send     [E_local][R * Tmax] bf16 [H]: the zero-copy combine input (and NVSHMEM-path staging)
//   dispatch_send    [Tmax] messages: staging of the NVSHMEM path (a put's source must stay put until quiet)
//   combine_weights  [R][Tmax][kMaxTopk] f32: [s][t][k] = source s's topk_weights[t][k]
//   combine_partial  [R][Tmax] f32 [H]: [d][t] = rank d's weighted sum of its experts' outputs for my token t
//                    (once_per_rank combine, NVLink peers: one row per (token, rank), not one per (token, expert))
//
// Flag pairs (every acquire names its release):
//   dispatch_send (last block out, after every block's data)  --release-->  dispatch_recv's wait on dispatch_signals
//   combine_send  (last block out, after every block's rows)  --release-->  combine_recv's wait on combine_signals
//   combine_send  (block 0, after its weight stores)          --release-->  combine_send's wait on weight_signals
// Epochs: epoch_counter[kind][half] counts the calls of that kind on that half. The send kernel uses counter + 1 in
// every block and its last block stores it back; the receive kernel (same half, later on the stream) reads it. The
// kernels advance the counters themselves, so CUDA-graph replays advance them too; no signal is ever reset except by
// clean_low_latency_buffer (a collective memset with barriers around it).
// Reuse: a half's slots are next written by the call after next of the same kind. That write cannot start before
// every rank finished reading: the writer first received the previous call (or the paired combine), which needed the
// reader's later send, which the reader's stream issues only after its receive (see LowLatencyGpu's docstring).
#pragma once

#include "epcomm/comm.cuh"
#include "epcomm/common.cuh"
#include "epcomm/copy.cuh"
#include "epcomm/fp8.cuh"
#include "epcomm/phases.cuh"
#include "epcomm/ptx.cuh"
#include "epcomm/scan.cuh"
#if defined(EPCOMM_NVSHMEM)
#include "epcomm/nvshmem.cuh"
#endif

namespace epcomm::low_latency {

// NOTES: mirrored by MAX_RANKS / MAX_TOPK / MSG_HEADER_BYTES in epcomm/low_latency.py (checked before launching).
constexpr int kMaxRanks = 256;        // shared-memory tables are sized for this many ranks
constexpr int kMaxTopk = 256;         // and this many top-k entries per token
constexpr int kMsgHeaderBytes = 16;   // header in front of every dispatch message
// 16-byte loads in flight per lane in the row copies: 8 moves an FP8 row of H 7168 in two steps (a bf16 row in
// four); each step is a memory round trip of the copying warp.
constexpr int kCopyUnroll = 8;
constexpr int kPayloadInTokens = 1;   // header word 1: the payload is in dispatch_tokens[source][token]

// The dispatch signal value: which call (epoch) and how many messages (count + 1, so that 0 means "nothing yet").
EPCOMM_DEVICE_INLINE uint64_t dispatch_signal_value(uint64_t epoch, int count) {
    return (epoch << 32) | static_cast<uint64_t>(static_cast<uint32_t>(count + 1));
}

#if defined(EPCOMM_NVSHMEM)

// This block's view of every rank's copy of the symmetric buffer: the NVLink / same-GPU address (nvshmem_ptr), or
// nullptr where only NVSHMEM puts reach it (another node, or force_nvshmem). Barrier afterwards before use.
EPCOMM_DEVICE_INLINE void load_peer_bases(uint8_t** peer_bases, uint8_t* sym_base, int num_ranks, int force_nvshmem,
                                          int num_threads) {
    for (int r = threadIdx.x; r < num_ranks; r += num_threads)
        peer_bases[r] = force_nvshmem ? nullptr : nvshmem::peer_ptr(sym_base, r);
}

// ---------------------------------------------------------------------------------------------------------------------
// Dispatch send: one block per token (grid-stride). Each valid (t, k) takes the next slot of expert topk_idx[t, k]
// for this source (a per-expert atomic counter), the block casts the row once (FP8: per 128 channels) and stores the
// message straight into every NVLink-reachable destination slot (other destinations get an NVSHMEM put of a staged
// copy). With once_per_rank, an NVLink-reachable rank gets the payload once, in its dispatch_tokens[rank][t], and
// each of its slots only the header (marked kPayloadInTokens): at EP2 with top-8 of 256 that is 1 row per
// destination rank instead of 4. The last block out sends every expert's count signal and advances the epoch. Never
// waits. Grid: any number of blocks >= 1 (also with num_tokens == 0: the counts, all zero, must still be signalled).
template <int kNumThreads, bool kUseFp8, bool kRoundScale>
EPCOMM_DEVICE_INLINE void dispatch_send(const int4* x, const int64_t* topk_idx, int num_tokens, int num_topk,
                                        int hidden, int num_experts, int num_ranks, int tmax, uint8_t* sym_base,
                                        long long off_signals, long long off_recv, long long off_staging,
                                        long long off_tokens, int msg_stride, int msg_bytes, int* expert_counters,
                                        int* block_counter, uint64_t* epoch_counter, int force_nvshmem,
                                        int once_per_rank, int* num_bad_indices, int* expert_rows,
                                        int expert_rows_len, uint64_t err_record, long long timeout_ns, int rank) {
    static_assert(kNumThreads % kWarpSize == 0, "whole warps only");
    constexpr int kNumWarps = kNumThreads / kWarpSize;
    constexpr int kGroupChannels = kWarpSize * 16;  // FP8: a warp casts 512 channels (4 scale blocks) per step
    // NOTES: every block reads the epoch before it counts itself out in comm::last_block_out; the last block stores it.
    const uint64_t epoch = *epoch_counter + 1;
    __shared__ uint8_t* peer_bases[kMaxRanks];
    __shared__ uint8_t* dst_ptr[kMaxTopk];     // direct address of (t, k)'s message slot, nullptr if none / remote
    __shared__ uint8_t* payload_ptr[kMaxTopk]; // where (t, k) stores the payload: its slot, its owner's token slot
                                               // (first k of each owner, once_per_rank), or nullptr
    __shared__ long long dst_off[kMaxTopk];    // its offset in the symmetric buffer, -1 if (t, k) sends nothing
    __shared__ int dst_pe[kMaxTopk];           // the owner rank
    const comm::Waiter waiter(err_record, timeout_ns, rank);
    const int num_local_experts = num_experts / num_ranks;
    const int warp = warp_id(), lane = lane_id();
    load_peer_bases(peer_bases, sym_base, num_ranks, force_nvshmem, kNumThreads);
    // This rank's (source, token, k) -> row table of the handle, emptied for this call's dispatch_recv (which runs
    // after this kernel on the same stream and fills it).
    for (int i = blockIdx.x * kNumThreads + threadIdx.x; i < expert_rows_len; i += gridDim.x * kNumThreads)
        expert_rows[i] = -1;
    bool issued = false;  // this warp issued NVSHMEM puts: it must quiet them before the block counts itself out

    for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        __syncthreads();  // peer_bases written (first pass); the previous token's dst_* no longer read
        // 1. Routing: a slot per valid (t, k) at its expert's owner.
        bool remote = false;
        for (int k = threadIdx.x; k < num_topk; k += kNumThreads) {
            const int64_t e = topk_idx[static_cast<long long>(t) * num_topk + k];
            long long off = -1;
            int pe = -1;
            if (e < -1 || e >= num_experts) {
                if (num_bad_indices != nullptr) atomicAdd(num_bad_indices, 1);  // never addressed; the host raises
            } else if (e >= 0) {
                const int owner = static_cast<int>(e / num_local_experts);
                const int j = static_cast<int>(e % num_local_experts);
                const int slot = atomicAdd(&expert_counters[e], 1);
                if (slot < tmax) {
                    off = off_recv + (static_cast<long long>(j * num_ranks + rank) * tmax + slot) * msg_stride;
                    pe = owner;
                    remote = remote || peer_bases[owner] == nullptr;
                } else {
                    // Only possible when a token names one expert twice (num_tokens <= tmax is checked).
                    comm::record_error(waiter, comm::kErrCapacity, owner, phase::kLlDispatchRecv, slot + 1, tmax);
                }
            }
            dst_off[k] = off;
            dst_pe[k] = pe;
            dst_ptr[k] = (off >= 0 && peer_bases[pe] != nullptr) ? peer_bases[pe] + off : nullptr;
        }
        // Publishes dst_*; any_remote is block-uniform.
        const bool any_remote = __syncthreads_or(remote ? 1 : 0) != 0;
        for (int k = threadIdx.x; k < num_topk; k += kNumThreads) {
            uint8_t* payload = dst_ptr[k];
            if (once_per_rank && payload != nullptr) {
                bool first = true;  // the first k naming an expert of this owner carries the payload
                for (int k2 = 0; k2 < k && first; ++k2) first = !(dst_ptr[k2] != nullptr && dst_pe[k2] == dst_pe[k]);
                payload = first ? peer_bases[dst_pe[k]] + off_tokens +
                                      (static_cast<long long>(rank) * tmax + t) * msg_stride
                                : nullptr;
            }
            payload_ptr[k] = payload;
        }
        __syncthreads();  // publishes payload_ptr
        uint8_t* staging = sym_base + off_staging + static_cast<long long>(t) * msg_stride;
        const int4* row = x + static_cast<long long>(t) * (hidden / 8);

        // 2. Payload into every destination (and the staging copy when some destination needs a put).
        if constexpr (kUseFp8) {
            const int num_groups = (hidden + kGroupChannels - 1) / kGroupChannels;
            for (int g = warp; g < num_groups; g += kNumWarps) {
                const int c0 = g * kGroupChannels + lane * 16;  // this lane's 16 channels
                const bool active = c0 < hidden;                // hidden % 128 == 0: whole 8-lane groups
                float v[16];
                if (active) {
                    float a[8], b[8];
                    fp8::unpack_bf16x8(ld_global_nc_na_v4(row + c0 / 8), a);
                    fp8::unpack_bf16x8(ld_global_nc_na_v4(row + c0 / 8 + 1), b);
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        v[i] = a[i];
                        v[8 + i] = b[i];
                    }
                } else {
#pragma unroll
                    for (int i = 0; i < 16; ++i) v[i] = 0.0f;
                }
                // amax of the 128-channel block = 8 consecutive lanes (all lanes shuffle, inactive ones with zeros).
                float amax = fp8::abs_max16(v);
                amax = fmaxf(amax, __shfl_xor_sync(kFullWarpMask, amax, 1));
                amax = fmaxf(amax, __shfl_xor_sync(kFullWarpMask, amax, 2));
                amax = fmaxf(amax, __shfl_xor_sync(kFullWarpMask, amax, 4));
                if (!active) continue;
                const fp8::Scales sc = fp8::block_scales<kRoundScale>(amax);
                const int4 q = fp8::to_e4m3x16(v, sc.scale);
                const long long data_at = kMsgHeaderBytes + c0;
                const long long scale_at = kMsgHeaderBytes + hidden + (c0 / fp8::kBlock) * 4;
                const bool scale_lane = lane % 8 == 0;
                for (int k = 0; k < num_topk; ++k) {
                    uint8_t* dst = payload_ptr[k];
                    if (dst == nullptr) continue;
                    st_global_na_v4(reinterpret_cast<int4*>(dst + data_at), q);
                    if (scale_lane) *reinterpret_cast<float*>(dst + scale_at) = sc.scale_inv;
                }
                if (any_remote) {
                    st_global_v4(reinterpret_cast<int4*>(staging + data_at), q);
                    if (scale_lane) *reinterpret_cast<float*>(staging + scale_at) = sc.scale_inv;
                }
            }
        } else {
            const int row_int4 = hidden / 8;
            for (int c = threadIdx.x; c < row_int4; c += kNumThreads) {
                const int4 v = ld_global_nc_na_v4(row + c);
                for (int k = 0; k < num_topk; ++k) {
                    uint8_t* dst = payload_ptr[k];
                    if (dst != nullptr) st_global_na_v4(reinterpret_cast<int4*>(dst + kMsgHeaderBytes) + c, v);
                }
                if (any_remote) st_global_v4(reinterpret_cast<int4*>(staging + kMsgHeaderBytes) + c, v);
            }
        }
        if (threadIdx.x == 0) {
            // Word 2 = k + 1 for the combine's (source, token, k) -> row table (0 in staged messages: one staged
            // message goes to several k; their owners are not NVLink peers, so combine never sums their rows).
            for (int k = 0; k < num_topk; ++k)
                if (dst_ptr[k] != nullptr)
                    st_global_na_v4(reinterpret_cast<int4*>(dst_ptr[k]),
                                    make_int4(t, once_per_rank ? kPayloadInTokens : 0, k + 1, 0));
            if (any_remote) st_global_v4(reinterpret_cast<int4*>(staging), make_int4(t, 0, 0, 0));
        }

        // 3. NVSHMEM puts of the staged message to the destinations without a direct address.
        if (any_remote) {
            __syncthreads();  // the staged message is complete
            // Cumulative with the barrier: the whole staged message is visible system-wide (a proxy transport's NIC
            // reads it) before this thread's puts.
            fence_acq_rel_sys();
            for (int k = warp; k < num_topk; k += kNumWarps) {
                if (dst_off[k] >= 0 && dst_ptr[k] == nullptr) {
                    nvshmem::put_nbi_warp(sym_base + dst_off[k], staging, static_cast<size_t>(msg_bytes), dst_pe[k]);
                    issued = true;
                }
            }
        }
    }
    // The puts have landed at their targets before this block counts itself out (warp-uniform condition).
    if (issued) nvshmem::quiet();

    // 4. Last block out: every expert's count to its owner, then the epoch for this call's receive kernel.
    if (!comm::last_block_out<true>(block_counter)) return;
    for (int e = threadIdx.x; e < num_experts; e += kNumThreads) {
        int count = atomicExch(&expert_counters[e], 0);  // reset for the next call
        count = count < tmax ? count : tmax;
        const int owner = e / num_local_experts, j = e % num_local_experts;
        const long long sig_off = off_signals + static_cast<long long>(j * num_ranks + rank) * sizeof(uint64_t);
        const uint64_t value = dispatch_signal_value(epoch, count);
        // Pairs with the acquire wait in dispatch_recv at rank `owner` on its dispatch_signals[j][rank]. Every block's
        // messages (direct stores, or puts completed by quiet) happen before it (last_block_out).
        if (peer_bases[owner] != nullptr)
            st_release_sys_u64(reinterpret_cast<uint64_t*>(peer_bases[owner] + sig_off), value);
        else
            nvshmem::signal_op(reinterpret_cast<uint64_t*>(sym_base + sig_off), value, nvshmem::SignalOp::kSet, owner);
    }
    if (threadIdx.x == 0) {
        *block_counter = 0;
        *epoch_counter = epoch;
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Diagnostics of the once_per_rank combine (EPCOMM_DEBUG_LL_COMBINE_SKIP, a compile-time switch; 0 in normal use;
// results are wrong with any bit set): leave out the weights exchange, the row loads, the partial-row stores, or the
// items altogether.
constexpr int kSkipWeights = 1, kSkipLoads = 2, kSkipStores = 4, kSkipItems = 8;
#ifndef EPCOMM_DEBUG_LL_COMBINE_SKIP
#define EPCOMM_DEBUG_LL_COMBINE_SKIP 0
#endif

// once_per_rank combine, block 0 of combine_send: this rank's top-k weights into the combine_weights[rank][t][k] of
// every NVLink-reachable owner of an expert it names (this rank's own copy included), then that owner's
// weight_signals[rank] = epoch. The stores are scattered 4-byte writes (T * K of them, half remote at EP2).
template <int kNumThreads>
EPCOMM_DEVICE_INLINE void combine_send_weights(uint8_t* const* peer_bases, const int64_t* topk_idx,
                                               const float* topk_weights, int num_tokens, int num_topk,
                                               int num_ranks, int num_local_experts, int tmax, long long off_weights,
                                               long long off_weight_signals, uint64_t epoch, int rank) {
    const int num_experts = num_ranks * num_local_experts;
    for (long long i = threadIdx.x; i < static_cast<long long>(num_tokens) * num_topk; i += kNumThreads) {
        const int64_t e = topk_idx[i];
        if (e < 0 || e >= num_experts) continue;  // -1, or a bad index (dispatch counted it; combine_recv skips it)
        const int d = static_cast<int>(e / num_local_experts);
        if (peer_bases[d] == nullptr) continue;
        const long long t = i / num_topk, k = i % num_topk;
        reinterpret_cast<float*>(peer_bases[d] + off_weights)[(rank * tmax + t) * kMaxTopk + k] = topk_weights[i];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < num_ranks; d += kNumThreads) {
        if (peer_bases[d] == nullptr) continue;
        // Pairs with the acquire wait of d's combine_send_partial_sums on weight_signals[rank]; the barrier above
        // orders every thread's weight stores before it (cumulative release).
        fence_acq_rel_sys();
        st_release_sys_u64(reinterpret_cast<uint64_t*>(peer_bases[d] + off_weight_signals) + rank, epoch);
    }
}

// once_per_rank combine: items of (source s, token t, a chunk of kSumSteps x 128 channels) for every NVLink-reachable
// s, dealt round-robin over the grid's warps (block-major, so that every block gets some): the rows of s's (t, k)
// here (expert_rows, in k order) weighted and summed in float32, stored into s's combine_partial[rank][t]. A lane
// owns 4 channels per step (an 8-byte bf16 load per row, one 16-byte float32 store), so each store instruction of a
// warp writes 512 contiguous bytes. A warp loads its first rows before it waits (bounded, one lane) for s's weights.
// Tokens with no row here store nothing (their owner does not read that row). Returns early (this warp) after a
// failed wait.
template <int kNumThreads>
EPCOMM_DEVICE_INLINE void combine_send_partial_sums(const int4* x, int hidden, uint8_t* const* peer_bases,
                                                    const uint8_t* sym_base, const int* expert_rows, int num_topk,
                                                    int num_ranks, int tmax, long long off_weight_signals,
                                                    long long off_weights, long long off_partial, uint64_t epoch,
                                                    const comm::Waiter& waiter, int rank) {
    constexpr int kNumWarps = kNumThreads / kWarpSize;
    constexpr int kSumSteps = 4;       // 8-byte loads per row per lane: an item covers 4 x 128 channels
    constexpr int kRowsInFlight = 4;   // rows loaded before they are added
    constexpr int kStepChannels = kWarpSize * 4;
    constexpr int kDebugSkip = EPCOMM_DEBUG_LL_COMBINE_SKIP;
    const int lane = lane_id();
    const int row_int2 = hidden / 4;   // bf16 input row: 4 channels per 8 bytes
    const int chunks = (hidden + kSumSteps * kStepChannels - 1) / (kSumSteps * kStepChannels);
    const long long num_items = static_cast<long long>(num_ranks) * tmax * chunks;
    const float* weights = reinterpret_cast<const float*>(sym_base + off_weights);
    const int2* x2 = reinterpret_cast<const int2*>(x);
    uint64_t ready = 0;  // bit s: this warp has acquired source s's weights (ranks >= 64 always wait again)
    for (long long it = blockIdx.x + static_cast<long long>(gridDim.x) * warp_id(); it < num_items;
         it += static_cast<long long>(gridDim.x) * kNumWarps) {
        const int task = static_cast<int>(it / chunks);  // s * tmax + t
        const int chunk = static_cast<int>(it % chunks);
        const int s = task / tmax;
        if (peer_bases[s] == nullptr) continue;  // warp-uniform
        float acc[kSumSteps][4];
#pragma unroll
        for (int u = 0; u < kSumSteps; ++u)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[u][i] = 0.0f;
        bool any = false;
        for (int k0 = 0; k0 < num_topk; k0 += kWarpSize) {
            const int k = k0 + lane;
            const int row = k < num_topk ? expert_rows[static_cast<long long>(task) * num_topk + k] : -1;
            unsigned mask = __ballot_sync(kFullWarpMask, row >= 0);
            bool have_w = false;
            float w = 0.0f;
            while (mask != 0) {
                any = true;
                int2 v[kRowsInFlight][kSumSteps];
                int from[kRowsInFlight];
#pragma unroll
                for (int r = 0; r < kRowsInFlight; ++r) {
                    from[r] = mask != 0 ? __ffs(mask) - 1 : -1;
                    if (mask != 0) mask &= mask - 1;
                    const int2* src = x2 + static_cast<long long>(__shfl_sync(kFullWarpMask, row, from[r] & 31)) *
                                               row_int2;
#pragma unroll
                    for (int u = 0; u < kSumSteps; ++u) {
                        const int c = (chunk * kSumSteps + u) * kWarpSize + lane;
                        v[r][u] = (from[r] >= 0 && c < row_int2 && !(kDebugSkip & kSkipLoads))
                                      ? __ldg(src + c)
                                      : make_int2(0, 0);
                    }
                }
                if (!have_w) {
                    if ((s >= 64 || ((ready >> s) & 1) == 0) && !(kDebugSkip & kSkipWeights)) {
                        bool ok = true;
                        // Pairs with the release of weight_signals[s] by s's combine_send_weights.
                        if (lane == 0)
                            ok = comm::wait_geq(reinterpret_cast<const uint64_t*>(sym_base + off_weight_signals) + s,
                                                epoch, waiter, s, phase::kLlCombineSend);
                        __syncwarp();  // orders lane 0's acquire before the other lanes' weight loads
                        if (__shfl_sync(kFullWarpMask, ok ? 1 : 0, 0) == 0) return;
                        if (s < 64) ready |= 1ull << s;
                    }
                    if (row >= 0)
                        w = __uint_as_float(ld_relaxed_sys_u32(reinterpret_cast<const uint32_t*>(
                            weights + static_cast<long long>(task) * kMaxTopk + k)));
                    have_w = true;
                }
#pragma unroll
                for (int r = 0; r < kRowsInFlight; ++r) {
                    if (from[r] < 0) break;  // warp-uniform
                    const float wk = __shfl_sync(kFullWarpMask, w, from[r]);
#pragma unroll
                    for (int u = 0; u < kSumSteps; ++u) {
                        const uint32_t lo = static_cast<uint32_t>(v[r][u].x), hi = static_cast<uint32_t>(v[r][u].y);
                        const float f[4] = {fp8::bf16_lo(lo), fp8::bf16_hi(lo), fp8::bf16_lo(hi), fp8::bf16_hi(hi)};
#pragma unroll
                        for (int i = 0; i < 4; ++i) acc[u][i] = __fadd_rn(acc[u][i], __fmul_rn(wk, f[i]));
                    }
                }
            }
        }
        if (!any || (kDebugSkip & kSkipStores)) continue;  // warp-uniform (ballots)
        int4* dst = reinterpret_cast<int4*>(peer_bases[s] + off_partial +
                                            (static_cast<long long>(rank) * tmax + task % tmax) * hidden * 4);
#pragma unroll
        for (int u = 0; u < kSumSteps; ++u) {
            const int c = (chunk * kSumSteps + u) * kWarpSize + lane;
            if (c < row_int2)
                st_global_na_v4(dst + c, make_int4(__float_as_int(acc[u][0]), __float_as_int(acc[u][1]),
                                                   __float_as_int(acc[u][2]), __float_as_int(acc[u][3])));
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Combine send: blocks_per_expert blocks per local expert j (blockIdx.x / blocks_per_expert = j); each row m < the
// expert's received count goes back to its source r (from layout_range) into r's combine_recv[e][src_info row], with
// e = rank * E_local + j. zero_copy: x is this rank's combine_send region (symmetric), usable as a put source as it is.
// once_per_rank: every NVLink-reachable source s instead gets ONE float32 row per token t that has rows here, the
// weighted sum over this rank's experts (combine_send_partial_sums); for that the sources' top-k weights cross first
// (block 0 stores this rank's weights into every such peer's combine_weights and releases its weight_signals[rank]),
// and a warp waits (bounded) for a source's weights before it adds that source's rows. Without once_per_rank it
// never waits. expert_rows: the handle's (source, token, k) -> row table (dispatch_recv). The last block out
// signals each destination once, in its combine_signals slot of this rank's first expert.
template <int kNumThreads>
EPCOMM_DEVICE_INLINE void combine_send(const int4* x, int hidden, const int* src_info, const int64_t* layout_range,
                                       int num_ranks, int num_local_experts, int tmax, int blocks_per_expert,
                                       uint8_t* sym_base, long long off_signals, long long off_recv,
                                       long long off_staging, int zero_copy, int* block_counter,
                                       uint64_t* epoch_counter, int force_nvshmem, int once_per_rank,
                                       const int64_t* topk_idx, const float* topk_weights, int num_tokens,
                                       int num_topk, const int* expert_rows, long long off_weight_signals,
                                       long long off_weights, long long off_partial, uint64_t err_record,
                                       long long timeout_ns, int rank) {
    static_assert(kNumThreads % kWarpSize == 0, "whole warps only");
    constexpr int kNumWarps = kNumThreads / kWarpSize;
    constexpr int kDebugSkip = EPCOMM_DEBUG_LL_COMBINE_SKIP;
    const uint64_t epoch = *epoch_counter + 1;  // stored back by the last block out
    __shared__ uint8_t* peer_bases[kMaxRanks];
    __shared__ int begins[kMaxRanks + 1];
    const comm::Waiter waiter(err_record, timeout_ns, rank);
    const int j = blockIdx.x / blocks_per_expert, sub = blockIdx.x % blocks_per_expert;
    const int warp = warp_id(), lane = lane_id();
    const int row_int4 = hidden / 8;
    const long long row_bytes = static_cast<long long>(hidden) * 2;
    const long long rows_per_expert = static_cast<long long>(num_ranks) * tmax;
    const int e = rank * num_local_experts + j;
    load_peer_bases(peer_bases, sym_base, num_ranks, force_nvshmem, kNumThreads);
    if (threadIdx.x == 0 && j < num_local_experts) {
        // layout_range[j][r] = (begin << 32) | count; begins are the running sums (the dispatch packed them so).
        int running = 0;
        for (int r = 0; r < num_ranks; ++r) {
            begins[r] = running;
            running += static_cast<int>(layout_range[static_cast<long long>(j) * num_ranks + r] & 0xffffffffll);
        }
        begins[num_ranks] = running;
    }
    __syncthreads();
    // A destination r gets partial sums (and sends this rank its weights) iff once_per_rank and r is NVLink-reachable;
    // reachability is symmetric, so r decides the same about this rank.
    if (once_per_rank && blockIdx.x == 0 && !(kDebugSkip & kSkipWeights))
        combine_send_weights<kNumThreads>(peer_bases, topk_idx, topk_weights, num_tokens, num_topk, num_ranks,
                                          num_local_experts, tmax, off_weights, off_weight_signals, epoch, rank);
    bool issued = false;
    if (j < num_local_experts) {
        const int total = begins[num_ranks];
        for (int m = sub * kNumWarps + warp; m < total; m += blocks_per_expert * kNumWarps) {
            const int r = find_block(begins, num_ranks, m);
            if (once_per_rank && peer_bases[r] != nullptr) continue;  // summed below instead
            const int t = src_info[j * rows_per_expert + m];
            if (t < 0 || t >= tmax) continue;  // not a row this dispatch produced: nothing to address
            const long long dst_off = off_recv + (static_cast<long long>(e) * tmax + t) * row_bytes;
            const int4* src = x + (j * rows_per_expert + m) * row_int4;
            if (peer_bases[r] != nullptr) {
                warp_copy<kCopyUnroll, true, true>(src, reinterpret_cast<int4*>(peer_bases[r] + dst_off), row_int4,
                                                   lane);
            } else {
                if (!zero_copy) {
                    int4* staged = reinterpret_cast<int4*>(sym_base + off_staging) + (j * rows_per_expert + m) * row_int4;
                    warp_copy<kCopyUnroll, true, true>(src, staged, row_int4, lane);
                    src = staged;
                }
                __syncwarp();
                fence_acq_rel_sys();  // the staged row is visible system-wide before the put reads it
                nvshmem::put_nbi_warp(sym_base + dst_off, src, static_cast<size_t>(row_bytes), r);
                issued = true;
            }
        }
    }
    if (issued) nvshmem::quiet();  // issued is per lane here, but every lane of a putting warp set it
    if (once_per_rank && !(kDebugSkip & kSkipItems))
        combine_send_partial_sums<kNumThreads>(x, hidden, peer_bases, sym_base, expert_rows, num_topk, num_ranks,
                                               tmax, off_weight_signals, off_weights, off_partial, epoch, waiter,
                                               rank);

    if (!comm::last_block_out<true>(block_counter)) return;
    for (int r = threadIdx.x; r < num_ranks; r += kNumThreads) {
        const long long sig_off = off_signals + static_cast<long long>(rank) * num_local_experts * sizeof(uint64_t);
        const uint64_t value = (epoch << 1) | ((once_per_rank && peer_bases[r] != nullptr) ? 1ull : 0ull);
        // Pairs with the acquire wait in combine_recv at rank r on its combine_signals[rank * E_local]; every
        // block's rows happen before it (last_block_out).
        if (peer_bases[r] != nullptr)
            st_release_sys_u64(reinterpret_cast<uint64_t*>(peer_bases[r] + sig_off), value);
        else
            nvshmem::signal_op(reinterpret_cast<uint64_t*>(sym_base + sig_off), value, nvshmem::SignalOp::kSet, r);
    }
    if (threadIdx.x == 0) {
        *block_counter = 0;
        *epoch_counter = epoch;
    }
}

#endif  // EPCOMM_NVSHMEM

// ---------------------------------------------------------------------------------------------------------------------
// Dispatch receive: blocks_per_expert blocks per local expert j. Every block waits (bounded) for the R count signals
// of j, packs the sources contiguously (source order; inside a source, slot order), and copies its share of the
// messages into the outputs:
//   out_x [E_local][R * Tmax] rows (e4m3 bytes [H] or bf16 [H]); out_scales float32 [E_local][S][R * Tmax] or, with
//   UE8M0, int32 [E_local][ceil(S / 4)][R * Tmax]; out_src_info [E_local][R * Tmax] (-1 past the count);
//   out_layout_range [E_local][R] = (begin << 32) | count; out_count [E_local]; cumulative_stats[j] += count;
//   wait_stats[r] += nanoseconds the expert's first block waited for source r (summed over experts);
//   out_expert_rows[(r * Tmax + t) * K + k] = the row of source r's (token t, k) here (the once_per_rank combine's
//   table; dispatch_send set it to -1; every rank has the same K, as in DeepEP: a k >= K is left out).
// Data rows past the count are left as they were.
template <int kNumThreads, bool kUseFp8, bool kUseUe8m0>
EPCOMM_DEVICE_INLINE void dispatch_recv(const uint8_t* local_base, long long off_signals, long long off_recv,
                                        long long off_tokens, int msg_stride, int hidden, int num_ranks,
                                        int num_local_experts, int tmax, int blocks_per_expert, int num_topk,
                                        const uint64_t* epoch_counter, int4* out_x, void* out_scales,
                                        int* out_src_info, int64_t* out_layout_range, int* out_count,
                                        int* cumulative_stats, long long* wait_stats, int* out_expert_rows,
                                        uint64_t err_record, long long timeout_ns, int rank) {
    static_assert(kNumThreads % kWarpSize == 0, "whole warps only");
    constexpr int kNumWarps = kNumThreads / kWarpSize;
    const uint64_t epoch = *epoch_counter;  // advanced by this call's dispatch_send
    __shared__ int counts[kMaxRanks];
    __shared__ int begins[kMaxRanks + 1];
    const comm::Waiter waiter(err_record, timeout_ns, rank);
    const int j = blockIdx.x / blocks_per_expert, sub = blockIdx.x % blocks_per_expert;
    if (j >= num_local_experts) return;  // block-uniform
    const int warp = warp_id(), lane = lane_id();
    const long long rows_per_expert = static_cast<long long>(num_ranks) * tmax;

    // 1. The count of every source (bounded waits, one thread per source).
    bool ok = true;
    for (int r = threadIdx.x; r < num_ranks; r += kNumThreads) {
        const uint64_t* sig = reinterpret_cast<const uint64_t*>(local_base + off_signals) +
                              static_cast<long long>(j) * num_ranks + r;
        const uint64_t start_ns = globaltimer_ns();
        // Pairs with the release of the signal by source r's dispatch_send (its last block out).
        const bool arrived = comm::wait_geq(sig, dispatch_signal_value(epoch, 0), waiter, r, phase::kLlDispatchRecv);
        int count = 0;
        if (arrived) {
            count = static_cast<int>(ld_acquire_sys_u64(sig) & 0xffffffffull) - 1;
            count = count < 0 ? 0 : (count > tmax ? tmax : count);
        }
        counts[r] = count;
        if (sub == 0 && wait_stats != nullptr)
            atomicAdd(reinterpret_cast<unsigned long long*>(wait_stats + r),
                      static_cast<unsigned long long>(globaltimer_ns() - start_ns));
        ok = ok && arrived;
    }
    if (!comm::block_all_ok(ok)) return;
    if (threadIdx.x == 0) {
        int running = 0;
        for (int r = 0; r < num_ranks; ++r) {
            begins[r] = running;
            running += counts[r];
        }
        begins[num_ranks] = running;
    }
    __syncthreads();
    const int total = begins[num_ranks];
    if (sub == 0) {
        for (int r = threadIdx.x; r < num_ranks; r += kNumThreads)
            out_layout_range[static_cast<long long>(j) * num_ranks + r] =
                (static_cast<int64_t>(begins[r]) << 32) | static_cast<int64_t>(counts[r]);
        if (threadIdx.x == 0) {
            out_count[j] = total;
            if (cumulative_stats != nullptr) cumulative_stats[j] += total;
        }
    }

    // 2. Messages -> output rows, one warp per message.
    const int num_scales = hidden / fp8::kBlock;
    const int data_int4 = kUseFp8 ? hidden / 16 : hidden / 8;
    const uint8_t* recv = local_base + off_recv;
    for (int m = sub * kNumWarps + warp; m < total; m += blocks_per_expert * kNumWarps) {
        const int r = find_block(begins, num_ranks, m);
        const int slot = m - begins[r];
        const uint8_t* msg = recv + (static_cast<long long>(j * num_ranks + r) * tmax + slot) * msg_stride;
        const long long row = j * rows_per_expert + m;
        const int4 header = ld_global_v4(reinterpret_cast<const int4*>(msg));
        const bool in_tokens = header.y == kPayloadInTokens && header.x >= 0 && header.x < tmax;
        const uint8_t* payload =
            in_tokens ? local_base + off_tokens + (static_cast<long long>(r) * tmax + header.x) * msg_stride : msg;
        warp_copy<kCopyUnroll, false, true>(reinterpret_cast<const int4*>(payload + kMsgHeaderBytes),
                                            out_x + row * data_int4, data_int4, lane);
        if (lane == 0) {
            out_src_info[row] = header.x;
            const int k = header.z - 1;  // -1: a staged message (NVSHMEM path)
            if (header.x >= 0 && header.x < tmax && k >= 0 && k < num_topk)
                out_expert_rows[(static_cast<long long>(r) * tmax + header.x) * num_topk + k] = static_cast<int>(row);
        }
        if constexpr (kUseFp8) {
            const float* scales = reinterpret_cast<const float*>(payload + kMsgHeaderBytes + hidden);
            if constexpr (kUseUe8m0) {
                const int num_words = (num_scales + 3) / 4;
                for (int w = lane; w < num_words; w += kWarpSize) {
                    uint32_t word = 0;
#pragma unroll
                    for (int b = 0; b < 4; ++b)
                        if (w * 4 + b < num_scales) word |= fp8::ue8m0_byte(scales[w * 4 + b]) << (8 * b);
                    static_cast<int*>(out_scales)[(static_cast<long long>(j) * num_words + w) * rows_per_expert + m] =
                        static_cast<int>(word);
                }
            } else {
                for (int s = lane; s < num_scales; s += kWarpSize)
                    static_cast<float*>(out_scales)[(static_cast<long long>(j) * num_scales + s) * rows_per_expert + m] =
                        scales[s];
            }
        }
    }
    // 3. src_info of the unused rows.
    for (long long m = total + static_cast<long long>(sub) * kNumThreads + threadIdx.x; m < rows_per_expert;
         m += static_cast<long long>(blocks_per_expert) * kNumThreads)
        out_src_info[j * rows_per_expert + m] = -1;
}

// ---------------------------------------------------------------------------------------------------------------------
// Combine receive: every block waits (bounded) for every owner's signal (every owner signals every rank once, with
// rows or not; bit 0 says whether owner d sent per-expert rows or one partial sum per token), then one block per token
// (grid-stride): out[t] = the sum over k = 0..K-1 with 0 <= topk_idx[t, k] < E of a term, in float32 in k order,
// rounded to bf16 once. The term of (t, k) with owner d: topk_weights[t, k] * combine_recv[topk_idx[t, k]][t]
// (product rounded, then sum rounded, as numpy) when d sent per-expert rows; combine_partial[d][t] for the first k
// naming an expert of d when d sent partial sums (already weighted; the later k of d add nothing). Grid >= 1 block,
// also with num_tokens == 0.
template <int kNumThreads>
EPCOMM_DEVICE_INLINE void combine_recv(const uint8_t* local_base, long long off_signals, long long off_recv,
                                       long long off_partial, int hidden, int num_experts, int num_ranks, int tmax,
                                       const int64_t* topk_idx, const float* topk_weights, int num_tokens,
                                       int num_topk, const uint64_t* epoch_counter, int4* out, uint64_t err_record,
                                       long long timeout_ns, int rank) {
    static_assert(kNumThreads % kWarpSize == 0, "whole warps only");
    // Top-k rows loaded before they are added (in k order): 8 covers top-8 in one memory round trip per step.
    constexpr int kLoadsInFlight = 8;
    const uint64_t epoch = *epoch_counter;  // advanced by this call's combine_send
    __shared__ long long rows[kMaxTopk];    // term of (t, k): 16-byte index of its row, -1 if none
    __shared__ float weights[kMaxTopk];
    __shared__ bool is_partial[kMaxTopk];   // the term is a float32 row of combine_partial (else bf16 combine_recv)
    __shared__ bool partial_from[kMaxRanks];
    const comm::Waiter waiter(err_record, timeout_ns, rank);
    const int num_local_experts = num_experts / num_ranks;
    for (int d = threadIdx.x; d < num_ranks; d += kNumThreads) partial_from[d] = false;
    __syncthreads();
    bool ok = true;
    // One wait per owner, all in parallel, by the block's first warp (every block needs every owner's rows; more
    // pollers would compete with the incoming writes): owner d signals once, after all its rows, in the slot of its
    // first expert.
    for (int d = threadIdx.x; d < num_ranks && threadIdx.x < kWarpSize; d += kWarpSize) {
        const uint64_t* sig = reinterpret_cast<const uint64_t*>(local_base + off_signals) +
                              static_cast<long long>(d) * num_local_experts;
        // Pairs with the release of the signal by the owner's combine_send (its last block out).
        const bool arrived = comm::wait_geq(sig, epoch << 1, waiter, d, phase::kLlCombineRecv);
        if (arrived && (ld_acquire_sys_u64(sig) & 1ull) != 0) partial_from[d] = true;
        ok = arrived && ok;
    }
    if (!comm::block_all_ok(ok)) return;

    const int row_int4 = hidden / 8;
    const int4* area = reinterpret_cast<const int4*>(local_base + off_recv);
    const int4* partial_area = reinterpret_cast<const int4*>(local_base + off_partial);
    for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        __syncthreads();  // the previous token's terms no longer read
        for (int k = threadIdx.x; k < num_topk; k += kNumThreads) {
            const int64_t* idx = topk_idx + static_cast<long long>(t) * num_topk;
            const int64_t e = idx[k];
            long long row = -1;
            bool partial = false;
            if (e >= 0 && e < num_experts) {
                const int d = static_cast<int>(e / num_local_experts);
                partial = partial_from[d];
                if (!partial) {
                    row = (e * tmax + t) * row_int4;
                } else {
                    bool first = true;  // the first k naming an expert of d takes d's partial row
                    for (int k2 = 0; k2 < k && first; ++k2)
                        first = !(idx[k2] >= 0 && idx[k2] < num_experts && idx[k2] / num_local_experts == d);
                    row = first ? (static_cast<long long>(d) * tmax + t) * 2 * row_int4 : -1;
                }
            }
            rows[k] = row;
            weights[k] = topk_weights[static_cast<long long>(t) * num_topk + k];  // per-expert terms only
            is_partial[k] = partial;
        }
        __syncthreads();
        for (int c = threadIdx.x; c < row_int4; c += kNumThreads) {
            float acc[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
            for (int k0 = 0; k0 < num_topk; k0 += kLoadsInFlight) {
                int4 v[kLoadsInFlight], v2[kLoadsInFlight];
#pragma unroll
                for (int u = 0; u < kLoadsInFlight; ++u) {
                    const int k = k0 + u;
                    if (k >= num_topk || rows[k] < 0) continue;
                    if (is_partial[k]) {
                        v[u] = ld_global_v4(partial_area + rows[k] + 2 * c);
                        v2[u] = ld_global_v4(partial_area + rows[k] + 2 * c + 1);
                    } else {
                        v[u] = ld_global_v4(area + rows[k] + c);
                    }
                }
#pragma unroll
                for (int u = 0; u < kLoadsInFlight; ++u) {
                    const int k = k0 + u;
                    if (k >= num_topk || rows[k] < 0) continue;
                    if (is_partial[k]) {
                        const float p[8] = {__int_as_float(v[u].x), __int_as_float(v[u].y), __int_as_float(v[u].z),
                                            __int_as_float(v[u].w), __int_as_float(v2[u].x), __int_as_float(v2[u].y),
                                            __int_as_float(v2[u].z), __int_as_float(v2[u].w)};
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], p[i]);
                    } else {
                        float f[8];
                        fp8::unpack_bf16x8(v[u], f);
                        const float w = weights[k];
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w, f[i]));
                    }
                }
            }
            st_global_v4(out + static_cast<long long>(t) * row_int4 + c, fp8::pack_bf16x8(acc));
        }
    }
}

}  // namespace epcomm::low_latency
