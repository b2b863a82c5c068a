"""LoRA linear layers as custom autograd functions: bf16 compute, fp32 master adapters, minimal saves.

A *projection* is ``y = x @ W.T + b + sum_k s_k * (x @ A_k.T) @ B_k.T`` with a frozen base ``W`` (out, in)
and adapters ``A_k`` (r_k, in), ``B_k`` (out, r_k) kept in fp32 (what the optimizer updates). Several
adapters on one layer are one adapter of the concatenated rank: ``[s_1 B_1 | s_2 B_2] @ [A_1; A_2]``.

``lora_group`` runs projections that share one input (q/k/v, gate/up) in one autograd node:

* forward: ``h = x @ A_cat.T`` once for every adapter of every projection (N, R); ``y = h_p @ (s B_p).T``,
  then ``y += x @ W.T`` by the base matmul itself (beta = 1; the scale is folded into the small (out, r)
  factor). A and B are cast to the activation dtype here (r x in elements; negligible), so no
  activation is ever cast to fp32.
* saved: x (shared with whatever else saved it: no copy; dropout is not applied on this path, so there is
  no dropped-input copy), h (N, R) and the bf16 factors. The frozen base weights get no gradient. When
  the caller passes ``norm=(x_pre, weight, eps)`` (x is ``rms_norm(x_pre)``: the attention's and the MLP's
  input in a Llama block), the node saves the norm's input instead, which the norm node keeps anyway,
  and recomputes x in backward: 2 bytes a hidden unit a token less per norm (about 2 GiB on an 8B
  model at 2x2048 tokens).
* backward: ``g_p = dy_p @ (s B_p)`` (N, r), ``dx = g @ A_cat + sum_p dy_p @ W_p`` accumulated in place
  (no separate per-projection dx tensors summed by autograd), ``dA = g.T @ x``, ``dB_k = s_k dy.T @ h_k``.

``lora_mlp`` is the gated MLP ``down(silu(gate(x)) * up(x))`` in one node. The gate/up base matmuls
write only ``x W^T``; the SwiGLU kernel adds the two adapters' low-rank terms tile by tile (forward, and
again when the backward recomputes the SwiGLU output), and the backward kernel adds the down adapter's
part of the SwiGLU gradient the same way, so no (N, intermediate) low-rank term is ever written and
read back (``kernels/triton_swiglu.py``). The same backward kernel sums ``dB_g``, ``dB_u`` and ``dA_d``
over the rows, so the SwiGLU output is never written in backward. It saves x, the base gate/up
outputs and the small ``h`` factors. With quantized weights, gate and up are dequantized into one
stacked weight (one matmul each way) whose spare columns carry ``diag(s B_g, s B_u)`` in backward, so
``[dg | du] @ stacked`` gives the adapters' ``g`` together with dx.

A projection may carry a fourth element, an output scale ``f`` (out,) (DoRA's): ``y = f ⊙ (x W^T + s h
B^T) + b``. The nodes run it without its bias and ``kernels/output_scale.py`` scales their outputs; a
gated MLP with scales is three nodes (gate/up, the scaled SwiGLU, down) instead of one.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

from deltatune.kernels.functional import rms_norm_values, swiglu_lora_backward, swiglu_lora_forward
from deltatune.kernels.lora_pack import (factor_groups, factors, flatten, grad_list, needs_grads, split_low_rank,
                                        unflatten)
from deltatune.kernels.output_scale import ScaledSwiGLU, ScaleOutput, split_output_scales

__all__ = ["lora_group", "lora_mlp", "recomputing"]


# Set while a checkpointed decoder layer is recomputed for its backward (``deltatune.fast``), through the
# ``recomputing`` context: a context variable, not a flag, so it is scoped to that call and its thread.
#
# Its value, ``skip_mlp_output``: nothing reads the MLP's output (only the residual add after it, whose
# backward needs no values), so ``lora_mlp`` skips the down projection's base matmul and returns
# uninitialised memory of the right shape: about a quarter of a Llama layer's weights, a sixth of a
# checkpointed step's matmuls. Set at all: the backward of this layer follows at once, so a quantized base
# weight dequantized for the recomputation is kept for it instead of dequantized a third time (one
# layer's dense weights live for that layer's backward only).
_RECOMPUTING: contextvars.ContextVar[bool | None] = contextvars.ContextVar("deltatune_recomputing", default=None)


@contextlib.contextmanager
def recomputing(skip_mlp_output: bool):
    """Context of a checkpointed layer's recomputation (see ``_RECOMPUTING``)."""
    token = _RECOMPUTING.set(bool(skip_mlp_output))
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def _dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """W as a dense tensor in ``dtype``: a cast, or a dequantization for a quantized weight."""
    return weight.to(dtype) if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)


