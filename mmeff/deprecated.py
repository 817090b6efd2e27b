"""Old module paths (``mmeff.tome``, ``mmeff.mini``, ``mmeff.bench_tome``, ...) kept for one release.

Before the layout moved into subpackages every module sat flat in ``mmeff/``. Importing an old path still
works: a finder on ``sys.meta_path`` answers it with the module's new home (the same module object, so
``monkeypatch``-style attribute changes reach the real code) and warns once with ``FutureWarning``
(shown by default, unlike ``DeprecationWarning``). A module that was split answers with a merged
namespace of the new modules. Remove after the next release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["ALIASES", "PUBLIC_MODULES", "install", "namespace"]

# old module path -> new module(s) holding its names (the first is where most of it went)
ALIASES: dict[str, tuple[str, ...]] = {
    "mmeff.baselines": ("mmeff.methods.baselines",),
    "mmeff.fourier": ("mmeff.methods.fourier",),
    "mmeff.freevideo": ("mmeff.methods.freevideo",),
    "mmeff.tome": ("mmeff.methods.tome", "mmeff.adapters.tome"),
    "mmeff.tocom": ("mmeff.methods.tocom", "mmeff.adapters.tocom", "mmeff.train.tocom"),
    "mmeff.vistog": ("mmeff.methods.vistog", "mmeff.adapters.vistog", "mmeff.train.vistog", "mmeff.eval.flops"),
    "mmeff.kvcache": ("mmeff.kv.presses",),
    "mmeff.sepllm": ("mmeff.kv.sepllm",),
    "mmeff.flatquant": ("mmeff.quant.flatquant", "mmeff.quant.calibration", "mmeff.quant.transforms"),
    "mmeff.gptq": ("mmeff.quant.gptq",),
    "mmeff.zoo": ("mmeff.models.zoo",),
    "mmeff.mini": ("mmeff.models.mini", "mmeff.train.mini", "mmeff.eval.scenes"),
    "mmeff.mini_vlm": ("mmeff.models.mini_vlm",),
    "mmeff.eve": ("mmeff.models.eve", "mmeff.train.eve"),
    "mmeff.squeezetime": ("mmeff.models.squeezetime",),
    "mmeff.instruct_ipt": ("mmeff.models.instruct_ipt",),
    "mmeff.instructions": ("mmeff.models.instructions",),
    "mmeff.cdt": ("mmeff.models.cdt", "mmeff.models.cdt_parts"),
    "mmeff.training": ("mmeff.train.loop",),
    "mmeff.distributed": ("mmeff.train.distributed",),
    "mmeff.videocls": ("mmeff.train.videocls",),
    "mmeff.videotok": ("mmeff.train.videotok",),
    "mmeff.restoration": ("mmeff.train.restoration",),
    "mmeff.finetune": ("mmeff.train.finetune",),
    "mmeff.grounding": ("mmeff.train.grounding", "mmeff.train.grounding_data"),
    "mmeff.mini_recipe": ("mmeff.train.mini_recipe",),
    "mmeff.evaluate": ("mmeff.eval.videoqa", "mmeff.eval.answers", "mmeff.eval.results"),
    "mmeff.profile": ("mmeff.eval.profile", "mmeff.eval.flops", "mmeff.eval.latency"),
    "mmeff.metrics": ("mmeff.eval.metrics",),
    "mmeff.perceptual": ("mmeff.eval.perceptual",),
    "mmeff.report": ("mmeff.eval.report",),
    "mmeff.plotting": ("mmeff.eval.plotting",),
    "mmeff.streaming": ("mmeff.eval.streaming",),
    "mmeff.bench_inputs": ("mmeff.bench.inputs",),
    "mmeff.bench_cdt": ("mmeff.bench.cdt",),
    "mmeff.bench_eve": ("mmeff.bench.eve",),
    "mmeff.bench_ipt": ("mmeff.bench.ipt",),
    "mmeff.bench_kv": ("mmeff.bench.kv",),
    "mmeff.bench_quant": ("mmeff.bench.quant",),
    "mmeff.bench_scenes": ("mmeff.bench.scenes",),
    "mmeff.bench_scenes_vistog": ("mmeff.bench.scenes_vistog",),
    "mmeff.bench_squeezetime": ("mmeff.bench.squeezetime",),
    "mmeff.bench_tocom": ("mmeff.bench.tocom",),
    "mmeff.bench_tome": ("mmeff.bench.tome",),
    "mmeff.bench_vistog": ("mmeff.bench.vistog",),
}


#: old modules that ``mmeff.__all__`` names: ``mmeff.tome.patch(...)`` keeps working silently as an attribute
PUBLIC_MODULES = ("cdt", "eve", "flatquant", "instruct_ipt", "squeezetime", "tome", "vistog")


def namespace(name: str, warn: bool = True) -> ModuleType:
    """The module an old path ``name`` answers with (made once); ``warn=False`` skips the FutureWarning
    (``mmeff.tome`` reached as an attribute of ``mmeff``, which stays public)."""
    if name in sys.modules:
        return sys.modules[name]
    if warn:
        return importlib.import_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return importlib.import_module(name)


def _caller_stacklevel() -> int:
    """``stacklevel`` of the user's import line for a warning raised in ``exec_module``.

    ``warnings`` itself skips importlib's ``_bootstrap`` frames when it counts, so only the others count.
    """
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None:
        frame = frame.f_back
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:
            continue
        level += 1
        if name != __file__ and "importlib" not in name:
            break
    return level


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the old paths in :data:`ALIASES`; every other import is left to the normal finders."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        """A spec for an old module path, else ``None``."""
        if fullname not in ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        """The default module object (filled by :meth:`exec_module`)."""
        return None

    def exec_module(self, module: ModuleType) -> None:
        """Warn, then make ``module`` the new module (one target) or a merged namespace (a split module)."""
        targets = ALIASES[module.__name__]
        warnings.warn(f"{module.__name__} moved to {' / '.join(targets)}; the old path will be removed in the next "
                      "release", FutureWarning, stacklevel=_caller_stacklevel())
        if len(targets) == 1:
            # importlib reads the module back from sys.modules after exec_module: the real module answers
            sys.modules[module.__name__] = importlib.import_module(targets[0])
            return
        for name in reversed(targets):
            for key, value in vars(importlib.import_module(name)).items():
                if not key.startswith("__"):
                    module.__dict__[key] = value
        module.__doc__ = f"Deprecated alias: {', '.join(targets)}."


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` once (after the normal finders, so real modules win)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
