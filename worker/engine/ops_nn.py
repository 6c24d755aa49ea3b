"""Convolution, pooling and layer normalization: registry entries like any op.

Layouts are PyTorch's: a per-example image is (C, H, W), a sequence (C, L),
so the arrays are (N, C, H, W) / (N, C, L), N being the batch axis; conv
weights are (out, in, kh, kw) / (out, in, k). No op here takes a bias: users
add a param of shape (out, 1, 1) (or (out, 1)), which broadcasts.

How conv is computed (im2col, no loop over positions or examples):

* the padded input is laid out channel-major, (C, N, Hp, Wp), and its
  receptive fields are read with `sliding_window_view` (a strided view,
  subsampled for stride and dilation) into one contiguous (C*kh*kw, N*OH*OW)
  matrix, `cols`;
* forward is ONE matmul, `w.reshape(out, -1) @ cols`, giving (out, N, OH, OW),
  returned as the (N, out, OH, OW) view of it (numpy's elementwise ops keep
  that layout, and a following conv reads it without a transpose copy);
* backward: dw = g' @ cols.T (g' the adjoint as (out, N*OH*OW); cols is
  rebuilt from x, cheaper than keeping it alive between the passes), and
  dcols = w'.T @ g', folded back onto the padded input (col2im) by a
  scatter-add over the kh*kw kernel taps: each tap is one vectorized
  strided `+=`, so the Python loop runs over taps, never over positions.

conv1d is conv2d with H = 1. Pooling loops over the kernel taps the same way
(one vectorized max or add per tap).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import GraphError
from .ops import REQUIRED, Attrs, Op, Shape, fmt, is_per_example, norm_axis, refuse_batch_axis, register


# ---------------------------------------------------------------- attribute helpers

def _tuple(values: tuple, n: int, what: str, least: int) -> tuple[int, ...]:
    """An int-or-n-tuple attribute as an n-tuple (one value stands for all), each >= least."""
    values = tuple(int(v) for v in values)
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise GraphError(f"{what} takes 1 or {n} values, got {len(values)}: {values}")
    if any(v < least for v in values):
        raise GraphError(f"{what} values must be >= {least}, got {values}")
    return values


def _out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """PyTorch's floor((size + 2 pad - dilation (kernel - 1) - 1) / stride) + 1."""
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def _tap(i: int, j: int, dil: tuple[int, int], stride: tuple[int, int], out_hw: tuple[int, int]) -> tuple:
    """Index of kernel tap (i, j) over the last two axes of a padded array:
    the input positions that tap reads for every output position."""
    return (Ellipsis,
            slice(i * dil[0], i * dil[0] + stride[0] * (out_hw[0] - 1) + 1, stride[0]),
            slice(j * dil[1], j * dil[1] + stride[1] * (out_hw[1] - 1) + 1, stride[1]))


def _pad_last2(x: np.ndarray, pad: tuple[int, int], fill: float) -> np.ndarray:
    if pad == (0, 0):
        return x
    out = np.full(x.shape[:-2] + (x.shape[-2] + 2 * pad[0], x.shape[-1] + 2 * pad[1]), fill, dtype=x.dtype)
    out[..., pad[0]:pad[0] + x.shape[-2], pad[1]:pad[1] + x.shape[-1]] = x
    return out


def _crop_last2(x: np.ndarray, pad: tuple[int, int]) -> np.ndarray:
    if pad == (0, 0):
        return x
    return x[..., pad[0]:x.shape[-2] - pad[0], pad[1]:x.shape[-1] - pad[1]]


# ---------------------------------------------------------------- convolution

class _Conv:
    """The geometry of one conv call, as 2-D (conv1d is H = 1)."""

    def __init__(self, at: Attrs, dims: int):
        names = "conv2d" if dims == 2 else "conv1d"
        self.stride = _tuple(at.stride, dims, f"{names} stride", 1)
        self.padding = _tuple(at.padding, dims, f"{names} padding", 0)
        self.dilation = _tuple(at.dilation, dims, f"{names} dilation", 1)
        if dims == 1:
            self.stride, self.padding, self.dilation = ((1,) + self.stride, (0,) + self.padding,
                                                        (1,) + self.dilation)