def _stacked(weights, dtype: torch.dtype, extra_cols: int = 0) -> torch.Tensor | None:
    """``[W_1; W_2; ...]`` (sum of outs, in + extra_cols) in ``dtype`` for quantized weights, dequantized
    straight into the left columns of one buffer (so projections sharing an input run as one matmul;
    the extra columns are the caller's, uninitialised); None for plain tensors (stacking those would
    copy them) or differing input sizes."""
    if any(isinstance(w, torch.Tensor) for w in weights) or len({w.shape[1] for w in weights}) != 1:
        return None
    cols = weights[0].shape[1]
    out = torch.empty((sum(w.shape[0] for w in weights), cols + extra_cols), dtype=dtype,
                      device=weights[0].packed.device)
    o = 0
    for w in weights:
        w.dequantize(dtype, out=out[o:o + w.shape[0], :cols])
        o += w.shape[0]
    return out


def _adjacent(ts, dim: int) -> torch.Tensor | None:
    """The 2-D tensor of which ``ts`` (2-D, unit column stride) are adjacent blocks along ``dim`` (0: row
    blocks, 1: column blocks) in order, as a view of their shared memory; None if they are not (or while
    compiling: traced tensors have no addresses)."""
    if not ts or any(t is None for t in ts) or torch.compiler.is_compiling():
        return None
    first = ts[0]
    size = (sum(t.shape[0] for t in ts), first.shape[1]) if dim == 0 else (first.shape[0], sum(t.shape[1] for t in ts))
    if first.stride(1) != 1 or first.stride(0) < (size[1] if dim == 1 else first.shape[1]):
        return None
    step, ptr, storage = first.element_size(), first.data_ptr(), first.untyped_storage().data_ptr()
    for t in ts:
        if (t.dim() != 2 or t.dtype != first.dtype or t.stride() != first.stride()
                or t.shape[1 - dim] != first.shape[1 - dim] or t.data_ptr() != ptr
                or t.untyped_storage().data_ptr() != storage):
            return None
        ptr += step * (t.shape[0] * first.stride(0) if dim == 0 else t.shape[1])
    return first.as_strided(size, first.stride())


