"""Top-k sparsification: which entries are kept, the sparse body's bytes, canonical decoding."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from adaquantfl.compression import TopKCompressor
from adaquantfl.compression.codec import CodecError, message_bytes
from adaquantfl.compression.container import frame_bytes
from adaquantfl.compression.topk import decode_sparse, encode_sparse, top_k_indices


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def recrc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def test_top_k_keeps_the_largest_magnitudes_ties_to_the_lower_index() -> None:
    v = np.array([0.5, -2.0, 1.0, -1.0, 1.0, 0.0, 3.0], dtype=np.float32)
    assert top_k_indices(v, 1).tolist() == [6]
    assert top_k_indices(v, 3).tolist() == [1, 2, 6]  # |1.0| at 2, 3, 4 tie: index 2 wins
    assert top_k_indices(v, 4).tolist() == [1, 2, 3, 6]
    assert top_k_indices(v, 7).tolist() == [0, 1, 2, 3, 4, 6]  # the zero is never sent


@pytest.mark.parametrize("d", [1, 7, 128, 1000, 50_000])
@pytest.mark.parametrize("fraction", [0.001, 0.1, 1.0])
def test_round_trip_is_the_dense_top_k(d: int, fraction: float) -> None:
    v = torch.randn(d, generator=gen(d))
    v[:: max(2, d // 10)] = 0.0
    c = TopKCompressor(fraction)
    payload = c.compress(v, 1, generator=gen())
    k = c.options.k(d)
    keep = torch.argsort(v.abs(), descending=True, stable=True)[:k]
    expected = torch.zeros(d)
    expected[keep] = v[keep]
    assert torch.equal(c.decompress(payload, numel=d, levels=1), expected)
    assert len(payload) <= c._max_compressed_bytes(d)


def test_sparse_message_bytes_hand_case() -> None:
    # d = 300, entries 0, 5 and 200: gaps 0, 4, 194 -> varints 00 | 04 | c2 01.
    v = torch.zeros(300)
    v[[0, 5, 200]] = torch.tensor([1.0, -2.0, 0.5])
    data = encode_sparse(v, np.array([0, 5, 200]))
    body = bytes([0x00, 0x04, 0xC2, 0x01]) + struct.pack("<3f", 1.0, -2.0, 0.5)
    header = b"AQ\x01\x03" + bytes([0xAC, 0x02, 0x03, 0x00, len(body)])
    assert data == header + body + struct.pack("<I", zlib.crc32(header + body))
    assert len(data) == frame_bytes((300, 3, 0, len(body)), 0)
    assert torch.equal(decode_sparse(data, expected_numel=300), v)


def _message(indices_varints: bytes, values: list[float], d: int = 300) -> bytes:
    body = indices_varints + struct.pack(f"<{len(values)}f", *values)
    k = len(values)
    header = b"AQ\x01\x03" + bytes([0xAC, 0x02, k, 0x00, len(body)])
    return recrc(header + body + b"\x00\x00\x00\x00")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_message(b"\x00\x84\x00", [1.0, 2.0]), "not minimally encoded"),  # 04 as 84 00
        (_message(b"\x00\x00", [1.0, 0.0]), "zero or not finite"),
        (_message(b"\x00\x00", [1.0, float("nan")]), "zero or not finite"),
        (_message(b"\xac\x02", [1.0]), "reaches 300"),
        (_message(b"\x00\x80\x80\x80\x80\x80\x01", [1.0, 2.0]), "longer than 5 bytes"),
    ],
)
def test_non_canonical_or_corrupt_sparse_bodies_are_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        decode_sparse(data, expected_numel=300)


def test_the_last_index_decodes() -> None:
    # Index 299 of 300 (varint ab 02): the boundary next to "reaches 300" above.
    assert decode_sparse(_message(b"\xab\x02", [1.0]), expected_numel=300)[299] == 1.0


def test_header_bounds_of_a_sparse_message() -> None:
    good = _message(b"\x00", [1.0])
    with pytest.raises(CodecError, match="message has numel 300; expected 10"):
        decode_sparse(good, expected_numel=10)
    too_many = recrc(good[:6] + bytes([0xAD, 0x02]) + good[7:])  # k = 301 > d = 300
    with pytest.raises(CodecError, match="sends 301 entries of a vector of 300"):
        decode_sparse(too_many, expected_numel=300)


def test_top_k_refuses_more_entries_than_k() -> None:
    v = torch.randn(100, generator=gen())
    payload = TopKCompressor(0.5).compress(v, 1, generator=gen())
    with pytest.raises(CodecError, match="sends 50 entries; k = 10"):
        TopKCompressor(0.1).decompress(payload, numel=100, levels=1)


def test_full_precision_is_raw_for_every_compressor() -> None:
    v = torch.randn(64, generator=gen())
    payload = TopKCompressor(0.1).compress(v, None, generator=gen())
    assert len(payload) == message_bytes(64, None)
    assert torch.equal(TopKCompressor(0.1).decompress(payload, numel=64, levels=None), v)
