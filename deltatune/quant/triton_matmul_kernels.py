"""The fused NF4/FP4 dequantize-matmul kernel (launched by ``deltatune.quant.triton_matmul``, which says
what it computes). Imports triton: load it only through ``triton_matmul`` (``kernels.backend.load``)."""

import triton
import triton.language as tl


@triton.jit
def quant_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, out_ptr,
                        M, N, K, stride_xm, stride_xk, stride_om, tiles_per_split: tl.constexpr,
                        BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, PAIRED: tl.constexpr,
                        GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) rows of x and y
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) rows of W, columns of y
    mask_m = rm < M
    mask_n = rn < N
    row_start = rn.to(tl.int64) * K  # (BN,) flat index of each weight row's first element
    # GROUPED: K % BLOCKSIZE == 0 and the tile covers whole absmax blocks (or lies inside one),
    # so each weight row of the tile needs GROUPS scales instead of one per element.
    GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # constexpr trip count: Triton 3.6's interpreter cannot loop over run-time bounds
    for i in range(0, tiles_per_split):
        k0 = (pid_k * tiles_per_split + i) * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        mask_k = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
        if PAIRED:  # K even: a row starts on a byte, so load BK/2 bytes and split the nibbles
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # (BK/2,) byte column within the row
            byte = tl.load(packed_ptr + (row_start[:, None] // 2 + rb[None, :]),
                           mask=mask_n[:, None] & (rb[None, :] < K // 2), other=0).to(tl.int32)
            nibble = tl.reshape(tl.join(byte >> 4, byte & 15), (BLOCK_N, BLOCK_K))  # element order
        else:  # odd K: element by element (a row may start in the middle of a byte)
            idx = row_start[:, None] + rk[None, :]
            byte = tl.load(packed_ptr + idx // 2, mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.int32)
            nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble)  # (BN, BK) fp32 code values
        if GROUPED:
            rg = tl.arange(0, GROUPS)
            block = (row_start[:, None] + k0) // BLOCKSIZE + rg[None, :]  # (BN, GROUPS)
            smask = mask_n[:, None] & (k0 + rg[None, :] * BLOCKSIZE < K)
        else:
            block = (row_start[:, None] + rk[None, :]) // BLOCKSIZE  # (BN, BK)
            smask = mask_n[:, None] & mask_k[None, :]
        if NESTED:  # absmax = dynamic[code8] * nested_absmax[block // 256] + offset
            qabs = tl.load(absmax_ptr + block, mask=smask, other=0).to(tl.int32)
            scale = tl.load(code8_ptr + qabs) * tl.load(nested_ptr + block // 256, mask=smask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=smask, other=0.0)
        if GROUPED:
            w = tl.reshape(value, (BLOCK_N, GROUPS, BLOCK_K // GROUPS)) * scale[:, :, None]
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        else:
            w = value * scale
        w = w.to(x.dtype)  # the weight values dequantize(q, x.dtype) holds
        if UPCAST:  # the interpreter's dot reads bf16 operands as raw bits: multiply in fp32 there
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc += tl.dot(x, tl.trans(w))  # (BM, BK) @ (BK, BN), fp32 accumulation
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    omask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:  # out is the fp32 buffer the splits add into
        tl.atomic_add(out, acc, mask=omask)