def _autocast_input(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """x cast as autocast would cast a linear layer's input, and its device type.

    The fused nodes then run with autocast off and every dtype explicit (all matmuls in x's dtype):
    autocast would otherwise turn some products bf16 and leave the in-place accumulations fp32.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(device))
    return x, device


def _save_input(ctx, x, x2, norm):
    """What to save for the shared input x2 (N, in): ``[x2]``, or, where x is ``rms_norm(x_pre, weight, eps)``
    and the caller says so (``norm = (x_pre, weight, eps)``), ``[x_pre (N, in), weight]`` (saved by the
    norm node anyway) and ``ctx.norm_eps``: the backward recomputes x from them."""
    ctx.norm_eps = None
    if norm is None or norm[0].shape != x.shape:
        return [x2]
    x_pre, weight, ctx.norm_eps = norm
    return [x_pre.reshape(x2.shape), weight]


def _load_input(ctx, saved):
    """Inverse of ``_save_input``: (x2, the rest of ``saved``), recomputing the norm's output if needed."""
    if ctx.norm_eps is None:
        return saved[0], saved[1:]
    return rms_norm_values(saved[0], saved[1], ctx.norm_eps), saved[2:]


def _group_forward(x2, projs, a_cat, sbs):
    """Outputs (N, out_p) of projections sharing the input rows x2 (N, in), h = x2 @ A_cat.T, the dense
    weights, and the block-diagonal factor ``diag(s B_p)`` where the weights were stacked (else None).

    The low-rank term is written first and the base matmul accumulates onto it (beta = 1): the big
    matmul is compute-bound, so reading C in its epilogue is nearly free, where adding the low-rank
    term afterwards would cost a separate read and write of y (N, out). Quantized weights of several
    projections are dequantized into one stacked weight and run as one matmul.
    """
    h = x2 @ a_cat.T if a_cat is not None else None  # (N, R)
    stacked = _stacked([w for w, *_ in projs], x2.dtype) if len(projs) > 1 and all(
        b is None for _, b, *_ in projs) else None
    if stacked is not None:  # quantized q/k/v: one matmul against [W_q; W_k; W_v], better tiled than three
        outs = [w.shape[0] for w, *_ in projs]  # (k and v alone fill about one wave of an H100)
        s_cat = None
        if h is None:
            y = x2 @ stacked.T
        else:  # all low-rank terms first, through the block-diagonal (sum out, R) factor, then the base matmul
            s_cat = torch.block_diag(*[sb if sb is not None else x2.new_zeros((o, 0)) for sb, o in zip(sbs, outs)])
            y = (h @ s_cat.T).addmm_(x2, stacked.T)
        return list(y.split(outs, 1)), h, list(stacked.split(outs, 0)), s_cat  # outputs: column blocks of y
    ys, dense, off = [], [], 0
    for (weight, bias, As, _, _), sb in zip(projs, sbs):
        w = _dense(weight, x2.dtype)
        dense.append(w)
        if sb is None:
            ys.append(F.linear(x2, w, None if bias is None else bias.to(x2.dtype)))
            continue
        r = sb.shape[1]
        hp = h[:, off:off + r]
        y = hp @ sb.T if bias is None else torch.addmm(bias.to(x2.dtype), hp, sb.T)  # (N, out)
        ys.append(y.addmm_(x2, w.T))  # y += x W.T
        off += r
    return ys, h, dense, None


def _weight_grad(a, b, dtype, scale=1.0):
    """``scale * a @ b`` in ``dtype``: an adapter factor's gradient (or several side by side) for its fp32
    master weight. On CUDA with 16-bit operands cuBLAS writes it in fp32 itself (no rounding to 16 bits
    first, and no separate cast and scale kernels: ~700 fewer launches a step on an 8B model)."""
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) \
            and not torch.compiler.is_compiling():
        if scale == 1.0:
            return torch.mm(a, b, out_dtype=dtype)
        out = torch.empty((a.shape[0], b.shape[1]), dtype=dtype, device=a.device)
        return torch.addmm(out, a, b, out_dtype=dtype, beta=0, alpha=scale)
    out = (a @ b).to(dtype)
    return out if scale == 1.0 else out * scale


def _a_dtype(projs):
    """The dtype of the first adapter A among ``projs`` (that of the gradient ``g.T @ x`` of them all)."""
    return next(a for _, _, As, _, _ in projs for a in As).dtype


def _keep_dense(spec, dense):
    """The dense weights to keep for the backward: while recomputing, if any base weight is quantized."""
    if _RECOMPUTING.get() is not None and not torch.compiler.is_compiling() and any(packed is not None for *_, packed in spec):
        return dense
    return None


def _product_scale(Bs, scales) -> float:
    """The scale that rides in the product for a projection's dB: its adapter's when it has one (several
    adapters: 1, and each adapter's block of the product is scaled after)."""
    return scales[0] if len(Bs) == 1 else 1.0


