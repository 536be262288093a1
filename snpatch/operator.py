"""Convolutions as linear operators: their functional form, operator norms and certified bounds.

A convolution layer maps an input of shape ``(C, *spatial)`` linearly (bias aside) to its
output; its Lipschitz constant in the l2 norm is the top singular value of that linear map,
which depends on the input size, the stride, the padding mode and the dilation, and is not
the top singular value of the kernel reshaped to a matrix (what ``method="matrix"`` and
torch's spectral norm divide by).

:class:`ConvSpec` is the layer's functional form (``F.conv*d`` / ``F.conv_transpose*d`` with
all its options, non-zero padding modes through ``F.pad``) and its adjoint
(:meth:`ConvSpec.adjoint`: the transposed convolution, and the adjoint of ``F.pad``'s index
map), written with plain tensor ops: no autograd engine, so that it runs wherever the layer
does (fake CUDA tensors included) and under ``torch.no_grad``.

:func:`conv_bound` is a *certified* upper bound of the operator norm (up to a relative
safety margin of 1e-8 far above float64 rounding error):

- Every convolution on a known input size is bounded by a circular convolution on a grid:
  a zero-padded convolution is a restriction of the circular one on
  ``n + min(total padding, effective kernel - 1)`` (zero-embedding is an isometry, keeping
  rows can only lower the norm); a stride keeps a subset of the output rows, so the
  stride-1 bound holds (``||S C|| <= ||C||``); a transposed convolution is the adjoint of a
  zero-padded convolution on its output size and has the same norm.
- Circular padding on size ``n`` gives rows of the circulant on ``n``; rows repeat when the
  output is longer than ``n``, which multiplies the bound by ``sqrt(repeats)``.
- Reflect and replicate padding are a linear map ``P`` followed by a valid convolution:
  ``||C P|| <= ||C|| ||P||``, with ``||P|| = sqrt(max number of copies of one input entry)``
  (``P^T P`` is diagonal).
- The circulant's norm is the largest top singular value of the kernel's FFT over the grid
  (per group; groups combine by max). Each frequency's ``lambda_max(K^H K)`` is certified by
  a Cholesky factorization of ``mu I - K^H K`` (it succeeds only if ``mu`` bounds every
  eigenvalue): candidates ``mu`` just above a power-iteration estimate, sharpened by inverse
  iteration, are all checked (``cholesky_ex``) and the smallest that holds is selected with
  ``torch.where``, the trace as the always-valid fallback. The bounds are float64 tensors on
  the weight's device and nothing in them is read on the host: a certified layer's forward
  does not synchronize a CUDA device (the public functions here return floats).
- For every input size at once (``size=None``) the sup over all frequencies is bounded from
  a grid with Bernstein's inequality for trigonometric polynomials (the symbol's Gram matrix
  has degree ``dilation * (kernel - 1)`` per dimension), or, for layers with too many
  channels for a fine grid, by ``sqrt(kernel taps)`` times the reshaped-kernel norm.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._compat import ConvNd, conv_pad, version_counter
from .distributed import gathered, sharded_like
from .engine import (
    EXACT_SQUARINGS,
    GRAM_LIMIT_CPU,
    BlockProducts,
    GramProducts,
    RitzRow,
    block_step,
    gram_limit,
    next_block,
    scale_of,
)
from .parametrization import (
    _LANCZOS_MAX_STEPS,
    _LOW_PRECISION,
    BLOCK_SIZE,
    Mode,
    SpectralNorm,
    _orthonormal,
    _scaled,
    in_functorch_transform,
    lanczos_top,
    weight_to_matrix,
)

__all__ = [
    "EXACT_CIRCULANT_WIDTH",
    "EXACT_OPERATOR_SIZE",
    "OPERATOR_BLOCK_SIZE",
    "OPERATOR_REFRESH_RESIDUAL",
    "Circulant",
    "ConvSpec",
    "OperatorNorm",
    "certified_divisor",
    "conv_bound",
    "conv_bound_up_to",
    "is_conv",
    "linear_maps",
    "matrix_bound",
    "operator_norm",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

# The certified value is checked at (1 - margin) of the bound reported: float64 rounding in
# forming K^H K and in the Cholesky factorization is below 1e-12 relative for any layer size.
_SAFETY = 1e-8
# The Cholesky checks (see _lambda_max_bounds) try, at once, the estimate times
# 1 + _FIRST_GAP * 4^j for j below _GAPS (1e-5 up to 0.66), then _REFINE_ROUNDS rounds of
# _INVERSE_STEPS inverse-iteration steps and _REFINE_POINTS candidates each (the settings
# that kept 800 test matrices within 1e-5 of lambda_max, as tight as the eigvalsh start).
_FIRST_GAP = 1e-5
_GAPS = 9
_REFINE_ROUNDS = 3
_REFINE_POINTS = 3
_INVERSE_STEPS = 3
# Power-iteration steps for the estimate the candidates start from.
_POWER_STEPS = 60
# Matrices of a batch (a chunk of frequencies) bounded one by one; the rest are checked
# against the largest of their bounds (see _lambda_max_bound).
_TOP = 8
# Power-iteration steps that rank a batch's matrices for that choice (a wrong ranking costs
# tightness, never validity: every matrix is checked).
_RANK_STEPS = 30
# Work budget (frequencies * rank^3) for the every-size grid; above it, the cheap bound.
_ALL_SIZES_BUDGET = 2e9
_MAX_FREQUENCIES = 1 << 14
# Bernstein's factor is 1 / (1 - sum_i pi m_i / N_i); the grid aims for this sum.
_ALL_SIZES_SLACK = 0.1
# Layers with at most this many inputs (and outputs) are bounded through their dense matrix.
_DENSE_LIMIT = 1024
_DENSE_ENTRIES = 1 << 24
# Complex entries processed per chunk of frequencies (memory bound).
_CHUNK_ENTRIES = 1 << 23
# Work (see _bound_cost) for bounding a certified circular/reflect/replicate conv on every
# input size up to its recorded one, one by one (about a second on one CPU core).
_UP_TO_BUDGET = 2e9


def is_conv(module: nn.Module) -> bool:
    """True for ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` (and subclasses)."""
    return isinstance(module, _CONV_TYPES + _CONV_TRANSPOSE_TYPES)


@dataclass(frozen=True)
class ConvSpec:
    """The functional form of one convolution layer (bias aside), as plain values.

    Args:
        transposed: a ``ConvTranspose*d``.
        ndim: spatial dimensions (1, 2 or 3).
        in_channels: channels of the input.
        stride, dilation, output_padding: per spatial dimension.
        padding: per spatial dimension, or ``"same"`` / ``"valid"`` (zeros mode only).
        groups: channel groups.
        padding_mode: ``"zeros"``, ``"circular"``, ``"reflect"`` or ``"replicate"``.
        pad: ``F.pad``'s amounts (last dimension first, left then right), which also give
            the padding of ``"same"``.
    """

    transposed: bool
    ndim: int
    in_channels: int
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    output_padding: tuple[int, ...]
    pad: tuple[int, ...]

    @classmethod
    def of(cls, layer: nn.Module) -> ConvSpec:
        """The spec of a ``Conv*d`` / ``ConvTranspose*d`` layer."""
        assert isinstance(layer, ConvNd)
        padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
        return cls(
            transposed=bool(layer.transposed),
            ndim=len(layer.kernel_size),
            in_channels=int(layer.in_channels),
            stride=tuple(int(s) for s in layer.stride),
            padding=padding,
            dilation=tuple(int(d) for d in layer.dilation),
            groups=int(layer.groups),
            padding_mode=str(layer.padding_mode),
            output_padding=tuple(int(p) for p in layer.output_padding),
            pad=conv_pad(layer),
        )

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's forward without bias: ``x`` is ``(batch, C, *spatial)``."""
        if self.transposed:
            return _CONV_TRANSPOSE[self.ndim](
                x,
                weight,
                None,
                self.stride,
                self.padding,  # type: ignore[arg-type]
                self.output_padding,
                self.groups,
                self.dilation,
            )
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.padding_mode)
            return _CONV[self.ndim](x, weight, None, self.stride, 0, self.dilation, self.groups)
        return _CONV[self.ndim](
            x,
            weight,
            None,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def adjoint(self, y: Tensor, weight: Tensor, size: Sequence[int]) -> Tensor:
        """The adjoint of :meth:`apply` for inputs of spatial ``size``: ``y`` is an output batch.

        A convolution's adjoint is the transposed convolution with the ``output_padding``
        that gives back the padded input's size (the rows a stride skips get zeros), then
        the adjoint of the padding (:func:`_pad_adjoint`); a transposed convolution's is
        the convolution, cut to ``size`` (an ``output_padding`` of at least the stride,
        allowed below the dilation, makes it longer).
        """
        if self.transposed:
            conv = _CONV[self.ndim]
            x = conv(y, weight, None, self.stride, self.padding, self.dilation, self.groups)
            for axis, n in enumerate(size):
                if x.shape[2 + axis] != n:
                    x = x.narrow(2 + axis, 0, n)
            return x
        extent = _kernel_extent(weight, self)
        pads = self._pad_pairs()
        # Zeros padding: the transposed convolution cuts off what both sides have in common.
        common = [min(p) if self.padding_mode == "zeros" else 0 for p in pads]
        output_padding = [
            (n + sum(p) - e) % s for n, p, e, s in zip(size, pads, extent, self.stride, strict=True)
        ]
        x = _CONV_TRANSPOSE[self.ndim](
            y,
            weight,
            None,
            self.stride,
            tuple(common),
            tuple(output_padding),
            self.groups,
            self.dilation,
        )
        rest = [(left - c, right - c) for (left, right), c in zip(pads, common, strict=True)]
        return _pad_adjoint(x, rest, self.padding_mode)

    def _pad_pairs(self) -> list[tuple[int, int]]:
        """``(left, right)`` padding per spatial dimension (first dimension first)."""
        pairs = [(self.pad[i], self.pad[i + 1]) for i in range(0, len(self.pad), 2)]
        return pairs[::-1]

    def out_channels(self, weight: Tensor) -> int:
        """Channels of the layer's output."""
        return int(weight.shape[1] * self.groups if self.transposed else weight.shape[0])

    def total_padding(self) -> tuple[int, ...]:
        """Left + right padding per spatial dimension (first dimension first)."""
        return tuple(left + right for left, right in self._pad_pairs())

    def output_size(self, size: Sequence[int], weight: Tensor) -> tuple[int, ...]:
        """Spatial output size for input ``size`` (transposed: with ``output_padding``)."""
        kernel = weight.shape[2:]
        out = []
        for i, n in enumerate(size):
            extent = self.dilation[i] * (kernel[i] - 1) + 1
            if self.transposed:
                p = self.total_padding()[i]
                out.append((n - 1) * self.stride[i] - p + extent + self.output_padding[i])
            else:
                out.append((n + self.total_padding()[i] - extent) // self.stride[i] + 1)
        return tuple(out)


def _pad_adjoint(grad: Tensor, pads: Sequence[tuple[int, int]], mode: str) -> Tensor:
    """The adjoint of ``F.pad(x, ..., mode)`` with ``(left, right)`` per spatial dimension.

    ``grad`` is padded-shaped, its spatial dimensions last. Each dimension at a time (the nD
    pad is the product of the 1-D ones): zeros padding cuts the borders off; circular,
    reflect and replicate padding copy entries into the borders, and the adjoint adds every
    copy back into its source (:func:`_border_adjoint`).
    """
    first = grad.ndim - len(pads)
    for axis, (left, right) in enumerate(pads):
        if left == right == 0:
            continue
        dim = first + axis
        n = grad.shape[dim] - left - right
        if mode == "zeros":
            grad = grad.narrow(dim, left, n)
        else:
            grad = _border_adjoint(grad, dim, left, right, n, mode)
    return grad


def _border_adjoint(grad: Tensor, dim: int, left: int, right: int, n: int, mode: str) -> Tensor:
    """:func:`_pad_adjoint` along one dimension, for a mode that copies into the borders.

    Each border is one block of copies, added back where it came from: a circular border
    in place at the other end, a reflected one flipped next to the edge, a replicated one
    summed into the edge. (Not an ``index_add`` over the padding's index map: torch 2.13's
    inductor miscompiles that on the CPU, with wrong strides for a channels-last source, and
    writes out of bounds.) No border is wider than ``n``: ``F.pad`` refuses a circular one
    that would wrap more than once, and a reflected one of ``n`` or more.
    """
    lo, hi = grad.narrow(dim, 0, left), grad.narrow(dim, left + n, right)
    out = grad.narrow(dim, left, n).clone()
    if mode == "circular":
        placed = [(lo, n - left), (hi, 0)]
    elif mode == "reflect":  # index -j reads j, n - 1 + j reads n - 1 - j
        placed = [(lo.flip(dim), 1), (hi.flip(dim), n - 1 - right)]
    else:  # replicate: the border reads the edge
        placed = [(lo.sum(dim, keepdim=True), 0), (hi.sum(dim, keepdim=True), n - 1)]
    for block, offset in placed:
        if block.shape[dim]:
            out.narrow(dim, offset, block.shape[dim]).add_(block)
    return out


def _channel_blocks(weight: Tensor, groups: int) -> Tensor:
    """``(groups, a, b, *kernel)``: each group's kernel (orientation does not matter)."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def _symbol(
    block: Tensor, dilation: Sequence[int], grid: Sequence[int], stride: Sequence[int]
) -> Tensor:
    """``(frequencies, a, b * prod(stride))``: one group's kernel ``(a, b, *k)`` in Fourier.

    The kernel's DFT on a circular grid (taps folded modulo the grid). With a stride ``s``
    (the grid a multiple of it), the output keeps one frequency in ``s`` per dimension and
    the ``s`` input frequencies that alias onto it are stacked side by side, scaled by
    ``1/sqrt(s)``: the polyphase form, whose norm is exactly the strided circulant's.
    """
    a, b, *kernel = block.shape
    placed = block.new_zeros(a, b, *grid)
    flat_index = torch.zeros((), dtype=torch.long, device=block.device)
    for axis, (k, d, g) in enumerate(zip(kernel, dilation, grid, strict=True)):
        shape = [1] * len(grid)
        shape[axis] = -1
        index = torch.arange(k, device=block.device) * d % g
        flat_index = flat_index + (index * math.prod(grid[axis + 1 :])).reshape(shape)
    # index_add: taps that land on the same grid point (grids smaller than the kernel) add.
    placed.flatten(2).index_add_(2, flat_index.flatten(), block.flatten(2))
    dims = tuple(range(2, 2 + len(grid)))
    if all(s == 1 for s in stride):
        spectrum = torch.fft.rfftn(placed, dim=dims)
        half: Tensor = spectrum.flatten(2).permute(2, 0, 1)
        return half
    spectrum = torch.fft.fftn(placed, dim=dims)
    split = [n for g, s in zip(grid, stride, strict=True) for n in (s, g // s)]
    spectrum = spectrum.reshape(a, b, *split)
    ndim = len(grid)
    coarse = [2 + 2 * i + 1 for i in range(ndim)]
    alias = [2 + 2 * i for i in range(ndim)]
    spectrum = spectrum.permute(*coarse, 0, 1, *alias)
    phases = math.prod(stride)
    full: Tensor = spectrum.reshape(-1, a, b * phases) / math.sqrt(phases)
    return full


def _gram(symbol: Tensor) -> Tensor:
    """``K^H K`` or ``K K^H``, whichever is smaller, for a batch of matrices."""
    if symbol.shape[-1] <= symbol.shape[-2]:
        return symbol.mH @ symbol
    return symbol @ symbol.mH


def _passes(gram: Tensor, traces: Tensor, mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Which candidates ``mu`` (J, B) bound ``lambda_max`` of each matrix of ``gram`` (B, r, r).

    Returns (bounds, factored, factors): ``mu (1 - _SAFETY) I - G`` has a Cholesky factor
    (``cholesky_ex``'s ``info == 0``: positive definite, so ``lambda_max < mu``), or ``mu``
    is at least the trace (``lambda_max <= trace`` for a PSD matrix); whether the first
    holds; the factors.
    """
    shifted = gram.neg().expand(mu.shape[0], *gram.shape).clone()
    shift = (mu * (1 - _SAFETY)).to(gram.dtype)
    shifted.diagonal(dim1=-2, dim2=-1).add_(shift[..., None])
    factors, info = torch.linalg.cholesky_ex(shifted)
    factored = (info == 0) & mu.isfinite()
    return factored | (mu >= traces), factored, factors


def _lambda_max_bounds(gram: Tensor) -> Tensor:
    """``(B,)`` certified upper bounds of ``lambda_max`` of a batch of Hermitian PSD matrices.

    Each is the smallest candidate that :func:`_passes` (chosen with ``torch.where``; the
    trace if none does). The first candidates are a power-iteration estimate times
    ``1 + 1e-5 * 4^j`` (:data:`_GAPS` of them, checked in one batched call); then each of
    :data:`_REFINE_ROUNDS` rounds sharpens the estimate by inverse iteration with the factor
    of the best passing candidate (``(mu I - G)^-1``, whose top eigenvalue
    ``1 / (mu - lambda_max)`` stands far above the others when ``mu`` is close) and checks
    :data:`_REFINE_POINTS` candidates just above it. float64 tensors on the device
    throughout, no value read on the host: nothing synchronizes.
    """
    traces = torch.diagonal(gram, dim1=-2, dim2=-1).real.sum(-1)
    x = _power_vector(gram)
    low = torch.minimum(_rayleigh(gram, x).clamp(min=0), traces)
    high = traces
    factor = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
    has_factor = torch.zeros_like(traces, dtype=torch.bool)

    def select(mu: Tensor) -> None:
        """Keep the smallest passing candidate (and its factor) and the best failing one."""
        nonlocal high, factor, has_factor, low
        ok, factored, factors = _passes(gram, traces, mu)
        best = torch.where(factored, mu, math.inf).argmin(0, keepdim=True)
        chosen = torch.take_along_dim(mu, best, 0)[0]
        better = factored.any(0) & (chosen < high)
        picked = torch.take_along_dim(factors, best[..., None, None], 0)[0]
        factor = torch.where(better[:, None, None], picked, factor)
        has_factor = has_factor | better
        high = torch.minimum(high, torch.where(ok, mu, high).amin(0))
        low = torch.maximum(low, torch.where(~ok & (mu < high), mu, low).amax(0))

    device = gram.device
    gaps = _FIRST_GAP * 4.0 ** torch.arange(_GAPS, dtype=torch.float64, device=device)
    select(torch.minimum(low * (1 + gaps[:, None]) + traces * 1e-12, traces))
    # Candidates at these fractions of the way from the estimate to the best bound: the
    # cubes of 1/4, 2/4, 3/4 (near the estimate, which inverse iteration makes accurate).
    points = torch.arange(1, _REFINE_POINTS + 1, dtype=torch.float64, device=device)
    fractions = (points / (_REFINE_POINTS + 1)) ** 3
    for _ in range(_REFINE_ROUNDS):
        for _ in range(_INVERSE_STEPS):
            y = torch.linalg.solve_triangular(factor, x, upper=False)
            y = _unit(torch.linalg.solve_triangular(factor.mH, y, upper=True))
            x = torch.where(has_factor[:, None, None] & y.isfinite().all(-2, keepdim=True), y, x)
        estimate = _rayleigh(gram, x)
        raised = estimate.isfinite() & (estimate < high)
        low = torch.where(raised, torch.maximum(low, estimate), low)
        select(low + (high - low) * fractions[:, None])
    return high


def _lambda_max_bound(gram: Tensor) -> Tensor:
    """A certified upper bound of the largest ``lambda_max`` over a batch (a 0-dim tensor).

    The :data:`_TOP` matrices with the largest power-iteration estimates are bounded
    tightly (:func:`_lambda_max_bounds`); the largest of those bounds, times ``1``,
    ``1 + 1e-4``, ``1 + 1e-2`` and ``2``, is then checked on the whole batch at once, and
    the smallest candidate that holds for every matrix kept (the largest trace, always
    valid, if none does). So each matrix is factored a few times, not once per refinement.
    """
    if gram.shape[0] <= _TOP:
        return _lambda_max_bounds(gram).amax()
    traces = torch.diagonal(gram, dim1=-2, dim2=-1).real.sum(-1)
    top = _rayleigh(gram, _power_vector(gram, _RANK_STEPS)).topk(_TOP).indices
    refined = _lambda_max_bounds(gram.index_select(0, top)).amax()
    ceiling = traces.amax()
    # 0, 1e-4, 1e-2 and 1 (made on the device: a copy from the host would synchronize).
    gaps = 10.0 ** torch.arange(-4, 1, 2, dtype=torch.float64, device=gram.device)
    gaps = torch.cat([gaps.new_zeros(1), gaps])
    mu = torch.minimum(refined * (1 + gaps), ceiling)
    ok = _passes(gram, traces, mu[:, None].expand(-1, gram.shape[0]))[0].all(-1)
    return torch.where(ok, mu, ceiling).amin()


def _power_vector(gram: Tensor, steps: int = _POWER_STEPS) -> Tensor:
    """``(B, r, 1)`` unit vectors after ``steps`` power-iteration steps.

    Started from a fixed, generic vector made on the device (a Weyl sequence), so that
    nothing is copied from the host. Only where the Cholesky checks start: a poor estimate
    costs work (see :func:`_lambda_max_bounds`), never validity.
    """
    rank = gram.shape[-1]
    index = torch.arange(1, rank + 1, dtype=torch.float64, device=gram.device)
    start = (index * 0.6180339887498949).frac() - 0.5
    x: Tensor = (start / start.norm()).to(gram.dtype).expand(gram.shape[0], rank).unsqueeze(-1)
    for _ in range(steps):
        x = _unit(torch.bmm(gram, x))
    return x


def _unit(x: Tensor) -> Tensor:
    """Columns of ``x`` (B, r, 1) scaled to unit norm (a zero column stays zero).

    Scaled by the largest entry first, so that the norm neither under- nor overflows.
    """
    tiny = torch.finfo(x.real.dtype).tiny
    x = x / x.abs().amax(dim=-2, keepdim=True).clamp_min(tiny)
    unit: Tensor = x / x.norm(dim=-2, keepdim=True).clamp_min(tiny)
    return unit


def _rayleigh(gram: Tensor, x: Tensor) -> Tensor:
    """``(B,)`` quotients ``x^H G x`` of unit vectors ``x`` (B, r, 1)."""
    quotient: Tensor = (x.mH @ torch.bmm(gram, x)).real.flatten()
    return quotient


def _circulant_norm(
    weight: Tensor,
    groups: int,
    dilation: Sequence[int],
    grid: Sequence[int],
    stride: Sequence[int] | None = None,
) -> Tensor:
    """Certified bound of the (strided) circular convolution's norm on ``grid``.

    The max over groups (a grouped convolution is a direct sum) and over frequencies, in
    chunks whose size depends on the shapes alone. A float64 tensor on the weight's device.
    """
    stride = stride or (1,) * len(grid)
    blocks = _channel_blocks(weight.detach().to(torch.float64), groups)
    spectrum = torch.cat([_symbol(block, dilation, grid, stride) for block in blocks])
    rank = min(spectrum.shape[1:])
    # Each chunk holds its symbols, their Grams and the candidates' shifted Grams.
    per_frequency = spectrum.shape[1] * spectrum.shape[2] + rank * rank * 4
    chunk = max(1, _CHUNK_ENTRIES // per_frequency)
    worst = [
        _lambda_max_bound(_gram(spectrum[start : start + chunk]))
        for start in range(0, spectrum.shape[0], chunk)
    ]
    return torch.stack(worst).amax().sqrt()


def _pad_copies(mode: str, left: int, right: int, n: int) -> int:
    """The most copies ``F.pad`` makes of one of ``n`` entries (by which entry each of its
    ``left + n + right`` reads from)."""
    counts = [0] * n
    for index in range(-left, n + right):
        if mode == "circular":
            source = index % n
        elif mode == "replicate":
            source = min(max(index, 0), n - 1)
        else:  # reflect
            source = (n - 1) - abs((n - 1) - abs(index))
        counts[source] += 1
    return max(counts)


def _pad_norm(spec: ConvSpec, size: Sequence[int]) -> float:
    """``||P||`` of the input padding: sqrt of the most copies of one input entry.

    The padding of each dimension is applied in turn, so the copies multiply.
    """
    copies = [
        _pad_copies(spec.padding_mode, left, right, n)
        for (left, right), n in zip(spec._pad_pairs(), size, strict=True)
    ]
    return math.sqrt(math.prod(copies))


def _kernel_extent(weight: Tensor, spec: ConvSpec) -> tuple[int, ...]:
    return tuple(d * (k - 1) + 1 for k, d in zip(weight.shape[2:], spec.dilation, strict=True))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _grid_and_factor(
    spec: ConvSpec, weight: Tensor, size: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...], float]:
    """The circular grid and stride that bound the layer on ``size``, and a factor on top.

    Zero padding (and the transposed case, the adjoint of a zero-padded convolution on its
    output size): any grid of at least ``n + min(padding, extent - 1)`` holds the layer as
    a restriction; rounded up to a multiple of the stride, the strided rows form a coset.
    Reflect/replicate: a valid convolution on the padded size, times ``||P||``. Circular:
    the circulant on ``n`` itself, times ``sqrt(repeats)`` when output rows repeat.
    """
    extent = _kernel_extent(weight, spec)
    pads = spec.total_padding()
    if spec.transposed or spec.padding_mode == "zeros":
        base = spec.output_size(size, weight) if spec.transposed else tuple(size)
        grid = tuple(
            _round_up(n + min(p, e - 1), s)
            for n, p, e, s in zip(base, pads, extent, spec.stride, strict=True)
        )
        return grid, spec.stride, 1.0
    if spec.padding_mode == "circular":
        repeats = 1
        strides = []
        for n, p, e, s in zip(size, pads, extent, spec.stride, strict=True):
            rows = -(-(n + p - e + 1) // n)
            repeats *= rows
            strides.append(s if rows == 1 and n % s == 0 else 1)
        return tuple(size), tuple(strides), math.sqrt(repeats)
    grid = tuple(_round_up(n + p, s) for n, p, s in zip(size, pads, spec.stride, strict=True))
    return grid, spec.stride, _pad_norm(spec, size)


def _matrix_bound(matrix: Tensor) -> Tensor:
    """:func:`matrix_bound` as a float64 tensor on the matrix's device (no host sync)."""
    m = matrix.detach().to(torch.float64)
    return _lambda_max_bounds(_gram(m.unsqueeze(0)))[0].sqrt()


def matrix_bound(matrix: Tensor) -> float:
    """Certified upper bound of a matrix's top singular value (float64 Cholesky check)."""
    return float(_matrix_bound(matrix))


def _cheap_bound(weight: Tensor, groups: int) -> Tensor:
    """``sqrt(taps) * min(||horizontal||, ||vertical||)`` of each group's per-tap matrices.

    ``K(w) = [K_1 ... K_P] diag(e^{i w p}) [I; ...; I]`` and the stacked phases have norm
    ``sqrt(P)``: valid for every input size (the padding factor aside). All groups in one
    batch (the max over groups of the smaller of each group's two bounds).
    """
    taps = math.prod(weight.shape[2:])
    blocks = _channel_blocks(weight.detach().to(torch.float64), groups)
    horizontal = blocks.flatten(2)
    vertical = blocks.movedim(2, -1).reshape(groups, -1, blocks.shape[2])
    both = torch.minimum(_lambda_max_bounds(_gram(horizontal)), _lambda_max_bounds(_gram(vertical)))
    return math.sqrt(taps) * both.amax().sqrt()


def _pad_factor_1d(mode: str, left: int, right: int, extent: int, n: int) -> float:
    """The padding factor of one spatial dimension of size ``n`` (0: size not accepted)."""
    out = n + left + right - extent + 1
    if (
        out < 1
        or (mode == "reflect" and max(left, right) >= n)
        or (mode == "circular" and max(left, right) > n)
    ):
        return 0.0
    if mode == "circular":
        return math.sqrt(-(-out // n))
    return math.sqrt(_pad_copies(mode, left, right, n))


def _all_sizes_pad_factor(spec: ConvSpec, weight: Tensor) -> float:
    """The largest padding factor over every input size (a product over dimensions)."""
    if spec.transposed or spec.padding_mode == "zeros":
        return 1.0
    extent = _kernel_extent(weight, spec)
    factor = 1.0
    for (left, right), e in zip(spec._pad_pairs(), extent, strict=True):
        # Past this size the left and right pads are apart and the factor stays put.
        limit = 2 * (left + right + e) + 2
        factor *= max(
            _pad_factor_1d(spec.padding_mode, left, right, e, n) for n in range(1, limit + 1)
        )
    return factor


def _all_sizes_bound(spec: ConvSpec, weight: Tensor) -> Tensor:
    """A certified bound valid for every input size."""
    kernel = weight.shape[2:]
    degrees = [d * (k - 1) for k, d in zip(kernel, spec.dilation, strict=True)]
    factor = _all_sizes_pad_factor(spec, weight)
    cheap = _cheap_bound(weight, spec.groups) * factor
    if not any(degrees):
        return cheap  # a 1x1 kernel: one tap, the per-group matrix norm is exact
    a, b = weight.shape[0] // spec.groups, weight.shape[1]
    rank = min(a, b)
    active = sum(1 for m in degrees if m)
    grid = [1 if m == 0 else math.ceil(active * math.pi * m / _ALL_SIZES_SLACK) for m in degrees]
    per_frequency = (rank**3 + _POWER_STEPS * rank**2 + a * b * rank + 200) * spec.groups
    frequencies = math.prod(grid) / 2
    excess = max(frequencies * per_frequency / _ALL_SIZES_BUDGET, frequencies / _MAX_FREQUENCIES)
    if excess > 1:
        scale = excess ** (1 / active)
        grid = [
            g if m == 0 else max(2 * m + 1, int(g / scale))
            for g, m in zip(grid, degrees, strict=True)
        ]
    slack = sum(math.pi * m / g for m, g in zip(degrees, grid, strict=True))
    if slack >= 0.5:
        return cheap
    sampled = _circulant_norm(weight, spec.groups, spec.dilation, grid)
    return torch.minimum(cheap, sampled / math.sqrt(1 - slack) * factor)


def _conv_bound(spec: ConvSpec, weight: Tensor, size: Sequence[int] | None) -> Tensor:
    """:func:`conv_bound` as a float64 tensor on the weight's device (no host sync)."""
    if size is None:
        return _all_sizes_bound(spec, weight)
    dense = _dense_matrix(spec, weight, size)
    if dense is not None:
        return _matrix_bound(dense)
    grid, stride, factor = _grid_and_factor(spec, weight, size)
    return _circulant_norm(weight, spec.groups, spec.dilation, grid, stride) * factor


def conv_bound(spec: ConvSpec, weight: Tensor, size: Sequence[int] | None) -> float:
    """Certified upper bound of the operator norm of a convolution (bias aside).

    Args:
        spec: the layer's functional form.
        weight: its (effective) weight.
        size: the input's spatial size, or None for a bound valid on every size.

    Returns:
        A float that is never below the l2 operator norm (see the module docstring).
    """
    return float(_conv_bound(spec, weight, size))


def _conv_bound_up_to(spec: ConvSpec, weight: Tensor, size: Sequence[int] | None) -> Tensor:
    """:func:`conv_bound_up_to` as a float64 tensor on the weight's device (no host sync).

    Which sizes and bounds are combined depends on the shapes alone.
    """
    if size is None:
        return _all_sizes_bound(spec, weight)
    if spec.transposed or spec.padding_mode == "zeros":
        return _conv_bound(spec, weight, size)
    extent = _kernel_extent(weight, spec)
    pads = spec._pad_pairs()
    factors = [
        {m: f for m in range(1, n + 1) if (f := _pad_factor_1d(spec.padding_mode, *p, e, m)) > 0}
        for n, p, e in zip(size, pads, extent, strict=True)
    ]
    sizes = list(itertools.product(*(sorted(f) for f in factors)))
    if sum(_bound_cost(spec, weight, m) for m in sizes) <= _UP_TO_BUDGET:
        return torch.stack([_conv_bound(spec, weight, m) for m in sizes]).amax()
    if spec.padding_mode == "circular":
        return _all_sizes_bound(spec, weight)
    valid = dataclasses.replace(
        spec, padding=(0,) * spec.ndim, padding_mode="zeros", pad=(0,) * (2 * spec.ndim)
    )
    # Per dimension: the sizes whose factor is at most that of ``size`` (V on the padded
    # ``size`` bounds them all), and each tiny size with a larger factor on its own.
    options = [
        [(n + sum(p), f[n]), *((m + sum(p), f[m]) for m in f if f[m] > f[n])]
        for f, n, p in zip(factors, size, pads, strict=True)
    ]
    bounds = [
        _conv_bound(valid, weight, [shape for shape, _ in combo])
        * math.prod(factor for _, factor in combo)
        for combo in itertools.product(*options)
    ]
    return torch.stack(bounds).amax()


def conv_bound_up_to(spec: ConvSpec, weight: Tensor, size: Sequence[int] | None) -> float:
    """Certified bound of the operator norm on every input size up to ``size`` (elementwise).

    What a certified layer divides by: it may be fed any size up to the largest recorded
    one (a larger input is recorded, and bounded, before its forward). With zero padding and
    for transposed convolutions the operator on a smaller input is a submatrix of the one on
    ``size``, so :func:`conv_bound` on ``size`` holds for all of them. Circular, reflect and
    replicate padding are not monotone in the size (a circular conv bounded at 8x8 can be
    above it at 6x6): while it is cheap (:data:`_UP_TO_BUDGET`), every accepted size up to
    ``size`` is bounded and the largest bound taken. Otherwise reflect/replicate pad with
    ``P`` and then run a valid convolution ``V``, whose matrix on a smaller input is a
    submatrix: ``||V P|| <= ||V on the padded size|| * ||P||``, where ``||P||`` is largest for
    a few tiny sizes (3 copies of one entry at size 3 for reflect, 1 for replicate), which
    are bounded on their own padded size; circular falls back to the every-size bound.
    ``size=None``: every size.
    """
    return float(_conv_bound_up_to(spec, weight, size))


def _bound_cost(spec: ConvSpec, weight: Tensor, size: Sequence[int]) -> float:
    """Rough floating-point work of :func:`conv_bound` on ``size``."""
    n_in = spec.in_channels * math.prod(size)
    out_channels = spec.out_channels(weight)
    n_out = out_channels * math.prod(spec.output_size(size, weight))
    if n_in <= _DENSE_LIMIT and n_in * n_out <= _DENSE_ENTRIES:
        return float(n_in * n_out * min(n_in, n_out) + min(n_in, n_out) ** 3 * 2)
    a, b = weight.shape[0] // spec.groups, weight.shape[1]
    rank = min(a, b)
    grid = math.prod(n + p for n, p in zip(size, spec.total_padding(), strict=True))
    return float(grid * (rank**3 * 10 + a * b * rank) * spec.groups)


def _round_up_to(value: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` (float64) in ``dtype``, rounded up: the smallest ``x >= value`` (not nearest)."""
    rounded = value.to(dtype)
    above = torch.nextafter(rounded, torch.full_like(rounded, math.inf))
    return torch.where(rounded.to(value.dtype) < value, above, rounded)


def _certified_divisor(
    conv: ConvSpec | None, weight: Tensor, dim: int, size: Sequence[int] | None
) -> Tensor:
    """:func:`certified_divisor` as a float64 tensor on the weight's device (no host sync)."""
    w = weight.detach().to(torch.float64)
    if conv is None:
        bound = _matrix_bound(weight_to_matrix(w, dim))
        taps, factor = 1, 1.0
    else:
        bound = _conv_bound_up_to(conv, w, size)
        taps, factor = math.prod(w.shape[2:]), _all_sizes_pad_factor(conv, w)
    rounding = torch.finfo(weight.dtype).eps * math.sqrt(taps) * factor * w.norm()
    value = (bound + rounding) * (1 + 4 * torch.finfo(torch.float32).eps)
    # A zero weight stays zero (the forward divides by 1).
    return torch.where(bound == 0, torch.zeros_like(value), value)


