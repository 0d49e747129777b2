"""Rotation-based compression: the ``"eden"`` compressor and the rotated body of wire format v1.

The update is cut into blocks, each block is turned by a random rotation
that only the seed in the message determines, the rotated coordinates are
quantized deterministically, and one scale per block makes the estimate
unbiased. This is EDEN (Vargaftik, Ben Basat, Portnoy, Mendelson,
Ben-Itzhak, Mitzenmacher, "EDEN: Communication-Efficient and Robust
Distributed Mean Estimation for Federated Learning", ICML 2022,
arXiv:2108.08842), which generalises DRIVE (the same authors, "DRIVE:
One-bit Distributed Mean Estimation", NeurIPS 2021, arXiv:2105.08339) from
one bit to any rate; the rotation is the randomized Hadamard transform of
both papers' implementations (and of OpenFL's EDEN pipeline).

Algorithm, per block ``x`` of ``n`` entries (a power of two; see Blocks):

1. ``y = R x`` with ``R = (H D_k / sqrt(n)) ... (H D_1 / sqrt(n))``: each ``D_l``
   flips the sign of every entry by a bit of the seed's stream, ``H`` is the
   n x n Walsh-Hadamard matrix, and ``k = 2`` rotations for blocks of 1024
   or more, 3 for 256-512 and 4 for 64-128. ``R`` is orthonormal, so
   ``||y|| = ||x||``.
2. ``v = Q(y)``: a deterministic quantizer of the rung's rate (the ladder below).
3. ``S = ||x||^2 / <y, v>``, sent as float32 (EDEN's scale; DRIVE's
   ``||x||^2 / ||y||_1`` at one bit).
4. The server computes ``x_hat = R^T (S v)``.
5. The variance is bounded by construction (below): a block whose realized
   error is over the rung's bound gets one more rotation (mode 1), and if
   that is over too, it is sent as float32 (mode 2).

Why it is unbiased. ``<x_hat, x> = S <v, y> = ||x||^2`` for every draw, so
the error ``x_hat - x`` is always orthogonal to ``x``; for a uniformly random
rotation the distribution of ``x_hat`` is symmetric about the line through
``x``, so ``E[x_hat] = x`` exactly, for any deterministic quantizer (EDEN,
Section 2). A randomized Hadamard transform is not uniform, and one of them,
as in DRIVE's and EDEN's implementations, leaves a bias this module's tests
measure: with blocks of 4096 at s = 15 three spikes in 4096 zeros come back
with ``||E[x_hat] - x||^2 = 0.055 ||x||^2``, cubed Gaussians at s = 3 with
0.006; with blocks of 64 Gaussians at s = 7 with 0.028. Composing rotations
makes every input's rotated coordinates close to Gaussian ("Quantizing with
randomized Hadamard transforms: efficient heuristic now proven",
arXiv:2605.06014, shows two suffice up to O(n^-1/2)); measured over 400-3000
draws, two leave no bias distinguishable from the noise at 1024 entries and
more, smaller blocks need three (256) or four (64), hence step 1's ``k``.
``tests/test_rotation.py`` checks every coordinate's mean within 5 standard
errors over 3000 seeds on Gaussian, heavy-tailed, one-hot, constant,
few-spike and sparse vectors, with DRIVE's biased scale as the control that
fails. Unbiasedness over the rotation is measured, not proven: it is exact
only for a uniform rotation.

Why the variance bound is proven. The client knows its realized error,
``||x_hat - x||^2 = S^2 ||v||^2 - ||x||^2`` (``R`` keeps lengths), computed in
float64. If ``omega_B``, that over ``||x||^2``, exceeds the rung's
``omega_max``, the block takes one more rotation, then float32. So every
message has ``||C(x) - x||^2 <= omega_max ||x||^2``:
:meth:`EdenCompressor.variance_bound` is ``omega_max`` (plus ``2**-16`` for
float32 rounding), a bound on each message, not only on its mean, whatever
the rotation's distribution. With the orthogonality above it makes ``C / (1
+ omega_max)`` a contraction for every draw (``||v - C(v)/(1+w)||^2 <= w/(1+w)
||v||^2``), which is what error feedback and the compressed downlink need.
The choice of mode depends on ``y`` alone, which keeps EDEN's symmetry
argument intact. Measured on Gaussian blocks: of 4096 entries none left
mode 0 below 5 bits, 0.02-0.9% took mode 1 at 5-8 bits, none went raw; of 64
entries (a short tail) 0.6-5% took mode 1 and at most 0.3% went raw (s = 1).
Mode 2 is otherwise for vectors too large to scale (``S >= 2**96``, entries
around 1e28 and up) and tiny ones (``S`` subnormal).

The rate ladder
---------------
``levels`` (a policy's s, 1 to 2^24 - 1, larger = more bits) picks a rung.
Rungs 1-14 are fractions of a bit: every 64 rotated coordinates are split
into groups of 2^j entries (the table's pattern), and each group sends the
position of its largest ``|y_i|`` (``j`` bits) and its sign (1 bit); the
others are 0. The value sent for a group of ``g`` is ``c_g = E[max of g
|N(0,1)|]`` (times ``S``), so groups of different sizes share one scale
well. Rungs 15 and up are whole bits: ``b = min(8, 1 + floor(log2((s + 1) /
16)))`` bits per coordinate, the sign at one bit, a uniform midrise
quantizer of the coordinate divided by its block's RMS with the step
``delta_b`` that minimises EDEN's variance for Gaussian coordinates (at 6-8
bits that step clips the largest coordinates, and a block with an outlier
can exceed its bound: such a block is quantized again with the step that
puts its largest ``|y_i|`` in the top bin, before any extra rotation). The
nominal rate is ``(s + 1) / 16`` bits per entry for s <= 15 (s = 1, 5 and 6
fall just below: 7/64, 23/64 and 27/64), then whole bits: s = 15 -> 1,
31 -> 2, 63 -> 3, 127 -> 4, ..., 2047 and up -> 8 (like QSGD's packed cost,
levels between two rungs cost the lower one's bits).
``omega`` (Gaussian) is EDEN's variance ``1 / cos^2 - 1`` for Gaussian
coordinates, computed exactly; ``omega_max`` (the variance bound) is 1.5x
it, rounded up. The measured columns are ``python -m benchmarks.limit`` on
one standard Gaussian vector of 10^6 entries with the default compressor:
bits per entry of the whole message (scales, seed, header, CRC: 0.009 bits
per entry here) and the realized omega, and ``x bound``, the bits over
``d/2 log2(1 + 1/omega)``.

=========  ==================  =======  ==========  ==========  =========  ========  =====
levels s   pattern per 64      nominal  measured    omega       omega      omega     x
                               bits     bits/entry  (Gaussian)  measured   max       bound
=========  ==================  =======  ==========  ==========  =========  ========  =====
1          1 x 64              0.109    0.1180      8.496       8.490      13        1.47
2          2 x 32              0.188    0.1961      4.809       4.814      7.3       1.44
3          2 x 16, 1 x 32      0.250    0.2586      3.527       3.525      5.3       1.44
4          4 x 16              0.313    0.3212      2.708       2.711      4.1       1.42
5          2 x 8, 3 x 16       0.359    0.3681      2.315       2.315      3.5       1.42
6          4 x 4, 3 x 16       0.422    0.4306      1.973       1.970      3.0       1.45
7          8 x 8               0.500    0.5088      1.515       1.516      2.3       1.39
8          4 x 4, 6 x 8        0.563    0.5713      1.314       1.312      2.0       1.40
9          8 x 4, 4 x 8        0.625    0.6338      1.142       1.140      1.8       1.40
10         12 x 4, 2 x 8       0.688    0.6963      0.993       0.993      1.5       1.39
11         16 x 4              0.750    0.7589      0.864       0.865      1.3       1.37
12         16 x 1, 12 x 4      0.813    0.8214      0.781       0.782      1.2       1.38
13         32 x 1, 8 x 4       0.875    0.8839      0.705       0.706      1.1       1.39
14         48 x 1, 4 x 4       0.938    0.9465      0.635       0.635      0.96      1.39
15-30      sign                1        1.0090      0.5708      0.5708     0.86      1.38
31-62      2 bits              2        2.0094      0.1349      0.1349     0.21      1.31
63-126     3 bits              3        3.0099      0.03890     0.03896    0.059     1.27
127-254    4 bits              4        4.0103      0.01168     0.01177    0.018     1.25
255-510    5 bits              5        5.0108      0.003507    0.003565   0.0053    1.23
511-1022   6 bits              6        6.0112      0.001041    0.001055   0.0016    1.22
1023-2046  7 bits              7        7.0117      0.0003044   0.0003018  0.00046   1.20
>= 2047    8 bits              8        8.0121      0.00008769  8.433e-05  0.00014   1.18
=========  ==================  =======  ==========  ==========  =========  ========  =====

Without framing the Gaussian figures are 1.35-1.43x the bound for the
fractions of a bit and 1.19-1.37x for whole bits (exact, from ``omega``).
Random subsampling of the rotated coordinates with a sign each (the
sub-bit scheme of EDEN's implementation and of this module's first
prototype) has ``omega = (1 + 0.571) / p - 1`` for a fraction ``p``, whose
ratio to the bound grows to ``2 ln 2 (1 + 0.571) = 2.18`` as ``p`` falls
(measured in the prototype, with a scale per 1024: 1.93x at p = 1/2, 2.26x
at 1/4, 2.60x at 1/8, against 1.45x, 1.51x, 1.61x for the largest of each 8,
16, 32): a random subset ignores which coordinates are large, while the
largest of ``g`` costs ``log2 g`` bits and carries ``c_g^2`` of energy.

Blocks
------
The vector is cut into blocks of ``b`` entries (a power of two); the last
``m`` entries, if fewer, form a block padded with zeros to the next power of
two >= max(m, 64). Padding the whole vector to one power of two instead
(EDEN's implementation) costs up to 2x the bits at every rate (d = 5,210
pads to 8,192) and a transform out of the cache; blocks cost a 32-bit scale
each and at most one padded tail. Which is cheaper depends on ``d`` and the
rate, so each message takes the ``b`` in ``[64, max_block_size]`` (4096 by
default) that makes it smallest (:func:`block_size_for`, a function of ``d``,
``s`` and the option, which the server recomputes). Bits per entry beyond
the rung's nominal rate (scales, seed, header, CRC, padding), from
:func:`message_bytes`:

========  ====  ==============  ==============  ==============  ================
d         s     blocks of 1024  blocks of 4096  chosen b        whole vector
========  ====  ==============  ==============  ==============  ================
5,210     1     0.075           0.067           0.067 (4096)    0.104 (8192)
5,210     15    0.083           0.228           0.083 (1024)    0.615 (8192)
15,010    1     0.049           0.031           0.031 (4096)    0.026 (16384)
15,010    15    0.070           0.113           0.054 (2048)    0.107 (16384)
10^6      1     0.034           0.009           0.009 (4096)    0.006 (2^20)
10^6      15    0.034           0.009           0.009 (4096)    0.049 (2^20)
========  ====  ==============  ==============  ==============  ================

At 10^6 entries and more the scales are the cost (0.031 bits per entry at
1024, 0.008 at 4096: 29% and 7% of rung 1); 4096 float32 is 16 KiB, which
keeps the transform in the L1 cache. (The whole-vector column is what the
bits would be; the format's blocks stop at 65536.)

Message (encoding 4, "rotated"; header ``levels`` = s, ``bucket size`` =
block size; the "norms" are the blocks' scales, one float32 each)::

    scales  nb float32 LE: +0.0 (zero or raw block) or a normal float in [2**-126, 2**96)
    body    seed     8 bytes, uint64 LE, < 2**63 (the shared randomness)
            modes    ceil(nb / 4) bytes: 2 bits per block, block j at stream bits
                     2j, 2j + 1 (LSB first): 0 the k rotations, 1 k + 1, 2 raw; 3 is invalid
            codes    the code stream of every block that is not raw, in order,
                     LSB first (bit j of a code at stream bit p + j, stream bit p
                     is bit p % 8 of byte p // 8); each block's codes in
                     coordinate order: per 64-entry pattern, per group
                     ``(index << 1) | negative`` of 1 + log2 g bits; at one bit,
                     one bit per coordinate, 1 = +; at b bits, ``c`` in b bits for
                     the value ``2c - (2^b - 1)``
            raw      the entries of every raw block, float32 LE, in order

The sign stream: entry ``i`` of rotation ``l`` (0 to 4) is negated when bit
``i % 64`` of SplitMix64's output for the state ``seed + (8 (i // 64) + l +
1) * 0x9E3779B97F4A7C15`` (mod 2^64) is set; ``i`` counts from the vector's
start, through the tail's padding, so no two (entry, rotation) pairs share
a bit. Canonical: one valid form per decoded message: a zero block has mode
0, scale +0.0 and all-zero codes; a raw block has scale +0.0 and is not all
zeros; padding bits are 0; the body length is exactly what the modes imply.

Notes
-----
The quantizers are deterministic; all randomness is the rotation's, drawn
from one 63-bit seed the client takes from its generator, so the server
needs nothing but the message. Error feedback composes with it unchanged.
Within a rung the message size is fixed (for a given d and block size),
except for raw blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from adaquantfl.compression._kernels import rotation as kernels
from adaquantfl.compression.codec import checked_header, peek_header
from adaquantfl.compression.compressor import BaseCompressor, register_compressor
from adaquantfl.compression.container import (
    ENCODINGS,
    U32_MAX,
    CodecError,
    as_buffer,
    build_message,
    frame_bytes,
)
from adaquantfl.compression.measure import flat_float32
from adaquantfl.compression.qsgd import MAX_LEVELS, draw_key, num_buckets, output_buffer
from adaquantfl.validation import check_int

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "RUNGS",
    "EdenCompressor",
    "EdenOptions",
    "RotatedMessage",
    "Rung",
    "block_size_for",
    "decode_rotated",
    "eden_encode",
    "encode_rotated",
    "message_bytes",
    "reconstruct",
    "rung",
]

#: Entries per rotation block (the default of :class:`EdenOptions`).
DEFAULT_BLOCK_SIZE = 4096
MIN_BLOCK = 64
MAX_BLOCK = 65536
#: Scales at or above this are not sent (the block goes raw): ``S * 255 * sqrt(n)``
#: and every partial sum of the inverse transform stay finite in float32.
MAX_SCALE = 2.0**96
_MIN_NORMAL = 2.0**-126
SEED_BYTES = 8
#: Added to ``omega_max`` in :meth:`EdenCompressor.variance_bound`: the client's
#: check is computed in float64 from float32 coordinates (relative error ~1e-6).
FLOAT_SLACK = 2.0**-16

#: ``c_g = E[max of g |N(0, 1)|]`` for g = 2^j, j = 0..6 (the value a group sends).
GROUP_MAGNITUDE = np.array(
    [
        0.7978845608028654,
        1.1283791670955126,
        1.4647279814586383,
        1.7833670778813644,
        2.077204479523607,
        2.347079198804724,
        2.5961107651466606,
    ],
    dtype=np.float32,
)
#: The uniform quantizer's step (in units of the block's RMS) for b = 2..8 bits:
#: the minimiser of EDEN's variance for Gaussian coordinates (b = 1 is the sign).
UNIFORM_STEP = {
    2: 0.995687,
    3: 0.586019,
    4: 0.335201,
    5: 0.188139,
    6: 0.104063,
    7: 0.056868,
    8: 0.030762,
}


@dataclass(frozen=True)
class Rung:
    """One rate of the ladder.

    Attributes
    ----------
    bits : int
        Bits per coordinate for whole-bit rungs (1 to 8); 0 for the grouped sub-bit rungs.
    groups : tuple of int
        Sub-bit rungs: ``log2`` of each group's size, in order, over 64 coordinates.
    omega_gauss : float
        EDEN's variance for Gaussian coordinates (exact, large blocks).
    omega_max : float
        The realized variance no block may exceed (1.5 ``omega_gauss``, rounded up).
    """

    bits: int
    groups: tuple[int, ...]
    omega_gauss: float
    omega_max: float

    @property
    def pattern_bits(self) -> int:
        """Code bits per 64 coordinates."""
        if self.bits:
            return 64 * self.bits
        return sum(j + 1 for j in self.groups)

    @property
    def nominal_bits(self) -> float:
        """Code bits per coordinate (without scales, header or padding)."""
        return self.pattern_bits / 64

    def describe(self) -> str:
        if self.bits == 1:
            return "sign"
        if self.bits:
            return f"{self.bits} bits"
        sizes: dict[int, int] = {}
        for j in self.groups:
            sizes[1 << j] = sizes.get(1 << j, 0) + 1
        return ", ".join(f"{count} x {size}" for size, count in sizes.items())


def _groups(*parts: tuple[int, int]) -> tuple[int, ...]:
    out: list[int] = []
    for size, count in parts:
        out += [size.bit_length() - 1] * count
    return tuple(out)


#: Sub-bit rungs (levels 1-14) and whole-bit rungs (keyed 100 + bits).
RUNGS: dict[int, Rung] = {
    1: Rung(0, _groups((64, 1)), 8.4958, 13.0),
    2: Rung(0, _groups((32, 2)), 4.8089, 7.3),
    3: Rung(0, _groups((16, 2), (32, 1)), 3.5267, 5.3),
    4: Rung(0, _groups((16, 4)), 2.7082, 4.1),
    5: Rung(0, _groups((8, 2), (16, 3)), 2.3152, 3.5),
    6: Rung(0, _groups((4, 4), (16, 3)), 1.9731, 3.0),
    7: Rung(0, _groups((8, 8)), 1.5154, 2.3),
    8: Rung(0, _groups((4, 4), (8, 6)), 1.3135, 2.0),
    9: Rung(0, _groups((4, 8), (8, 4)), 1.1415, 1.8),
    10: Rung(0, _groups((4, 12), (8, 2)), 0.9934, 1.5),
    11: Rung(0, _groups((4, 16)), 0.8644, 1.3),
    12: Rung(0, _groups((1, 16), (4, 12)), 0.7812, 1.2),
    13: Rung(0, _groups((1, 32), (4, 8)), 0.7051, 1.1),
    14: Rung(0, _groups((1, 48), (4, 4)), 0.6352, 0.96),
    101: Rung(1, (), 0.5708, 0.86),
    102: Rung(2, (), 0.13488, 0.21),
    103: Rung(3, (), 0.038896, 0.059),
    104: Rung(4, (), 0.011678, 0.018),
    105: Rung(5, (), 0.0035075, 0.0053),
    106: Rung(6, (), 0.0010411, 0.0016),
    107: Rung(7, (), 0.00030443, 0.00046),
    108: Rung(8, (), 8.7694e-5, 0.00014),
}


def rung(levels: int) -> Rung:
    """The rung of ``levels``: 1-14 the sub-bit patterns, then whole bits (see the module)."""
    s = check_int("levels", levels, 1, MAX_LEVELS)
    if s < 15:
        return RUNGS[s]
    bits = min(8, ((s + 1) // 16).bit_length())
    return RUNGS[100 + bits]


@dataclass(frozen=True)
class EdenOptions:
    """Options of :class:`EdenCompressor`.

    Parameters
    ----------
    max_block_size : int
        The largest rotation block, a power of two in ``[64, 65536]`` (default
        4096). Each message uses the power of two in ``[64, max_block_size]``
        that makes it smallest (:func:`block_size_for`): the largest, unless
        the vector's tail would be padded a lot.
    """

    max_block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        b = check_int("max_block_size", self.max_block_size, MIN_BLOCK, MAX_BLOCK)
        if b & (b - 1):
            raise ValueError(f"max_block_size must be a power of two in [64, 65536], got {b}")


# --------------------------------------------------------------------------- sizes


def _padded(m: int) -> int:
    """A tail of ``m`` entries is padded to the next power of two >= max(m, 64)."""
    return max(MIN_BLOCK, 1 << (m - 1).bit_length())


def _blocks(numel: int, block_size: int) -> tuple[int, int, int]:
    """``(blocks, entries of the last block, its padded size)``.

    An empty vector has one block of no entries (the container's one "norm").
    """
    nb = num_buckets(numel, block_size)
    last = numel - (nb - 1) * block_size
    return nb, last, block_size if last == block_size else _padded(last) if last else 0


def code_bits(numel: int, levels: int, block_size: int) -> int:
    """Code bits of a message in which no block is raw."""
    nb, _, tail = _blocks(numel, block_size)
    per64 = rung(levels).pattern_bits
    return ((nb - 1) * block_size + tail) // 64 * per64


def _body_bytes(numel: int, levels: int, block_size: int) -> int:
    nb = num_buckets(numel, block_size)
    return SEED_BYTES + -(-nb // 4) + -(-code_bits(numel, levels, block_size) // 8)


def message_bytes(numel: int, levels: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Exact size of an ``"eden"`` message in which no block is raw (the usual case)."""
    nb = num_buckets(numel, block_size)
    return frame_bytes((numel, levels, block_size, _body_bytes(numel, levels, block_size)), nb)


@functools.lru_cache(maxsize=1024)
def block_size_for(numel: int, levels: int, max_block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """The block size of a message: the power of two in ``[64, max_block_size]`` whose
    message (without raw blocks) is smallest, the larger on ties."""
    sizes = [1 << k for k in range(6, max_block_size.bit_length())]
    return min(sizes, key=lambda b: (message_bytes(numel, levels, b), -b))


def _max_body_bytes(numel: int, levels: int, block_size: int) -> int:
    # Raw blocks send 4 bytes per entry instead of their codes; a padded tail
    # block's codes can outweigh its raw entries, so bound both at once.
    return _body_bytes(numel, levels, block_size) + 4 * numel


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, eq=False)
class RotatedMessage:
    """The fields of an ``"eden"`` message, decoded and checked (see the module's layout).

    Attributes
    ----------
    numel, levels, block_size, seed : int
    scales : np.ndarray
        float32, one per block.
    modes : np.ndarray
        uint8, one per block (0 the base rotations, 1 one more, 2 raw).
    codes : np.ndarray
        uint8, the code stream (padding bits 0).
    raw : np.ndarray
        float32, the entries of the raw blocks.
    """

    numel: int
    levels: int
    block_size: int
    seed: int
    scales: np.ndarray
    modes: np.ndarray
    codes: np.ndarray
    raw: np.ndarray

    def equals(self, other: RotatedMessage) -> bool:
        """Field-by-field equality (float fields bit for bit)."""
        return (
            (self.numel, self.levels, self.block_size, self.seed)
            == (other.numel, other.levels, other.block_size, other.seed)
            and np.array_equal(self.scales.view(np.uint32), other.scales.view(np.uint32))
            and np.array_equal(self.modes, other.modes)
            and np.array_equal(self.codes, other.codes)
            and np.array_equal(self.raw.view(np.uint32), other.raw.view(np.uint32))
        )


def _pack_modes(modes: np.ndarray) -> np.ndarray:
    padded = np.zeros(-(-modes.size // 4) * 4, dtype=np.uint8)
    padded[: modes.size] = modes
    q = padded.reshape(-1, 4)
    packed: np.ndarray = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)
    return packed


def _unpack_modes(data: np.ndarray, count: int) -> np.ndarray:
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    modes: np.ndarray = ((data[:, None] >> shifts) & 3).reshape(-1)
    return modes[:count]


def encode_rotated(message: RotatedMessage) -> bytes:
    """The bytes of ``message`` (the inverse of :func:`decode_rotated`; no checks of content)."""
    modes = _pack_modes(message.modes)
    codes = np.ascontiguousarray(message.codes, dtype=np.uint8)
    raw = np.ascontiguousarray(message.raw, dtype="<f4").view(np.uint8)
    seed = np.array([message.seed], dtype="<u8").view(np.uint8)
    body = SEED_BYTES + modes.size + codes.size + raw.size

    def write(out: np.ndarray) -> None:
        at = 0
        for part in (seed, modes, codes, raw):
            out[at : at + part.size] = part
            at += part.size

    return build_message(
        ENCODINGS["rotated"],
        message.numel,
        message.levels,
        message.block_size,
        np.ascontiguousarray(message.scales, dtype=np.float32),
        body,
        write,
    )


def eden_encode(
    x: torch.Tensor,
    levels: int,
    *,
    generator: torch.Generator,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> bytes:
    """The ``"eden"`` message of ``x`` at ``levels`` (one 63-bit draw from ``generator``).

    Raises
    ------
    ValueError
        If ``x`` is not a floating tensor, holds NaN or inf, or has more than
        2**32 - 1 entries, or ``levels`` is out of range.
    """
    EdenOptions(block_size)  # a power of two in [64, 65536]
    r = rung(levels)
    v = _flat_float32(x)
    d = v.size
    if d > U32_MAX:
        raise ValueError(f"v1 messages carry at most {U32_MAX} entries, got {d}")
    seed = draw_key(generator)
    nb = num_buckets(d, block_size)
    scales = np.zeros(nb, dtype=np.float32)
    modes = np.zeros(nb, dtype=np.uint8)
    codes = np.zeros(-(-code_bits(d, levels, block_size) // 32) + 1, dtype=np.uint32)
    # Raw blocks are rare: room for 2^20 raw entries, and a second pass with
    # room for all of them if that is not enough.
    raw = np.empty(min(d, 1 << 20), dtype=np.float32)
    while True:
        total, nraw, _, status = kernels.encode_blocks(
            v,
            block_size,
            np.uint64(seed),
            r.bits,
            UNIFORM_STEP.get(r.bits, 1.0),
            np.array(r.groups or (0,), dtype=np.int64),
            _group_values(r),
            r.pattern_bits,
            r.omega_max,
            MAX_SCALE,
            scales,
            modes,
            codes,
            raw,
        )
        if status != 2:
            break
        raw = np.empty(d, dtype=np.float32)
        codes[:] = 0
    if status == 1:
        bad = int(d - np.count_nonzero(np.isfinite(v)))
        raise ValueError(f"cannot encode a vector with {bad} non-finite entries (NaN or inf)")
    stream = codes.view(np.uint8)[: -(-total // 8)]
    message = RotatedMessage(d, int(levels), block_size, seed, scales, modes, stream, raw[:nraw])
    return encode_rotated(message)


def decode_rotated(
    data: bytes | bytearray | memoryview,
    *,
    expected_numel: int,
    expected_levels: int | None = None,
    expected_block_size: int | None = None,
) -> RotatedMessage:
    """Parse and check an ``"eden"`` message; everything is checked before it is returned.

    Header fields (against the length and the caller's expectations), the CRC,
    each scale, the seed, the modes, the exact body length, the zero blocks'
    codes, the padding bits and the raw entries.

    Raises
    ------
    CodecError
        Naming the first field that is wrong.
    """
    buf = as_buffer(data)
    header = peek_header(buf)
    if header.encoding != "rotated":
        raise CodecError(f"expected a rotated message, got {header.encoding}")
    if expected_levels is not None and header.levels != expected_levels:
        raise CodecError(f"message has levels {header.levels}; expected {expected_levels}")
    if expected_block_size is not None and header.bucket_size != expected_block_size:
        raise CodecError(
            f"message has blocks of {header.bucket_size}; expected {expected_block_size}"
        )
    header = checked_header(buf, expected_numel)
    d, b, levels = header.numel, int(header.bucket_size or 0), header.levels
    nb, last, tail = _blocks(d, b)
    scales = np.frombuffer(buf, dtype="<f4", count=nb, offset=header.header_bytes).astype(
        np.float32
    )
    _check_scales(scales)
    if last == 0 and scales[-1] != 0:  # an empty vector's one block is a zero block
        raise CodecError(f"an empty vector's block has scale {float(scales[-1])!r}, not 0")
    body = np.frombuffer(buf, dtype=np.uint8, count=header.body_bytes, offset=header.body_offset)
    seed = int(body[:SEED_BYTES].view("<u8")[0])
    if seed >= 2**63:
        raise CodecError(f"seed 0x{seed:016x} exceeds 63 bits")
    mode_bytes = -(-nb // 4)
    packed = body[SEED_BYTES : SEED_BYTES + mode_bytes]
    modes = _unpack_modes(packed, nb)
    if modes.size != nb:
        raise CodecError(f"rotated body ends inside the modes ({modes.size} of {nb} blocks)")
    if mode_bytes and int(packed[-1]) >> (2 * (nb - 4 * (mode_bytes - 1))):
        raise CodecError("a padding bit after the last block's mode is set")
    if np.any(modes == 3):
        raise CodecError(f"block {int(np.argmax(modes == 3))} has mode 3 (allowed: 0, 1, 2)")
    is_raw = modes == kernels.MODE_RAW
    if np.any(scales[is_raw] != 0):
        raise CodecError(f"raw block {int(np.argmax(is_raw & (scales != 0)))} has a scale")
    sizes = np.full(nb, b, dtype=np.int64)
    padded = np.full(nb, b, dtype=np.int64)
    if nb:
        sizes[-1], padded[-1] = last, tail
    r = rung(levels)
    bits = int(padded[~is_raw].sum()) // 64 * r.pattern_bits
    raw_entries = int(sizes[is_raw].sum())
    expected = SEED_BYTES + mode_bytes + -(-bits // 8) + 4 * raw_entries
    if expected != header.body_bytes:
        raise CodecError(
            f"rotated body is {header.body_bytes} bytes; its modes need {expected} "
            f"({int(is_raw.sum())} raw blocks)"
        )
    start = SEED_BYTES + mode_bytes
    end = start + -(-bits // 8)
    words = _words(body[start:end])  # the check's copy is also the message's codes
    status, block = kernels.check_blocks(words, bits, d, b, r.bits, r.pattern_bits, scales, modes)
    if status:
        raise CodecError(_STATUS[status].format(block=block))
    raw = body[end:].view("<f4").astype(np.float32)
    if not np.isfinite(raw).all():
        raise CodecError("a raw block holds NaN or inf")
    at = 0
    for k in np.flatnonzero(is_raw):
        m = int(sizes[k])
        if not np.any(raw[at : at + m]):
            raise CodecError(f"raw block {int(k)} is all zeros (a zero block has mode 0)")
        at += m
    codes = words.view(np.uint8)[: end - start]
    return RotatedMessage(d, levels, b, seed, scales, modes, codes, raw)


_STATUS = {
    1: "block {block} has scale 0 but non-zero codes",
    2: "block {block} has scale 0 but mode 1 (a zero block has mode 0)",
    4: "a padding bit after the last code is set",
}


def _check_scales(scales: np.ndarray) -> None:
    word = scales.view(np.uint32)
    ok = (word == 0) | ((scales >= _MIN_NORMAL) & (scales < MAX_SCALE))
    if not ok.all():
        k = int(np.argmin(ok))
        raise CodecError(
            f"block {k}'s scale {float(scales[k])!r} is not +0.0 or a normal float in "
            f"[2**-126, 2**96)"
        )


def reconstruct(message: RotatedMessage, out: torch.Tensor | None = None) -> torch.Tensor:
    """The vector a message stands for: ``R^T (S v)`` per block (into ``out`` if given)."""
    flat = output_buffer(out, message.numel)
    r = rung(message.levels)
    kernels.decode_blocks(
        _words(message.codes),
        message.raw,
        np.uint64(message.seed),
        message.block_size,
        r.bits,
        np.array(r.groups or (0,), dtype=np.int64),
        _group_values(r),
        r.pattern_bits,
        message.scales,
        message.modes,
        flat.detach().numpy(),
    )
    return flat


def _words(stream: np.ndarray) -> np.ndarray:
    """The code stream's bytes as little-endian uint32 words, with a spare zero word."""
    words = np.zeros(stream.size // 4 + 2, dtype=np.uint32)
    words.view(np.uint8)[: stream.size] = stream
    return words


def _group_values(r: Rung) -> np.ndarray:
    if not r.groups:
        return np.ones(1, dtype=np.float32)
    return np.ascontiguousarray(GROUP_MAGNITUDE[list(r.groups)])


def _flat_float32(x: torch.Tensor) -> np.ndarray:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"eden needs a floating-point torch.Tensor, got {type(x).__name__}")
    flat: np.ndarray = flat_float32(x).numpy()
    return flat


# --------------------------------------------------------------------------- the compressor


@register_compressor
class EdenCompressor(BaseCompressor):
    """EDEN: randomized Hadamard rotations, a deterministic quantizer, an unbiasing scale.

    ``EdenCompressor()`` (blocks of up to 4096) or
    ``EdenCompressor(max_block_size=1024)``. ``levels`` picks a rung of the
    ladder in the module docstring: s = 1 sends 0.11 bits per entry, 7 half a
    bit, 15 one bit, 31 two, up to 8 bits.

    Notes
    -----
    ``decompress`` checks the encoding, levels and block size (the one
    :func:`block_size_for` gives for the model's size and the levels) from
    the header alone, then numel and the CRC, before it reads the body; every
    field is checked before the output is written.
    """

    name = "eden"
    options_type = EdenOptions
    takes_levels = True

    def __init__(
        self, max_block_size: int = DEFAULT_BLOCK_SIZE, *, options: EdenOptions | None = None
    ) -> None:
        super().__init__(options or EdenOptions(max_block_size))

    @property
    def max_block_size(self) -> int:
        return int(self.options.max_block_size)

    def block_size(self, numel: int, levels: int) -> int:
        """The block size of this compressor's messages of ``numel`` entries at ``levels``."""
        return block_size_for(numel, levels, self.max_block_size)

    def _compress(self, update: torch.Tensor, levels: int, *, generator: torch.Generator) -> bytes:
        block = self.block_size(update.numel(), levels)
        return eden_encode(update, levels, generator=generator, block_size=block)

    def _decompress(
        self, payload: bytes, *, numel: int, levels: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        message = decode_rotated(
            payload,
            expected_numel=numel,
            expected_levels=levels,
            expected_block_size=self.block_size(numel, levels),
        )
        return reconstruct(message, out)

    def _max_compressed_bytes(self, numel: int) -> int:
        """Every block raw, at the smallest blocks (the most scales) and the widest codes."""
        sizes = [1 << k for k in range(6, self.max_block_size.bit_length())]
        return max(
            frame_bytes(
                (numel, MAX_LEVELS, b, _max_body_bytes(numel, MAX_LEVELS, b)),
                num_buckets(numel, b),
            )
            for b in sizes
        )

    def _compressed_formula_bits(self, numel: int, levels: int) -> int:
        """Code bits, a 32-bit scale per block and the 64-bit seed."""
        block = self.block_size(numel, levels)
        return code_bits(numel, levels, block) + 32 * num_buckets(numel, block) + 8 * SEED_BYTES

    def variance_bound(self, numel: int, levels: int | None) -> float | None:
        """The rung's ``omega_max`` (+ ``2**-16``): every message's realized
        ``||C(x) - x||^2 / ||x||^2`` is at most this (the encoder enforces it)."""
        if levels is None:
            return 0.0
        return rung(levels).omega_max + FLOAT_SLACK