def _group_backward(dys, x2, h, projs, a_cat, sbs, need_dx, need, dense=None, merged=None, db_given=None):
    """Gradients of ``_group_forward``: dx (N, in) or None, and per projection (dbias, [dA_k], [dB_k]).

    ``need`` lists, per projection, (bias needs grad, [A_k needs grad], [B_k needs grad]). As in the
    forward, the low-rank part of dx (``g @ A_cat``) is written first and the base matmuls accumulate.
    ``dense``: the forward's dense weights, if it kept them (else each W is cast/dequantized here).
    ``merged``: ``(dy_cat (N, sum out), W_cat (sum out, in))`` when the output gradients are column
    blocks of one tensor and the weights row blocks of another: dx's base part is then one matmul.
    ``W_cat`` may carry ``g``'s factors as R extra columns (``_augment``): that matmul then gives g too.
    ``db_given``: per projection its adapters' ``dy^T h_p`` (out, r_p), already computed (by the SwiGLU
    kernel) and scaled as here (by the scale for one adapter, else 1), or None.
    """
    cols = x2.shape[1]
    g_given = None
    if need_dx and merged is not None and merged[1].shape[1] > cols:
        both = merged[0] @ merged[1]  # (N, in + R) = [dx_base | g]
        dx_base, g_given = both[:, :cols], both[:, cols:]
    n = x2.shape[0]
    dy2s, gs, grads, off = [], [], [], 0
    for (weight, bias, As, Bs, scales), sb, dy, (need_bias, need_a, need_b) in zip(projs, sbs, dys, need):
        r = sb.shape[1] if sb is not None else 0
        d_as, d_bs = [None] * len(As), [None] * len(Bs)
        if dy is None:
            dy2s.append(None)
            if r and g_given is None:
                gs.append(torch.zeros((n, r), dtype=x2.dtype, device=x2.device))
            grads.append((None, d_as, d_bs))
            off += r
            continue
        dy2 = dy.reshape(n, -1)
        dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()  # column blocks of a wider tensor are fine
        dy2s.append(dy2)
        if r and g_given is None:
            gs.append(dy2 @ sb)  # (N, r_p)
        if r:
            if any(need_b):
                one = _product_scale(Bs, scales)
                given = db_given[len(grads)] if db_given is not None else None
                db = given.to(Bs[0].dtype) if given is not None else \
                    _weight_grad(dy2.T, h[:, off:off + r], Bs[0].dtype, one)  # (out, r_p)
                o = 0
                for k, (b, s) in enumerate(zip(Bs, scales)):
                    rk = b.shape[1]
                    if need_b[k]:
                        d_bs[k] = db if len(Bs) == 1 else db[:, o:o + rk].to(b.dtype) * s
                    o += rk
        dbias = dy2.sum(0).to(bias.dtype) if need_bias else None
        grads.append((dbias, d_as, d_bs))
        off += r
    g = (torch.cat(gs, 1) if len(gs) > 1 else gs[0]) if gs else g_given  # (N, R)
    dx = g @ a_cat if (g is not None and need_dx and g_given is None) else None
    if g_given is not None:
        dx = dx_base.addmm_(g, a_cat)  # dx_base and g are column blocks of one tensor: no overlap
    elif need_dx and merged is not None:
        dx = merged[0] @ merged[1] if dx is None else dx.addmm_(*merged)
    elif need_dx:
        for i, ((weight, *_), dy2) in enumerate(zip(projs, dy2s)):
            if dy2 is not None:
                w = dense[i] if dense is not None else _dense(weight, dy2.dtype)
                dx = dy2 @ w if dx is None else dx.addmm_(dy2, w)
    if g is not None and any(any(a) for _, a, _ in need):
        da = _weight_grad(g.T, x2, _a_dtype(projs))  # (R, in)
        o = 0
        for (_, _, As, _, _), (_, need_a, _), (_, d_as, _) in zip(projs, need, grads):
            for k, a in enumerate(As):
                if need_a[k]:
                    d_as[k] = da[o:o + a.shape[0]].to(a.dtype)
                o += a.shape[0]
    return dx, grads


