"""Convolution, pooling and layer normalization: registry entries like any op.

Layouts are PyTorch's: a per-example image is (C, H, W), a sequence (C, L),
so the arrays are (N, C, H, W) / (N, C, L), N being the batch axis; conv
weights are (out, in, kh, kw) / (out, in, k). No op here takes a bias: users
add a param of shape (out, 1, 1) (or (out, 1)), which broadcasts.

How conv is computed (im2col, no loop over positions or examples; see
`_Layout`):

* `cols`, one (C*kh*kw, N*L) matrix, holds every output position's
  receptive field as a column: filled by one copy per kernel tap from the
  padded input laid out channel-major (C, N, Hp, Wp);
* forward is ONE matmul, `w.reshape(out, -1) @ cols`, transposed to a
  C-contiguous (N, out, OH, OW);
* backward: dw = g' @ cols.T (g' the adjoint as (out, N*L); cols is rebuilt
  from x rather than kept alive between the passes), and dcols = w'.T @ g',
  folded back onto the padded input (col2im) by a scatter-add over the
  kh*kw kernel taps: each tap is one vectorized strided `+=`, so the Python
  loop runs over taps, never over positions.

Small images (H*W <= 8 kh*kw, a small matrix) skip im2col: see `_Dense`.

conv1d is conv2d with H = 1. Pooling loops over the kernel taps the same way
(one vectorized max, compare or add per tap).
"""

from __future__ import annotations

import functools

import numpy as np

from .errors import GraphError
from .ops import REQUIRED, Attrs, Op, Shape, fmt, is_per_example, norm_axis, refuse_batch_axis, register


# ---------------------------------------------------------------- attribute helpers

# Conv and pooling loop in Python over a kernel's taps (one vectorized copy, max or add each), so their
# number is bounded: a 256 x 256 window (a global pool of a 256 x 256 image) is the most. Found by the
# fuzz: a 2**14 x 2**14 pooling window of a padded 8 x 8 image kept a worker busy for hours.
MAX_KERNEL_TAPS = 2**16


def _check_taps(kernel: tuple[int, ...], what: str) -> None:
    taps = 1
    for k in kernel:
        taps *= k
    if taps > MAX_KERNEL_TAPS:
        raise GraphError(f"{what}: a {fmt(tuple(kernel))} kernel has {taps} taps; the limit is {MAX_KERNEL_TAPS}")

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
        _check_taps(tuple(w[2:]), name)
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


