"""float32 ``exp`` and row maximum that LLVM vectorizes inside numba loops (imported only
where numba is installed).

Why: a softmax pass that runs whole in numba can be split over cores by ``prange``
(backend/parallel_loops.py), which NumPy's exp and max (called from Python) cannot. numba's
own ``exp`` is a scalar libm call per element (no SVML here) and its float max reduction
does not vectorize (LLVM wants NaN-free max semantics): on (1,120 x 10,000) float32, 13 ms
against NumPy's 2-3 ms. Here:

- ``exp_f32``: Cody-Waite range reduction ``x = n ln2 + r`` (|r| <= ln2 / 2), Cephes'
  degree-6 polynomial for e^r in float32, and the scaling by 2^n rounded once (into the
  denormals too): AVX-512's ``vscalefps`` through LLVM's ldexp, else two factors made from
  their bits; e^x for x < -104 (a causal mask's -inf) is set to 0 without the arithmetic
  underflow, which costs a microcode assist of ~100 cycles on x86 (it made attention's
  softmax 3x slower). Within 1 ulp of the correctly rounded value on [-104, 89]
  (tests/test_parallel_lm_kernels.py); NumPy's own AVX-512 float32 exp is within 2 ulp, so
  the two differ in the last bit or two.
- ``row_peak_f32``: the maximum through the float32 bits as integers (integer max and min
  reductions vectorize); a NaN with the sign bit clear wins, as a NaN in NumPy's max.

The bit casts are two LLVM ``bitcast`` intrinsics (numba has no scalar view).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic


@intrinsic
def int32_bits_as_float32(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 whose bits are the int32 ``bits``."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@intrinsic
def float32_as_int32_bits(typingctx, value):  # type: ignore[no-untyped-def]
    """The int32 with the bits of the float32 ``value``."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(types.int32))

    return sig, codegen


#: only FMA contraction: NaN and inf keep their IEEE meaning, the order of operations stays
_FLAGS = {"contract"}


@numba.njit(fastmath=_FLAGS, error_model="numpy", nogil=True)
def times_power_of_two_by_factors(p, k):  # type: ignore[no-untyped-def]
    """``p * 2^k`` for a float32 p in [0.5, 2] and an int32 k in [-150, 129], rounded once:
    2^k as two normal factors made from their bits (the first product is exact; only the
    second rounds, into the denormals too)."""
    half = k >> 1
    rest = k - half
    return (p * int32_bits_as_float32(np.int32((half + 127) << 23))
            * int32_bits_as_float32(np.int32((rest + 127) << 23)))


@intrinsic
def times_power_of_two_by_ldexp(typingctx, p, k):  # type: ignore[no-untyped-def]
    """``p * 2^k`` (float32, int32) rounded once: LLVM's ``ldexp``, one ``vscalefps`` on
    AVX-512, which LLVM vectorizes (17 and later; the same value as the factors)."""
    sig = types.float32(types.float32, types.int32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.ldexp.f32.i32")
        return builder.call(fn, args)

    return sig, codegen


def _ldexp_is_one_instruction() -> bool:
    """Whether LLVM knows ``ldexp`` (17 and later) and this CPU has AVX-512's ``vscalefps``
    (elsewhere a vectorized loop would call libm's ldexpf per element: right, but slow)."""
    from llvmlite import binding

    return binding.llvm_version_info >= (17,) and bool(
        binding.get_host_cpu_features().get("avx512f"))


#: ``p * 2^k`` rounded once, as exp_f32 scales its polynomial: both give the same bits
#: (tests/test_parallel_lm_kernels.py).
#: NOTE measured (session 18, AVX-512, one thread, 10,000 values in cache): exp_f32's loop
#: 0.317 -> 0.250 ns a value with ldexp (the factors take about eight integer and float
#: operations per vector, vscalefps one)
times_power_of_two = (times_power_of_two_by_ldexp if _ldexp_is_one_instruction()
                      else times_power_of_two_by_factors)


@numba.njit(fastmath=_FLAGS, error_model="numpy", nogil=True)
def exp_f32(x):  # type: ignore[no-untyped-def]
    """e^x for a float32 x (NaN stays NaN, -inf gives 0, +inf gives inf)."""
    value = x
    vanishes = x < np.float32(-104.0)          # e^x rounds to 0 (and -inf)
    # those lanes compute e^0 instead: an underflow to 0 costs a slow microcode assist on
    # x86 (a causal mask's -inf made attention's softmax 3x slower)
    x = min(x, np.float32(89.0)) if not vanishes else np.float32(0.0)
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    # ln 2 in two parts: n * 0.693359375 is exact for the n that occur
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)       # e^r
    result = times_power_of_two(p, np.int32(n))  # (n from -150 to 129)
    if vanishes:
        result = np.float32(0.0)
    return value if value != value else result  # NaN


@numba.njit(error_model="numpy", nogil=True)
def row_peak_f32(row):  # type: ignore[no-untyped-def]
    """The maximum of a non-empty float32 row (1-d, contiguous).

    As int32, the bits of floats with the sign bit clear order as the floats; with it set
    (negative floats, -0.0) they order the other way round. So the largest int32 is the
    maximum if it is not negative, else the smallest int32 is (two integer reductions that
    vectorize, nothing computed per element)."""
    top = np.int32(-2147483648)
    bottom = np.int32(2147483647)
    for j in range(row.shape[0]):
        b = float32_as_int32_bits(row[j])
        top = max(top, b)
        bottom = min(bottom, b)
    return int32_bits_as_float32(top if top >= 0 else bottom)