class _LoraGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, norm, *tensors):
        projs = unflatten(spec, tensors)
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.is_contiguous() else x2.contiguous()
        a_cat, sbs = factors(projs, x.dtype)
        ys, h, dense, s_cat = _group_forward(x2, projs, a_cat, sbs)
        ctx.s_cat = None if torch.compiler.is_compiling() else s_cat  # for the backward's stacked weight
        ctx.spec, ctx.x_shape, ctx.dense = spec, x.shape, _keep_dense(spec, dense)
        ctx.save_for_backward(*_save_input(ctx, x, x2, norm), h, a_cat, *sbs, *tensors)
        return tuple(y.view(*x.shape[:-1], -1) for y in ys)

    @staticmethod
    def backward(ctx, *dys):
        spec = ctx.spec
        x2, (h, a_cat, *rest) = _load_input(ctx, ctx.saved_tensors)
        sbs, tensors = rest[:len(spec)], rest[len(spec):]
        projs = unflatten(spec, tensors)
        dense, ctx.dense = ctx.dense, None
        s_cat, ctx.s_cat = ctx.s_cat, None
        n = x2.shape[0]
        merged = None  # one matmul for dx when the gradients are one tensor and the weights quantized
        dy_cat = _adjacent([None if d is None else d.reshape(n, -1) for d in dys], 1) if len(dys) > 1 else None
        if dy_cat is not None and ctx.needs_input_grad[0]:
            if dense is not None:  # kept by a recomputation: row blocks of the forward's stacked weight
                w_cat = _adjacent(dense, 0)
            elif all(b is None for _, b, *_ in projs):
                w_cat = _stacked([w for w, *_ in projs], x2.dtype, h.shape[1] if h is not None else 0)
                if w_cat is not None and s_cat is not None:  # whose spare columns give g as well
                    w_cat[:, x2.shape[1]:].copy_(s_cat)
            else:
                w_cat = None
            merged = (dy_cat, w_cat) if w_cat is not None else None
        dx, grads = _group_backward(dys, x2, h, projs, a_cat, sbs, ctx.needs_input_grad[0], needs_grads(ctx, spec, 3),
                                    dense, merged)
        return (dx.view(ctx.x_shape) if dx is not None else None, None, None, *grad_list(spec, grads))


def lora_group(x: torch.Tensor, projections, norm=None) -> tuple[torch.Tensor, ...]:
    """Apply LoRA projections that share the input ``x`` (..., in) in one autograd node.

    Args:
        x: activations in the compute dtype (bf16 in training).
        projections: ``[(W (out, in), bias or None, [(A (r, in), B (out, r), scale), ...]), ...]``;
            W and bias frozen, A and B in any dtype (fp32 master weights), cast to x's dtype here. A
            projection may add an output scale f (out,) as a fourth element: ``f ⊙ (x W^T + low rank) + b``.
        norm: ``(x_pre, weight, eps)`` when x is ``rms_norm(x_pre, weight, eps)`` (as the caller knows: a
            Llama block's attention and MLP inputs): the node then saves x_pre, which the norm node
            keeps anyway, instead of x, and recomputes x in backward (``rms_norm_values``, bit for bit).
    Returns:
        one output (..., out_p) per projection, in x's dtype.
    """
    inner, outer = split_output_scales(projections)
    ys = _lora_group(x, inner, norm)
    return tuple(y if o is None else ScaleOutput.apply(y, *o) for y, o in zip(ys, outer))


def _lora_group(x: torch.Tensor, projections, norm=None) -> tuple[torch.Tensor, ...]:
    """``lora_group`` of projections without output scales: the node itself."""
    spec, tensors = flatten(projections)
    cast, device = _autocast_input(x)
    norm = None if cast is not x or torch.compiler.is_compiling() else norm  # x_pre gives x, not its cast
    with torch.autocast(device, enabled=False):
        return _LoraGroup.apply(cast, spec, norm, *tensors)