def certified_divisor(
    conv: ConvSpec | None, weight: Tensor, dim: int, size: Sequence[int] | None
) -> float:
    """What a certified layer divides its weight by, so that its norm is <= the target.

    The certified bound (a matrix: :func:`matrix_bound`; a convolution:
    :func:`conv_bound_up_to` on ``size``) plus a margin for the rounding of the forward's
    ``weight * scale`` in the weight's dtype: each entry is off by at most ``eps |entry|``,
    and a convolution's norm is at most ``sqrt(taps) * ||.||_F`` of its kernel times the
    padding factor, so the rounded weight's norm exceeds ``scale * bound`` by at most
    ``scale * eps * sqrt(taps) * ||W||_F * factor``; times ``1 + 4 eps`` of float32 for the
    rounding of ``lipschitz / divisor`` itself. (float32: a few 1e-6 relative; float16 and
    bfloat16 round so coarsely that the margin is percents.) The layer computes it as a
    tensor on the weight's device, with no host synchronization; this reads it as a float.
    """
    return float(_certified_divisor(conv, weight, dim, size))


def _dense_matrix(spec: ConvSpec, weight: Tensor, size: Sequence[int]) -> Tensor | None:
    """The layer's matrix (float64, ``outputs x inputs``) when it is small, else None."""
    n_in = spec.in_channels * math.prod(size)
    out_channels = spec.out_channels(weight)
    n_out = out_channels * math.prod(spec.output_size(size, weight))
    if n_in > _DENSE_LIMIT or n_in * n_out > _DENSE_ENTRIES:
        return None
    w = weight.detach().to(torch.float64)
    basis = torch.eye(n_in, dtype=torch.float64, device=w.device)
    columns = spec.apply(basis.reshape(n_in, spec.in_channels, *size), w).flatten(1)
    return columns.mT


