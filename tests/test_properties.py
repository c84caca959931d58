"""Property-based tests of pack/unpack (codecs/packing.py): random shapes and codes at every width.

The layout is checked against a bit-by-bit reference written here: for every packable width, code i of a row sits
at bits i*bits .. i*bits+bits-1 of the row's bytes read as one little-endian bit stream (8/bits codes per byte for
widths dividing 8, 8 codes per `bits`-byte word otherwise: the same stream), and the bits past the last code are 0.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.codecs.packing import PACKABLE_BITS, pack, packed_size, unpack

LEAD = st.lists(st.integers(1, 3), min_size=0, max_size=3)


@st.composite
def codes_of(draw) -> tuple[torch.Tensor, int]:
    """(codes with a random leading shape and last dimension 1-130, their width)."""
    bits = draw(st.sampled_from(PACKABLE_BITS))
    shape = (*draw(LEAD), draw(st.integers(1, 130)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8), bits


def expected_size(n: int, bits: int) -> int:
    """Bytes of n codes: the whole bytes their bits fill when 8 is a multiple of the width, else whole 8-code words."""
    return -(-n * bits // 8) if 8 % bits == 0 else -(-n // 8) * bits


def reference_pack_row(row: list[int], bits: int) -> list[int]:
    """One row packed bit by bit into a little-endian stream, padded with zero bits to `expected_size` bytes."""
    out = [0] * expected_size(len(row), bits)
    for i, code in enumerate(row):
        for b in range(bits):
            if code >> b & 1:
                pos = i * bits + b
                out[pos // 8] |= 1 << (pos % 8)
    return out


@settings(max_examples=150, deadline=None)
@given(codes_of())
def test_round_trip_any_shape_any_width(case):
    codes, bits = case
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*codes.shape[:-1], packed_size(codes.shape[-1], bits))
    assert torch.equal(unpack(packed, bits, codes.shape[-1]), codes)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 5000), st.sampled_from(PACKABLE_BITS))
def test_packed_size_is_whole_bytes_or_words_and_wastes_under_a_word(n, bits):
    size = packed_size(n, bits)
    assert size == expected_size(n, bits)
    assert size * 8 >= n * bits  # every bit of every code fits
    word_bits = 8 if 8 % bits == 0 else 8 * bits
    assert size * 8 - n * bits < word_bits  # less than one byte (or one 8-code word) is padding


@settings(max_examples=100, deadline=None)
@given(codes_of())
def test_layout_is_the_little_endian_bit_stream(case):
    codes, bits = case
    packed = pack(codes, bits).reshape(-1, packed_size(codes.shape[-1], bits))
    for got, row in zip(packed.tolist(), codes.reshape(-1, codes.shape[-1]).tolist()):
        assert got == reference_pack_row(row, bits)


@settings(max_examples=60, deadline=None)
@given(codes_of(), st.integers(1, 129))
def test_unpack_of_a_prefix_length_is_the_prefix(case, k):
    """Unpacking fewer codes than were packed is refused unless the byte count matches, and then gives the prefix."""
    codes, bits = case
    n = codes.shape[-1]
    k = min(k, n)
    if packed_size(k, bits) == packed_size(n, bits):
        assert torch.equal(unpack(pack(codes, bits), bits, k), codes[..., :k])
    else:
        try:
            unpack(pack(codes, bits), bits, k)
        except ValueError as e:
            assert "packed last dimension" in str(e)
        else:
            raise AssertionError(f"unpack accepted {packed_size(n, bits)} bytes for {k} codes of {bits} bits")
