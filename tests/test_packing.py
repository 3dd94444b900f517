import itertools

import pytest
import torch

from myq.packing import pack, packed_width, unpack


def test_worked_byte_from_docstring():
    assert pack(torch.tensor([-3, 5], dtype=torch.int8), 4).tolist() == [0xD5]


@pytest.mark.parametrize("bits", [2, 4])
def test_every_code_combination_round_trips(bits):
    codes = range(-(2 ** (bits - 1)), 2 ** (bits - 1))
    per_byte = 8 // bits
    combos = torch.tensor(list(itertools.product(codes, repeat=per_byte)), dtype=torch.int8)  # (16 or 256, per_byte)
    packed = pack(combos, bits)
    assert packed.shape == (len(combos), 1)
    assert torch.equal(unpack(packed, bits, per_byte), combos)
    assert len(set(packed.flatten().tolist())) == len(combos)  # distinct codes give distinct bytes


def test_nibbles_decode_independently():
    # Every low nibble with every high nibble: the decoded low code never depends on the high one.
    for low in range(-8, 8):
        for high in range(-8, 8):
            byte = pack(torch.tensor([low, high], dtype=torch.int8), 4)
            assert byte.item() == (low + 8) | ((high + 8) << 4)
            assert unpack(byte, 4, 2).tolist() == [low, high]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (2, 3, 9), (64, 128), (5, 1027)])
def test_round_trip_any_shape(bits, shape):
    torch.manual_seed(0)
    w_q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, dtype=torch.int8)
    packed = pack(w_q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_width(shape[-1], bits))
    assert torch.equal(unpack(packed, bits, shape[-1]), w_q)


def test_codes_that_do_not_fit_are_rejected():
    with pytest.raises(ValueError, match=r"codes in \[-8, 8\] do not fit 4 bits; expected \[-8, 7\]"):
        pack(torch.tensor([-8, 8], dtype=torch.int8), 4)


def test_unpack_rejects_wrong_width():
    with pytest.raises(ValueError, match="expected 3 bytes"):
        unpack(torch.zeros(2, 4, dtype=torch.uint8), 4, 5)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_unpackable_bits_rejected(bits):
    with pytest.raises(ValueError, match=r"use one of \(2, 4\)"):
        pack(torch.zeros(4, dtype=torch.int8), bits)


@pytest.mark.parametrize("bits,codes,expected", [
    (4, [-3], [0x85]),                  # padding code 0 is stored as 8 in the high nibble
    (4, [1, 2, 3], [0xA9, 0x8B]),
    (2, [-2, 1, 0, -1, 1], [0x6C, 0xAB]),  # 0b01_10_11_00, then 3 padding slots of stored 2
])
def test_odd_width_pads_with_code_zero(bits, codes, expected):
    packed = pack(torch.tensor(codes, dtype=torch.int8), bits)
    assert packed.tolist() == expected
    assert unpack(packed, bits, len(codes)).tolist() == codes