def operator_norm(
    spec: ConvSpec, weight: Tensor, size: Sequence[int], *, steps: int = 400, rtol: float = 1e-7
) -> float:
    """The operator norm on ``size`` by Lanczos (Golub-Kahan) on the layer and its adjoint.

    Exact (dense SVD) for small layers; otherwise a converged estimate from below (not
    certified); pair it with :func:`conv_bound`.
    """
    w = weight.detach().to(torch.float64)
    dense = _dense_matrix(spec, w, size)
    if dense is not None:
        return float(torch.linalg.matrix_norm(dense, ord=2))
    apply, adjoint, n = linear_maps(spec, w, size)
    start = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n_out = int(apply(start).numel())
    steps = min(steps, n, n_out, _LANCZOS_ENTRIES // (n + n_out))
    value, _ = lanczos_top(apply, adjoint, steps, 1, start, rtol=rtol)
    return value


def linear_maps(
    spec: ConvSpec, weight: Tensor, size: Sequence[int]
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], int]:
    """Flat ``A v``, ``A^T u`` (:meth:`ConvSpec.adjoint`) and ``dim v`` of the layer on ``size``."""
    shape = (1, spec.in_channels, *size)
    out_shape = (1, spec.out_channels(weight), *spec.output_size(size, weight))

    def apply(v: Tensor) -> Tensor:
        return spec.apply(v.reshape(shape), weight).flatten()

    def adjoint(u: Tensor) -> Tensor:
        return spec.adjoint(u.reshape(out_shape), weight, size).flatten()

    return apply, adjoint, math.prod(shape)