def _gate_up(x2, projs, rank):
    """Base (no adapter) gate and up outputs (N, I) each, and their dense weights for the backward:
    one matmul against the stacked ``[W_g; W_u]`` for quantized weights (g, u are then column blocks of
    one (N, 2I) tensor; the stack has ``rank`` spare columns for ``_augment``), two plain ones otherwise."""
    (w_g, b_g, *_), (w_u, b_u, *_) = projs
    stacked = _stacked([w_g, w_u], x2.dtype, rank) if b_g is None and b_u is None else None
    if stacked is not None:
        gu = x2 @ stacked[:, :x2.shape[1]].T  # (N, 2I)
        return gu[:, :w_g.shape[0]], gu[:, w_g.shape[0]:], stacked
    dense = (_dense(w_g, x2.dtype), _dense(w_u, x2.dtype))
    g, u = (F.linear(x2, w, None if b is None else b.to(x2.dtype)) for w, b in zip(dense, (b_g, b_u)))
    return g, u, dense


def _augment(stacked, cols, sbs, rows):
    """Write the block-diagonal ``diag(s B_g, s B_u)`` into the spare columns of the stacked weight
    ``[W_g; W_u]`` (2I, cols + R): then ``[dg | du] @ stacked`` gives ``[dx_base | g]`` in one matmul,
    instead of a second pass over the (N, 2I) gradients for ``g = dg (s B_g) | du (s B_u)``.
    ``sbs``: per stacked weight its (rows_p, r_p) factor or None; ``rows``: the weights' row counts."""
    tail = stacked[:, cols:]
    tail.zero_()
    row = col = 0
    for sb, n in zip(sbs, rows):
        if sb is not None:
            tail[row:row + n, col:col + sb.shape[1]].copy_(sb)
            col += sb.shape[1]
        row += n
    return stacked


