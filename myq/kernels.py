"""PyTorch's weight-only CPU kernels for int8 and int4 weights: availability checks and thin wrappers.

Decoding one token reads every weight once for two operations per weight, so its speed is set by
memory traffic. These kernels read the integer codes and never write a float copy of the weight:
    int8   torch.ops.aten._weight_int8pack_mm(x (M, K), w_q int8 (N, K), scale (N,)) -> (M, N)
    int4   torch.ops.aten._weight_int4pack_mm_for_cpu(x (M, K), w_int4pack, S, scales_and_zeros (G, N, 2))
           computes w = (q - 8) * scale + zero for the unsigned nibble q, read from a layout of its own.
The module also unpacks codes for the many-row route (prefill), which dequantizes once per call.
Shapes: N = out_features, K = in_features, S = group_size, G = K / S groups, M = rows of the input (B * T).

The limits checked here come from experiments with torch 2.14.1 on x86 with AVX512 and from the
kernels' source. On x86 only the bfloat16 variants are vectorized. The int8 kernel needs K to be a
multiple of 16 and 32-byte aligned rows: a misaligned row crashes the process instead of raising.
The int4 kernel takes group sizes 32, 64, 128 and 256, and N a multiple of its layout's block of rows.
Left out: GPU kernels (GPUs dequantize and call F.linear) and quantized activations.
"""

import functools
import sys

import torch
import torch.nn.functional as F

aten = torch.ops.aten