@dataclass(frozen=True)
class Circulant:
    """A circular convolution that is exactly a (strided) circulant on its input size.

    That holds when every dimension's total padding is the kernel's extent minus one (the
    output has one row per stride) and the stride divides the size. Then the unitary DFTs
    of input and output make the operator block-diagonal: one small block per group and
    per output frequency ``m``, mapping the group's input channels at the input frequencies
    that alias onto ``m`` (``m + j n / s`` for ``j < s`` per dimension, the polyphase form of
    :func:`_symbol`) to its output channels at ``m``. The operator norm is the largest of
    the blocks' norms, so each block can be tracked on its own (:class:`OperatorNorm`).

    The methods move a batch of ``K`` input- or output-shaped spectra ``(K, C, *size)``
    to and from these blocks, ``(bins, rows, K)`` with ``bins = groups * prod(size / s)``.
    """

    groups: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def of(cls, spec: ConvSpec, weight: Tensor, size: Sequence[int]) -> Circulant | None:
        """The splitting of ``spec`` on ``size``, or None where the layer is not a circulant."""
        if spec.transposed or spec.padding_mode != "circular":
            return None
        extent = _kernel_extent(weight, spec)
        for n, total, e, s in zip(size, spec.total_padding(), extent, spec.stride, strict=True):
            if total != e - 1 or n % s:
                return None
        return cls(spec.groups, tuple(size), spec.stride)

    @property
    def _ndim(self) -> int:
        return len(self.size)

    @property
    def _half(self) -> bool:
        """Stride 1: the real FFT's half spectrum holds every block once (the others are
        their conjugates, with the same norms)."""
        return all(s == 1 for s in self.stride)

    def _spectral_size(self) -> tuple[int, ...]:
        if self._half:
            return (*self.size[:-1], self.size[-1] // 2 + 1)
        return self.size

    def _dims(self) -> tuple[int, ...]:
        return tuple(range(2, 2 + self._ndim))

    def spectrum(self, fields: Tensor) -> Tensor:
        """The unitary DFT of real fields ``(K, C, *size)`` (half of it, see ``_half``)."""
        transform = torch.fft.rfftn if self._half else torch.fft.fftn
        spectrum: Tensor = transform(fields, dim=self._dims(), norm="ortho")
        return spectrum

    def fields(self, spectrum: Tensor) -> Tensor:
        """The real fields of a spectrum from :meth:`spectrum` (its inverse)."""
        if self._half:
            real: Tensor = torch.fft.irfftn(spectrum, s=self.size, dim=self._dims(), norm="ortho")
            return real
        full: Tensor = torch.fft.ifftn(spectrum, dim=self._dims(), norm="ortho")
        return full.real

    def mode(self, spectrum: Tensor) -> Tensor:
        """A real unit field in the span of one frequency's ``spectrum`` and its conjugate's.

        ``x``, the inverse DFT of the full spectrum, is complex; its real and imaginary
        parts both lie in that span (a real operator's singular space), and the larger is
        at least ``|x| / sqrt(2)`` (a frequency that is its own conjugate can carry any
        phase, which may leave one of them near zero).
        """
        if self._half:
            missing = self.size[-1] - spectrum.shape[-1]
            spectrum = F.pad(spectrum, (0, missing))
        x = torch.fft.ifftn(spectrum, dim=self._dims(), norm="ortho")
        real, imag = x.real, x.imag
        norm_real, norm_imag = torch.linalg.vector_norm(real), torch.linalg.vector_norm(imag)
        chosen = torch.where(norm_real >= norm_imag, real, imag)
        tiny = torch.finfo(chosen.dtype).tiny
        unit: Tensor = chosen / torch.maximum(norm_real, norm_imag).clamp_min(tiny)
        return unit

    def _split(self) -> list[int]:
        """Each dimension ``n`` as ``(s, n / s)``: frequency ``j n / s + m`` at ``(j, m)``."""
        size = self._spectral_size()
        return [d for n, s in zip(size, self.stride, strict=True) for d in (s, n // s)]

    def _input_order(self) -> list[int]:
        """``(K, G, b, j0, m0, j1, m1, ...)`` to ``(G, m0, m1, ..., b, j0, j1, ..., K)``."""
        nd = self._ndim
        return [1, *(4 + 2 * i for i in range(nd)), 2, *(3 + 2 * i for i in range(nd)), 0]

    def inputs(self, spectra: Tensor) -> Tensor:
        """Input spectra ``(K, C, *size)`` as ``(bins, b * phases, K)``."""
        k, channels = spectra.shape[:2]
        g = self.groups
        split = spectra.reshape(k, g, channels // g, *self._split())
        placed = split.permute(*self._input_order())
        return placed.reshape(g * math.prod(placed.shape[1 : 1 + self._ndim]), -1, k)

    def inputs_back(self, bins: Tensor, channels: int) -> Tensor:
        """The inverse of :meth:`inputs`: ``(bins, b * phases, K)`` to ``(K, C, *size)``."""
        k = bins.shape[-1]
        g = self.groups
        split = self._split()
        coarse = split[1::2]
        shape = [g, *coarse, channels // g, *split[0::2], k]
        order = self._input_order()
        inverse = [order.index(i) for i in range(len(order))]
        return bins.reshape(shape).permute(*inverse).reshape(k, channels, *self._spectral_size())

    def outputs(self, spectra: Tensor) -> Tensor:
        """Output spectra ``(K, O, *size / stride)`` as ``(bins, O / groups, K)``."""
        k, channels = spectra.shape[:2]
        g = self.groups
        grouped = spectra.reshape(k, g, channels // g, *spectra.shape[2:])
        nd = self._ndim
        placed = grouped.permute(1, *range(3, 3 + nd), 2, 0)
        return placed.reshape(-1, channels // g, k)

    def width(self, channels: int, out_channels: int) -> int:
        """The dimension of a block: its input or its output size, whichever is smaller."""
        g = self.groups
        return min(channels // g * math.prod(self.stride), out_channels // g)

    def input_units(self, channels: int, like: Tensor) -> Tensor:
        """``b * phases`` input fields whose spectra span every block's input space.

        Field ``(i, p)`` is a unit impulse at position ``p`` of the first stride cell in
        channel ``i`` of every group: its spectrum at the aliases ``m + j n / s`` of any
        ``m`` is a phase times a DFT row of ``p``, so together they are a basis there.
        """
        b = channels // self.groups
        count = b * math.prod(self.stride)
        cells = torch.eye(count, dtype=like.dtype, device=like.device)
        cells = cells.reshape(count, 1, b, *self.stride).expand(
            count, self.groups, -1, *self.stride
        )
        return _zero_extended(cells.reshape(count, channels, *self.stride), self.size)

    def output_units(self, out_channels: int, like: Tensor) -> Tensor:
        """``O / groups`` output fields: a unit impulse at the origin in channel ``j`` of
        every group (a flat spectrum: the identity on every block's output space, scaled).
        """
        a = out_channels // self.groups
        ones = [1] * self._ndim
        units = torch.eye(a, dtype=like.dtype, device=like.device)
        units = units.reshape(a, 1, a, *ones).expand(a, self.groups, a, *ones)
        out = tuple(n // s for n, s in zip(self.size, self.stride, strict=True))
        return _zero_extended(units.reshape(a, out_channels, *ones), out)


def _zero_extended(x: Tensor, size: Sequence[int]) -> Tensor:
    """``x`` (batch, C, *small) with zeros after its end in each spatial dimension to ``size``."""
    small = x.shape[2:]
    pads = [p for n, m in zip(size[::-1], small[::-1], strict=True) for p in (0, n - m)]
    return F.pad(x, pads)


#: Input-shaped vectors tracked per convolution in operator mode (see docs/lipschitz.md):
#: with 4, a zero-padded digits CNN's Conv2d(32, 32, 3) was 0.74% off at Adam 1e-3 even
#: with the refresh; with 8, 0.10% (docs/design/engine.md, section 2).
OPERATOR_BLOCK_SIZE = 8
#: An operator step whose top residual exceeds this is refreshed (matrix mode: 2%): on the
#: digits CNN of ``benchmarks/tracking.py`` 2% left a Conv2d(32, 32, 3) 0.53% off, 1% 0.15%.
OPERATOR_REFRESH_RESIDUAL = 0.01
#: An operator with at most this many inputs or outputs is solved exactly at every step on
#: the CPU (from its Gram on its whole input space, or on its row space): a block of that
#: size costs little, and a smaller one would miss crossings within it. It is the engine's
#: limit for matrices (:func:`snpatch.engine.gram_limit`, which the operator asks): on an
#: accelerator, where no refresh runs, ``GRAM_LIMIT_ACCELERATOR``.
EXACT_OPERATOR_SIZE = GRAM_LIMIT_CPU


#: A circulant whose frequency blocks have at most this many inputs or outputs is solved
#: exactly at every step, from that many unit impulses through the layer (or its adjoint).
#: Wider blocks are tracked by the block's vectors (exact too up to OPERATOR_BLOCK_SIZE):
#: solving 16-wide blocks exactly (16 squarings of every frequency's 32 x 32 real form)
#: took a Conv2d(16, 16, 3) on 32x32 105 ms per step on one CPU core, tracking 27 ms.
EXACT_CIRCULANT_WIDTH = 4
#: Steps of a circulant's per-frequency iteration from its (fixed) start, when its state
#: is made (new input size, loading).
_CIRCULANT_STEPS = 16
# Entries (input + output sizes times steps) a Lanczos run may hold.
_LANCZOS_ENTRIES = 1 << 25


#: OperatorNorm's saved state beyond torch's ``_u``, ``_v`` (a convolution's only).
_OPERATOR_STATE = ("_input_size", "_op_v")


class OperatorNorm(SpectralNorm):
    """Parametrization dividing a weight by a layer's operator norm or a certified bound.

    Recorded in snapshots as ``kind = "operator"``.

    Used by :func:`snpatch.apply_spectral_norm` for convolutions with ``method="operator"``
    (``conv`` set) and for every weight with ``certified=True``. For a convolution,
    ``sigma`` is the l2 operator norm of the convolution (bias aside) on the largest input
    size seen so far (``_input_size``), tracked by a block power iteration that runs
    through the layer's functional form and its adjoint (:meth:`ConvSpec.adjoint`), on a
    block of input-shaped vectors (``_op_block``). The forward divides by ``||A v||`` for the top
    right vector ``v`` (``_op_v``), differentiably, in training and eval alike. Until an
    input size is known the weight is normalized as by :class:`SpectralNorm` (the matrix
    norm, whose state ``_u``, ``_v`` this class keeps too), or, with ``certified``, by a
    certified bound valid for every input size.

    With ``certified=True`` the value divided by is :func:`certified_divisor` of the weight
    the forward is given (train or eval): a certified bound on every input size up to the
    recorded one (:func:`conv_bound_up_to`; before any input, on every size) plus a margin
    for the rounding of the normalized weight in its dtype, rounded up. It is computed
    again whenever that weight's storage or version counter (``optimizer.step()``,
    ``load_state_dict``, ``model.to(...)``) or the input size changed, and reused
    otherwise; the gradient is that of the estimate. (In-place edits through ``.data``
    bypass the version counter: call :func:`snpatch.update_sigma` after one.) Being a
    function of the weight and the size, it is not saved: a loaded model computes the
    same divisor, and eval outputs are those of the saved model.

    Buffers: ``_u``, ``_v`` (matrix state, saved), ``_input_size`` (long, zeros while
    unknown), ``_op_v`` (``(1, C, *size)``), both saved for a convolution only (a weight
    normalized as a matrix keeps torch's keys); not saved: ``_block``, ``_sigma``,
    ``_op_block``, ``_op_sigma`` (re-fitted after loading).

    Args:
        weight: the weight to normalize, as for :class:`SpectralNorm`.
        dim: as for :class:`SpectralNorm`.
        lipschitz: as for :class:`SpectralNorm`.
        mode: as for :class:`SpectralNorm`.
        n_power_iterations: as for :class:`SpectralNorm`.
        eps: as for :class:`SpectralNorm`.
        conv: the layer's functional form, or None for a weight normalized as a matrix.
        certified: divide by a certified upper bound.
        input_size: spatial input size, if already known.
        operator_block_size: input-shaped vectors tracked.
        converge: estimate the state now (False: placeholders, to be overwritten).
    """

    kind: ClassVar[str] = "operator"
    persistent_buffers: ClassVar[frozenset[str]] = frozenset({"_u", "_v", "_input_size", "_op_v"})

    _input_size: Tensor
    _op_v: Tensor
    _op_block: Tensor
    _op_sigma: Tensor

    def __init__(
        self,
        weight: Tensor,
        *,
        dim: int,
        lipschitz: float,
        mode: Mode,
        n_power_iterations: int,
        eps: float,
        conv: ConvSpec | None,
        certified: bool,
        input_size: Sequence[int] | None = None,
        block_size: int = BLOCK_SIZE,
        operator_block_size: int = OPERATOR_BLOCK_SIZE,
        converge: bool = True,
    ) -> None:
        super().__init__(
            weight,
            dim=dim,
            lipschitz=lipschitz,
            mode=mode,
            n_power_iterations=n_power_iterations,
            eps=eps,
            block_size=block_size,
            converge=False,
        )
        self.conv = conv
        self.certified = bool(certified)
        self.operator_block_size = int(operator_block_size)
        ndim = conv.ndim if conv is not None else 0
        dtype = self._u.dtype
        device = self._u.device
        # Saved for a convolution's operator norm only: a weight normalized as a matrix
        # (certified Linear) keeps torch's state_dict keys, ``_u`` and ``_v``.
        saved = conv is not None
        self.register_buffer(
            "_input_size", torch.zeros(ndim, dtype=torch.long, device=device), persistent=saved
        )
        channels = conv.in_channels if conv is not None else 0
        empty = torch.zeros(1, channels, *([0] * ndim), dtype=dtype, device=device)
        self.register_buffer("_op_v", empty, persistent=saved)
        self.register_buffer("_op_block", empty.clone(), persistent=False)
        self.register_buffer("_op_sigma", self._u.new_zeros(()), persistent=False)
        # (_bound_key of a weight, its certified divisor): derived from the weight alone,
        # like the eval cache, so it is neither saved nor part of snapshots.
        self._divisor_cache: tuple[tuple[object, ...] | None, Tensor] | None = None
        if conv is not None and input_size is not None:
            self._resize(weight, tuple(int(n) for n in input_size))
        if converge:
            self.converge(weight)

    # --- configuration -------------------------------------------------------------
    def config(self) -> dict[str, object]:
        """Every option as plain python values; with the buffers it rebuilds this object."""
        return {
            **super().config(),
            "operator_block_size": self.operator_block_size,
            "certified": self.certified,
            "conv": None if self.conv is None else tuple(vars(self.conv).values()),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], buffers: Mapping[str, Tensor]) -> OperatorNorm:
        """Rebuild from :meth:`config` and all buffers (input size included), estimating nothing."""
        norm = super().from_config(config, buffers)
        assert isinstance(norm, OperatorNorm)
        conv = config["conv"]
        norm.conv = None if conv is None else ConvSpec(*conv)
        norm.certified = bool(config["certified"])
        norm.operator_block_size = int(config["operator_block_size"])
        if norm.conv is None:  # not saved (see __init__)
            for name in _OPERATOR_STATE:
                norm.register_buffer(name, buffers[name], persistent=False)
        norm._buffers.pop("_bound", None)  # a buffer in snapshots of earlier versions
        norm._divisor_cache = None  # recomputed (the same value) at the next forward
        return norm

    @torch.no_grad()
    def effective_weight(self, weight: Tensor) -> Tensor:
        """The normalized weight as the eval forward computes it (no iteration step, no grad)."""
        if not self.certified and self.input_size is None:
            return super().effective_weight(weight)
        return sharded_like(self.forward(gathered(weight).detach()), weight)

    # --- state ---------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, ...] | None:
        """The spatial input size the operator norm is for, or None before any input."""
        # Read off the state's shape, (1, channels, *size), not the saved ``_input_size``
        # buffer: reading a CUDA tensor on the host would synchronize every forward.
        if self.conv is None or self._op_v.numel() == 0:
            return None
        return tuple(self._op_v.shape[2:])

    def _state(self, weight: Tensor) -> Tensor:
        return weight.detach().to(self._u.dtype)

    def _block_width(self, weight: Tensor, size: tuple[int, ...]) -> int:
        """Input-shaped vectors tracked for ``size``: at most ``operator_block_size``.

        For a :class:`Circulant` each vector holds one per frequency block, so no more
        than a block's dimension are useful.
        """
        assert self.conv is not None
        out_channels = self.conv.out_channels(weight)
        n_in = self.conv.in_channels * math.prod(size)
        n_out = out_channels * math.prod(self.conv.output_size(size, weight))
        circulant = Circulant.of(self.conv, weight, size)
        if circulant is not None:
            n_in = circulant.width(self.conv.in_channels, out_channels)
            if n_in <= EXACT_CIRCULANT_WIDTH:
                return 1  # (not used: solved exactly)
        return max(1, min(self.operator_block_size, n_in, n_out))

    def _resize(self, weight: Tensor, size: tuple[int, ...]) -> None:
        """New, random input-shaped state for ``size`` (estimated by :meth:`converge`)."""
        assert self.conv is not None
        n_in = self.conv.in_channels * math.prod(size)
        k = self._block_width(weight, size)
        like = self._u
        shape = (self.conv.in_channels, *size)
        self._input_size = torch.tensor(size, dtype=torch.long, device=like.device)
        block = _orthonormal(n_in, k, like).mT.reshape(k, *shape).contiguous()
        self._op_block = block
        self._op_v = block[:1].clone()

    def observe(self, weight: Tensor, args: tuple[object, ...]) -> None:
        """Record the input size of a forward; a larger size is estimated anew (converged)."""
        if self.conv is None or not args or not isinstance(args[0], Tensor):
            return
        size = tuple(int(n) for n in args[0].shape[-self.conv.ndim :])
        known = self.input_size
        if known is not None and all(n <= m for n, m in zip(size, known, strict=True)):
            return
        if known is not None:
            size = tuple(max(n, m) for n, m in zip(size, known, strict=True))
        # Under torch.inference_mode (validation or prediction before training) the new
        # state must still be normal tensors: training updates it in place later.
        with torch.no_grad(), torch.inference_mode(False):
            self._resize(weight, size)
            self._converge_operator(weight)

    # --- estimation ----------------------------------------------------------------
    @torch.no_grad()
    def converge(self, weight: Tensor) -> None:
        weight = gathered(weight)  # once, before super() (a no-op there then)
        super().converge(weight)
        if self.input_size is not None:
            self._converge_operator(weight)
        if self.certified:
            self._update_bound(weight)

    def _maps(
        self, w: Tensor
    ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], int]:
        assert self.conv is not None
        assert self.input_size is not None
        return linear_maps(self.conv, w, self.input_size)

    def _circulant(self, weight: Tensor) -> Circulant | None:
        assert self.conv is not None
        assert self.input_size is not None
        return Circulant.of(self.conv, weight, self.input_size)

    def _fit_operator_block(self, w: Tensor) -> None:
        """Top right Ritz vectors of a Lanczos run on the operator, started from ``_op_v``.

        For a :class:`Circulant`, whose tracked vectors hold every frequency block (and
        the operator's top vectors only a few), the block is a fixed generic start
        iterated :data:`_CIRCULANT_STEPS` times instead; ``_op_v`` and ``_op_sigma`` are
        kept.
        """
        circulant = self._circulant(w)
        if circulant is not None:
            assert self.conv is not None
            out_channels = self.conv.out_channels(w)
            if circulant.width(self.conv.in_channels, out_channels) <= EXACT_CIRCULANT_WIDTH:
                return  # solved exactly: the block is not used
            kept = self._op_v.clone(), self._op_sigma.clone()
            k = self._op_block.shape[0]
            start = torch.randn(
                k, *self._op_v.shape[1:], generator=torch.Generator().manual_seed(0)
            )
            self._op_block = start.to(self._op_block)
            for _ in range(_CIRCULANT_STEPS):
                block_step(self._operator_products(w))
            self._op_v, self._op_sigma = kept
            return
        apply, adjoint, n_in = self._maps(w)
        n_out = int(apply(self._op_v.flatten()).numel())
        steps = min(_LANCZOS_MAX_STEPS, n_in, n_out, _LANCZOS_ENTRIES // (n_in + n_out))
        k = self._op_block.shape[0]
        _, basis = lanczos_top(apply, adjoint, max(steps, 2 * k), k, self._op_v.flatten().clone())
        self._op_block = basis.mT.reshape(basis.shape[1], *self._op_v.shape[1:]).contiguous()

    def _converge_operator(self, weight: Tensor) -> None:
        with torch.autocast(weight.device.type, enabled=False):
            self._fit_operator_block(self._state(weight))
            block_step(self._operator_products(weight))

    def step_products(
        self, weight: Tensor, *, first: bool
    ) -> Sequence[BlockProducts | GramProducts]:
        if self.input_size is None:
            return super().step_products(weight, first=first)
        if self.n_power_iterations == 0:
            if first:
                with torch.autocast(weight.device.type, enabled=False):
                    self._op_sigma.copy_(self._live(self._state(weight)))
            return []
        return self._operator_products(weight)

    def _operator_products(self, weight: Tensor) -> list[BlockProducts | GramProducts]:
        """``Y = A X`` and ``Z = A^T Y`` for the block ``X`` of input-shaped vectors.

        A :class:`Circulant` is stepped per frequency block, an operator with at most
        :data:`EXACT_OPERATOR_SIZE` inputs or outputs exactly; any other on the tracked
        block, which the engine refreshes on the CPU where the weight moved too fast
        (``explore``, ``restep``: :func:`snpatch.engine.krylov_block`).
        """
        assert self.conv is not None
        assert self.input_size is not None
        conv = self.conv
        block = self._op_block
        with torch.autocast(weight.device.type, enabled=False):
            w = self._state(weight)
            circulant = self._circulant(w)
            if circulant is not None:
                return [self._circulant_products(w, circulant)]
            size = self.input_size
            n_in = conv.in_channels * math.prod(size)
            n_out = conv.out_channels(w) * math.prod(conv.output_size(size, w))
            if min(n_in, n_out) <= gram_limit(w.device):
                return [self._exact_products(w, n_in, n_out)]
            return [self._block_products(w, block.flatten(1).mT)]

    def _block_products(self, w: Tensor, columns: Tensor) -> BlockProducts:
        """The products of a block (``n x k`` columns), with a refresh's ``explore``."""
        assert self.conv is not None
        conv, shape = self.conv, self._op_block.shape[1:]
        block = columns.mT.reshape(-1, *shape)
        out = conv.apply(block, w)
        back = conv.adjoint(out, w, shape[1:])

        def finish(y: Tensor, z: Tensor, row: RitzRow) -> list[tuple[Tensor, Tensor]]:
            return self._finish_operator(columns, z, row)

        def explore(x: Tensor) -> tuple[Tensor, Tensor]:
            image = conv.apply(x.reshape(1, *shape), w)
            return image.flatten(), conv.adjoint(image, w, shape[1:]).flatten()

        return BlockProducts(
            out.flatten(1).mT,
            back.flatten(1).mT,
            finish,
            block=columns,
            explore=explore,
            restep=lambda other: self._block_products(w, other),
            refresh_residual=OPERATOR_REFRESH_RESIDUAL,
        )

    def _exact_products(self, w: Tensor, n_in: int, n_out: int) -> GramProducts:
        """The step on the whole of the smaller side: exact, from one product.

        The operator (or its adjoint) applied to the unit impulses of the smaller side,
        ``Z``, gives its Gram ``Z^T Z``: ``A^T A`` (or ``A A^T``) itself, whose top
        eigenvector is ``v`` (or ``u``, and then ``v = Z u / sigma``). The tracked block is
        not used.
        """
        assert self.conv is not None
        assert self.input_size is not None
        conv, size = self.conv, self.input_size
        n = min(n_in, n_out)
        units = torch.eye(n, dtype=w.dtype, device=w.device)
        inputs = n_in <= n_out
        if inputs:
            image = conv.apply(units.reshape(n, -1, *size), w)
        else:
            out_size = conv.output_size(size, w)
            image = conv.adjoint(units.reshape(n, -1, *out_size), w, size)
        z = image.flatten(1).mT
        shape = self._op_v.shape

        def finish(
            top: Tensor, sigma: Tensor, divisor: Tensor, scale: Tensor | None
        ) -> list[tuple[Tensor, Tensor]]:
            v = top if inputs else torch.mv(z, top) / divisor
            return [(self._op_v, v.reshape(shape)), (self._op_sigma, sigma)]

        return GramProducts(z.mT @ z, finish, squarings=EXACT_SQUARINGS)

    def _circulant_products(self, w: Tensor, circulant: Circulant) -> BlockProducts:
        """The products of every frequency block at once (see :class:`Circulant`).

        Blocks with at most :data:`EXACT_CIRCULANT_WIDTH` inputs or outputs are solved
        exactly (:meth:`_exact_circulant_products`); wider ones are tracked:

        The tracked vectors go through the layer and its adjoint as always; their unitary
        DFTs, split into the blocks, are each block's ``B``, ``Y = A B`` and ``Z = A^H Y``
        (complex), stepped as a batch: the norm of every frequency is tracked, none can
        overtake the estimate unseen.
        """
        assert self.conv is not None
        conv, block = self.conv, self._op_block
        if circulant.width(conv.in_channels, conv.out_channels(w)) <= EXACT_CIRCULANT_WIDTH:
            return self._exact_circulant_products(w, circulant)
        out = conv.apply(block, w)
        back = conv.adjoint(out, w, block.shape[2:])
        y = circulant.outputs(circulant.spectrum(out))
        z = circulant.inputs(circulant.spectrum(back))
        start = circulant.inputs(circulant.spectrum(block))

        def finish(y: Tensor, z: Tensor, row: RitzRow) -> list[tuple[Tensor, Tensor]]:
            return self._finish_circulant(circulant, start, z, row)

        return BlockProducts(y, z, finish)

    def _exact_circulant_products(self, w: Tensor, circulant: Circulant) -> BlockProducts:
        """Every frequency block on a basis of its smaller side: exact, from one product.

        Unit impulses on the smaller side (:meth:`Circulant.output_units` through the
        adjoint, or :meth:`Circulant.input_units` through the layer) give, after the DFT,
        a basis ``Y`` of every block's space and its image ``Z``; the step is then exact.
        """
        assert self.conv is not None
        assert self.input_size is not None
        conv, size = self.conv, self.input_size
        channels, out_channels = conv.in_channels, conv.out_channels(w)
        g = circulant.groups
        outputs_smaller = out_channels // g <= channels // g * math.prod(circulant.stride)
        if outputs_smaller:
            units = circulant.output_units(out_channels, w)
            image = conv.adjoint(units, w, size)
            y = circulant.outputs(circulant.spectrum(units))
            z = circulant.inputs(circulant.spectrum(image))
        else:
            units = circulant.input_units(channels, w)
            image = conv.apply(units, w)
            y = circulant.inputs(circulant.spectrum(units))
            z = circulant.outputs(circulant.spectrum(image))

        def finish(y: Tensor, z: Tensor, row: RitzRow) -> list[tuple[Tensor, Tensor]]:
            top = row.sigma.argmax().reshape(1)
            # The right vector is on the input side: Z cv (outputs smaller) or Y cu.
            basis, coefficients = (z, row.cv) if outputs_smaller else (y, row.cu)
            vector = torch.bmm(
                basis.index_select(0, top), coefficients.index_select(0, top).unsqueeze(-1)
            )
            return [
                (self._op_v, self._circulant_vector(circulant, top, vector, basis.shape)),
                (self._op_sigma, row.sigma.index_select(0, top).reshape(())),
            ]

        return BlockProducts(y, z, finish, squarings=EXACT_SQUARINGS)

    def _circulant_vector(
        self, circulant: Circulant, top: Tensor, vector: Tensor, shape: torch.Size
    ) -> Tensor:
        """The unit spatial vector of one frequency block's ``vector`` (the real part)."""
        only = vector.new_zeros(shape[0], shape[1], 1).index_copy_(0, top, vector)
        return circulant.mode(circulant.inputs_back(only, self._op_v.shape[1]))

    def _finish_circulant(
        self, circulant: Circulant, start: Tensor, z: Tensor, row: RitzRow
    ) -> list[tuple[Tensor, Tensor]]:
        """The new state from a circulant's batched step.

        The next block is each frequency block's next block, back in space (real: the
        blocks of conjugate frequencies are conjugate). ``v`` is the top right vector of
        the block with the largest estimate, in space (:meth:`Circulant.mode`).
        """
        block = self._op_block
        bins = next_block(z, start, row)
        new = circulant.fields(circulant.inputs_back(bins, block.shape[1]))
        top = row.sigma.argmax().reshape(1)
        vector = torch.bmm(z.index_select(0, top), row.cv.index_select(0, top).unsqueeze(-1))
        return [
            (self._op_v, self._circulant_vector(circulant, top, vector, z.shape)),
            (block, new),
            (self._op_sigma, row.sigma.index_select(0, top).reshape(())),
        ]

    def _finish_operator(
        self, columns: Tensor, z: Tensor, row: RitzRow
    ) -> list[tuple[Tensor, Tensor]]:
        block = self._op_block
        v = torch.mv(z, row.cv)
        new = next_block(z, columns, row)
        return [
            (self._op_v, v.reshape(self._op_v.shape)),
            (block, new.mT.reshape(block.shape)),
            (self._op_sigma, row.sigma),
        ]

    @torch.no_grad()
    def refit_block(self, weight: Tensor) -> None:
        """After loading: re-fit the tracked blocks, keep the loaded vectors and size."""
        weight = gathered(weight)  # once, before super() (a no-op there then)
        super().refit_block(weight)
        if self.input_size is not None:
            with torch.autocast(weight.device.type, enabled=False):
                w = self._state(weight)
                size = self.input_size
                k = max(1, min(self._block_width(w, size), self._op_v.numel()))
                self._op_block = self._op_v.new_zeros(k, *self._op_v.shape[1:])
                self._fit_operator_block(w)
                self._op_sigma.copy_(self._live(w))
        if self.certified:
            self._update_bound(weight)

    def _bound_key(self, weight: Tensor) -> tuple[object, ...] | None:
        """What the divisor depends on: the weight's storage and version, the input size.

        Host-side metadata only (no device synchronization). None for a tensor without a
        version counter (an inference tensor), whose divisor is recomputed at every forward.
        """
        try:
            version = version_counter(weight)
        except RuntimeError:
            return None
        return (
            weight.data_ptr(),
            version,
            weight.dtype,
            weight.device,
            weight.shape,
            self._op_v.shape,
            self._u.dtype,
        )

    def _update_bound(self, weight: Tensor) -> None:
        """Store the certified divisor of ``weight`` (see :func:`certified_divisor`).

        Computed on the weight's device as a tensor (candidate bounds checked by
        ``cholesky_ex`` and selected with ``torch.where``): no value is read on the host.
        """
        w = weight.detach()
        size = self.input_size if self.conv is not None else None
        with torch.no_grad():
            value = _certified_divisor(self.conv, w, self.dim, size)
            with torch.inference_mode(False):
                divisor = _round_up_to(value, self._u.dtype).to(self._u.device)
        self._divisor_cache = (self._bound_key(weight), divisor)

    def _divisor(self, weight: Tensor) -> Tensor:
        """The certified divisor of ``weight``, recomputed when the weight or size changed.

        The weight an eval forward sees after ``optimizer.step()`` (or ``load_state_dict``,
        ``model.to(...)``, an in-place edit) has a new version or storage, so its bound is
        computed before it is used; a forward of an unchanged weight reuses it. Under
        ``torch.func`` transforms the weight is a wrapper: the divisor stored for the
        weight last seen outside is used (:func:`snpatch.update_sigma` refreshes it).
        """
        cache = self._divisor_cache
        if cache is None or not in_functorch_transform():
            key = self._bound_key(weight)
            if cache is None or key is None or key != cache[0]:
                self._update_bound(weight)
        assert self._divisor_cache is not None
        return self._divisor_cache[1]

    def _live(self, w: Tensor) -> Tensor:
        """What the forward divides by (before certification), differentiable in ``w``."""
        if self.input_size is not None:
            assert self.conv is not None
            # Cloned: a second forward before backward updates the buffers in place.
            value: Tensor = self.conv.apply(self._op_v.clone(), w).norm()
            return value
        return torch.vdot(self._u.clone(), weight_to_matrix(w, self.dim) @ self._v.clone())

    def estimate(self, weight: Tensor) -> float:
        """The estimate of ``sigma`` for ``weight`` that the forward divides by (uncertified)."""
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            return float(self._live(self._state(weight)))

    def cached_weight(self, weight: Tensor) -> Tensor | None:
        # Only the matrix-norm path (no input size yet, not certified) uses the cache.
        if self.certified or self.input_size is not None:
            return None
        return super().cached_weight(weight)

    def forward(self, weight: Tensor) -> Tensor:
        if not self.certified and self.input_size is None:
            return super().forward(weight)
        if self.training:
            self._advance_on_read(weight)
        with torch.autocast(weight.device.type, enabled=False):
            live = self._live(weight.to(self._u.dtype))
            if self.certified:
                # The value is the divisor exactly (live - live is 0 in any rounding); the
                # gradient is the estimate's.
                sigma = self._divisor(weight).clone() + (live - live.detach())
            else:
                sigma = live
            return _scaled(weight, scale_of(sigma, self.lipschitz, self.mode == "soft", self.eps))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if self.conv is None:
            # Earlier versions saved empty placeholders for a weight normalized as a matrix.
            for name in _OPERATOR_STATE:
                state_dict.pop(prefix + name, None)
        # The saved input size may differ from this one's: take the saved shapes.
        for name in _OPERATOR_STATE:
            incoming = state_dict.get(prefix + name)
            current = self._buffers[name]
            if (
                isinstance(incoming, Tensor)
                and current is not None
                and incoming.shape != current.shape
            ):
                self._buffers[name] = current.new_zeros(incoming.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> OperatorNorm:
        super()._apply(fn, recurse)
        self._divisor_cache = None
        for name in ("_op_v", "_op_block", "_op_sigma"):
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype in _LOW_PRECISION:
                self._buffers[name] = buffer.float()
        return self

    def extra_repr(self) -> str:
        size = self.input_size
        return (
            super().extra_repr()
            + f", operator={self.conv is not None}, certified={self.certified}, "
            f"input_size={size}"
        )