def _conv_shape(dims: int):
    name = "conv2d" if dims == 2 else "conv1d"
    layout = "(C, H, W)" if dims == 2 else "(C, L)"

    def rule(at: Attrs, x: Shape, w: Shape) -> Shape:
        geometry = _Conv(at, dims)
        if len(x) != dims + 2:
            raise GraphError(f"{name} needs x of rank {dims + 2}, (batch, {layout[1:]}: give the input a "
                             f"per-example shape {layout}; got {fmt(x)}")
        if len(w) != dims + 2 or is_per_example(w):
            raise GraphError(f"{name} needs weights (out, in, {'kh, kw' if dims == 2 else 'k'}) that are not "
                             f"per-example, got {fmt(w)}")
        if w[1] != x[1]:
            raise GraphError(f"{name}: x has {x[1]} channels but the weights {fmt(w)} take {w[1]}")
        spatial = (1,) * (2 - dims) + tuple(x[2:])
        kernel = (1,) * (2 - dims) + tuple(w[2:])
        out = tuple(_out_size(s, k, st, p, d) for s, k, st, p, d in
                    zip(spatial, kernel, geometry.stride, geometry.padding, geometry.dilation))
        if any(o < 1 for o in out) or 0 in w or 0 in x[1:]:
            raise GraphError(f"{name}: a {fmt(w[2:])} kernel (dilation {geometry.dilation[2 - dims:]}) does not "
                             f"fit the input {fmt(x)} padded by {geometry.padding[2 - dims:]}")
        return (x[0], w[0]) + out[2 - dims:]
    return rule