# Module-level switches: tests monkeypatch them to False to simulate a torch build without the kernel.
HAS_INT8_KERNEL = hasattr(aten, "_weight_int8pack_mm")
HAS_INT4_KERNEL = hasattr(aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(aten, "_weight_int4pack_mm_for_cpu")

# Inputs with more rows than this (prefill, batches) dequantize once and call F.linear instead. The
# kernels redo their dequantization for every block of 4 rows, so their time grows with the rows.
# Measured on 1024 x 4096 and 4096 x 1024 bf16 layers (two threads of an AMD EPYC with AVX512), the
# int8 kernel stopped paying off at about 32 rows and the int4 kernel at about 96. The limits leave
# some margin.
MAX_KERNEL_ROWS = {"int8": 16, "int4": 64}

# On x86 only the bfloat16 variants are vectorized; float32 and float16 run a scalar loop slower than
# dequantize + F.linear.
KERNEL_DTYPES = (torch.bfloat16,)

# The group sizes _weight_int4pack_mm_for_cpu accepts, largest first.
INT4_GROUP_SIZES = (256, 128, 64, 32)
INT4_OFFSET = 8
INT8_K_MULTIPLE = 16
ALIGNMENT_BYTES = 64


def rows_of(x):
    """Return the number of rows M of `x` viewed as (M, K)."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def kernel_may_run(x, kernel):
    """Return whether input `x` suits CPU `kernel` ("int8" or "int4"): CPU, a kernel dtype, few rows, no autograd."""
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False  # the kernels have no backward
    return 0 < rows_of(x) <= MAX_KERNEL_ROWS[kernel]


def is_aligned(tensor, alignment=ALIGNMENT_BYTES):
    """Return whether `tensor`'s first element sits at an address that is a multiple of `alignment`."""
    return tensor.data_ptr() % alignment == 0


def as_aligned_rows(x):
    """Return `x` as a contiguous, 64-byte aligned (M, K) tensor, copying only when needed."""
    x2d = x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous() or not is_aligned(x2d):
        # The int8 kernel reads rows with aligned vector loads, so a misaligned view would crash it.
        # PyTorch's CPU allocator returns 64-byte aligned memory, so a fresh copy is aligned.
        x2d = x2d.clone(memory_format=torch.contiguous_format)
    return x2d


def int8_kernel_fits(w_q):
    """Return whether `_weight_int8pack_mm` can use the int8 weight `w_q` (N, K) as stored."""
    k = w_q.shape[-1]
    return (HAS_INT8_KERNEL and w_q.device.type == "cpu" and w_q.dtype == torch.int8 and w_q.is_contiguous()
            and k % INT8_K_MULTIPLE == 0 and is_aligned(w_q))


def int8_matmul(x, w_q, scale):
    """Return x @ (w_q * scale[:, None])^T for int8 codes `w_q` (N, K) and per-channel `scale` (N,)."""
    if scale.dtype != x.dtype:
        scale = scale.to(x.dtype)
    y = aten._weight_int8pack_mm(as_aligned_rows(x), w_q, scale)
    return y.view(*x.shape[:-1], w_q.shape[0])


@functools.cache  # called on every int4 kernel call, with a handful of distinct arguments
def int4_kernel_group_size(k, group_size):
    """Return the group size to run the int4 kernel with, or None when no accepted size fits.

    A layer's group of S codes (S = K per-channel) is split into kernel groups of the largest accepted
    size that divides S, each repeating the layer's scale, so per-channel and S = 512 layers run too.
    """
    span = k if group_size is None else group_size
    return next((size for size in INT4_GROUP_SIZES if span % size == 0), None)


def int4_kernel_fits(n, k, group_size, device):
    """Return whether `_weight_int4pack_mm_for_cpu` can run a 4-bit (N, K) weight of `group_size` on `device`."""
    if not HAS_INT4_KERNEL or torch.device(device).type != "cpu":
        return False
    block = int4_layout_block()
    return block is not None and n % block == 0 and int4_kernel_group_size(k, group_size) is not None


def to_int4pack(w_q):
    """Return signed 4-bit codes `w_q` int8 (N, K) in PyTorch's CPU int4 layout, uint8 (N, K / 2)."""
    nibbles = w_q.to(torch.int32) + INT4_OFFSET  # the kernel reads unsigned nibbles q = code + 8
    return aten._convert_weight_to_int4pack_for_cpu(nibbles, 2)  # inner_k_tiles has no effect on CPU


def from_int4pack(w_packed, n, k, block=None):
    """Return the signed int8 codes (N, K) stored in PyTorch's CPU int4 layout `w_packed` (N, K / 2).

    For each block of `block` output rows and each k, the layout holds block / 2 bytes: byte i has
    row i's nibble in its low 4 bits and row i + block / 2's in its high 4 bits.
    """
    nibbles = int4pack_offset_codes_t(w_packed, n, k, block).t()  # (K, N) -> (N, K)
    return (nibbles.to(torch.int8) - INT4_OFFSET).contiguous()


@functools.cache
def int4_layout_block():
    """Return the rows per block of this machine's CPU int4 layout (64 with AVX512, 32 with AVX2), or None.

    PyTorch picks the layout by CPU capability at run time, so it is found by converting a probe weight
    and reading it back. A probe matmul then checks that the kernel computes (q - 8) * scale + zero.
    None (no block size reads back, or the kernel disagrees) means the int4 kernel is not used.
    """
    generator = torch.Generator().manual_seed(0)
    k = INT4_GROUP_SIZES[-1]
    for block in (64, 32):
        w_q = torch.randint(-8, 8, (block, k), dtype=torch.int8, generator=generator)
        try:
            w_packed = to_int4pack(w_q)
        except RuntimeError:
            return None
        if torch.equal(from_int4pack(w_packed, block, k, block), w_q):
            return block if _int4_probe_matches(w_q, w_packed) else None
    return None


def _int4_probe_matches(w_q, w_packed):
    n, k = w_q.shape
    scale = torch.full((n,), 0.5, dtype=torch.bfloat16)
    zero_point = torch.ones(n, dtype=torch.int8)
    # The identity as input returns W^T itself: (code - 1) * 0.5 is exact in bfloat16, so equality is exact.
    x = torch.eye(k, dtype=torch.bfloat16)
    try:
        y = int4_matmul(x, w_packed, n, k, None, scale, zero_point)
    except RuntimeError:
        return False
    return torch.equal(y.float(), ((w_q.float() - 1) * 0.5).T)


def scales_and_zeros(scale, zero_point, k, group_size, dtype):
    """Return the int4 kernel's (G', N, 2) table: each kernel group's scale and its zero, -zero_point * scale.

    G' = K / kernel group size; per-channel and large groups repeat their scale over G' / G kernel groups.
    Built on every call, because storing it would add a second copy of the scales to the layer.
    """
    return _table(scale, zero_point, k // int4_kernel_group_size(k, group_size), dtype)


def _table(scale, zero_point, kernel_groups, dtype):
    n = scale.shape[0]
    scale_t = _repeat_groups(scale.reshape(n, -1).t(), kernel_groups)  # (N,) or (N, G) -> (G', N)
    if scale_t.dtype != dtype:
        scale_t = scale_t.to(dtype)
    zero = None
    if zero_point is not None:
        zero_point_t = _repeat_groups(zero_point.reshape(n, -1).t(), kernel_groups)
        zero = torch.mul(zero_point_t, scale_t).neg_()  # rounded once to `dtype`, as the kernel reads it
    return interleave_pairs(scale_t, zero)


def interleave_pairs(first, second=None):
    """Return (..., 2) pairs (first, second) of two same-shaped 16-bit float tensors; second=None means zeros.

    torch.stack along a new last dimension copies one element at a time: in a profile of W4 opt-350m
    decoding, the table took about a fifth of the CPU time. Here each pair is one int32 word: the first
    value's bits in the low half, the second's in the high half, which is their order in memory on a
    little-endian machine. Other dtypes and byte orders take torch.stack.
    """
    if first.element_size() != 2 or sys.byteorder != "little":
        second = torch.zeros_like(first) if second is None else second
        return torch.stack((first, second), dim=-1)
    words = first.contiguous().view(torch.int16).to(torch.int32)
    words &= 0xFFFF  # undo the sign extension of bit patterns with the top bit set
    if second is not None:
        words |= second.contiguous().view(torch.int16).to(torch.int32) << 16
    return words.view(first.dtype).view(*first.shape, 2)


def _repeat_groups(per_group, kernel_groups):
    """Return (G, N) values as (G', N), each row repeated G' / G times; an expanded view when G = 1."""
    if per_group.shape[0] == kernel_groups:
        return per_group
    if per_group.shape[0] == 1:
        return per_group.expand(kernel_groups, -1)
    return per_group.repeat_interleave(kernel_groups // per_group.shape[0], dim=0)


def int4_matmul(x, w_packed, n, k, group_size, scale, zero_point=None):
    """Return x @ W^T for 4-bit codes in PyTorch's CPU int4 layout `w_packed` with their scales."""
    kernel_group_size = int4_kernel_group_size(k, group_size)
    table = _table(scale, zero_point, k // kernel_group_size, x.dtype)
    y = aten._weight_int4pack_mm_for_cpu(x.reshape(-1, k).contiguous(), w_packed, kernel_group_size, table)
    return y.view(*x.shape[:-1], n)


def bit_planes(w_packed, bits):
    """Return the 8 // bits fields of every byte of `w_packed`, lowest first, each uint8 of its shape.

    Masks and shifts run on int32 words (four bytes at a time, one mask for all four), because PyTorch
    vectorizes those better than the same operations on uint8 elements. Rows that do not split into
    int32 words take the uint8 operations.
    """
    mask = (1 << bits) - 1
    if w_packed.shape[-1] % 4 or w_packed.storage_offset() % 4 or not w_packed.is_contiguous():
        return [(w_packed >> shift) & mask for shift in range(0, 8, bits)]
    words = w_packed.view(torch.int32)
    word_mask = mask * 0x01010101  # the field's mask in each of the four bytes
    return [((words >> shift) & word_mask).view(torch.uint8) for shift in range(0, 8, bits)]


def unpacked_offset_codes(w_packed, bits, k):
    """Return the stored (offset) codes, code + 2^(bits - 1), of plain packed bytes: uint8 (N, K).

    Each byte is widened to a word of 8 // bits bytes, and in-place integer operations shift its fields
    into those bytes. Read as bytes, the words are then the codes in order (little-endian).
    This is several times faster than interleaving masked copies of the bytes.
    """
    per_byte = 8 // bits
    if sys.byteorder != "little":
        fields = torch.stack(bit_planes(w_packed, bits), dim=-1)  # (N, K / per_byte, per_byte)
        return fields.reshape(w_packed.shape[0], -1)[:, :k]
    words = w_packed.to(torch.int16 if per_byte == 2 else torch.int32)
    shift = 8 - bits  # moves field j + 1 from bit bits * (j + 1) to bit 8 * (j + 1)
    for _ in range(per_byte.bit_length() - 1):  # one step for 2 fields, two (shifts 6, 12) for 4
        words |= words << shift
        shift *= 2
    words &= ((1 << bits) - 1) * int.from_bytes(b"\x01" * per_byte, "little")  # the field's bits in each byte
    return words.view(torch.uint8).reshape(w_packed.shape[0], -1)[:, :k]


def int4pack_offset_codes_t(w_packed, n, k, block=None):
    """Return the nibbles q = code + 8 of PyTorch's CPU int4 layout, transposed: uint8 (K, N) in row order.

    The transpose is the cheap direction for this layout: it moves runs of block / 2 contiguous bytes,
    while (N, K) would need a transpose of single nibbles within every block.
    """
    block = block or int4_layout_block()
    blocked = w_packed.reshape(n // block, k, block // 2).transpose(0, 1).contiguous()  # -> (K, N / block, block / 2)
    low, high = bit_planes(blocked, 4)  # rows i and i + block / 2 of each block
    return torch.stack((low, high), dim=2).view(k, n)  # (K, N / block, 2, block / 2) -> (K, N)
