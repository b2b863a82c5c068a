"""How the fused LoRA nodes (``kernels/lora.py``) carry their projections through autograd.

``torch.autograd.Function.apply`` takes a flat list of tensors: ``flatten`` turns projections
``[(W, bias, [(A, B, scale), ...]), ...]`` into a hashable spec plus that list (a quantized W rides in
the spec: frozen, and cheaper to dequantize again than to save dense), ``unflatten`` inverts it, and
``needs_grads``/``grad_list`` map ``needs_input_grad`` and the gradients between the two forms.
``factor_groups`` casts every adapter factor of a node into one buffer in the compute dtype.
"""

from __future__ import annotations

import math

import torch

from deltatune.kernels.functional import cast_into

__all__ = ["factor_groups", "factors", "flatten", "grad_list", "needs_grads", "split_low_rank", "unflatten"]


def flatten(projections):
    """Projections ``[(W, bias, [(A, B, scale), ...]), ...]`` -> (spec, flat tensor list).

    A quantized W (anything with ``.dequantize(dtype)``) rides in the spec instead of the tensor list:
    it is frozen, and dequantizing it again in backward costs less memory than saving it dense.
    """
    spec, tensors = [], []
    for weight, bias, adapters in projections:
        packed = None if isinstance(weight, torch.Tensor) else weight
        spec.append((bias is not None, tuple(float(s) for _, _, s in adapters), packed))
        if packed is None:
            tensors.append(weight)
        if bias is not None:
            tensors.append(bias)
        tensors += [a for a, _, _ in adapters] + [b for _, b, _ in adapters]
    return tuple(spec), tensors


def unflatten(spec, tensors):
    """Inverse of ``flatten``: per projection (W, bias, [A...], [B...], scales), and each one's offsets."""
    out, i = [], 0
    for has_bias, scales, packed in spec:
        if packed is None:
            weight, i = tensors[i], i + 1
        else:
            weight = packed
        bias = tensors[i] if has_bias else None
        i += 1 if has_bias else 0
        k = len(scales)
        out.append((weight, bias, list(tensors[i:i + k]), list(tensors[i + k:i + 2 * k]), scales))
        i += 2 * k
    return out


def needs_grads(ctx, spec, offset):
    """Per projection (bias, [A], [B]) needs-grad flags from ``ctx.needs_input_grad`` starting at ``offset``."""
    flags, i = [], offset
    for has_bias, scales, packed in spec:
        i += 1 if packed is None else 0  # W (frozen; never differentiated here)
        nb = has_bias and ctx.needs_input_grad[i]
        i += 1 if has_bias else 0
        k = len(scales)
        flags.append((nb, list(ctx.needs_input_grad[i:i + k]), list(ctx.needs_input_grad[i + k:i + 2 * k])))
        i += 2 * k
    return flags


def grad_list(spec, grads):
    """Flatten per-projection grads back into the order of ``flatten``'s tensors (None for W)."""
    out = []
    for (has_bias, _, packed), (dbias, d_as, d_bs) in zip(spec, grads):
        if packed is None:
            out.append(None)
        if has_bias:
            out.append(dbias)
        out += d_as + d_bs
    return out


def split_low_rank(h, sbs):
    """Per projection ``(h_p (N, r_p) view of h, sB_p)``, or None where a projection has no adapter."""
    out, off = [], 0
    for sb in sbs:
        if sb is None:
            out.append(None)
            continue
        out.append((h[:, off:off + sb.shape[1]], sb))
        off += sb.shape[1]
    return out


def factors(projs, dtype):
    """A_cat (R, in) in ``dtype`` and per projection ``(s B)`` (out, r_p) in ``dtype`` (None if no adapter)."""
    return factor_groups([projs], dtype)[0]


def factor_groups(groups, dtype):
    """``factors`` of several groups of projections, cast together.

    Built on every call (r x (in + out) elements per adapter): a cache keyed on the tensors' versions would
    miss writes through ``.data``, which don't bump it. Every A and scaled B lands in one new buffer in
    ``dtype`` (each rounded once from its fp32 product), in one launch on CUDA (``cast_into``); A_cat and
    each ``s B`` are views of it. Several adapters on one projection (rare) are concatenated on the side.
    """
    srcs, offsets, scales, plan, total = [], [], [], [], 0

    def slot(shape):  # an element offset in the buffer, 16-byte aligned, and the view's shape
        nonlocal total
        start, total = total, total + -(-math.prod(shape) // 8) * 8
        return start, shape

    for projs in groups:
        a_all = [a for _, _, As, _, _ in projs for a in As]
        a_slot = None
        if a_all:
            a_slot = slot((sum(a.shape[0] for a in a_all), a_all[0].shape[1]))  # rows of A_cat
            o = a_slot[0]
            for a in a_all:
                srcs.append(a), offsets.append(o), scales.append(1.0)
                o += a.numel()
        sbs = []
        for _, _, _, Bs, ss in projs:
            if len(Bs) == 1:
                sbs.append(slot(tuple(Bs[0].shape)))
                srcs.append(Bs[0]), offsets.append(sbs[-1][0]), scales.append(ss[0])
            else:
                sbs.append(torch.cat([b * s for b, s in zip(Bs, ss)], 1).to(dtype) if Bs else None)
        plan.append((a_slot, sbs))
    flat = cast_into(srcs[0].new_empty(total, dtype=dtype), [t.contiguous() for t in srcs], offsets, scales) \
        if srcs else None

    def view(sl):
        return sl if sl is None or isinstance(sl, torch.Tensor) else flat[sl[0]:sl[0] + math.prod(sl[1])].view(sl[1])

    return [(view(a_slot), [view(sb) for sb in sbs]) for a_slot, sbs in plan]
