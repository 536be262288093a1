"""The per-step engine: one sync-free block step, batched over the weights patched together.

Every estimator (a weight viewed as a matrix, a convolution operator) tracks the top of its
spectrum with a block of ``k`` orthonormal right vectors ``B`` (stored as ``n x k``
columns). One step reads the operator ``A`` twice, ``Y = A B`` and ``Z = A^T Y``, and does
a Rayleigh-Ritz step on them through their ``k x k`` Gram matrices alone:

- ``sigma`` and the coefficients ``c`` maximize ``|Z c| / |Y c|`` (the top singular value of
  ``A`` restricted to the span of ``Y``), a generalized symmetric eigenproblem of the Grams
  ``(Z^T Z, Y^T Y)``, solved by Cholesky whitening and repeated squaring;
- ``u = Y c / |Y c|`` and ``v = Z c / |Z c|`` (so ``u^T A v == sigma``);
- the next block is ``Z`` orthonormalized through the Cholesky factor of its Gram.

An estimator may also be a batch of independent problems (a circular convolution's
frequency blocks, complex: :class:`snpatch.operator.Circulant`), stepped in the same batch.

There is no QR, SVD or eigendecomposition: PyTorch's ``linalg.svd``, ``eigh`` and
``cholesky`` synchronize a CUDA device with the host (they check for errors there), where
``cholesky_ex``, ``solve_triangular`` and matrix products don't. The small linear algebra
is batched over every weight of a :class:`Cohort` (the weights one
:func:`snpatch.apply_spectral_norm` call patched), so a training step issues a fixed number
of small launches for the whole model, plus the products with each weight.

On the CPU, where reading a value on the host costs nothing, a step whose weight moved too
fast for it (the top Ritz vector's residual, from the same Grams, above
:data:`REFRESH_RESIDUAL`) is redone in the same call on a Krylov space
(:func:`krylov_block`). On an accelerator that decision would synchronize; there a matrix
whose smaller side is at most :data:`GRAM_LIMIT_ACCELERATOR` is instead solved at every
step from its Gram matrix (:func:`gram_step`: ``W W^T`` or ``W^T W``, its top eigenvector
by repeated squaring, batched by size), which no move of the weight leaves behind, and
whose flops a GPU does in microseconds; the CPU does so up to :data:`GRAM_LIMIT_CPU`
(``docs/design/engine.md``, section 2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._compat import foreach_copy_
from .distributed import is_sharded

if TYPE_CHECKING:
    from .parametrization import SpectralNorm

__all__ = [
    "BlockProducts",
    "Cohort",
    "GramProducts",
    "Ritz",
    "RitzRow",
    "autocast_off",
    "block_step",
    "gram_limit",
    "installed",
    "next_block",
    "on_accelerator",
    "original_tensor",
    "ritz",
    "scale_of",
    "step_norms",
]

#: A step whose top Ritz vector ``x`` has a relative residual ``|A x - rho x| / (rho |x|)``
#: (``A = W^T W``, ``rho`` its Rayleigh quotient) above this is redone on a Krylov space
#: (see :func:`block_step`): after a fast move of the weight the block no longer holds its
#: top direction, and the residual says so at no cost (it comes from the Grams).
REFRESH_RESIDUAL = 0.02
#: Krylov depth of that refresh: ``A^j v`` for ``j <= REFRESH_DEPTH`` join the block.
REFRESH_DEPTH = 8
#: A Krylov vector that orthogonalization leaves below this fraction of its length is
#: rounding (the space is exhausted): normalized, it would be noise that the Rayleigh-Ritz
#: step cannot tell from a direction, and that makes the result depend on the rounding.
KRYLOV_EXHAUSTED = 1e-4
#: Refreshes at most per step (each from the last one's result).
REFRESH_ROUNDS = 4
#: A refresh whose estimate rose by more than this (relative) is not converged yet.
REFRESH_RISE = 1e-3

#: Blocks of up to this many vectors are batched together (the smaller padded); a wider
#: one (an operator solved exactly on a basis of up to 64 vectors) only with blocks of its
#: own width: padding the others up to it would cost more than it saves.
SHARED_WIDTH = 16

#: A matrix whose smaller side is at most this is solved from its Gram matrix at every
#: step on an accelerator (:class:`GramProducts`), whatever its weight did since the last
#: step: no tracked block follows a fast move (``docs/design/engine.md``, section 2), and the
#: refresh that the CPU decides per step would synchronize a device. The Gram costs
#: ``2 m n p`` flops and its squarings ``2 p^3`` each (``p`` the smaller side): at 640 those
#: are 5 GFLOP, about 0.1 ms of a current datacenter GPU, in a fixed number of launches for
#: all the weights of a size class (mobilenet_v3_small's 576-wide head is under it).
GRAM_LIMIT_ACCELERATOR = 640
#: The same on the CPU, where a step costs its flops: only small matrices, for which the
#: Gram and its squarings cost less than the block step's many small operations (the 2-D
#: mixture discriminator's 64-wide layers).
GRAM_LIMIT_CPU = 64
#: Squarings of a Gram matrix: ``G^(2^10)``, whose top column's Rayleigh quotient gives
#: sigma to 1e-6 relative on a flat spectrum with a pair 1e-4 apart at its top (8: 1.7e-4;
#: 512 x 4608 Gaussian: 6e-8, with 8 3e-5), in float32.
GRAM_SQUARINGS = 10

#: Squarings of the whitened ``k x k`` problem: ``M^(2^8)`` leaves a second eigenvalue
#: 0.98 of the first (singular values 1% apart) at 0.6% of it, for a sigma error of ~1e-7.
SQUARINGS = 8
#: Squarings for an estimator that asks to be exact (``BlockProducts.squarings``): ``2^16``
#: resolves top singular values 1e-5 apart, where ``SQUARINGS`` leaves pairs 0.5% apart
#: mixed (a small operator's or a circulant's, solved on its whole space, have such pairs).
EXACT_SQUARINGS = 16


def _constants(dtype: torch.dtype) -> tuple[float, float]:
    """(relative shift, absolute floor) for a Gram matrix of ``dtype``.

    The relative shift (of the trace) keeps a Gram that rounding made slightly indefinite,
    or a rank-deficient one, positive definite for Cholesky; at 100 machine epsilons it
    moves the top eigenvalue by at most that much relative to the trace. The floor makes
    a zero weight's Gram the identity times a tiny value (a zero weight stays zero, with
    ``sigma == 0``).
    """
    info = torch.finfo(dtype)
    return 100 * info.eps, info.tiny / info.eps


def _with_shift(
    gram: Tensor, rel: float, tiny: float, extra: Tensor | None = None, *, inplace: bool = False
) -> Tensor:
    """``gram + (rel * trace + tiny + extra) I`` (``extra`` per batch entry)."""
    shifted = gram if inplace else gram.clone()
    diagonal = shifted.diagonal(dim1=-2, dim2=-1)
    shift = diagonal.real.sum(-1, keepdim=True).mul_(rel).add_(tiny)
    if extra is not None:
        shift.add_(extra.unsqueeze(-1))
    diagonal.add_(shift)
    return shifted


def _top_eigenvector(m: Tensor, squarings: int = SQUARINGS) -> Tensor:
    """Top eigenvectors (L, k, 1), unnormalized, of symmetric positive semi-definite ``m``.

    Repeated squaring (``m^(2^SQUARINGS)``, rescaled every fourth squaring so that nothing
    over- or underflows: the top eigenvalue of a Frobenius-normalized matrix is at least
    ``1/sqrt(k)``), then its column with the largest diagonal entry, which is the top
    eigenvector times its largest component (entries at most 1). Matrix products only, no
    ``eigh``: nothing here synchronizes with the host.
    """
    if m.is_complex():
        # As the real symmetric [[P, -Q], [Q, P]] of m = P + iQ, whose eigenvector [x; y]
        # is m's x + iy (every eigenvalue twice): batched complex products are far slower.
        k = m.shape[-1]
        real = torch.cat([torch.cat([m.real, -m.imag], -1), torch.cat([m.imag, m.real], -1)], -2)
        top = _top_eigenvector(real, squarings)
        return torch.complex(top[..., :k, :], top[..., k:, :])
    rel, tiny = _constants(m.dtype)
    power = m / (torch.linalg.matrix_norm(m, keepdim=True) + tiny)
    # A zero matrix (a zero weight) still gets a non-zero vector.
    power.diagonal(dim1=-2, dim2=-1).add_(rel)
    for i in range(squarings):
        power = torch.bmm(power, power)
        if i % 4 == 3 and i + 1 < squarings:  # (the result's scale does not matter)
            power = power / (torch.linalg.matrix_norm(power, keepdim=True) + tiny)
    column = power.diagonal(dim1=-2, dim2=-1).real.argmax(-1, keepdim=True)
    return torch.take_along_dim(power, column.unsqueeze(-2), dim=-1)


@dataclass(frozen=True)
class Ritz:
    """The batched result of :func:`ritz` (each field has the batch as its first axis)."""

    #: ``c / |Y c|``: ``u = Y cu`` is the unit left vector.
    cu: Tensor
    #: ``c / |Z c|``: ``v = Z cv`` is the unit right vector.
    cv: Tensor
    #: ``|Z c| / |Y c|``: the estimate of the top singular value.
    sigma: Tensor
    #: 1 where the weight is zero (the next block is ``Z + tau B``, see :func:`ritz`), else 0.
    tau: Tensor
    #: Lower Cholesky factor ``L`` of the Gram of ``Z + tau B``: the next block is
    #: ``(Z + tau B) L^-T``.
    factor: Tensor


def _adjoint(x: Tensor) -> Tensor:
    """``x^T`` (``x^H`` for complex ``x``) of a batch of matrices."""
    return x.mH if x.is_complex() else x.mT


def ritz(gram_y: Tensor, gram_z: Tensor, squarings: int = SQUARINGS) -> Ritz:
    """The Rayleigh-Ritz step of ``k`` vectors from their Grams, batched (see the module).

    Args:
        gram_y: ``Y^T Y`` (L, k, k) where ``Y = A B`` (``Y^H Y`` for complex blocks).
        gram_z: ``Z^T Z`` (L, k, k) where ``Z = A^T Y`` (``Z^H Z``, ``Z = A^H Y``).

    The next block is ``Z`` orthonormalized through the Cholesky factor of its (shifted)
    Gram; for a zero weight (``Z == 0``) it is ``Z + B = B`` (``tau = 1``, else 0), so
    that the block survives until the weight moves away from zero. (Directions a
    low-rank weight lacks fade from the block; they hold nothing of its top.)
    """
    rel, tiny = _constants(gram_y.dtype)
    chol_y = torch.linalg.cholesky_ex(_with_shift(gram_y, rel, tiny))[0]
    half = torch.linalg.solve_triangular(chol_y, gram_z, upper=False)
    whitened = torch.linalg.solve_triangular(chol_y, _adjoint(half), upper=False)
    top = _top_eigenvector(whitened, squarings)
    c = torch.linalg.solve_triangular(_adjoint(chol_y), top, upper=True)
    # |Y c| and |Z c| from the quadratic forms c^T G c, both Grams in one product.
    both = torch.cat([c, c])
    products = torch.bmm(torch.cat([gram_y, gram_z]), both)
    if both.is_complex():
        norms = (both.conj() * products).real.sum(-2, keepdim=True)
    else:
        norms = (both * products).sum(-2, keepdim=True)
    norm_y, norm_z = norms.clamp_min(0).sqrt().chunk(2)
    norm_y = norm_y.clamp_min(tiny)
    sigma = (norm_z / norm_y).flatten()
    cu = (c / norm_y).squeeze(-1)
    cv = (c / norm_z.clamp_min(tiny)).squeeze(-1)
    # A zero weight (Z == 0) keeps its block as it is: tau = 1, and the Gram of Z + B is I.
    trace = gram_z.diagonal(dim1=-2, dim2=-1).real.sum(-1)
    tau = (trace == 0).to(trace.dtype)
    factor = torch.linalg.cholesky_ex(_with_shift(gram_z, rel, tiny, tau, inplace=True))[0]
    return Ritz(cu, cv, sigma, tau, factor)


@dataclass(frozen=True)
class RitzRow:
    """One estimator's row of :class:`Ritz`, plus ``scale``: its divisor applied, if asked."""

    cu: Tensor
    cv: Tensor
    sigma: Tensor
    tau: Tensor
    #: Upper triangular ``L^T``: the next block is ``(Z + tau B) (L^T)^-1``.
    factor_t: Tensor
    scale: Tensor | None


