"""fusedadapters: NeMo's adapter mixin API with fused adapter kernels.

NeMo code ports by changing imports: ``nemo.core`` → ``fusedadapters``,
``nemo.core.adapter_mixins`` → ``fusedadapters.adapter_mixins``,
``nemo.core.classes.mixins.adapter_mixin_strategies`` → ``fusedadapters.adapter_mixin_strategies``,
``nemo.collections.common.parts.adapter_modules`` → ``fusedadapters.adapter_modules``,
``nemo.utils`` / ``hydra.utils`` → ``fusedadapters.utils``.
"""

from . import access_mixins, adapter_mixin_strategies, adapter_mixins, adapter_modules, ops, utils
from .access_mixins import AccessMixin
from .adapter_mixin_strategies import (
    AbstractAdapterStrategy,
    ResidualAddAdapterStrategy,
    ResidualAddAdapterStrategyConfig,
    ReturnResultAdapterStrategy,
    ReturnResultAdapterStrategyConfig,
)
from .adapter_mixins import (
    AdapterConfig,
    AdapterModelPTMixin,
    AdapterModuleMixin,
    AdapterNotFoundError,
    AdapterRegistryInfo,
    get_registered_adapter,
    register_adapter,
    update_module_class_with_adapter_class,
)
from .adapter_modules import (
    AdapterModuleUtil,
    FusedLinearAdapter,
    FusedLinearAdapterConfig,
    LinearAdapter,
    LinearAdapterConfig,
)
from .model import ModelPT, ModelSummary, NeuralModule
from .routing import route_adapters
from .serialization import CheckpointFileError
from .targets import UnsafeTargetError, instantiate, register_loadable_class

__version__ = "0.1.0"

__all__ = [
    "AbstractAdapterStrategy",
    "AccessMixin",
    "AdapterConfig",
    "AdapterModelPTMixin",
    "AdapterModuleMixin",
    "AdapterModuleUtil",
    "AdapterNotFoundError",
    "AdapterRegistryInfo",
    "CheckpointFileError",
    "FusedLinearAdapter",
    "FusedLinearAdapterConfig",
    "LinearAdapter",
    "LinearAdapterConfig",
    "ModelPT",
    "ModelSummary",
    "NeuralModule",
    "ResidualAddAdapterStrategy",
    "ResidualAddAdapterStrategyConfig",
    "ReturnResultAdapterStrategy",
    "ReturnResultAdapterStrategyConfig",
    "UnsafeTargetError",
    "access_mixins",
    "adapter_mixin_strategies",
    "adapter_mixins",
    "adapter_modules",
    "get_registered_adapter",
    "instantiate",
    "ops",
    "register_adapter",
    "register_loadable_class",
    "route_adapters",
    "update_module_class_with_adapter_class",
    "utils",
]
