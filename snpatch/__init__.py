"""snpatch: spectral normalization on any PyTorch model in one line.

>>> import torchvision, snpatch
>>> model = snpatch.apply_spectral_norm(torchvision.models.resnet18(weights=None), exclude="fc")
"""

from .errors import (
    AlreadyPatchedError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    MissingDependencyError,
    NoMatchingLayersError,
    NoMatchingTensorsError,
    ParametrizationRemovedError,
    SerializationError,
    SharedWeightError,
    SnapshotMismatchError,
    SnpatchError,
    SnpatchWarning,
    UnsupportedLayerError,
    WrappedModelError,
)
from .export import (
    SpectralNormSnapshot,
    exported,
    plain_state_dict,
    remove_spectral_norm,
    restore_spectral_norm,
)
from .monitor import exact_sigmas, log_sigmas, sigma_estimates
from .operator import OperatorNorm
from .parametrization import SpectralNorm
from .patch import (
    SpectralNormConfig,
    apply_spectral_norm,
    is_patched,
    patched_layers,
    set_lipschitz,
    spectral_norms,
    update_sigma,
)
from .report import SpectralReport, lipschitz_bound, lipschitz_bounds, spectral_report
from .select import DEFAULT_LAYER_TYPES, LINEAR_LIKE_LAYERS, TensorNames, select_layers

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LINEAR_LIKE_LAYERS",
    "AlreadyPatchedError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "MissingDependencyError",
    "NoMatchingLayersError",
    "NoMatchingTensorsError",
    "OperatorNorm",
    "ParametrizationRemovedError",
    "SerializationError",
    "SharedWeightError",
    "SnapshotMismatchError",
    "SnpatchError",
    "SnpatchWarning",
    "SpectralNorm",
    "SpectralNormConfig",
    "SpectralNormSnapshot",
    "SpectralReport",
    "TensorNames",
    "UnsupportedLayerError",
    "WrappedModelError",
    "__version__",
    "apply_spectral_norm",
    "exact_sigmas",
    "exported",
    "is_patched",
    "lipschitz_bound",
    "lipschitz_bounds",
    "log_sigmas",
    "patched_layers",
    "plain_state_dict",
    "remove_spectral_norm",
    "restore_spectral_norm",
    "select_layers",
    "set_lipschitz",
    "sigma_estimates",
    "spectral_norms",
    "spectral_report",
    "update_sigma",
]
