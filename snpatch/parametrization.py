"""The math on one weight: the spectral-norm parametrization and its power iteration.

:class:`SpectralNorm` is a ``torch.nn.utils.parametrize`` parametrization. Its persistent
state is exactly that of ``torch.nn.utils.parametrizations.spectral_norm`` (``_u``, the
left, and ``_v``, the right top singular vector of the weight viewed as a matrix), so
checkpoints move between the two. On top of that it keeps a small orthonormal block of
right singular vectors (``_block``, not saved) and runs a *block* power iteration with a
Rayleigh-Ritz step: reading the weight dominates the cost, and multiplying it by a block
of ``k`` vectors reads it once, just as a matrix-vector product does, while the block
keeps tracking the top singular value when the top of the spectrum is clustered (where
one vector per step falls behind).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BLOCK_SIZE", "Mode", "SpectralNorm", "weight_to_matrix"]

Mode = Literal["hard", "soft"]

#: Vectors tracked per weight. Chosen by measurement, see the README's "Accuracy" section.
BLOCK_SIZE = 8

# Below this size of the smaller matrix side, the initial subspace comes from an exact
# eigendecomposition of the Gram matrix (a resnet50 takes ~0.6 s); above it a Lanczos
# bidiagonalization is cheaper.
_GRAM_LIMIT = 2048
_LANCZOS_MAX_STEPS = 160
_LANCZOS_RTOL = 1e-7

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the iteration state: float32, or float64 for float64 weights."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_to_matrix(weight: Tensor, dim: int) -> Tensor:
    """View ``weight`` as the matrix whose spectral norm is taken (torch's convention).

    ``dim`` becomes the rows and every other dimension is flattened into the columns, so a
    ``Conv2d`` weight ``(out, in/groups, kh, kw)`` with ``dim=0`` is ``(out, in/groups*kh*kw)``.
    """
    if dim != 0:
        weight = weight.movedim(dim, 0)
    return weight.flatten(1)


def _matrix_to_weight(matrix: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """Inverse of :func:`weight_to_matrix` for a tensor of the matrix's shape."""
    if dim == 0:
        return matrix.reshape(shape)
    moved = (shape[dim], *(s for i, s in enumerate(shape) if i != dim))
    return matrix.reshape(moved).movedim(0, dim)


def _scale(sigma: Tensor, lipschitz: float, soft: bool, eps: float) -> Tensor:
    """``c / sigma`` (hard) or ``min(1, c / sigma)`` (soft); a zero ``sigma`` gives ``c``.

    A zero weight has ``sigma == 0``: dividing by 1 instead keeps it zero, never NaN, and
    keeps its gradient finite and non-zero so it can still be trained.
    """
    denominator = torch.where(sigma > 0, sigma.clamp_min(eps), torch.ones_like(sigma))
    scale = lipschitz / denominator
    return scale.clamp(max=1.0) if soft else scale


def _scaled(weight: Tensor, scale: Tensor) -> Tensor:
    if weight.dtype in _LOW_PRECISION:
        # A float16/bfloat16 scale alone would be off by up to 0.4%.
        return (weight.float() * scale).to(weight.dtype)
    return weight * scale.to(weight.dtype)


class _Sigma(torch.autograd.Function):
    """``sigma = u^T W v`` with ``u``, ``v`` constant, returning a precomputed value.

    The backward is ``grad * u v^T``, the gradient of torch's ``vdot(u, mv(W, v))``, and is
    itself differentiable (used on the double-backward path of :class:`_Normalize`).
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
        ctx.save_for_backward(u, v)
        ctx.dim = dim
        ctx.shape = weight.shape
        ctx.dtype = weight.dtype
        return sigma.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        u, v = ctx.saved_tensors
        grad_matrix = torch.outer(u * grad, v)
        grad_weight = _matrix_to_weight(grad_matrix, ctx.shape, ctx.dim).to(ctx.dtype)
        return grad_weight, None, None, None, None


class _Normalize(torch.autograd.Function):
    """``W * scale(sigma)`` with ``sigma = u^T W v`` (``u``, ``v`` constant), in one node.

    ``sigma`` comes precomputed (the power iteration's Ritz value, which equals ``u^T W v``
    for the weight it ran on), so the forward reads the weight once. The backward is
    ``g * s + s'(sigma) <g, W> u v^T``: one reduction and one rank-1 update, where autograd's
    chain through ``W / sigma`` and ``u^T W v`` makes several passes. With
    ``create_graph=True`` the backward is built from differentiable operations, so double
    backward (gradient penalties) is exact.
    """

    @staticmethod
    def forward(
        ctx: Any,
        weight: Tensor,
        u: Tensor,
        v: Tensor,
        sigma: Tensor,
        lipschitz: float,
        soft: bool,
        eps: float,
        dim: int,
    ) -> Tensor:
        ctx.save_for_backward(weight, u, v, sigma)
        ctx.options = (lipschitz, soft, eps, dim)
        return _scaled(weight, _scale(sigma, lipschitz, soft, eps))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, u, v, sigma = ctx.saved_tensors
        lipschitz, soft, eps, dim = ctx.options
        if torch.is_grad_enabled():
            # Double backward: the same formula, from differentiable operations.
            sigma_of_w = _Sigma.apply(weight, u, v, sigma, dim)
            out = _scaled(weight, _scale(sigma_of_w, lipschitz, soft, eps))
            (grad_weight,) = torch.autograd.grad(out, weight, grad, create_graph=True)
            return grad_weight, None, None, None, None, None, None, None
        scale = _scale(sigma, lipschitz, soft, eps)
        # d scale / d sigma = -scale / sigma where the bound is active, else 0 (soft).
        active = sigma > 0
        if soft:
            active = active & (sigma > lipschitz)
        inner = torch.vdot(grad.flatten().to(sigma.dtype), weight.flatten().to(sigma.dtype))
        coefficient = torch.where(active, -scale / sigma.clamp_min(eps) * inner, 0.0)
        grad_weight = _scaled(grad, scale)
        u_scaled = (u * coefficient).to(grad_weight.dtype)
        if dim == 0 and grad_weight.is_contiguous():
            matrix = grad_weight.view(grad_weight.shape[0], -1)
            matrix.addmm_(u_scaled.unsqueeze(1), v.to(grad_weight.dtype).unsqueeze(0))
        else:
            rank_one = torch.outer(u_scaled, v.to(grad_weight.dtype))
            grad_weight.add_(_matrix_to_weight(rank_one, grad_weight.shape, dim))
        return grad_weight, None, None, None, None, None, None, None


def _orthonormal(rows: int, cols: int, like: Tensor) -> Tensor:
    """A random ``rows x cols`` matrix with orthonormal columns (uses the global RNG)."""
    gauss = torch.randn(rows, cols, dtype=like.dtype, device=like.device)
    ortho: Tensor = torch.linalg.qr(gauss)[0]
    return ortho


def _gram_subspace(matrix: Tensor, k: int) -> Tensor:
    """Top-``k`` right singular vectors from an eigendecomposition of the smaller Gram matrix."""
    rows, cols = matrix.shape
    if cols <= rows:
        vecs: Tensor = torch.linalg.eigh(matrix.mT @ matrix)[1]
        return vecs[:, -k:].flip(1)
    vecs = torch.linalg.eigh(matrix @ matrix.mT)[1]
    # Right vectors are W^T u / sigma; orthonormalizing W^T U handles sigma == 0 too.
    ortho: Tensor = torch.linalg.qr(matrix.mT @ vecs[:, -k:].flip(1))[0]
    return ortho


def _lanczos_subspace(matrix: Tensor, k: int, start: Tensor) -> Tensor:
    """Top-``k`` right Ritz vectors of ``matrix`` (see :func:`lanczos_top`)."""
    steps = min(_LANCZOS_MAX_STEPS, *matrix.shape)
    return lanczos_top(lambda v: matrix @ v, lambda u: matrix.mT @ u, steps, k, start)[1]


def lanczos_top(
    apply: Callable[[Tensor], Tensor],
    adjoint: Callable[[Tensor], Tensor],
    steps: int,
    k: int,
    start: Tensor,
    rtol: float = _LANCZOS_RTOL,
) -> tuple[float, Tensor]:
    """Top singular value and top-``k`` right Ritz vectors of a Golub-Kahan-Lanczos run.

    ``apply(v) = A v`` and ``adjoint(u) = A^T u`` on flat vectors (a matrix, or a
    convolution and its vector-Jacobian product). Full reorthogonalization; stops once the
    top Ritz value changes by less than ``rtol`` (checked every few steps) or after
    ``steps`` steps (at most the smaller dimension of ``A``). Krylov methods separate a
    clustered top of the spectrum far faster than subspace iteration, which is what large
    randomly initialized layers (and convolution operators) have.
    """
    us: list[Tensor] = []
    vs: list[Tensor] = [F.normalize(start, dim=0)]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    previous = torch.zeros((), dtype=start.dtype, device=start.device)
    for j in range(steps):
        u = apply(vs[j])
        if us:
            left = torch.stack(us, 1)
            u = u - left @ (left.mT @ u)
            u = u - left @ (left.mT @ u)
        alpha = u.norm()
        us.append(u / alpha.clamp_min(torch.finfo(u.dtype).tiny))
        alphas.append(alpha)
        v = adjoint(us[j])
        right = torch.stack(vs, 1)
        v = v - right @ (right.mT @ v)
        v = v - right @ (right.mT @ v)
        beta = v.norm()
        if j + 1 < steps:
            vs.append(v / beta.clamp_min(torch.finfo(v.dtype).tiny))
            betas.append(beta)
        if (j + 1) % 8 == 0 or j + 1 == steps:
            top = torch.linalg.svdvals(_bidiagonal(alphas, betas))[0]
            if bool((top - previous).abs() <= rtol * top) and j + 1 >= 2 * k:
                break
            previous = top
    bidiag = _bidiagonal(alphas, betas)
    _, values, vh = torch.linalg.svd(bidiag)
    basis = torch.stack(vs[: bidiag.shape[1]], 1) @ vh[:k].mT
    ortho: Tensor = torch.linalg.qr(basis)[0]
    return float(values[0]), ortho


def _bidiagonal(alphas: list[Tensor], betas: list[Tensor]) -> Tensor:
    """The upper bidiagonal ``B`` with ``W V = U B`` from the Lanczos coefficients."""
    n = len(alphas)
    bidiag = torch.diag(torch.stack(alphas))
    if n > 1:
        bidiag = bidiag + torch.diag(torch.stack(betas[: n - 1]), 1)
    return bidiag


class SpectralNorm(nn.Module):
    """Parametrization ``W -> W * c / sigma(W)`` (hard) or ``W * min(1, c / sigma(W))`` (soft).

    ``sigma(W)`` is the top singular value of ``weight_to_matrix(W, dim)``, estimated by a
    block power iteration that :meth:`power_step` advances (snpatch calls it from a forward
    pre-hook, in training mode only). Use :func:`snpatch.apply_spectral_norm` rather than
    building this directly.

    The iteration keeps an orthonormal block ``B`` of ``k`` right singular vectors. One
    step is a subspace iteration with a Rayleigh-Ritz step: ``W B = Q R_1`` (QR),
    ``W^T Q = P R`` (QR), ``R = X S Y^T`` (SVD of a ``k x k`` matrix); then ``sigma = s_1``,
    ``u = Q y_1``, ``v = P x_1`` (so ``u^T W v == sigma`` exactly) and the new block is ``P``.
    Each step reads the weight twice, as torch's power iteration does, but a block of
    vectors keeps tracking the top singular value where one vector falls behind.

    Args:
        weight: the weight to be normalized (used for shapes and the initial estimate).
        dim: the dimension that becomes the rows of the matrix (1 for transposed convs).
        lipschitz: the target bound ``c``.
        mode: ``"hard"`` or ``"soft"``.
        n_power_iterations: block steps per training forward (0: keep the state).
        eps: lower bound of ``sigma`` in the division.
        block_size: vectors tracked per side (at most ``min(matrix shape)``).
        converge: estimate the state now (False: random vectors, to be overwritten).
    """

    _u: Tensor
    _v: Tensor
    _block: Tensor
    _sigma: Tensor

    def __init__(
        self,
        weight: Tensor,
        *,
        dim: int,
        lipschitz: float,
        mode: Mode,
        n_power_iterations: int,
        eps: float,
        block_size: int = BLOCK_SIZE,
        converge: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.lipschitz = float(lipschitz)
        self.mode: Mode = mode
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        with torch.no_grad():
            matrix = self._matrix(weight)
            rows, cols = matrix.shape
            k = min(block_size, rows, cols)
            self.register_buffer("_u", F.normalize(matrix.new_empty(rows).normal_(), dim=0))
            self.register_buffer("_v", F.normalize(matrix.new_empty(cols).normal_(), dim=0))
            # Stored transposed (k x cols, rows contiguous): the layout in which the
            # products with the weight run fastest on CPU BLAS.
            block = _orthonormal(cols, k, matrix).mT.contiguous()
            self.register_buffer("_block", block, persistent=False)
            self.register_buffer("_sigma", matrix.new_zeros(()), persistent=False)
        if converge:
            self.converge(weight)

    def _matrix(self, weight: Tensor) -> Tensor:
        """The detached weight as a matrix in the state's dtype (float32 at least)."""
        matrix = weight_to_matrix(weight.detach(), self.dim)
        return matrix.to(_state_dtype(weight.dtype))

    @property
    def block_size(self) -> int:
        """Number of singular vectors tracked per side."""
        return int(self._block.shape[0])

    @torch.no_grad()
    def converge(self, weight: Tensor) -> None:
        """Re-estimate the whole state to full accuracy for ``weight`` (used at patch time)."""
        with torch.autocast(weight.device.type, enabled=False):
            matrix = self._matrix(weight)
            self._fit_block(matrix)
            self._step(matrix)

    @torch.no_grad()
    def refit_block(self, weight: Tensor) -> None:
        """Re-fit only the tracked block to ``weight``, keeping ``u``, ``v`` and ``sigma``.

        Used after ``load_state_dict``: the loaded vectors keep eval outputs exactly as saved,
        while the next training step starts from the right subspace of the loaded weight.
        """
        with torch.autocast(weight.device.type, enabled=False):
            self._fit_block(self._matrix(weight))

    def _fit_block(self, matrix: Tensor) -> None:
        k = self.block_size
        if min(matrix.shape) <= _GRAM_LIMIT:
            basis = _gram_subspace(matrix, k)
        else:
            basis = _lanczos_subspace(matrix, k, self._block[0].clone())
        self._block.copy_(basis.mT)

    @torch.no_grad()
    def power_step(self, weight: Tensor) -> None:
        """Advance the iteration ``n_power_iterations`` steps for the current ``weight``."""
        with torch.autocast(weight.device.type, enabled=False):
            matrix = self._matrix(weight)
            if self.n_power_iterations == 0:
                self._sigma.copy_(torch.vdot(self._u, matrix @ self._v))
            for _ in range(self.n_power_iterations):
                self._step(matrix)

    def _step(self, matrix: Tensor) -> None:
        block = self._block
        left = torch.linalg.qr(matrix @ block.mT)[0]
        right, tri = torch.linalg.qr((left.mT @ matrix).mT)
        x, values, yh = torch.linalg.svd(tri)
        self._u.copy_(left @ yh[0])
        self._v.copy_(right @ x[:, 0])
        self._block.copy_(right.mT)
        self._sigma.copy_(values[0])

    def sigma(self, weight: Tensor) -> Tensor:
        """The estimate ``u^T W v`` that the eval forward divides by (no grad)."""
        with torch.no_grad():
            return torch.vdot(self._u, self._matrix(weight) @ self._v)

    def forward(self, weight: Tensor) -> Tensor:
        # In training the pre-hook has just run the iteration for this weight; in eval the
        # estimate is recomputed for the current weight, as torch does.
        sigma = self._sigma if self.training else self.sigma(weight)
        # Cloned: a second forward before backward (D(real), D(fake)) updates the buffers
        # in place, and autograd must see the values this forward used.
        return _Normalize.apply(  # type: ignore[no-any-return]
            weight,
            self._u.clone(),
            self._v.clone(),
            sigma.clone(),
            self.lipschitz,
            self.mode == "soft",
            self.eps,
            self.dim,
        )

    def right_inverse(self, value: Tensor) -> Tensor:
        return value

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SpectralNorm:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        # model.half() / model.to(torch.bfloat16) must not lower the iteration's precision.
        for name in ("_u", "_v", "_block", "_sigma"):
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype in _LOW_PRECISION:
                self._buffers[name] = buffer.float()
        return self

    def extra_repr(self) -> str:
        return (
            f"lipschitz={self.lipschitz:g}, mode={self.mode!r}, dim={self.dim}, "
            f"n_power_iterations={self.n_power_iterations}, eps={self.eps:g}, "
            f"block_size={self.block_size}"
        )