class _LoraMLP(torch.autograd.Function):
    """The gated MLP with LoRA in one node.

    The gate/up adapters' low-rank terms never reach memory: the base matmuls write ``g0``, ``u0`` and
    the SwiGLU kernel adds ``h_g (s B_g)^T`` and ``h_u (s B_u)^T`` tile by tile, in forward and again in
    the backward's recomputation; the backward kernel likewise adds the down adapter's part of the
    SwiGLU output gradient (``g_d A_d``) to the base part ``dy W_d``. With quantized weights gate and up
    are dequantized into one stacked weight: one matmul each way instead of two.
    """

    @staticmethod
    def forward(ctx, x, spec, norm, *tensors):
        projs = unflatten(spec, tensors)  # gate, up, down
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.is_contiguous() else x2.contiguous()
        (a_gu, sb_gu), (a_d, sb_d) = factor_groups([projs[:2], projs[2:]], x.dtype)
        h_gu = x2 @ a_gu.T if a_gu is not None else None  # (N, R_g + R_u)
        g, u, dense_gu = _gate_up(x2, projs[:2], h_gu.shape[1] if h_gu is not None else 0)
        act = swiglu_lora_forward(g, u, *split_low_rank(h_gu, sb_gu))  # (N, I): used here, not saved
        if _RECOMPUTING.get() and not torch.compiler.is_compiling():
            y = torch.empty((x2.shape[0], projs[2][0].shape[0]), dtype=x.dtype, device=x.device)
            h_d = act @ a_d.T if a_d is not None else None
            dense_d = [None]
        else:
            (y,), h_d, dense_d, _ = _group_forward(act, projs[2:], a_d, sb_d)
        ctx.spec, ctx.x_shape, ctx.dense = spec, x.shape, _keep_dense(spec, [dense_gu, dense_d[0]])
        ctx.save_for_backward(*_save_input(ctx, x, x2, norm), g, u, h_gu, h_d, a_gu, a_d, *sb_gu, *sb_d, *tensors)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        spec = ctx.spec
        x2, (g, u, h_gu, h_d, a_gu, a_d, sg, su, sd, *tensors) = _load_input(ctx, ctx.saved_tensors)
        projs = unflatten(spec, tensors)
        need = needs_grads(ctx, spec, 3)
        # down projection: its input (the SwiGLU output) is recomputed inside the SwiGLU backward below,
        # which sums dA_d from it (and dB_g, dB_u from dg, du)
        proj_d = projs[2]
        dense_gu, w_d = ctx.dense or (None, None)
        ctx.dense = None
        w_d = w_d if w_d is not None else _dense(proj_d[0], dy.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        gd = dy2 @ sd if sd is not None else None  # (N, r_d)
        dact = dy2 @ w_d  # (N, I), the base part; the kernel adds gd @ A_d
        del w_d
        ones = [_product_scale(Bs, scales) for _, _, _, Bs, scales in projs]  # ride in the kernel's sums
        dgu, db_g, db_u, da_d = swiglu_lora_backward(dact, g, u, *split_low_rank(h_gu, [sg, su]),
                                                     (gd, a_d) if gd is not None else None, ones[:2])
        del dact
        i = g.shape[1]
        nbias_d, na_d, nb_d = need[2]
        d_as, d_bs = [None] * len(proj_d[2]), [None] * len(proj_d[3])
        if gd is not None:
            db = _weight_grad(dy2.T, h_d, proj_d[3][0].dtype, ones[2]) if any(nb_d) else None
            o = 0
            for k, (a, b, s) in enumerate(zip(proj_d[2], proj_d[3], proj_d[4])):
                rk = a.shape[0]
                if na_d[k]:
                    d_as[k] = da_d[o:o + rk].to(a.dtype)
                if nb_d[k]:
                    d_bs[k] = db if len(proj_d[3]) == 1 else db[:, o:o + rk].to(b.dtype) * s
                o += rk
        dbias_d = dy2.sum(0).to(proj_d[1].dtype) if nbias_d else None
        merged = None
        if ctx.needs_input_grad[0]:
            stacked = dense_gu if isinstance(dense_gu, torch.Tensor) else None
            if stacked is None and projs[0][1] is None and projs[1][1] is None:
                stacked = _stacked([projs[0][0], projs[1][0]], dy.dtype, h_gu.shape[1] if h_gu is not None else 0)
            if stacked is not None and h_gu is not None:
                stacked = _augment(stacked, x2.shape[1], [sg, su], [i, i])
            merged = (dgu, stacked) if stacked is not None else None
        dx, grads_gu = _group_backward((dgu[:, :i], dgu[:, i:]), x2, h_gu, projs[:2], a_gu, [sg, su],
                                       ctx.needs_input_grad[0], need[:2],
                                       dense_gu if isinstance(dense_gu, tuple) else None, merged, [db_g, db_u])
        grads = grads_gu + [(dbias_d, d_as, d_bs)]
        return (dx.view(ctx.x_shape) if dx is not None else None, None, None, *grad_list(spec, grads))


def lora_mlp(x: torch.Tensor, gate, up, down, norm=None) -> torch.Tensor:
    """The gated MLP ``down(silu(gate(x)) * up(x))`` with LoRA projections, in one autograd node.

    Each of ``gate``, ``up``, ``down`` is ``(W, bias or None, [(A, B, scale), ...])`` as in
    ``lora_group``, and ``norm`` as there. Saves x (or the norm's input), the gate and up outputs and the
    rank-sized factors, not the SwiGLU output. Returns (..., hidden) in x's dtype. With an output scale
    on any of them (``lora_group``'s fourth element), three nodes: gate/up, the scaled SwiGLU, down.
    """
    if any(len(p) > 3 and p[3] is not None for p in (gate, up, down)):
        (gate, up), scales = split_output_scales([gate, up])
        g, u = _lora_group(x, [gate, up], norm)
        act = ScaledSwiGLU.apply(g, u, *(scales[0] or (None, None)), *(scales[1] or (None, None)))
        return lora_group(act, [down])[0]
    spec, tensors = flatten([gate, up, down])
    cast, device = _autocast_input(x)
    norm = None if cast is not x or torch.compiler.is_compiling() else norm  # x_pre gives x, not its cast
    with torch.autocast(device, enabled=False):
        return _LoraMLP.apply(cast, spec, norm, *tensors)