def _as2d(dims: int, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if dims == 2:
        return x, w
    return x[:, :, None, :], w[:, :, None, :]


def _im2col(geometry: _Conv, x: np.ndarray, kernel: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """(C*kh*kw, N*OH*OW): the receptive field of every output position, one column each."""
    n, c = x.shape[:2]
    xp = _pad_last2(x.transpose(1, 0, 2, 3), geometry.padding, 0)  # (C, N, Hp, Wp)
    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    span = ((kernel[0] - 1) * dh + 1, (kernel[1] - 1) * dw + 1)
    windows = sliding_window_view(xp, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    windows = windows[:, :, :out_hw[0], :out_hw[1]]  # (C, N, OH, OW, kh, kw)
    return windows.transpose(0, 4, 5, 1, 2, 3).reshape(c * kernel[0] * kernel[1], n * out_hw[0] * out_hw[1])


def _conv_forward(dims: int):
    def forward(at: Attrs, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        geometry = _Conv(at, dims)
        x2, w2 = _as2d(dims, x, w)
        n, o = x2.shape[0], w2.shape[0]
        kernel = w2.shape[2:]
        out_hw = tuple(_out_size(s, k, st, p, d) for s, k, st, p, d in
                       zip(x2.shape[2:], kernel, geometry.stride, geometry.padding, geometry.dilation))
        cols = _im2col(geometry, x2, kernel, out_hw)
        out = np.matmul(w2.reshape(o, -1), cols)  # (O, N*OH*OW): the one product
        out = out.reshape(o, n, *out_hw).transpose(1, 0, 2, 3)
        return out if dims == 2 else out[:, :, 0, :]
    return forward


def _conv_vjp(dims: int):
    def vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple:
        geometry = _Conv(at, dims)
        x2, w2 = _as2d(dims, x, w)
        g2 = g if dims == 2 else g[:, :, None, :]
        n, c = x2.shape[:2]
        o, kernel = w2.shape[0], w2.shape[2:]
        out_hw = g2.shape[2:]
        g_cols = g2.transpose(1, 0, 2, 3).reshape(o, -1)  # (O, N*OH*OW)
        grad_x = grad_w = None
        if at.wants[1]:
            cols = _im2col(geometry, x2, kernel, out_hw)
            grad_w = np.matmul(g_cols, cols.T).reshape(w.shape)
        if at.wants[0]:
            d_cols = np.matmul(w2.reshape(o, -1).T, g_cols).reshape(c, kernel[0], kernel[1], n, *out_hw)
            pad = geometry.padding
            dxp = np.zeros((c, n, x2.shape[2] + 2 * pad[0], x2.shape[3] + 2 * pad[1]), dtype=x.dtype)
            for i in range(kernel[0]):  # col2im: one strided scatter-add per kernel tap
                for j in range(kernel[1]):
                    dxp[_tap(i, j, geometry.dilation, geometry.stride, out_hw)] += d_cols[:, i, j]
            grad_x = _crop_last2(dxp, pad).transpose(1, 0, 2, 3)
            if dims == 1:
                grad_x = grad_x[:, :, 0, :]
        return grad_x, grad_w
    return vjp


_CONV_ATTRS = {"stride": ("ints", (1,)), "padding": ("ints", (0,)), "dilation": ("ints", (1,))}
register(Op("conv2d", 2, _conv_shape(2), _conv_forward(2), _conv_vjp(2), linear_in="each", attrs=_CONV_ATTRS,
            doc="2-D cross-correlation as PyTorch's conv2d (no bias): x (batch, C, H, W), w (out, C, kh, kw); "
                "stride, padding (zeros) and dilation are 1 or 2 ints"))
register(Op("conv1d", 2, _conv_shape(1), _conv_forward(1), _conv_vjp(1), linear_in="each", attrs=_CONV_ATTRS,
            doc="1-D cross-correlation as PyTorch's conv1d (no bias): x (batch, C, L), w (out, C, k)"))


# ---------------------------------------------------------------- pooling

class _Pool:
    def __init__(self, at: Attrs, name: str):
        self.kernel = _tuple(at.kernel, 2, f"{name} kernel", 1)
        self.stride = _tuple(at.stride, 2, f"{name} stride", 1) if at.stride else self.kernel
        self.padding = _tuple(at.padding, 2, f"{name} padding", 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel)):
            raise GraphError(f"{name}: padding {self.padding} must be at most half the kernel {self.kernel} "
                             "(as in PyTorch), so that every window holds real input")

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        return (_out_size(h, self.kernel[0], self.stride[0], self.padding[0], 1),
                _out_size(w, self.kernel[1], self.stride[1], self.padding[1], 1))

    def taps(self, out_hw: tuple[int, int]):
        for i in range(self.kernel[0]):
            for j in range(self.kernel[1]):
                yield _tap(i, j, (1, 1), self.stride, out_hw)


def _pool_shape(name: str):
    def rule(at: Attrs, x: Shape) -> Shape:
        pool = _Pool(at, name)
        if len(x) < 2 or (is_per_example(x) and len(x) < 3):
            raise GraphError(f"{name} pools the last two axes (H, W), which must not be the batch axis; "
                             f"got {fmt(x)}")
        out = pool.out_hw(x[-2], x[-1])
        if min(out) < 1:
            raise GraphError(f"{name}: a {pool.kernel} window does not fit {fmt(x)} padded by {pool.padding}")
        return tuple(x[:-2]) + out
    return rule


def _max_pool_forward(at: Attrs, x: np.ndarray) -> np.ndarray:
    pool = _Pool(at, "max_pool2d")
    out_hw = pool.out_hw(*x.shape[-2:])
    xp = _pad_last2(x, pool.padding, -np.inf)
    taps = pool.taps(out_hw)
    out = xp[next(taps)].copy()
    for tap in taps:
        np.maximum(out, xp[tap], out=out)  # NaN propagates, as in PyTorch
    return out


def _max_pool_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """The whole gradient of a window goes to ONE input: its first maximal
    element in row-major window order (a NaN, if the window holds one), as
    PyTorch's CPU kernel picks. Overlapping windows add up."""
    pool = _Pool(at, "max_pool2d")
    xp = _pad_last2(x, pool.padding, -np.inf)
    grad = np.zeros_like(xp)
    unclaimed = np.ones(out.shape, dtype=bool)
    nan_out = np.isnan(out)
    has_nan = bool(nan_out.any())
    # Padding never wins, even against a window of -inf (PyTorch skips it).
    real = _pad_last2(np.ones(x.shape[-2:], dtype=bool), pool.padding, False)
    for tap in pool.taps(out.shape[-2:]):
        hit = xp[tap] == out
        if has_nan:
            hit |= nan_out & np.isnan(xp[tap])
        hit &= unclaimed
        if pool.padding != (0, 0):
            hit &= real[tap]
        unclaimed &= ~hit
        grad[tap] += np.where(hit, g, 0)
    return (_crop_last2(grad, pool.padding),)


def _avg_pool_forward(at: Attrs, x: np.ndarray) -> np.ndarray:
    pool = _Pool(at, "avg_pool2d")
    xp = _pad_last2(x, pool.padding, 0)
    taps = pool.taps(pool.out_hw(*x.shape[-2:]))
    out = xp[next(taps)].copy()
    for tap in taps:
        out += xp[tap]
    out /= x.dtype.type(pool.kernel[0] * pool.kernel[1])  # padding counts (count_include_pad=True)
    return out


def _avg_pool_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    pool = _Pool(at, "avg_pool2d")
    share = g / x.dtype.type(pool.kernel[0] * pool.kernel[1])
    grad = np.zeros(x.shape[:-2] + (x.shape[-2] + 2 * pool.padding[0], x.shape[-1] + 2 * pool.padding[1]),
                    dtype=x.dtype)
    for tap in pool.taps(out.shape[-2:]):
        grad[tap] += share
    return (_crop_last2(grad, pool.padding),)


_POOL_ATTRS = {"kernel": ("ints", REQUIRED), "stride": ("ints", ()), "padding": ("ints", (0,))}
register(Op("max_pool2d", 1, _pool_shape("max_pool2d"), _max_pool_forward, _max_pool_vjp, attrs=_POOL_ATTRS,
            doc="max over kh x kw windows of the last two axes; stride defaults to the kernel, padding is -inf; "
                "a window's gradient goes to its first maximal element (row-major), as in PyTorch"))
register(Op("avg_pool2d", 1, _pool_shape("avg_pool2d"), _avg_pool_forward, _avg_pool_vjp, linear_in="all",
            attrs=_POOL_ATTRS,
            doc="mean over kh x kw windows of the last two axes; zero padding counts in the mean "
                "(PyTorch's count_include_pad=True)"))


# ---------------------------------------------------------------- layer norm

def _norm_axes(at: Attrs, rank: int) -> tuple[int, ...]:
    if not at.axes:
        raise GraphError("layer_norm needs at least one axis")
    return tuple(sorted({norm_axis(a, rank, "layer_norm") for a in at.axes}))


def _layer_norm_shape(at: Attrs, x: Shape) -> Shape:
    for axis in _norm_axes(at, len(x)):
        refuse_batch_axis(x, axis, "layer_norm")
    if not at.eps >= 0:
        raise GraphError(f"layer_norm eps must be >= 0, got {at.eps}")
    return x


def _centered_and_rstd(at: Attrs, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x - mean and 1 / sqrt(var + eps) over the axes (biased variance, as PyTorch)."""
    axes = _norm_axes(at, x.ndim)
    centered = x - np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(centered), axis=axes, keepdims=True)
    var += x.dtype.type(at.eps)
    return centered, np.reciprocal(np.sqrt(var, out=var), out=var)


def _layer_norm_forward(at: Attrs, x: np.ndarray) -> np.ndarray:
    centered, rstd = _centered_and_rstd(at, x)
    centered *= rstd
    return centered


def _layer_norm_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """rstd * (g - mean(g) - y * mean(g * y)), y the output."""
    axes = _norm_axes(at, x.ndim)
    _, rstd = _centered_and_rstd(at, x)
    grad = g - np.mean(g, axis=axes, keepdims=True)
    grad -= out * np.mean(g * out, axis=axes, keepdims=True)
    grad *= rstd
    return (grad,)


register(Op("layer_norm", 1, _layer_norm_shape, _layer_norm_forward, _layer_norm_vjp,
            attrs={"axes": ("ints", (-1,)), "eps": (float, 1e-5)},
            doc="(x - mean) / sqrt(var + eps) over `axes` of each example (not the batch axis), biased "
                "variance as PyTorch's layer_norm, no affine: multiply and add params for that"))