#: ``(lipschitz, soft, eps)``: the options of the scale ``c / sigma`` a matrix estimator
#: divides by, computed with the batch (see :func:`scale_of`).
ScaleOptions = tuple[float, bool, float]


@dataclass
class BlockProducts:
    """One estimator's half of a step: its block's images ``Y = A B`` and ``Z = A^T Y``.

    ``y`` is ``m x k`` and ``z`` ``n x k`` (the block's vectors as columns). A batched
    item holds ``L`` independent problems at once, ``y`` ``(L, m, k)`` and ``z``
    ``(L, n, k)`` (complex allowed: then ``A^H``), and gets one :class:`RitzRow` with a
    batch axis (an operator that is a direct sum, e.g. a circular convolution's
    frequencies); it is never refreshed.
    ``finish(y, z, row)`` writes the estimator's new state from its :class:`RitzRow` and
    returns the ``(buffer, value)`` pairs to be copied with the batch; ``commit()``, if
    given, runs after those copies.
    """

    y: Tensor
    z: Tensor
    finish: Callable[[Tensor, Tensor, RitzRow], list[tuple[Tensor, Tensor]]]
    scale_options: ScaleOptions | None = None
    commit: Callable[[], None] | None = None
    #: ``(Y^T Y, Z^T Z)`` if the estimator computed them with its products.
    grams: tuple[Tensor, Tensor] | None = None
    #: The block ``B`` (``n x k`` columns) the products were computed from.
    block: Tensor | None = None
    #: ``x -> (A x, A^T A x)`` for one flat vector: what a refresh explores with.
    explore: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    #: The estimator's products for another block (``n x k`` columns) of the same weight.
    restep: Callable[[Tensor], BlockProducts] | None = None
    #: Squarings of the top eigenvector's solve (items are batched by it).
    squarings: int = SQUARINGS
    #: The residual above which the step is refreshed (see :func:`block_step`).
    refresh_residual: float = REFRESH_RESIDUAL

    def gram_y(self) -> Tensor:
        return self.grams[0] if self.grams is not None else _adjoint(self.y) @ self.y

    def gram_z(self) -> Tensor:
        return self.grams[1] if self.grams is not None else _adjoint(self.z) @ self.z


