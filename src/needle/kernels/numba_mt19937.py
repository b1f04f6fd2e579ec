"""Dropout's mask straight from NumPy's global MT19937 stream, in one numba loop.

``np.random.rand`` makes each double from two 32-bit outputs of the Mersenne Twister, one word
at a time in C (~3.5 ns a double). Here the same words come out of the generator's own state
(``kernels/random_mask.py`` hands in views of it), a whole 624-word block at a time: the
twist and the tempering are loops LLVM vectorizes. The doubles are NumPy's
(``(a >> 5) * 2^26 + (b >> 6)) / 2^53``), so the mask is bit for bit the one NumPy's draw
gives, and the generator is left where ``np.random.rand`` would leave it (tests compare both).
Imported only where numba is installed.
"""

from __future__ import annotations

import numpy as np

from ..backend.numba_support import njit_cached
from .numba_random_mask import bernoulli_mask as mask_of_draws

#: MT19937's state length and shift (NumPy's mt19937.c: RK_STATE_LEN, M)
STATE_WORDS = 624
SHIFT = 397


@njit_cached
def twist(key):
    """The next 624 words of state, in place (NumPy's mt19937_gen)."""
    upper, lower, matrix_a = np.uint32(0x80000000), np.uint32(0x7FFFFFFF), np.uint32(0x9908B0DF)
    one, zero = np.uint32(1), np.uint32(0)
    for i in range(STATE_WORDS - SHIFT):
        y = (key[i] & upper) | (key[i + 1] & lower)
        key[i] = key[i + SHIFT] ^ (y >> one) ^ ((zero - (y & one)) & matrix_a)
    for i in range(STATE_WORDS - SHIFT, STATE_WORDS - 1):
        y = (key[i] & upper) | (key[i + 1] & lower)
        key[i] = key[i + SHIFT - STATE_WORDS] ^ (y >> one) ^ ((zero - (y & one)) & matrix_a)
    y = (key[STATE_WORDS - 1] & upper) | (key[0] & lower)
    key[STATE_WORDS - 1] = key[SHIFT - 1] ^ (y >> one) ^ ((zero - (y & one)) & matrix_a)


@njit_cached
def next_words(key, pos, words):
    """Fill ``words`` with the generator's next outputs (tempered), twisting as it runs out;
    ``pos[0]`` is the state's read position (0..624), updated."""
    at = pos[0]
    done = 0
    total = words.shape[0]
    while done < total:
        if at == STATE_WORDS:
            twist(key)
            at = 0
        take = min(STATE_WORDS - at, total - done)
        source = key[at:at + take]
        target = words[done:done + take]
        for k in range(take):  # (slices indexed from zero: the loop vectorizes)
            y = source[k]
            y ^= y >> np.uint32(11)
            y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
            y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
            y ^= y >> np.uint32(18)
            target[k] = y
        at += take
        done += take
    pos[0] = at


@njit_cached
def next_doubles(key, pos, out):
    """Fill ``out`` (float64) with the doubles np.random.rand would draw next: two words
    each, ``((a >> 5) * 2^26 + (b >> 6)) / 2^53`` (NumPy's mt19937_next_double)."""
    n = out.shape[0]
    words = np.empty(2 * n, np.uint32)
    next_words(key, pos, words)
    for i in range(n):
        a = np.float64(words[2 * i] >> np.uint32(5))
        b = np.float64(words[2 * i + 1] >> np.uint32(6))
        out[i] = (a * 67108864.0 + b) / 9007199254740992.0


@njit_cached
def bernoulli_mask(key, pos, p32, out):
    """out[i] = 1 where float32(the i-th next double of the stream) <= p32, else 0 (out flat,
    in its own dtype): the draws of ``next_doubles`` through numba_random_mask's loop (the
    comparison kernels/random_mask.py uses on NumPy's draw)."""
    draws = np.empty(out.shape[0], np.float64)
    next_doubles(key, pos, draws)
    mask_of_draws(draws, p32, out)
