"""mmeff.datasets: media loading, video-QA formats, scenes, degradations and restoration data."""

import sys as _sys

if __name__ != "mmeff.datasets":
    # The repository root is on sys.path (``python -m`` run from a checkout), so this folder was found as
    # the top-level ``datasets``: that name belongs to the PyPI package (Hugging Face datasets). Load the installed one
    # in this module's place, so nothing here shadows it.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        __name__, [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root])
    if _spec is None or _spec.loader is None:
        # Not installed: stay the empty namespace Python makes of a bare folder (no __file__, no version),
        # which is how transformers' availability checks recognise an absent package.
        del __file__
    else:
        _real = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _real
        _spec.loader.exec_module(_real)
else:
    # The loaders users reach for, importable from the package itself (``from mmeff.datasets import
    # load_video``), resolved on first use so that importing mmeff.datasets stays cheap.
    _EXPORTS = {
        **dict.fromkeys(("IMAGE_NAMES", "VIDEO_NAMES", "VIDEO_SUFFIXES", "VideoClip", "load_video", "read_frames",
                         "sample_image", "sample_video_path", "write_mp4"), "media"),
        **dict.fromkeys(("VIDEOQA_FORMATS", "VideoQASample", "load_activitynet_qa", "load_msrvtt_qa",
                         "load_msvd_qa", "load_mvbench", "load_nextqa", "load_tgif_qa", "load_videomme",
                         "load_videoqa", "synthetic_videoqa"), "videoqa"),
        **dict.fromkeys(("scene_sample", "scene_samples", "scene_videoqa", "scene_video_sample"), "scenes"),
    }
    __all__ = sorted(_EXPORTS)

    def __getattr__(name: str) -> object:
        if name not in _EXPORTS:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib as _importlib

        value = getattr(_importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_EXPORTS})
