"""mmeff: cheaper vision-language and video models, one API for every method.

    import mmeff
    with mmeff.apply(model, mmeff.AvgPool(tokens=144)):
        model.generate(**inputs)

Layout (dependencies point down the list; nothing imports upward): ``kernels`` -> ``core``, ``checkpoint``,
``hfconfig``, ``hosts`` -> ``datasets``, ``methods``, ``kv``, ``quant`` -> ``adapters`` -> ``api`` ->
``models`` -> ``eval`` -> ``train`` -> ``bench`` -> ``cli``, ``demos``. See the README's "Architecture".
"""

import importlib

from mmeff import adapters  # noqa: F401  (registers every adapter)
from mmeff import deprecated as _deprecated
from mmeff.api import apply, attach, patch, unpatch
from mmeff.core import (
    BudgetReducer,
    Compose,
    GridReducer,
    Reduction,
    ScoreTopK,
    TokenContext,
    TokenReducer,
    compose,
    create_reducer,
    get_reducer_class,
    list_reducers,
    register,
)
from mmeff.kv.presses import EvictingCache, FullKV, KVPress, StreamingLLM, create_press, list_presses
from mmeff.kv.sepllm import SepLLM, separator_ids
from mmeff.methods.baselines import AvgPool, CLSAttnTopK, RandomKeep, UniformKeep
from mmeff.methods.fourier import FourierLowPass, fourier_compress
from mmeff.methods.freevideo import FreeVideoLLM
from mmeff.methods.tome import ToMe
from mmeff.methods.vistog import VisToG
from mmeff.models import embedded as _embedded  # noqa: F401  (registers mmeff-mini)
from mmeff.models import squeezetime as _squeezetime  # noqa: F401  (registers its models)
from mmeff.models.cdt import CDT
from mmeff.models.eve import EveForConditionalGeneration
from mmeff.models.instruct_ipt import InstructIPT
from mmeff.models.zoo import create_model, list_models
from mmeff.quant import flatquant as _flatquant  # noqa: F401  (registers the quantizers)

_deprecated.install()

__version__ = "0.2.0"

__all__ = [
    "AvgPool",
    "CDT",
    "EveForConditionalGeneration",
    "BudgetReducer",
    "CLSAttnTopK",
    "Compose",
    "EvictingCache",
    "FullKV",
    "KVPress",
    "FourierLowPass",
    "FreeVideoLLM",
    "InstructIPT",
    "GridReducer",
    "RandomKeep",
    "Reduction",
    "ScoreTopK",
    "SepLLM",
    "StreamingLLM",
    "ToMe",
    "VisToG",
    "TokenContext",
    "TokenReducer",
    "UniformKeep",
    "apply",
    "attach",
    "compose",
    "create_press",
    "create_reducer",
    "cdt",
    "eve",
    "flatquant",
    "fourier_compress",
    "instruct_ipt",
    "get_reducer_class",
    "list_presses",
    "list_reducers",
    "patch",
    "register",
    "separator_ids",
    "tome",
    "squeezetime",
    "create_model",
    "list_models",
    "vistog",
    "unpatch",
]


def __getattr__(name: str) -> object:
    """``mmeff.tome``, ``mmeff.eve``, ... (the modules ``__all__`` names) as the namespace they had in 0.1.0,
    without a warning; other old flat module paths (``mmeff.mini``, ``mmeff.profile``) as warning aliases."""
    if name in _deprecated.PUBLIC_MODULES:
        return _deprecated.namespace(f"{__name__}.{name}", warn=False)
    if f"{__name__}.{name}" in _deprecated.ALIASES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
