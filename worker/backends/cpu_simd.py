"""Low-level numba helpers shared by the CPU kernels: jit options, a vectorisable exp, a cache
prefetch, and the thread-count set-up of parallel kernels."""
from __future__ import annotations

import os

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

# Reassociation lets LLVM vectorise reductions (the head_dim dot products); no "nnan"/"ninf":
# the kernel keeps every value finite and must not let the compiler assume more than that.
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
JIT_OPTIONS = dict(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")

_LOG2_E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # ln 2 split in two so that n * _LN2_HI is exact
_LN2_LO = np.float32(1.428606765330187e-06)
_EXP_FLOOR = np.float32(-87.0)  # below this exp(x) < 1.7e-38: returned as exactly 0


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret an int32 as float32 (a bitcast LLVM vectorises, unlike libm's ldexpf)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


_CACHE_LINE = 64


@intrinsic
def prefetch_token(typingctx, cache, block, row):
    """Hint the CPU to load cache[block, row] (a 4-D cache's [kv_heads, head_dim] token row) into
    its caches. The paged kernels jump from block to block, which the hardware prefetcher cannot
    predict: asking for the next block while reading this one cut the decode kernel's time on
    a captured benchmark step by a third (7.9 to 5.2 ms) on this 2-core host. A prefetch never
    faults, so any in-range indices are safe."""

    def codegen(context, builder, signature, args):
        cache_type = signature.args[0]
        array = context.make_array(cache_type)(context, builder, args[0])
        index = [context.cast(builder, value, ty, types.intp)
                 for value, ty in zip(args[1:], signature.args[1:])]
        index += [context.get_constant(types.intp, 0)] * (cache_type.ndim - 2)
        start = cgutils.get_item_pointer(context, builder, cache_type, array, index,
                                         wraparound=False)
        shape = cgutils.unpack_tuple(builder, array.shape, cache_type.ndim)
        nbytes = context.get_constant(types.intp, context.get_abi_sizeof(
            context.get_data_type(cache_type.dtype)))
        for extent in shape[2:]:
            nbytes = builder.mul(nbytes, extent)
        byte_ptr = ir.IntType(8).as_pointer()
        prefetch = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [byte_ptr] + [ir.IntType(32)] * 3),
            "llvm.prefetch.p0i8",
        )
        base = builder.bitcast(start, byte_ptr)
        read, keep_in_all_levels, data = (ir.Constant(ir.IntType(32), v) for v in (0, 3, 1))
        zero = context.get_constant(types.intp, 0)
        line = context.get_constant(types.intp, _CACHE_LINE)
        with cgutils.for_range_slice(builder, zero, nbytes, line) as (offset, _):
            builder.call(prefetch, [builder.gep(base, [offset]), read, keep_in_all_levels, data])
        return context.get_dummy_value()

    return types.none(cache, block, row), codegen


@numba.njit(inline="always", **JIT_OPTIONS)
def exp_nonpositive(x):
    """exp(x) for float32 x <= 0, in plain arithmetic so that loops calling it vectorise (libm's
    expf is a scalar call). e**x = 2**n * e**r with |r| <= ln2 / 2 and a degree-6 Taylor
    polynomial: relative error under 5e-7. Inputs below -87 give exactly 0."""
    clamped = max(x, _EXP_FLOOR)
    n = np.floor(clamped * _LOG2_E + np.float32(0.5))
    r = clamped - n * _LN2_HI - n * _LN2_LO
    poly = np.float32(1.0 / 720.0)
    poly = poly * r + np.float32(1.0 / 120.0)
    poly = poly * r + np.float32(1.0 / 24.0)
    poly = poly * r + np.float32(1.0 / 6.0)
    poly = poly * r + np.float32(0.5)
    poly = poly * r + np.float32(1.0)
    poly = poly * r + np.float32(1.0)
    result = poly * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
    return np.float32(0.0) if x < _EXP_FLOOR else result


# numba's OpenMP threading layer links the system's libgomp by file name, so it runs a second
# OpenMP runtime beside torch's own copy. By default that runtime's idle threads spin for ~4 ms
# of CPU after every parallel kernel (the decode attention, once per layer), on the cores that
# torch's threads need for the matmuls that follow. GOMP_SPINCOUNT is read once, when the
# library loads: it is set for numba's copy alone, torch's having loaded with torch.
NUMBA_POOL_SPINCOUNT = "0"
OPENMP_WAIT_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def start_numba_pool() -> None:
    """Start numba's thread pool with its idle threads sleeping at once, unless the user set
    OpenMP's wait settings themselves."""
    if any(name in os.environ for name in OPENMP_WAIT_SETTINGS):
        numba.get_num_threads()
        return
    os.environ["GOMP_SPINCOUNT"] = NUMBA_POOL_SPINCOUNT
    try:
        numba.get_num_threads()  # loads the threading layer's library, which reads it now
    finally:
        del os.environ["GOMP_SPINCOUNT"]


start_numba_pool()


def numba_thread_limit() -> int:
    """Threads for numba's parallel kernels: torch's setting (e.g. Ray's per-actor limit), capped
    by numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def match_numba_threads_to_torch() -> None:
    """Call before each parallel kernel. numba's first call starts its OpenMP pool, which resets
    torch's thread count to the core count: it is put back, or an engine limited to one thread
    would silently run its matmuls on every core."""
    torch_threads = torch.get_num_threads()
    numba.set_num_threads(numba_thread_limit())
    torch.set_num_threads(torch_threads)
