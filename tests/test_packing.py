import pytest
import torch

from kvshrink.codecs.packing import pack, packed_size, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_exact_for_odd_lengths(bits):
    g = torch.Generator().manual_seed(bits)
    for n in list(range(1, 20)) + [31, 33, 63, 97]:
        codes = torch.randint(0, 1 << bits, (3, 2, n), generator=g, dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.shape == (3, 2, packed_size(n, bits))
        assert torch.equal(unpack(packed, bits, n), codes)


def test_all_code_values_survive():
    for bits in (2, 3, 4, 8):
        codes = torch.arange(1 << bits, dtype=torch.uint8).repeat(3)
        assert torch.equal(unpack(pack(codes, bits), bits, codes.numel()), codes)


def test_packed_sizes_waste_no_whole_byte():
    assert packed_size(32, 2) == 8
    assert packed_size(32, 3) == 12  # 8 codes per 3-byte word, no padding for a 32-code group
    assert packed_size(32, 4) == 16
    assert packed_size(32, 8) == 32
    for bits in (2, 3, 4, 8):
        for n in range(1, 70):
            assert packed_size(n, bits) * 8 - n * bits < 8 * bits  # less than one word wasted


def test_bad_bits_and_sizes_rejected():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="packed last dimension"):
        unpack(torch.zeros(3, dtype=torch.uint8), 2, 16)
