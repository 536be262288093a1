"""The math on one weight: the spectral-norm parametrization and its power iteration.

:class:`SpectralNorm` is a ``torch.nn.utils.parametrize`` parametrization. Its persistent
state is exactly that of ``torch.nn.utils.parametrizations.spectral_norm`` (``_u``, the
left, and ``_v``, the right top singular vector of the weight viewed as a matrix), so
checkpoints move between the two. On top of that it keeps a small orthonormal block of
right singular vectors (``_block``, not saved) and runs a *block* power iteration with a
Rayleigh-Ritz step: reading the weight dominates the cost, and multiplying it by a block
of ``k`` vectors reads it once, just as a matrix-vector product does, while the block
keeps tracking the top singular value when the top of the spectrum is clustered (where
one vector per step falls behind). A matrix whose smaller side is at most
:func:`snpatch.engine.gram_limit` (64 on the CPU, 640 on an accelerator) is instead solved
from its Gram matrix at every step, and its block is not used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ._compat import (
    functorch_transforms_active,
    in_autograd_backward,
    jit_tracing,
    version_counter,
)
from .distributed import gathered, sharded_like
from .engine import (
    BlockProducts,
    Cohort,
    GramProducts,
    RitzRow,
    autocast_off,
    block_step,
    gram_limit,
    next_block,
    scale_of,
    step_norms,
)
from .errors import SerializationError

__all__ = [
    "BLOCK_SIZE",
    "Mode",
    "SpectralNorm",
    "in_backward_pass",
    "in_functorch_transform",
    "weight_to_matrix",
]

Mode = Literal["hard", "soft"]

#: Vectors tracked per weight. Chosen by measurement, see docs/measurements.md, "Accuracy".
BLOCK_SIZE = 16

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


class _OptimizerSteps:
    """Counts ``torch.optim`` optimizer steps in this process (a global post-step hook).

    Part of what tells a weight's new value (see :meth:`SpectralNorm.advance`): FSDP2
    all-gathers the updated shards into the same unsharded tensor with its version counter
    preserved, and optimizers may write through ``.data``, so the version counter alone can
    miss an update; a step of any optimizer can't be missed.
    """

    count = 0
    _handle: object = None

    @classmethod
    def install(cls) -> None:
        if cls._handle is None:
            cls._handle = register_optimizer_step_post_hook(cls._tick)

    @classmethod
    def _tick(cls, optimizer: object, args: object, kwargs: object) -> None:
        cls.count += 1


def in_functorch_transform() -> bool:
    """True inside a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...).

    Those transforms forbid mutating buffers captured from outside, so there a training
    forward leaves the iteration state alone and divides by ``u^T W v`` for the weight it
    is given, as eval does.
    """
    if torch.compiler.is_compiling():
        return False
    return functorch_transforms_active()


def in_backward_pass() -> bool:
    """True while the autograd engine runs a backward pass.

    A forward there is a recomputation by activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not): it must reproduce the original forward,
    so the iteration must not advance a second time.
    """
    if torch.compiler.is_compiling():
        return False
    return in_autograd_backward()


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


def _scaled(weight: Tensor, scale: Tensor) -> Tensor:
    if weight.dtype in _LOW_PRECISION:
        # A float16/bfloat16 scale alone would be off by up to 0.4%.
        return (weight.float() * scale).to(weight.dtype)
    return weight * (scale if scale.dtype == weight.dtype else scale.to(weight.dtype))


def _explore(matrix: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(W x, W^T W x)`` for a flat vector ``x`` (``W^T`` applied from the left of a row)."""
    wx = torch.mv(matrix, x)
    return wx, wx @ matrix


