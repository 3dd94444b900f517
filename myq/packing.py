"""Pack 2- and 4-bit integer codes into uint8 bytes, and unpack them back.

PyTorch has no int4 or int2 dtype, so sub-byte codes travel in uint8 bytes. The layout, fixed once here:

- Codes are packed along the last dimension (K). A byte contains `8 // bits` neighbouring codes.
- The first code of a byte goes into the lowest bits ("little end first").
- Signed codes are stored with an offset (offset binary): stored = code + 2^(bits-1), so a 4-bit code
  in [-8, 7] is stored as an unsigned nibble in [0, 15]. This is also how PyTorch's int4 kernels read
  their nibbles (they subtract 8).
- A K that is not a multiple of `8 // bits` is padded with code 0 at the end of each row; `unpack`
  takes the true K and drops the padding.

One byte worked by hand, bits=4, codes [-3, 5]:
    -3 + 8 = 5  = 0b0101  -> low nibble
     5 + 8 = 13 = 0b1101  -> high nibble
    byte = 0b1101_0101 = 0xD5 = 213
"""

import torch

PACKABLE_BITS = (2, 4)


def _check(bits):
    if isinstance(bits, bool) or bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits!r} cannot be packed; use one of {PACKABLE_BITS} (8-bit codes need no packing)")
    return 8 // bits


def packed_width(k, bits):
    """Return how many bytes hold K codes of `bits` bits: ceil(K / (8 // bits))."""
    per_byte = _check(bits)
    return -(-k // per_byte)


def pack(w_q, bits):
    """Pack signed int8 codes (..., K) of `bits` bits into uint8 (..., ceil(K * bits / 8))."""
    per_byte = _check(bits)
    if w_q.dtype != torch.int8:
        raise TypeError(f"pack expects int8 codes, got dtype {w_q.dtype}")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if w_q.numel() and (w_q.min() < qmin or w_q.max() > qmax):
        raise ValueError(
            f"codes in [{w_q.min().item()}, {w_q.max().item()}] do not fit {bits} bits; expected [{qmin}, {qmax}]")

    k = w_q.shape[-1]
    pad = packed_width(k, bits) * per_byte - k
    stored = (w_q.to(torch.int16) - qmin).to(torch.uint8)
    if pad:
        stored = torch.nn.functional.pad(stored, (0, pad), value=-qmin)  # code 0 stored with its offset
    stored = stored.reshape(*w_q.shape[:-1], -1, per_byte)  # (..., K) -> (..., K / per_byte, per_byte)

    w_packed = torch.zeros(stored.shape[:-1], dtype=torch.uint8, device=w_q.device)
    for slot in range(per_byte):
        w_packed |= stored[..., slot] << (slot * bits)
    return w_packed


def unpack(w_packed, bits, k):
    """Unpack uint8 bytes (..., ceil(K * bits / 8)) into signed int8 codes (..., K)."""
    per_byte = _check(bits)
    if w_packed.dtype != torch.uint8:
        raise TypeError(f"unpack expects uint8 bytes, got dtype {w_packed.dtype}")
    if w_packed.shape[-1] != packed_width(k, bits):
        raise ValueError(
            f"{w_packed.shape[-1]} bytes per row cannot hold K={k} codes of {bits} bits; "
            f"expected {packed_width(k, bits)} bytes")

    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=w_packed.device)
    stored = (w_packed.unsqueeze(-1) >> shifts) & mask  # (..., K / per_byte) -> (..., K / per_byte, per_byte)
    codes = stored.reshape(*w_packed.shape[:-1], -1)[..., :k]
    return (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