@dataclass
class GramProducts:
    """One estimator's half of an exact step: a Gram matrix ``G`` (``p x p``).

    ``G`` is a matrix's ``W W^T`` or ``W^T W``, or an operator's ``A A^T`` or ``A^T A``,
    whichever is smaller: its top eigenvector is a top singular vector. The step finds its top
    eigenvector ``x`` (unit, or zero for a zero weight) and ``sigma = sqrt(x^T G x)`` with
    the other Grams of its size class (:func:`gram_step`); ``finish(x, sigma, divisor,
    scale)`` (``divisor``: ``sigma``, at least the smallest normal number) writes the
    estimator's new state and returns the ``(buffer, value)`` pairs to be copied with the
    batch; ``commit()``, if given, runs after those copies.
    """

    gram: Tensor
    finish: Callable[[Tensor, Tensor, Tensor, Tensor | None], list[tuple[Tensor, Tensor]]]
    #: The options of the scale computed with the batch (None: no scale, ``finish`` gets None).
    scale_options: ScaleOptions | None = None
    commit: Callable[[], None] | None = None
    #: Squarings of the top eigenvector's solve (items are batched by it).
    squarings: int = GRAM_SQUARINGS


#: Grams are batched at sizes that are multiples of this, so that the squarings' flops
#: waste little on padding.
GRAM_SIZE_STEP = 64
#: Grams of up to this size are batched together, at the size of the largest among them
#: rounded up to :data:`GRAM_SIZE_STEP`: a batch's fixed cost is some 45 launches, and
#: squaring 128 x 128 instead of 64 x 64 costs a GPU microseconds.
GRAM_SMALL_SIZE = 128


