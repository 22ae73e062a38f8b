"""The chunk checksum (``checksum.checksum_host``) computed piece by piece, in any order.

The checksum is ``sum_i mix(word_i, i)`` over a chunk's whole 8-byte words,
plus a term for the zero-padded tail word and one for the length, modulo
2**64. A sum has no order, so the words can be hashed in pieces, on any thread,
as each piece of the chunk arrives from the disk (or just before it leaves),
and the pieces added up afterwards: ``checksum_finish(sum of word_sum's, ...)``
equals ``checksum_host`` of the chunk, bit for bit, whenever the pieces cover
every whole word exactly once.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .checksum_cpu import _mix, _tail_word

__all__ = ["word_sum", "checksum_finish"]

_MASK = (1 << 64) - 1


@njit(nogil=True, cache=True)
def _word_sum(words, first):
    total = np.uint64(0)
    for i in range(words.shape[0]):
        total += _mix(words[i], np.uint64(first + i))
    return total


def word_sum(words: np.ndarray, first: int) -> int:
    """``sum mix(words[j], first + j)`` mod 2**64: the part of a chunk's checksum carried by
    ``words`` (a uint64 array), the chunk's whole words number ``first`` onwards. GIL-free."""
    return int(_word_sum(words, np.uint64(first)))


@njit(nogil=True, cache=True)
def _finish(partial, b, nbytes):
    nw = nbytes // 8
    total = partial
    if nw * 8 < nbytes:
        total += _mix(_tail_word(b, nw * 8, nbytes), np.uint64(nw))
        nw += 1
    return total + _mix(np.uint64(nbytes), np.uint64(nw) + np.uint64(0x5157))


def checksum_finish(partial: int, chunk: np.ndarray) -> int:
    """The checksum of ``chunk`` (its uint8 bytes) given ``partial``, the sum of ``word_sum`` over
    all its whole words: adds the tail word's and the length's terms."""
    return int(_finish(np.uint64(partial & _MASK), chunk, chunk.shape[0]))
