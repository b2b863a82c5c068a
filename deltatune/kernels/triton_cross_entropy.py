"""Cross-entropy over a chunk of bf16 logits in Triton, writing the gradient over the logits in place.

For each row: ``loss = logsumexp(z) - z[label]`` (fp32 statistics, online over the vocabulary, Milakov &
Gimelshein 2018, arXiv:1805.02867), then ``dz = (softmax(z) - onehot(label)) * scale`` stored over ``z``.
Rows whose label is ``ignore_index`` get loss 0 and a zero gradient. ``scale`` is read from a device
scalar (1 / number of counted tokens) so that no host synchronisation is needed. Two reads and one write
of the chunk; the caller multiplies the gradient into the head weight and drops the chunk, so the full
(N, V) logits never exist (Liger-Kernel's fused linear cross-entropy works the same way).
Imports triton: load through ``deltatune.kernels`` (lazily).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_rows(Z, stride, LABELS, LOSS, SCALE, n_cols: tl.constexpr, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride
    label = tl.load(LABELS + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        z = tl.load(z_row + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    ignored = label == ignore_index
    z_label = tl.load(z_row + tl.where(ignored, 0, label)).to(tl.float32)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - z_label))
    scale = tl.where(ignored, 0.0, tl.load(SCALE))
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        z = tl.load(z_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse) - tl.where(start + cols == label, 1.0, 0.0)
        tl.store(z_row + start + cols, (p * scale).to(Z.dtype.element_ty), mask=mask)


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int):
    """Per-row losses (C,) fp32 of ``logits`` (C, V); overwrites ``logits`` with ``scale * dloss/dlogits``.

    ``scale`` is a one-element fp32 device tensor.
    """
    c, v = logits.shape
    assert logits.stride(1) == 1
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    _ce_rows[(c,)](logits, logits.stride(0), labels, loss, scale, v, ignore_index, BLOCK=4096, num_warps=8)
    return loss