def _rounded(p: int) -> int:
    return -(-p // GRAM_SIZE_STEP) * GRAM_SIZE_STEP


def _size_class(p: int) -> int:
    """A ``p x p`` Gram's batch: 0 for the small ones (see :data:`GRAM_SMALL_SIZE`)."""
    return 0 if p <= GRAM_SMALL_SIZE else _rounded(p)


def gram_step(products: Sequence[GramProducts]) -> None:
    """Exact steps of the estimators in ``products``, batched by dtype, device, options, size.

    Each Gram is padded with zeros to its size class (the extra eigenvalues are 0, and the
    top eigenvector is zero there); the batch's top eigenvectors come from
    :func:`_top_eigenvector` in :data:`GRAM_SQUARINGS` squarings, their Rayleigh quotients
    and scales in the same batch, and the buffer writes are one ``_foreach_copy_`` per
    batch. Nothing here depends on the previous state, so no move of the weight, however
    large, leaves it behind.
    """
    groups: dict[
        tuple[torch.dtype, torch.device, ScaleOptions | None, int, int], list[GramProducts]
    ] = {}
    for item in products:
        gram, size = item.gram, _size_class(item.gram.shape[-1])
        key = (gram.dtype, gram.device, item.scale_options, size, item.squarings)
        groups.setdefault(key, []).append(item)
    for (dtype, device, options, size, squarings), items in groups.items():
        if size == 0:
            size = _rounded(max(item.gram.shape[-1] for item in items))
        tiny = torch.finfo(dtype).tiny
        with autocast_off(device):
            grams = torch.stack([_padded(item.gram, size, fill=False) for item in items])
            tops = _top_eigenvector(grams, squarings)
            tops = tops / torch.linalg.vector_norm(tops, dim=-2, keepdim=True).clamp_min(tiny)
            quotients = torch.bmm(tops.mT, torch.bmm(grams, tops)).flatten()
            sigmas = quotients.clamp_min(0).sqrt()
            divisors = sigmas.clamp_min(tiny)
            scales = scale_of(sigmas, *options).unbind() if options else [None] * len(items)
            copies: list[tuple[Tensor, Tensor]] = []
            for item, top, sigma, divisor, scale in zip(
                items,
                tops.squeeze(-1).unbind(),
                sigmas.unbind(),
                divisors.unbind(),
                scales,
                strict=True,
            ):
                p = item.gram.shape[-1]
                copies.extend(item.finish(top if p == size else top[:p], sigma, divisor, scale))
            _copy(copies)
        for item in items:
            if item.commit is not None:
                item.commit()


def _copy(copies: Sequence[tuple[Tensor, Tensor]]) -> None:
    """``target.copy_(value)`` for each pair: one ``_foreach_copy_`` (eager)."""
    if torch.compiler.is_compiling():
        # Inductor (torch 2.14) lets a later backward write into buffers updated by
        # ``_foreach_copy_`` in the forward graph: one copy each there.
        for target, value in copies:
            target.copy_(value)
    elif copies:
        targets, values = zip(*copies, strict=True)
        foreach_copy_(targets, values)


def next_block(z: Tensor, block: Tensor, row: RitzRow) -> Tensor:
    """The next block (``n x k`` columns) from ``Z`` and the current one (see :func:`ritz`)."""
    tau = row.tau if row.tau.dim() == 0 else row.tau.reshape(-1, 1, 1)  # (batched items)
    mixed = torch.addcmul(z, block, tau)
    new: Tensor = torch.linalg.solve_triangular(row.factor_t, mixed, upper=True, left=False)
    return new


def scale_of(sigma: Tensor, lipschitz: float, soft: bool, eps: float) -> Tensor:
    """``c / sigma`` (hard) or ``min(1, c / sigma)`` (soft), elementwise; ``c`` at ``sigma == 0``.

    A zero weight has ``sigma == 0``: dividing by 1 instead keeps it zero, never NaN, and
    keeps its gradient finite and non-zero so that it can still be trained.
    """
    denominator = torch.where(sigma > 0, sigma.clamp_min(eps), torch.ones_like(sigma))
    scale = lipschitz / denominator
    return scale.clamp(max=1.0) if soft else scale


def residuals(result: Ritz) -> Tensor:
    """Relative residuals of the top Ritz vectors ``x = B c`` of a batch, for ``A = W^T W``.

    ``|A x - rho x| / (rho |x|)`` with ``rho = x^T A x / |x|^2``, for an orthonormal block
    ``B``: ``(c^T G_z c)(c^T c) / (c^T G_y c)^2 - 1`` under the square root, which with
    ``cu = c / |Y c|`` (``cu^T G_y cu = 1``, ``cu^T G_z cu = sigma^2``) is
    ``sigma^2 |cu|^2 - 1``. Zero for a zero weight.
    """
    squared = (result.sigma * torch.linalg.vector_norm(result.cu, dim=-1)).square() - 1
    residual: Tensor = squared.clamp_min(0).sqrt()
    return residual


def on_accelerator(device: torch.device) -> bool:
    """Whether ``device`` takes the accelerator's path: no decision on the host, Grams.

    The one switch between the two cost models (``benchmarks/tracking.py`` turns it on to
    run the accelerator's path on the CPU): on the CPU a step costs its flops and reading a
    value on the host is free; on an accelerator flops are cheap, and launches and host
    synchronizations are what a step costs.
    """
    return device.type != "cpu"


def refreshes(device: torch.device) -> bool:
    """Whether steps on ``device`` are refreshed where their residual is large.

    The decision to refresh reads the residuals on the host: free on the CPU, a
    synchronization on an accelerator (where the matrices up to :func:`gram_limit` are
    exact at every step instead), and data-dependent control flow under ``torch.compile``.
    """
    return not on_accelerator(device) and not torch.compiler.is_compiling()


def gram_limit(device: torch.device) -> int:
    """The largest smaller side of a matrix solved from its Gram on ``device``."""
    return GRAM_LIMIT_ACCELERATOR if on_accelerator(device) else GRAM_LIMIT_CPU


def krylov_block(item: BlockProducts, row: RitzRow, depth: int = REFRESH_DEPTH) -> Tensor:
    """A block holding the top of a Krylov space, for a refresh.

    The space is the block plus ``v, A v, ..., A^depth v`` (``A = W^T W``, ``v`` the step's
    right vector), each new vector orthogonalized against those before it (twice, as
    classical Gram-Schmidt needs in floating point: a plain power basis is too
    ill-conditioned for its Grams), read with ``depth + 1`` matrix-vector pairs. The new
    block is the space's ``k`` top Ritz vectors (a thick restart: a second refresh goes on
    from all of them, not from one vector). The estimator's products on that block
    (``item.restep``) are the refreshed step. Runs on the CPU only (it reads norms on the
    host and uses ``eigh``, see :func:`refreshes`).
    """
    assert item.block is not None
    assert item.explore is not None
    tiny = torch.finfo(item.z.dtype).tiny
    basis, ys = [item.block], [item.y]
    x = torch.mv(item.z, row.cv)
    for _ in range(depth + 1):
        known = torch.cat(basis, 1)
        before = torch.linalg.vector_norm(x)
        for _ in range(2):
            x = x - torch.mv(known, torch.mv(known.mT, x))
        after = torch.linalg.vector_norm(x)
        if float(after) <= KRYLOV_EXHAUSTED * float(before):
            break  # the space is exhausted (a low-rank weight): what is left is rounding
        x = x / after.clamp_min(tiny)
        wx, ax = item.explore(x)
        basis.append(x.unsqueeze(1))
        ys.append(wx.unsqueeze(1))
        x = ax
    # Rayleigh-Ritz of A on the (orthonormal) space: its Gram is Y^T Y. The new block is
    # the space's top k Ritz vectors (eigh: this runs on the CPU only), a thick restart.
    space = torch.cat(basis, 1)
    y = torch.cat(ys, 1).double()
    _, vectors = torch.linalg.eigh(y.mT @ y)
    k = item.block.shape[1]
    block = space @ vectors[:, -k:].flip(-1).to(space.dtype)
    # Signs fixed (each column's largest entry positive): eigh's are arbitrary.
    largest = block.abs().argmax(0, keepdim=True)
    signed: Tensor = block * torch.take_along_dim(block, largest, 0).sign()
    return signed


def _rows(
    result: Ritz, options: ScaleOptions | None, items: Sequence[BlockProducts]
) -> list[RitzRow]:
    """One :class:`RitzRow` per item, cut back to its block size where it was padded.

    A batched item (products of shape ``(L, m, k)``, see :class:`BlockProducts`) gets its
    ``L`` rows in one :class:`RitzRow` whose fields keep the batch axis.
    """
    if any(item.y.dim() == 3 for item in items):
        return _batched_rows(result, options, items)
    count = len(items)
    scales: Sequence[Tensor | None] = (
        scale_of(result.sigma, *options).unbind() if options else [None] * count
    )
    rows = []
    width = result.cu.shape[-1]
    for item, cu, cv, sigma, tau, factor, scale in zip(
        items,
        result.cu.unbind(),
        result.cv.unbind(),
        result.sigma.unbind(),
        result.tau.unbind(),
        result.factor.mT.unbind(),
        scales,
        strict=True,
    ):
        k = item.y.shape[1]
        if k != width:
            cu, cv, factor = cu[:k], cv[:k], factor[:k, :k]
        rows.append(RitzRow(cu, cv, sigma, tau, factor, scale))
    return rows


def _batched_rows(
    result: Ritz, options: ScaleOptions | None, items: Sequence[BlockProducts]
) -> list[RitzRow]:
    """:func:`_rows` where some items are batched: each item's rows as one :class:`RitzRow`."""
    scale = scale_of(result.sigma, *options) if options else None
    factor_t = _adjoint(result.factor)
    rows, start = [], 0
    for item in items:
        k = item.y.shape[-1]
        count = item.y.shape[0] if item.y.dim() == 3 else 1
        end = start + count
        if item.y.dim() == 3:
            pick: slice | int = slice(start, end)
        else:
            pick = start
        rows.append(
            RitzRow(
                result.cu[pick, ..., :k],
                result.cv[pick, ..., :k],
                result.sigma[pick],
                result.tau[pick],
                factor_t[pick, ..., :k, :k],
                None if scale is None else scale[pick],
            )
        )
        start = end
    return rows


def _padded(gram: Tensor, width: int, *, fill: bool) -> Tensor:
    """``gram`` (k x k) as the leading block of a ``width x width`` matrix.

    The rest is zero, with ``fill`` its diagonal the mean of ``gram``'s (so that the shift
    :func:`ritz` takes from the trace keeps its scale): padded with a unit metric
    (``Y^T Y``) and a zero operator (``Z^T Z``), the extra directions have Ritz value 0 and
    the leading block's results are those of ``gram`` alone (a Cholesky factor's leading
    block is the factor of the leading block).
    """
    k = gram.shape[-1]
    if k == width:
        return gram
    out = torch.nn.functional.pad(gram, (0, width - k, 0, width - k))
    if fill:
        diagonal = gram.diagonal(dim1=-2, dim2=-1)
        out.diagonal(dim1=-2, dim2=-1)[..., k:] = diagonal.mean(-1, keepdim=True)
    return out


def _ritz_of(items: Sequence[BlockProducts]) -> Ritz:
    """:func:`ritz` of the items, their Grams padded to the largest block among them."""
    width = max(item.y.shape[-1] for item in items)
    if any(item.y.dim() == 3 for item in items):
        gram_y = torch.cat([_batch(_padded(item.gram_y(), width, fill=True)) for item in items])
        gram_z = torch.cat([_batch(_padded(item.gram_z(), width, fill=False)) for item in items])
    else:
        gram_y = torch.stack([_padded(item.gram_y(), width, fill=True) for item in items])
        gram_z = torch.stack([_padded(item.gram_z(), width, fill=False) for item in items])
    return ritz(gram_y, gram_z, max(item.squarings for item in items))


def _batch(gram: Tensor) -> Tensor:
    """``gram`` with a leading batch axis (one item's ``(k, k)`` Gram becomes ``(1, k, k)``)."""
    return gram if gram.dim() == 3 else gram.unsqueeze(0)


def block_step(products: Sequence[BlockProducts | GramProducts]) -> None:
    """One step of every estimator in ``products``; the small linear algebra batched.

    :class:`GramProducts` go to :func:`gram_step`. The others are batched by dtype, device
    and scale options (smaller blocks padded to the largest, see :func:`_padded`; blocks
    wider than :data:`SHARED_WIDTH` by width) and by the squarings they ask for.
    The buffer writes are one ``_foreach_copy_`` per batch.

    Where :func:`refreshes` allows it (the CPU), an estimator whose top Ritz vector has a
    relative residual above :data:`REFRESH_RESIDUAL` (:func:`residuals`: its weight moved
    too fast for one block step to follow) is stepped again, in the same call, from a
    :func:`krylov_block`; the weights that moved slowly cost nothing more.
    """
    exact = [item for item in products if isinstance(item, GramProducts)]
    if exact:
        gram_step(exact)
    groups: dict[
        tuple[torch.dtype, torch.device, ScaleOptions | None, int, int], list[BlockProducts]
    ] = {}
    for item in products:
        if isinstance(item, GramProducts):
            continue
        width = item.y.shape[-1]
        shared = 0 if width <= SHARED_WIDTH else width
        key = (item.y.dtype, item.y.device, item.scale_options, shared, item.squarings)
        groups.setdefault(key, []).append(item)
    for (_, device, options, _, _), items in groups.items():
        with autocast_off(device):
            result = _ritz_of(items)
            rows = _rows(result, options, items)
            if refreshes(device) and all(item.y.dim() == 2 for item in items):
                _refresh(items, rows, residuals(result), options)
            copies: list[tuple[Tensor, Tensor]] = []
            for item, row in zip(items, rows, strict=True):
                copies.extend(item.finish(item.y, item.z, row))
            _copy(copies)
        for item in items:
            if item.commit is not None:
                item.commit()


def _refresh(
    items: list[BlockProducts],
    rows: list[RitzRow],
    residual: Tensor,
    options: ScaleOptions | None,
) -> None:
    """Replace, in place, the items (and rows) whose residual is too large by refreshed ones.

    A refresh is repeated from its own result, up to :data:`REFRESH_ROUNDS` times, while its
    residual is still too large or its estimate still rose by more than
    :data:`REFRESH_RISE` (a Ritz value only rises as it converges: on a flat top of the
    spectrum a small residual alone does not say the top was reached).
    """
    values = dict(enumerate(residual.tolist()))
    flagged = [
        i for i, value in values.items() if value > items[i].refresh_residual and items[i].restep
    ]
    for _ in range(REFRESH_ROUNDS):
        if not flagged:
            return
        before = [float(rows[i].sigma) for i in flagged]
        redone = []
        for i in flagged:
            restep = items[i].restep
            assert restep is not None
            redone.append(restep(krylov_block(items[i], rows[i])))
        result = _ritz_of(redone)
        new_rows = _rows(result, options, redone)
        for i, item, row in zip(flagged, redone, new_rows, strict=True):
            items[i], rows[i] = item, row
        after = result.sigma.tolist()
        still = residuals(result).tolist()
        flagged = [
            i
            for i, old, new, value in zip(flagged, before, after, still, strict=True)
            if value > items[i].refresh_residual or new > old * (1 + REFRESH_RISE)
        ]


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast off for the sigma math on ``device`` (entered only when it is on: not free)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class Cohort:
    """The weights one :func:`snpatch.apply_spectral_norm` call patched, stepped together.

    The first training-mode read of a weight with a new value (see
    :meth:`SpectralNorm.advance`) steps every member whose weight has a new value too, in
    one batched step: after an optimizer step that is the whole model, at its first layer.
    A member whose weight is sharded at that moment (``fully_shard`` keeps the others'
    shards until their own forward) or whose layer is in eval mode waits for its own read.
    Members that lost their normalization (removed) are dropped.
    """

    def __init__(self) -> None:
        self.members: list[tuple[nn.Module, str, SpectralNorm]] = []

    def add(self, owner: nn.Module, tensor_name: str, norm: SpectralNorm) -> None:
        self.members.append((owner, tensor_name, norm))
        norm._cohort = self

    def step_stale(self, trigger: SpectralNorm, weight: Tensor) -> None:
        """Step ``trigger`` (for ``weight``) and every other member with a new value."""
        stale: list[tuple[SpectralNorm, Tensor, tuple[int, int, int, int] | None]] = []
        alive = []
        for member in self.members:
            owner, tensor_name, norm = member
            if norm is trigger:
                alive.append(member)
                stale.append((norm, weight, norm.value_key(weight)))
                continue
            found = installed(owner, tensor_name)
            if found is None or found[0] is not norm:
                continue  # removed
            original = found[1]
            alive.append(member)
            if not norm.training or is_sharded(original):
                continue
            key = norm.value_key(original)
            if key is None or key != norm._stepped_for:
                stale.append((norm, original, key))
        if len(alive) != len(self.members):
            self.members = alive
        step_norms([(norm, w) for norm, w, _ in stale])
        for norm, _, key in stale:
            norm._stepped_for = key


def step_norms(items: Iterable[tuple[SpectralNorm, Tensor]]) -> None:
    """``n_power_iterations`` steps of each ``(norm, weight)``, batched across them."""
    pending = list(items)
    rounds = 0
    with torch.no_grad():
        while pending:
            products: list[BlockProducts | GramProducts] = []
            for norm, weight in pending:
                products.extend(norm.step_products(weight, first=rounds == 0))
            if products:
                block_step(products)
            rounds += 1
            pending = [(n, w) for n, w in pending if n.n_power_iterations > rounds]


def installed(owner: nn.Module, tensor_name: str) -> tuple[nn.Module, Tensor] | None:
    """The first parametrization on ``owner``'s ``tensor_name`` and its original tensor.

    Read through ``_modules`` and ``_parameters``: asked on every training forward, where
    nn.Module.__getattr__ and the containers' ``__getitem__`` cost microseconds each.
    """
    found = owner._modules.get("parametrizations")
    if not isinstance(found, nn.ModuleDict):
        return None
    parametrizations = found._modules.get(tensor_name)
    if not isinstance(parametrizations, parametrize.ParametrizationList):
        return None
    first = parametrizations._modules.get("0")
    if first is None:
        return None
    return first, original_tensor(parametrizations)


def original_tensor(parametrizations: parametrize.ParametrizationList) -> Tensor:
    """``parametrizations.original``, without nn.Module.__getattr__ where it is a parameter."""
    original = parametrizations._parameters.get("original")
    return parametrizations.original if original is None else original
