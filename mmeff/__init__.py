"""mmeff: cheaper vision-language and video models, one API for every method.

    import mmeff
    with mmeff.apply(model, mmeff.AvgPool(tokens=144)):
        model.generate(**inputs)
"""

from mmeff import cdt, eve, flatquant, instruct_ipt, squeezetime, tome, vistog
from mmeff.api import apply, attach, patch, unpatch
from mmeff.baselines import AvgPool, CLSAttnTopK, RandomKeep, UniformKeep
from mmeff.cdt import CDT
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
from mmeff.eve import EveForConditionalGeneration
from mmeff.fourier import FourierLowPass, fourier_compress
from mmeff.freevideo import FreeVideoLLM
from mmeff.instruct_ipt import InstructIPT
from mmeff.kvcache import EvictingCache, FullKV, KVPress, StreamingLLM, create_press, list_presses
from mmeff.sepllm import SepLLM, separator_ids
from mmeff.tome import ToMe
from mmeff.vistog import VisToG
from mmeff.zoo import create_model, list_models

__version__ = "0.1.0"

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