class _Sigma(torch.autograd.Function):
    """``sigma = u^T W v`` with ``u``, ``v`` constant, returning a precomputed value.

    The backward is ``grad * u v^T``, the gradient of torch's ``vdot(u, mv(W, v))``, and is
    itself differentiable (used on the double-backward path of :class:`_Normalize`).
    """

    # torch.func (grad, vmap) needs setup_context separate from forward, and a vmap rule.
    generate_vmap_rule = True

    @staticmethod
    def forward(weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
        return sigma.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        weight, u, v, _, dim = inputs
        ctx.save_for_backward(u, v)
        ctx.dim = dim
        ctx.shape = weight.shape
        ctx.dtype = weight.dtype

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

    # torch.func (grad, vmap) needs setup_context separate from forward, and a vmap rule.
    generate_vmap_rule = True

    @staticmethod
    def forward(
        weight: Tensor,
        u: Tensor,
        v: Tensor,
        sigma: Tensor,
        scale: Tensor,
        lipschitz: float,
        soft: bool,
        eps: float,
        dim: int,
    ) -> Tensor:
        # ``scale`` is scale_of(sigma, lipschitz, soft, eps), computed once by the caller.
        return _scaled(weight, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor | None) -> None:
        weight, u, v, sigma, scale, lipschitz, soft, eps, dim = inputs
        ctx.save_for_backward(weight, u, v, sigma, scale)
        ctx.options = (lipschitz, soft, eps, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, u, v, sigma, scale = ctx.saved_tensors
        lipschitz, soft, eps, dim = ctx.options
        nones = (None,) * 8
        if torch.is_grad_enabled():
            # Double backward: the same formula, from differentiable operations.
            sigma_of_w = _Sigma.apply(weight, u, v, sigma, dim)
            out = _scaled(weight, scale_of(sigma_of_w, lipschitz, soft, eps))
            (grad_weight,) = torch.autograd.grad(out, weight, grad, create_graph=True)
            return grad_weight, *nones
        if (
            dim == 0
            and grad.device.type == "cpu"
            and grad.dtype == sigma.dtype
            and grad.is_contiguous()
            and not torch.compiler.is_compiling()
        ):
            # One pass over the weight: g * scale + coefficient * u v^T, with the scalars
            # as Python floats (reading CPU scalars costs no device synchronization, and a
            # small layer's step would otherwise spend more on a dozen 0-dim tensor ops
            # than on its arithmetic; a compiled graph can't read them, and inductor fuses
            # the general path anyway). Kept for its measured saving (issue 14, item 7: kept
            # only while >= 5% on some bench model): without it, training the bench's mlp
            # took 6% longer (in-process A/B, docs/design/engine.md, "4. Simpler").
            value, factor = float(sigma), float(scale)
            alpha = 0.0  # d scale / d sigma * <g, W>: -scale / sigma where the bound is active
            if value > 0 and not (soft and value <= lipschitz):
                dot = float(torch.vdot(grad.view(-1), weight.reshape(-1).to(grad.dtype)))
                alpha = -factor / max(value, eps) * dot
            matrix = grad.view(grad.shape[0], -1)
            fused = torch.addr(matrix, u, v, beta=factor, alpha=alpha)
            return fused.view(grad.shape), *nones
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
        return grad_weight, *nones


class _NormalizeEager(torch.autograd.Function):
    """:class:`_Normalize` in the ``forward(ctx, ...)`` style, for plain eager training.

    The same forward and backward. torch binds the arguments of a setup_context-style
    Function with ``inspect.signature`` on every call, which costs more than a small
    layer's whole normalization; this style skips that. Under torch.func transforms and
    while compiling, :class:`_Normalize` is used (they need its style). Kept for its measured
    saving (issue 14, item 7): with :class:`_Normalize` instead, a training step of the
    bench's mixture_d took 10-12% longer, mlp's 5-6% (docs/design/engine.md, "4. Simpler").
    """

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:  # the arguments of _Normalize.forward
        _Normalize.setup_context(ctx, inputs, None)
        return _Normalize.forward(*inputs)

    backward = staticmethod(_Normalize.backward)


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
    top Ritz value changes by less than ``rtol`` (checked every few steps), after ``steps``
    steps (at most the smaller dimension of ``A``), or at a breakdown: when ``A v`` or
    ``A^T u`` has nothing left outside the vectors found so far (below
    ``sqrt(machine epsilon)`` of the largest coefficient), the Krylov space is invariant and
    its Ritz values are singular values of ``A``; normalizing the rounding noise left there
    would build a bidiagonal that no longer describes ``A`` (and overestimates its norm).
    Operators of rank below their size (inputs a strided kernel never reads, constant
    kernels) break down after at most their rank's worth of steps. The value is never above
    ``||A||`` beyond rounding. Fewer than ``k`` Ritz vectors are completed with random
    orthonormal ones. Krylov methods separate a clustered top of the spectrum far faster
    than subspace iteration, which is what large randomly initialized layers (and
    convolution operators) have.
    """
    us: list[Tensor] = []
    vs: list[Tensor] = [F.normalize(start, dim=0)]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    previous = torch.zeros((), dtype=start.dtype, device=start.device)
    tolerance = torch.finfo(start.dtype).eps ** 0.5
    # The largest coefficient so far: a lower bound of ||A||, the scale of rounding noise.
    scale = torch.zeros((), dtype=start.dtype, device=start.device)
    for j in range(steps):
        u = apply(vs[j])
        if us:
            left = torch.stack(us, 1)
            u = u - left @ (left.mT @ u)
            u = u - left @ (left.mT @ u)
        alpha = u.norm()
        scale = torch.maximum(scale, alpha)
        # One sync per step; the run already syncs every few steps for its stopping test.
        if j > 0 and bool(alpha <= tolerance * scale):
            # A v_j lies in span(u_1..u_{j-1}): column j of B is (beta_{j-1}, 0).
            alphas.append(torch.zeros_like(alpha))
            break
        us.append(u / alpha.clamp_min(torch.finfo(u.dtype).tiny))
        alphas.append(alpha)
        v = adjoint(us[j])
        right = torch.stack(vs, 1)
        v = v - right @ (right.mT @ v)
        v = v - right @ (right.mT @ v)
        beta = v.norm()
        scale = torch.maximum(scale, beta)
        if j + 1 < steps:
            if bool(beta <= tolerance * scale):
                break  # A^T u_j lies in span(v_1..v_j): B is square, j + 1 columns
            vs.append(v / beta.clamp_min(torch.finfo(v.dtype).tiny))
            betas.append(beta)
        if (j + 1) % 8 == 0 or j + 1 == steps:
            top = torch.linalg.svdvals(_bidiagonal(alphas, betas))[0]
            if bool((top - previous).abs() <= rtol * top) and j + 1 >= 2 * k:
                break
            previous = top
    bidiag = _bidiagonal(alphas, betas)
    _, values, vh = torch.linalg.svd(bidiag)
    columns = min(len(vs), bidiag.shape[1])
    basis = torch.stack(vs[:columns], 1) @ vh[: min(k, columns), :columns].mT
    if basis.shape[1] < k:
        # A breakdown before k steps: complete the block with random orthogonal directions.
        extra = torch.randn(basis.shape[0], k - basis.shape[1], dtype=basis.dtype)
        basis = torch.cat([basis, extra.to(basis.device)], 1)
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
    block power iteration that :meth:`advance` steps once per new value of the weight, in
    training mode only. Use :func:`snpatch.apply_spectral_norm` rather than building this
    directly.

    The iteration keeps an orthonormal block ``B`` of ``k`` right singular vectors (the
    columns of ``_block``). One step is a subspace iteration with a Rayleigh-Ritz step,
    ``Y = W B``, ``Z = W^T Y``, solved on their ``k x k`` Grams without QR or SVD and batched
    with the other weights patched together (:mod:`snpatch.engine`); ``u^T W v == sigma``
    for the weight it ran on. Each step reads the weight twice, as torch's power iteration
    does, but a block of vectors keeps tracking the top singular value where one vector
    falls behind.

    In eval mode the normalized weight is cached (see :meth:`forward`).

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

    #: Name under which snapshots (:func:`snpatch.remove_spectral_norm`) record this class.
    kind: ClassVar[str] = "matrix"
    #: The buffers saved in ``state_dict`` (torch's layout); the others are derived state.
    persistent_buffers: ClassVar[frozenset[str]] = frozenset({"_u", "_v"})

    _u: Tensor
    _v: Tensor
    _block: Tensor
    _sigma: Tensor

    #: Serve the eval-mode weight from a cache (see :meth:`forward`); False recomputes it.
    eval_cache: bool = True
    #: (optimizer steps, weight identity, storage, version) when the state last advanced.
    _stepped_for: tuple[int, int, int, int] | None = None
    #: The weights patched with this one, stepped with it (set by ``Cohort.add``).
    _cohort: Cohort | None = None
    #: ``(u, v, sigma, scale, options)`` of the last step, for its training forwards, valid
    #: while ``_u`` is at ``_fresh_version`` (any other write to the state bumps it).
    _fresh: tuple[Tensor, Tensor, Tensor, Tensor, tuple[float, str, float]] | None = None
    _fresh_version: int = -1

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
            # The block's vectors as columns (cols x k).
            block = _orthonormal(cols, k, matrix)
            self.register_buffer("_block", block, persistent=False)
            self.register_buffer("_sigma", matrix.new_zeros(()), persistent=False)
        self._cache: tuple[tuple[object, ...], Tensor] | None = None
        _OptimizerSteps.install()
        if converge:
            self.converge(weight)

    def config(self) -> dict[str, object]:
        """The options, as plain Python values (with :meth:`from_config`: an exact copy)."""
        return {
            "dim": self.dim,
            "lipschitz": self.lipschitz,
            "mode": self.mode,
            "n_power_iterations": self.n_power_iterations,
            "eps": self.eps,
            "eval_cache": self.eval_cache,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], buffers: Mapping[str, Tensor]) -> SpectralNorm:
        """Rebuild a parametrization from :meth:`config` and its buffers, estimating nothing.

        ``buffers`` maps every buffer name (persistent or not) to its tensor, which is used
        as it is (not copied). Uses no random numbers, so restoring a snapshot leaves the
        global RNG, and with it the rest of a training run, untouched.
        """
        norm = cls.__new__(cls)
        nn.Module.__init__(norm)
        norm.dim = int(config["dim"])
        norm.lipschitz = float(config["lipschitz"])
        norm.mode = config["mode"]
        norm.n_power_iterations = int(config["n_power_iterations"])
        norm.eps = float(config["eps"])
        norm.eval_cache = bool(config.get("eval_cache", True))
        norm._cache = None
        _OptimizerSteps.install()
        for name, tensor in buffers.items():
            norm.register_buffer(name, tensor, persistent=name in cls.persistent_buffers)
        return norm

    @torch.no_grad()
    def effective_weight(self, weight: Tensor) -> Tensor:
        """The normalized weight as the eval forward computes it (no iteration step, no grad).

        For a weight sharded by ``fully_shard`` (a ``DTensor``), every rank must call: the
        result is sharded the same way.
        """
        full = gathered(weight)
        sigma = self.sigma(full)
        scale = scale_of(sigma, self.lipschitz, self.mode == "soft", self.eps)
        return sharded_like(_scaled(full.detach(), scale), weight)

    def __prepare_scriptable__(self) -> SpectralNorm:
        # torch.jit.script calls this on every submodule before compiling; parametrized
        # modules can't be scripted, so say what works instead of a parser error.
        raise SerializationError(
            "torch.jit.script can't compile a layer with spectral normalization "
            "(a torch.nn.utils.parametrize parametrization); script the model inside "
            "`with snpatch.exported(model):`, which bakes in the normalized weights"
        )

    def _matrix(self, weight: Tensor) -> Tensor:
        """The detached weight as a matrix in the state's dtype (float32 at least)."""
        if torch.is_grad_enabled():
            weight = weight.detach()
        matrix = weight_to_matrix(weight, self.dim)
        return matrix.to(_state_dtype(weight.dtype))

    @property
    def block_size(self) -> int:
        """Number of singular vectors tracked per side."""
        return int(self._block.shape[1])

    @torch.no_grad()
    def converge(self, weight: Tensor) -> None:
        """Re-estimate the whole state to full accuracy for ``weight`` (used at patch time).

        A weight sharded by ``fully_shard`` is gathered first (every rank must call).
        """
        weight = gathered(weight)
        with torch.autocast(weight.device.type, enabled=False):
            self._fit_block(self._matrix(weight))
            block_step(self._matrix_products(weight))

    @torch.no_grad()
    def refit_block(self, weight: Tensor) -> None:
        """Re-fit only the tracked block to ``weight``, keeping ``u``, ``v`` and ``sigma``.

        Used after ``load_state_dict``: the loaded vectors keep eval outputs exactly as saved,
        while the next training step starts from the right subspace of the loaded weight.
        A weight sharded by ``fully_shard`` is gathered first (every rank must call).
        """
        weight = gathered(weight)
        with torch.autocast(weight.device.type, enabled=False):
            self._fit_block(self._matrix(weight))

    def _fit_block(self, matrix: Tensor) -> None:
        k = self.block_size
        if min(matrix.shape) <= _GRAM_LIMIT:
            basis = _gram_subspace(matrix, k)
        else:
            basis = _lanczos_subspace(matrix, k, self._block[:, 0].clone())
        self._block.copy_(basis)
        self._fresh = None

    def advance(self, weight: Tensor) -> None:
        """Advance the iteration once for each new value of ``weight``; then do nothing.

        Called in training mode by the layer's forward pre-hook and by :meth:`forward`,
        which runs wherever the weight is read (``layer.weight``, ``F.linear(x,
        layer.weight)`` from a parent module, a tied or shared weight). A new value is told
        by a step of any ``torch.optim`` optimizer in the process (a post-step hook counts
        them) or a change of the tensor's identity, storage or version counter (which every
        in-place update, ``load_state_dict`` and ``model.to()`` change), so each weight is
        stepped once per training step however often the step reads it (``D(real)``,
        ``D(fake)``, a gradient penalty). An edit through ``.data`` outside an optimizer
        step bypasses both: call :func:`snpatch.update_sigma` after one.

        The callers leave out the contexts where no state may change (activation
        checkpointing recomputing a forward in backward, ``torch.func`` transforms) and
        ``torch.compile`` tracing, where the pre-hook steps at every training forward (a
        version counter can't be guarded on without a recompilation per step).
        """
        key = self.value_key(weight)
        if key is None or key != self._stepped_for:
            cohort = self._cohort
            if cohort is not None:
                cohort.step_stale(self, weight)  # sets every stepped member's key
            else:
                step_norms([(self, weight)])
            self._stepped_for = key

    @staticmethod
    def value_key(weight: Tensor) -> tuple[int, int, int, int] | None:
        """What tells a new value of ``weight`` (see :meth:`advance`); None: always new.

        Host-side metadata only: reading it never synchronizes a device.
        """
        try:
            return (_OptimizerSteps.count, id(weight), weight.data_ptr(), version_counter(weight))
        except RuntimeError:  # an inference tensor has no version counter
            return None

    def _advance_on_read(self, weight: Tensor) -> None:
        """:meth:`advance` from a training-mode read, where state may change."""
        if not (torch.compiler.is_compiling() or in_backward_pass() or in_functorch_transform()):
            self.advance(weight)

    def power_step(self, weight: Tensor) -> None:
        """Advance the iteration ``n_power_iterations`` steps for the current ``weight``."""
        step_norms([(self, weight)])

    def step_products(
        self, weight: Tensor, *, first: bool
    ) -> Sequence[BlockProducts | GramProducts]:
        """This estimator's products for one step of :func:`snpatch.engine.block_step`.

        With ``n_power_iterations == 0`` there is no step: ``sigma`` is ``u^T W v`` for the
        current weight (computed here, on the ``first`` round).
        """
        if self.n_power_iterations == 0:
            if first:
                self._sigma.copy_(self._torch_estimate(weight))
                self._fresh = None
            return []
        if not first and self._solved_exactly(weight):
            return []  # (the first round was exact: more would change nothing)
        return self._matrix_products(weight)

    def _solved_exactly(self, weight: Tensor) -> bool:
        """Whether each step solves ``weight`` exactly, from its Gram (:func:`gram_limit`)."""
        rows = weight.shape[self.dim]  # (weight_to_matrix's shape, without dispatching a view)
        return min(rows, weight.numel() // max(rows, 1)) <= gram_limit(weight.device)

    def _matrix_products(self, weight: Tensor) -> list[BlockProducts | GramProducts]:
        with autocast_off(weight.device):
            matrix = self._matrix(weight)
            if self._solved_exactly(weight):
                return [self._gram_products(matrix)]
        block = self._buffers["_block"]
        assert block is not None
        return [self._products(matrix, block)]

    def _gram_products(self, matrix: Tensor) -> GramProducts:
        """The exact step's Gram ``W W^T`` or ``W^T W`` (the smaller), and its finish."""
        rows, cols = matrix.shape
        wide = rows <= cols
        gram = matrix @ matrix.mT if wide else matrix.mT @ matrix

        def finish(
            top: Tensor, sigma: Tensor, divisor: Tensor, scale: Tensor | None
        ) -> list[tuple[Tensor, Tensor]]:
            # top: the unit top left (wide) or right singular vector; the other is its
            # image over sigma, so that u^T W v is sigma, as torch's vectors make it.
            image = torch.mv(matrix.mT, top) if wide else torch.mv(matrix, top)
            other = image / divisor
            u, v = (top, other) if wide else (other, top)
            return self._finish_vectors(u, v, sigma, scale)

        return GramProducts(gram, finish, self._scale_options(), self._commit)

    def _scale_options(self) -> tuple[float, bool, float]:
        return (self.lipschitz, self.mode == "soft", self.eps)

    def _products(self, matrix: Tensor, block: Tensor) -> BlockProducts:
        """``Y = W B``, ``Z = W^T Y`` and their Grams, for the matrix ``W`` and block ``B``."""
        with autocast_off(matrix.device):
            y = matrix @ block
            y_t = y.mT
            # W^T Y as (Y^T W)^T: CPU BLAS is several times faster this way round.
            z_t = y_t @ matrix
            z = z_t.mT
            grams = (y_t @ y, z_t @ z)
        return BlockProducts(
            y,
            z,
            self._finish,
            self._scale_options(),
            self._commit,
            grams,
            block,
            explore=lambda x: _explore(matrix, x),
            restep=lambda other: self._products(matrix, other),
        )

    def _finish(self, y: Tensor, z: Tensor, row: RitzRow) -> list[tuple[Tensor, Tensor]]:
        state = cast(dict[str, Tensor], self._buffers)
        block = state["_block"]
        u, v = torch.mv(y, row.cu), torch.mv(z, row.cv)
        vectors = self._finish_vectors(u, v, row.sigma, row.scale)
        return [*vectors, (block, next_block(z, block, row))]

    def _finish_vectors(
        self, u: Tensor, v: Tensor, sigma: Tensor, scale: Tensor | None
    ) -> list[tuple[Tensor, Tensor]]:
        """The step's ``u``, ``v`` and ``sigma`` (to be copied into the buffers), kept fresh."""
        # (The buffers are read from ``_buffers``: nn.Module.__getattr__ costs a small
        # layer's step several microseconds.)
        state = cast(dict[str, Tensor], self._buffers)
        if scale is not None and not torch.compiler.is_compiling():
            # What the training forwards of this value divide by: new tensors, which later
            # steps don't overwrite (the buffers get copies), so no forward clones them.
            self._fresh = (u, v, sigma, scale, (self.lipschitz, self.mode, self.eps))
        else:
            self._fresh = None
        return [(state["_u"], u), (state["_v"], v), (state["_sigma"], sigma)]

    def _commit(self) -> None:
        if self._fresh is not None:
            try:
                self._fresh_version = version_counter(self._buffers["_u"])  # type: ignore[arg-type]
            except RuntimeError:  # an inference tensor (made under inference_mode): no version
                self._fresh = None

    def sigma(self, weight: Tensor) -> Tensor:
        """The estimate the eval forward divides by (no grad): see :meth:`_eval_vectors`."""
        return self._eval_vectors(weight)[1]

    def _torch_estimate(self, weight: Tensor) -> Tensor:
        """torch's estimate ``u^T W v`` for ``weight`` with the current ``u``, ``v`` (no grad)."""
        with torch.no_grad(), autocast_off(weight.device):
            return torch.vdot(self._u, self._matrix(weight) @ self._v)

    def _eval_vectors(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The left vector and the estimate the eval forward uses (no grad).

        torch's ``u^T W v`` where it is positive. It is not where the weight changed so much
        after the last step (a large optimizer step, then eval) that ``u`` and ``v`` no
        longer describe it: torch divides by the negative value (the weight's sign flips)
        and snpatch by 1 (the rule for a zero weight), and either bounds nothing. There it is
        ``|W v|`` with ``u = W v / |W v|``.
        """
        with torch.no_grad(), autocast_off(weight.device):
            u = self._u
            wv = self._matrix(weight) @ self._v
            estimate = torch.vdot(u, wv)
            valid = estimate > 0
            norm = torch.linalg.vector_norm(wv)
            # (A zero W v gives a zero u: the divisor is then 1, a constant, see scale_of.)
            fallback = wv / norm.clamp_min(torch.finfo(norm.dtype).tiny)
            return torch.where(valid, u, fallback), torch.where(valid, estimate, norm)

    def forward(self, weight: Tensor) -> Tensor:
        """``weight`` normalized; in training with the estimate the pre-hook just updated.

        In eval mode (and under torch.func, where the hook cannot update the state) the
        estimate is recomputed for the current weight, as torch does (unless torch's is not
        positive: see :meth:`_eval_vectors`). In eval mode the result is cached: while the
        weight (its identity, storage and version counter), ``u``, ``v`` and the options
        stay the same, the cached tensor is served. It is never served where the result
        must carry a graph (grad enabled and the weight requires grad: e.g. gradients with
        respect to the weights in eval), under torch.func, nor while ``torch.compile``
        traces. In-place edits made through ``.data`` bypass PyTorch's version counter:
        after one in eval mode call :meth:`clear_cache` (or set ``eval_cache = False``).
        Switching to training drops the cache.
        """
        if self._serves_cache(weight):
            return self._cached(weight)
        functorch = in_functorch_transform()
        soft = self.mode == "soft"
        compiling = torch.compiler.is_compiling()
        if self.training and not functorch:
            if self._cache is not None:  # (nn.Module.__setattr__ is slow: not every step)
                self._cache = None
            self._advance_on_read(weight)
            fresh = self._fresh
            if (
                fresh is not None
                and not compiling
                and self._fresh_version == version_counter(self._buffers["_u"])  # type: ignore[arg-type]
                and fresh[4] == (self.lipschitz, self.mode, self.eps)
            ):
                # The step's own results (never written in place afterwards).
                return _NormalizeEager.apply(  # type: ignore[no-any-return]
                    weight, *fresh[:4], self.lipschitz, soft, self.eps, self.dim
                )
            sigma = self._sigma
            u = self._u.clone()
        else:
            u, sigma = self._eval_vectors(weight)
        # Cloned: a later step (or a load) updates the buffers in place, and autograd
        # must see the values this forward used.
        sigma = sigma.clone()
        function = _Normalize if functorch or compiling else _NormalizeEager
        return function.apply(  # type: ignore[no-any-return]
            weight,
            u,
            self._v.clone(),
            sigma,
            scale_of(sigma, self.lipschitz, soft, self.eps),
            self.lipschitz,
            soft,
            self.eps,
            self.dim,
        )

    def _cache_key(self, weight: Tensor) -> tuple[object, ...] | None:
        """What the cached eval weight depends on; None where it can't be validated."""
        buffers = self._buffers
        u, v = buffers["_u"], buffers["_v"]
        assert u is not None
        assert v is not None
        try:
            return (
                id(weight),
                weight.data_ptr(),
                version_counter(weight),
                u.data_ptr(),
                version_counter(u),
                v.data_ptr(),
                version_counter(v),
                self.lipschitz,
                self.mode,
                self.eps,
            )
        except RuntimeError:
            # An inference tensor: it has no version counter to validate a cache with.
            return None

    def _cached(self, weight: Tensor) -> Tensor:
        """The eval-mode normalized weight, from the cache while it is valid."""
        key = self._cache_key(weight)
        if key is None:
            return self.effective_weight(weight)
        cache = self._cache
        if cache is not None and cache[0] == key:
            return cache[1]
        # Built outside inference mode so that it can be served in any later mode.
        with torch.inference_mode(False):
            value = self.effective_weight(weight)
        self._cache = (key, value)
        return value

    def cached_weight(self, weight: Tensor) -> Tensor | None:
        """The cached eval-mode weight if :meth:`forward` would serve it as is, else None.

        Does no work beyond the checks: the patched layer's ``weight`` property asks this
        first and only goes through ``torch.nn.utils.parametrize`` (whose per-access
        overhead is several times that of a small layer's eval forward) when it gets None.
        The conditions are those of :meth:`forward` (:meth:`_serves_cache`).
        """
        cache = self._cache
        if cache is None or not self._serves_cache(weight) or cache[0] != self._cache_key(weight):
            return None
        return cache[1]

    def _serves_cache(self, weight: Tensor) -> bool:
        """Whether this forward may use the eval cache (see :meth:`forward`)."""
        # Cheapest first: the weight property asks this on every eval access.
        return not (
            self.training
            or not self.eval_cache
            or (weight.requires_grad and torch.is_grad_enabled())
            or torch.compiler.is_compiling()
            or jit_tracing()  # a cached tensor would become a constant of the trace
            or functorch_transforms_active()
        )

    def clear_cache(self) -> None:
        """Drop the cached eval-mode weight (needed only after an edit through ``.data``)."""
        self._cache = None

    def train(self, mode: bool = True) -> SpectralNorm:
        # No full-size copy is kept alive while training.
        self._cache = None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        state["_cache"] = None  # deepcopy / pickle: rebuilt on the next eval forward
        return state

    def right_inverse(self, value: Tensor) -> Tensor:
        return value

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SpectralNorm:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._cache = None
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