class _Layout:
    """Where every output position's receptive field sits, for one conv call.

    `cols` is (C*kh*kw, N*L): row (c, i, j) holds, for every example and
    output position, the input that kernel tap (i, j) of channel c reads.
    With stride 1 (the common case) the padded images are flattened, so the
    tap (i, j) is the same flat array shifted by i*dh*Wp + j*dw: each row of
    `cols` is one contiguous copy, at the price of Wp - OW wasted columns
    per output row (L = OH*Wp; they are cut from the result and get zero
    adjoints). Other strides copy strided taps (L = OH*OW).
    """

    def __init__(self, geometry: _Conv, x_shape: tuple[int, ...], kernel: tuple[int, int]):
        self.n, self.c, self.h, self.w = x_shape
        self.kernel, self.pad, self.stride, self.dilation = kernel, geometry.padding, geometry.stride, geometry.dilation
        self.oh, self.ow = (_out_size(s, k, st, p, d) for s, k, st, p, d in
                            zip(x_shape[2:], kernel, self.stride, self.pad, self.dilation))
        self.hp, self.wp = self.h + 2 * self.pad[0], self.w + 2 * self.pad[1]
        self.flat = self.stride == (1, 1)
        self.width = self.wp if self.flat else self.ow  # columns per output row in cols
        self.length = self.oh * self.width  # L: columns per example
        # the last tap's shifted slice runs (kw - 1) * dw past the flat image
        self.tail = (kernel[1] - 1) * self.dilation[1] if self.flat else 0

    def _taps(self):
        for i in range(self.kernel[0]):
            for j in range(self.kernel[1]):
                if self.flat:
                    shift = i * self.dilation[0] * self.wp + j * self.dilation[1]
                    yield i, j, (slice(None), slice(None), slice(shift, shift + self.length))
                else:
                    yield i, j, _tap(i, j, self.dilation, self.stride, (self.oh, self.ow))

    def _padded(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """A zero (C, N, ...) buffer the taps index, and its (C, N, Hp, Wp) image part."""
        if self.flat:
            buffer = np.zeros((self.c, self.n, self.hp * self.wp + self.tail), dtype=dtype)
            return buffer, buffer[:, :, :self.hp * self.wp].reshape(self.c, self.n, self.hp, self.wp)
        buffer = np.zeros((self.c, self.n, self.hp, self.wp), dtype=dtype)
        return buffer, buffer

    def _interior(self, image: np.ndarray) -> np.ndarray:
        return image[:, :, self.pad[0]:self.pad[0] + self.h, self.pad[1]:self.pad[1] + self.w]

    def _cols_shape(self) -> tuple[int, ...]:
        per_tap = (self.length,) if self.flat else (self.oh, self.ow)
        return (self.c, self.kernel[0], self.kernel[1], self.n) + per_tap

    def im2col(self, x: np.ndarray) -> np.ndarray:
        buffer, image = self._padded(x.dtype)
        self._interior(image)[...] = x.transpose(1, 0, 2, 3)
        cols = np.empty(self._cols_shape(), dtype=x.dtype)
        for i, j, tap in self._taps():  # one copy per kernel tap
            cols[:, i, j] = buffer[tap]
        return cols.reshape(self.c * self.kernel[0] * self.kernel[1], self.n * self.length)

    def output(self, product: np.ndarray) -> np.ndarray:
        """(O, N*L) -> (N, O, OH, OW), C-contiguous (the wasted columns dropped)."""
        wide = product.reshape(-1, self.n, self.oh, self.width)[..., :self.ow]
        return np.ascontiguousarray(wide.transpose(1, 0, 2, 3))

    def adjoint_cols(self, g: np.ndarray) -> np.ndarray:
        """(N, O, OH, OW) -> (O, N*L), zeros in the wasted columns."""
        if self.width == self.ow:
            return np.ascontiguousarray(g.transpose(1, 0, 2, 3)).reshape(g.shape[1], -1)
        wide = np.zeros((g.shape[1], self.n, self.oh, self.width), dtype=g.dtype)
        wide[..., :self.ow] = g.transpose(1, 0, 2, 3)
        return wide.reshape(g.shape[1], -1)

    def col2im(self, d_cols: np.ndarray) -> np.ndarray:
        """The adjoint of im2col: each column's values added back where they were read."""
        d_cols = d_cols.reshape(self._cols_shape())
        buffer, image = self._padded(d_cols.dtype)
        for i, j, tap in self._taps():  # one strided scatter-add per kernel tap
            buffer[tap] += d_cols[:, i, j]
        return np.ascontiguousarray(self._interior(image).transpose(1, 0, 2, 3))


# ---------------------------------------------------------------- small images: the conv as one dense matrix

# On small images (the 8x8 and 4x4 of a digits CNN) im2col's fixed costs
# (the column matrix built per pass, per-tap copies, transposes, the
# scatter-add) weigh more than its product. There the whole linear map
# x -> conv(x, w) of one example is a small dense matrix M, (out*OH*OW) x
# (C*H*W), that holds w's entries at the (output, input) pairs a kernel tap
# connects and exact zeros elsewhere: forward is x (N, C*H*W) @ M.T, dx is
# g (N, out*OH*OW) @ M, both already in the (N, C, H, W) layout, and dw sums
# the connected entries of g.T @ x. It costs H*W / (kh*kw) times im2col's
# multiply-adds, so it is taken only while that and M stay small.
DENSE_MAX_ELEMENTS = 1 << 20  # entries of M (4 MiB in float32)
DENSE_MAX_SPREAD = 8  # H*W <= 8 kh*kw


@functools.lru_cache(maxsize=64)
def _dense_pairs(hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tap, output position, input position) of every connection that reads
    real input (padding reads zeros: no entry), sorted by tap."""
    oh, ow = (_out_size(s, k, st, p, d) for s, k, st, p, d in zip(hw, kernel, stride, pad, dilation))
    i, j, p, q = np.meshgrid(np.arange(kernel[0]), np.arange(kernel[1]), np.arange(oh), np.arange(ow),
                             indexing="ij")
    rows = p * stride[0] - pad[0] + i * dilation[0]
    cols = q * stride[1] - pad[1] + j * dilation[1]
    real = (rows >= 0) & (rows < hw[0]) & (cols >= 0) & (cols < hw[1])
    taps, outs, ins = (i * kernel[1] + j)[real], (p * ow + q)[real], (rows * hw[1] + cols)[real]
    for a in (taps, outs, ins):
        a.flags.writeable = False
    return taps, outs, ins


class _Dense:
    """One conv call as the dense matrix M (see above)."""

    def __init__(self, geometry: _Conv, x_shape: tuple[int, ...], w_shape: tuple[int, ...]):
        self.n, self.c, self.h, self.w = x_shape
        self.o, _, kh, kw = w_shape
        self.kernel = (kh, kw)
        self.oh, self.ow = (_out_size(s, k, st, p, d) for s, k, st, p, d in
                            zip(x_shape[2:], self.kernel, geometry.stride, geometry.padding, geometry.dilation))
        self.pairs = _dense_pairs((self.h, self.w), self.kernel, geometry.stride, geometry.padding,
                                  geometry.dilation)

    @staticmethod
    def fits(geometry: _Conv, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> bool:
        _, c, h, w = x_shape
        o, _, kh, kw = w_shape
        oh, ow = (_out_size(s, k, st, p, d) for s, k, st, p, d in
                  zip((h, w), (kh, kw), geometry.stride, geometry.padding, geometry.dilation))
        return h * w <= DENSE_MAX_SPREAD * kh * kw and o * oh * ow * c * h * w <= DENSE_MAX_ELEMENTS

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """M as (out*OH*OW, C*H*W): w's entries placed (not multiplied), zeros elsewhere."""
        taps, outs, ins = self.pairs
        m = np.zeros((self.o, self.oh * self.ow, self.c, self.h * self.w), dtype=w.dtype)
        m[:, outs, :, ins] = w.reshape(self.o, self.c, -1)[:, :, taps].transpose(2, 0, 1)
        return m.reshape(self.o * self.oh * self.ow, self.c * self.h * self.w)

    def forward(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        out = np.matmul(x.reshape(self.n, -1), self.matrix(w).T)
        return out.reshape(self.n, self.o, self.oh, self.ow)

    def grad_x(self, g_rows: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.matmul(g_rows, self.matrix(w)).reshape(self.n, self.c, self.h, self.w)

    def grad_w(self, g_rows: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Each tap's sum over the connected (output, input) pairs of g.T @ x:
        the same terms as im2col's dw; the unconnected entries, which may hold
        anything, are never read."""
        taps, outs, ins = self.pairs
        both = np.matmul(g_rows.T, x.reshape(self.n, -1))  # (out*OH*OW, C*H*W)
        both = both.reshape(self.o, self.oh * self.ow, self.c, self.h * self.w)
        picked = both[:, outs, :, ins].reshape(len(taps), self.o * self.c)  # (pairs, out*C)
        tap_count = self.kernel[0] * self.kernel[1]
        per_tap = np.zeros((tap_count, len(taps)), dtype=x.dtype)
        per_tap[taps, np.arange(len(taps))] = 1
        summed = np.matmul(per_tap, picked).reshape(tap_count, self.o, self.c)
        return np.ascontiguousarray(summed.transpose(1, 2, 0)).reshape(self.o, self.c, *self.kernel)


def _finite(a: np.ndarray) -> bool:
    """Whether every element is finite, in one reduction (a sum is finite only
    then; an overflowing sum just says no, which only costs speed)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.sum(a)))


def _conv_forward(dims: int):
    def forward(at: Attrs, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        x2, w2 = _as2d(dims, x, w)
        geometry = _Conv(at, dims)
        # M's zeros times an infinite input would be NaN where PyTorch's conv never reads it: im2col then
        if _Dense.fits(geometry, x2.shape, w2.shape) and _finite(x2):
            out = _Dense(geometry, x2.shape, w2.shape).forward(x2, w2)
            return out if dims == 2 else out[:, :, 0, :]
        layout = _Layout(geometry, x2.shape, w2.shape[2:])
        out = layout.output(np.matmul(w2.reshape(w2.shape[0], -1), layout.im2col(x2)))  # the one product
        return out if dims == 2 else out[:, :, 0, :]
    return forward


def _conv_vjp(dims: int):
    def vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple:
        x2, w2 = _as2d(dims, x, w)
        geometry = _Conv(at, dims)
        g2 = g if dims == 2 else g[:, :, None, :]
        if _Dense.fits(geometry, x2.shape, w2.shape) and (not at.wants[0] or _finite(g2)):
            dense = _Dense(geometry, x2.shape, w2.shape)
            g_rows = g2.reshape(g2.shape[0], -1)
            grad_x = dense.grad_x(g_rows, w2) if at.wants[0] else None
            grad_w = dense.grad_w(g_rows, x2).reshape(w.shape) if at.wants[1] else None
            return (grad_x if grad_x is None or dims == 2 else grad_x[:, :, 0, :]), grad_w
        layout = _Layout(geometry, x2.shape, w2.shape[2:])
        g_cols = layout.adjoint_cols(g if dims == 2 else g[:, :, None, :])  # (O, N*L)
        grad_x = grad_w = None
        if at.wants[1]:  # im2col again: cheaper than keeping cols alive from the forward pass
            grad_w = np.matmul(g_cols, layout.im2col(x2).T).reshape(w.shape)
        if at.wants[0]:
            grad_x = layout.col2im(np.matmul(w2.reshape(w2.shape[0], -1).T, g_cols))
            if dims == 1:
                grad_x = grad_x[:, :, 0, :]
        return grad_x, grad_w
    return vjp


def _images(x: Shape) -> int:
    """Images in one example's value (1 for a per-example x), or in all of a value without a batch axis."""
    return 1 if is_per_example(x) else x[0]


def _conv_scratch(dims: int):
    def scratch(at: Attrs, x: Shape, w: Shape) -> int:
        """The padded image and im2col's columns, twice each (the VJP rebuilds the columns for dw while
        dcols and col2im's padded buffer are alive), and the product's wide (O, L) columns, twice: with a
        large padding and dilation these dwarf the output."""
        x2 = (1, x[1], 1, x[2]) if dims == 1 else (1, *x[1:])
        kernel = (1, w[2]) if dims == 1 else tuple(w[2:])
        layout = _Layout(_Conv(at, dims), x2, kernel)
        padded = layout.c * (layout.hp * layout.wp + layout.tail)
        cols = layout.c * kernel[0] * kernel[1] * layout.length
        return _images(x) * 2 * (padded + cols + w[0] * layout.length)
    return scratch


_CONV_ATTRS = {"stride": ("ints", (1,)), "padding": ("ints", (0,)), "dilation": ("ints", (1,))}
register(Op("conv2d", 2, _conv_shape(2), _conv_forward(2), _conv_vjp(2), linear_in="each", attrs=_CONV_ATTRS,
            scratch=_conv_scratch(2),
            doc="2-D cross-correlation as PyTorch's conv2d (no bias): x (batch, C, H, W), w (out, C, kh, kw); "
                "stride, padding (zeros) and dilation are 1 or 2 ints"))
register(Op("conv1d", 2, _conv_shape(1), _conv_forward(1), _conv_vjp(1), linear_in="each", attrs=_CONV_ATTRS,
            scratch=_conv_scratch(1),
            doc="1-D cross-correlation as PyTorch's conv1d (no bias): x (batch, C, L), w (out, C, k)"))


# ---------------------------------------------------------------- pooling

class _Pool:
    def __init__(self, at: Attrs, name: str):
        self.kernel = _tuple(at.kernel, 2, f"{name} kernel", 1)
        self.stride = _tuple(at.stride, 2, f"{name} stride", 1) if at.stride else self.kernel
        self.padding = _tuple(at.padding, 2, f"{name} padding", 0)
        _check_taps(self.kernel, name)
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
    xp = _pad_last2(x, pool.padding, -np.inf)
    taps = [xp[tap] for tap in pool.taps(pool.out_hw(*x.shape[-2:]))]
    if len(taps) == 1:
        return taps[0].copy()
    out = np.maximum(taps[0], taps[1])
    for tap in taps[2:]:
        np.maximum(out, tap, out=out)  # NaN propagates, as in PyTorch
    return out


def _max_pool_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """The whole gradient of a window goes to ONE input: its first maximal
    element in row-major window order (a NaN, if the window holds one), as
    PyTorch's CPU kernel picks; padding never does, even in a window of
    -inf. Overlapping windows add up."""
    pool = _Pool(at, "max_pool2d")
    xp = _pad_last2(x, pool.padding, -np.inf)
    taps = list(pool.taps(out.shape[-2:]))
    disjoint = all(s >= k for s, k in zip(pool.stride, pool.kernel))
    covered = (disjoint and pool.stride == pool.kernel and pool.padding == (0, 0)
               and x.shape[-2] % pool.kernel[0] == 0 and x.shape[-1] % pool.kernel[1] == 0)
    grad = np.empty_like(xp) if covered else np.zeros_like(xp)  # covered: every element written once below
    # A sum is NaN only if out holds a NaN (or both infinities): one pass instead of a mask in the common case.
    nan_out = np.isnan(out) if np.isnan(np.sum(out)) else None
    real = _pad_last2(np.ones(x.shape[-2:], dtype=bool), pool.padding, False) if pool.padding != (0, 0) else None
    hit = np.empty(out.shape, dtype=bool)
    unclaimed = None
    for k, tap in enumerate(taps):
        np.equal(xp[tap], out, out=hit)
        if nan_out is not None:
            hit |= nan_out & np.isnan(xp[tap])
        if real is not None:
            hit &= real[tap]
        if k:
            hit &= unclaimed
        if k < len(taps) - 1:  # later taps may only take what earlier ones left
            unclaimed = ~hit if unclaimed is None else np.logical_xor(unclaimed, hit, out=unclaimed)
        if disjoint:
            np.multiply(g, hit, out=grad[tap])
        else:
            grad[tap] += g * hit
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


def _pool_scratch(at: Attrs, x: Shape) -> int:
    """The padded input and its gradient (a window as large as the image, padded by half of it, keeps the
    output small and the padded input not)."""
    pool = _Pool(at, "pool")
    lead = 1
    for d in x[1 if is_per_example(x) else 0:-2]:
        lead *= d
    return 2 * lead * (x[-2] + 2 * pool.padding[0]) * (x[-1] + 2 * pool.padding[1])


_POOL_ATTRS = {"kernel": ("ints", REQUIRED), "stride": ("ints", ()), "padding": ("ints", (0,))}
register(Op("max_pool2d", 1, _pool_shape("max_pool2d"), _max_pool_forward, _max_pool_vjp, attrs=_POOL_ATTRS,
            scratch=_pool_scratch,
            doc="max over kh x kw windows of the last two axes; stride defaults to the kernel, padding is -inf; "
                "a window's gradient goes to its first maximal element (row-major), as in PyTorch"))
register(Op("avg_pool2d", 1, _pool_shape("avg_pool2d"), _avg_pool_forward, _avg_pool_vjp, linear_in="all",
            scratch=_pool_scratch,
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
