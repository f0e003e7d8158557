// Dealing tokens to warps and finishing a grid: a token's routing row, the ticket dealer of dynamic scheduling, the
// per-kernel counters with their resetting last-block-out, and the grid-done signal to every peer.
#pragma once

#include "epcomm/comm.cuh"
#include "epcomm/common.cuh"
#include "epcomm/ptx.cuh"
#include "epcomm/trace.cuh"

namespace epcomm {

// Per-kernel counters (int32, zero between calls): [0] blocks that finished, [1, 1 + kNumTickets) the ticket counters
// of TokenDealer. The last block out resets them all, after every block has counted in (so after its last ticket).
constexpr int kNumTickets = 2;

// comm::last_block_out over this kernel's counters; the last block also resets them all for the next launch (every
// block has counted in, so drawn its last ticket). kPublish: a SYSTEM fence orders every block's stores before its
// count, so that the last block can release them to peers (grid_done_signal); otherwise a GPU fence orders the block's
// ticket draws (its warps waited for the last one: TokenDealer::finish) before its count.
// Trace marks: kArrived, kCountedOut.
template <bool kPublish>
EPCOMM_DEVICE_INLINE bool last_block_out_reset(int* counters) {
#if EPCOMM_DEBUG_TRACE
    __syncthreads();
    trace::mark(trace::kArrived);
#endif
    const bool is_last = comm::last_block_out<kPublish>(counters);
    trace::mark(trace::kCountedOut);
    if (is_last && threadIdx.x == 0)
        for (int i = 0; i <= kNumTickets; ++i) counters[i] = 0;
    return is_last;
}

// Signal every peer once all blocks of this grid are done: the last block out releases epoch into flag_at(d) for each
// rank d < kNumRanks (flag_at(d): the flag this rank owns in d's memory), and stores the epoch into epoch_counter
// unless it is nullptr. Returns true in the last block.
// Trace marks: as last_block_out_reset, and kSignalled.
template <int kNumRanks, typename FlagAt>
EPCOMM_DEVICE_INLINE bool grid_done_signal(int* counters, FlagAt flag_at, uint64_t epoch, uint64_t* epoch_counter) {
    const bool is_last = last_block_out_reset<true>(counters);
    if (is_last && threadIdx.x < kNumRanks) {
        fence_acq_rel_sys();  // pairs with the acquire waits on this flag at every peer
        st_release_sys_u64(flag_at(threadIdx.x), epoch);
        if (threadIdx.x == 0) {
            if (epoch_counter) *epoch_counter = epoch;  // every block has read the old value (all counted in)
            trace::stamp(trace::kSignalled);
        }
    }
    return is_last;
}

// A token's routing, for the warp that handles it: its send_pos row (the row of token t in rank d's receive order,
// -1 where not sent there), lane d holding rank d's entry; -1 in every lane for t >= num_tokens (no token).
template <int kNumRanks>
EPCOMM_DEVICE_INLINE int load_route(const int* send_pos, int t, int num_tokens, int lane) {
    return (t < num_tokens && lane < kNumRanks) ? send_pos[static_cast<long long>(t) * kNumRanks + lane] : -1;
}

// Which token a warp takes next. Every warp's first token is its index w among the `stride` warps (no wait at the
// start). Then, static (tickets == nullptr): every stride-th token. Dynamic: token stride + the next ticket of a
// counter the warps share (the per-kernel counters above), so that warps on faster SMs take more tokens and all finish
// together instead of waiting for the slowest SM's last round. A ticket is drawn one token ahead: the atomic's latency
// hides behind the current token's copy. All lanes of the warp call every member.
struct TokenDealer {
    int* tickets;
    int stride;
    int lane;
    int ahead;  // lane 0: the ticket drawn for the token after the current one

    EPCOMM_DEVICE_INLINE TokenDealer(int* tickets_, int stride_, int lane_)
        : tickets(tickets_), stride(stride_), lane(lane_), ahead(0) {}
    EPCOMM_DEVICE_INLINE int first(int warp_index) {
        if (tickets != nullptr && lane == 0) ahead = atomicAdd(tickets, 1);
        return warp_index;
    }
    EPCOMM_DEVICE_INLINE int next(int t) {
        if (tickets == nullptr) return t + stride;
        const int n = stride + __shfl_sync(kFullWarpMask, ahead, 0);
        if (lane == 0) ahead = atomicAdd(tickets, 1);
        return n;
    }
    // After the warp's last token: wait for the ticket drawn ahead (its atomic has then been performed), so that the
    // block's count in last_block_out_reset comes after every ticket draw of the block.
    // (A ticket is never negative: the test only makes lane 0 wait for the value, an empty asm would not.)
    EPCOMM_DEVICE_INLINE void finish() const {
        if (tickets != nullptr && ahead < 0) __trap();
    }
};

}  // namespace epcomm
