"""mmeff: cheaper vision-language and video models, one API for every method.

    import mmeff
    with mmeff.apply(model, mmeff.AvgPool(tokens=144)):
        model.generate(**inputs)
"""

from mmeff.api import apply, attach, patch, unpatch
from mmeff.baselines import AvgPool, CLSAttnTopK, RandomKeep, UniformKeep
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
from mmeff.fourier import FourierLowPass, fourier_compress
from mmeff.freevideo import FreeVideoLLM

__version__ = "0.1.0"

__all__ = [
    "AvgPool",
    "BudgetReducer",
    "CLSAttnTopK",
    "Compose",
    "FourierLowPass",
    "FreeVideoLLM",
    "GridReducer",
    "RandomKeep",
    "Reduction",
    "ScoreTopK",
    "TokenContext",
    "TokenReducer",
    "UniformKeep",
    "apply",
    "attach",
    "compose",
    "create_reducer",
    "fourier_compress",
    "get_reducer_class",
    "list_reducers",
    "patch",
    "register",
    "unpatch",
]
