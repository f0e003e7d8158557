// The only file that includes NVSHMEM's device headers: the NVRTC work-arounds first, then thin wrappers that the
// kernels call. Only specs with uses_nvshmem=True see it (the runtime adds the NVSHMEM options and EPCOMM_NVSHMEM).
//
// Work-arounds (checked against NVSHMEM 3.4.5 with NVRTC 13.0; see nvshmem_headers() in epcomm/runtime/compiler.py):
//  1. Some NVSHMEM headers use std::is_integral & co. unqualified while NVRTC has no <type_traits>
//     (non_abi/device/coll/reduce.cuh, fcollect.cuh): alias the few traits they name to cuda::std, below.
//  2. The stock non_abi/nvshmem_build_options.h turns IBGDA on (whose device code includes infiniband/mlx5dv.h, not
//     shipped) and device inlining off: the runtime writes a shadow of it (IBGDA off, full inlining on) first on the
//     include path, and only when the stock header needs it. It is included first here, so it wins everywhere.
//  3. nvshmem_tensor.h declares unannotated functions: the runtime passes -default-device.
//  4. No device library link: -D__NVSHMEM_NUMBA_SUPPORT__ (the recipe's "route C") compiles the device functions
//     into the kernel's own cubin, with the module-local device state that nvshmemx_cumodule_init fills at load time.
// By default only the point-to-point device API is included (puts, signals, quiet, nvshmem_ptr): it compiles in about
// 2 s instead of 6.6 s with the collectives. A family header that needs device collectives (nvshmem_barrier_all, ...)
// defines EPCOMM_NVSHMEM_COLLECTIVES before including this file.
#pragma once

#if !defined(EPCOMM_NVSHMEM)
#error "epcomm/nvshmem.cuh is only for kernels whose KernelSpec sets uses_nvshmem=True"
#endif

#include "epcomm/common.cuh"

// Work-around 1: the std type traits the NVSHMEM headers name, as aliases of libcu++'s.
#include <cuda/std/type_traits>
namespace std {
using cuda::std::enable_if;
using cuda::std::false_type;
using cuda::std::is_empty;
using cuda::std::is_floating_point;
using cuda::std::is_integral;
using cuda::std::is_same;
using cuda::std::is_signed;
using cuda::std::is_unsigned;
using cuda::std::true_type;
}  // namespace std

// Work-around 2: resolves to the runtime's shadow when it wrote one (it is first on the include path), else to the
// stock header; either way it is seen before any other NVSHMEM header.
#include "non_abi/nvshmem_build_options.h"

#if defined(EPCOMM_NVSHMEM_COLLECTIVES)
#include <nvshmem.h>
#include <nvshmemx.h>
#else
#include <device/nvshmem_defines.h>
#include <device/nvshmemx_defines.h>
#endif

namespace epcomm::nvshmem {

// How a put-with-signal updates the target's signal word.
enum class SignalOp : int {
    kSet = NVSHMEM_SIGNAL_SET,  // *sig = value
    kAdd = NVSHMEM_SIGNAL_ADD,  // *sig += value
};

// This PE's index in NVSHMEM_TEAM_WORLD.
EPCOMM_DEVICE_INLINE int my_pe() { return nvshmem_my_pe(); }

// Number of PEs in NVSHMEM_TEAM_WORLD.
EPCOMM_DEVICE_INLINE int n_pes() { return nvshmem_n_pes(); }

// Direct load/store pointer to PE pe's copy of the symmetric object sym, or nullptr when not reachable by loads/stores.
template <typename T>
EPCOMM_DEVICE_INLINE T* peer_ptr(T* sym, int pe) {
    return static_cast<T*>(nvshmem_ptr(sym, pe));
}

// Non-blocking put of bytes from local src to PE pe's symmetric dst, issued by the whole warp (all lanes call it).
EPCOMM_DEVICE_INLINE void put_nbi_warp(void* dst, const void* src, size_t bytes, int pe) {
    nvshmemx_putmem_nbi_warp(dst, src, bytes, pe);
}

// Non-blocking put, then update PE pe's symmetric signal word sig once the data has landed there (whole warp calls).
// The target pairs with it by waiting on its own sig (comm::wait_geq); data is visible to it once the signal is.
EPCOMM_DEVICE_INLINE void put_signal_nbi_warp(void* dst, const void* src, size_t bytes, uint64_t* sig, uint64_t value,
                                              SignalOp op, int pe) {
    nvshmemx_putmem_signal_nbi_warp(dst, src, bytes, sig, value, static_cast<int>(op), pe);
}

// Update PE pe's symmetric signal word (one thread), ordered after this thread's earlier puts to pe only by fence().
EPCOMM_DEVICE_INLINE void signal_op(uint64_t* sig, uint64_t value, SignalOp op, int pe) {
    nvshmemx_signal_op(sig, value, static_cast<int>(op), pe);
}

// Order this thread's earlier puts to each PE before its later ones to the same PE.
EPCOMM_DEVICE_INLINE void fence() { nvshmem_fence(); }

// Wait until this thread's outstanding non-blocking puts have completed (source reusable, data delivered).
EPCOMM_DEVICE_INLINE void quiet() { nvshmem_quiet(); }

}  // namespace epcomm::nvshmem
