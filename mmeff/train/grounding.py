"""Grounding mmeff-mini on a CPU: a vision tower that puts each object's attributes into its patches, and a
small language model trained from scratch to read them.

Why this recipe (measured on a 2-core CPU; ``../shared/methods/grounding.md`` and issue 31 hold the history):
SmolLM2-135M + LoRA on top of the contrastive tower trains at ~1,300 conversations an hour and stayed at
chance; the contrastive tower's patch tokens carry colour but hardly shape (39% linearly, majority 35%), so
"the colour of the triangle" could not be read from them however long the LM trained. Here:

1. **Dense tower** (:func:`train_tower`): the VLM's CLIP tower (initialised from the dual encoder's image
   tower) is trained with per-patch cross-entropy on what the label map (:func:`mmeff.datasets.scenes.label_map`)
   says lies under each patch: the object's colour, shape, size class, 3x3 cell, sub-image centre, whether
   the patch holds the object's centre, the written word; and per image (read from every patch) how many
   circles, squares, triangles and objects the picture holds. The heads read the layer LLaVA feeds its
   projector (``vision_feature_layer=-2``); they are dropped afterwards.
2. **Small LM** (:func:`train_lm`): a Llama (hidden 192, 4 layers, 6 heads) on SmolLM2's tokenizer, trained
   from scratch together with the projector on cached tower features (the tower is frozen after step 1),
   several question turns per image, the loss on answer tokens only, scored over the words the scenes use
   (every other embedding row stays zero, so those tokens' logits are 0 and the answer must beat them).
3. **Attention supervision** (opt-in: ``LMTrainConfig.look_weight``, :func:`look_loss`; not in the shipped
   recipe). Trained on answers alone, the LM learned the questions whose answer an average over all visual
   tokens gives (video direction, how many objects appear, counts) and stayed at chance on those that need
   one object's tokens (it answered "hat" to every written-word question). The label map says which visual
   tokens hold each answer (:func:`~mmeff.train.grounding_data.question_patches`), so this term trains the
   last prompt token's first ``look_heads`` heads in ``look_layers`` to attend there. Measured (issue 31),
   500 steps from the shipped weights: those heads put 40-97% of their attention on the right tokens (the
   word: 93-97%), yet held-out accuracy stayed at 42% (10 per kind) and the word answer stayed constant:
   attention is not the wall, the visual tokens' content is (the projector's outputs at word patches no
   longer separate the ten words).

The result is a plain HF ``LlavaForConditionalGeneration`` (:mod:`mmeff.models.mini_vlm`); every adapter
applies. :mod:`mmeff.train.mini_recipe` runs the stages in order (``mmeff mini train``). The data (dense
labels, cached feature pools, the LM's conversations) is in :mod:`mmeff.train.grounding_data`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmeff.eval.scenes import accuracy_by_kind, answer_scenes, heldout_items
from mmeff.train.grounding_data import (
    HEADS,
    FeaturePool,
    LMData,
    PoolRender,
    TowerData,
    attribute_words,
    collate_lm,
    collate_pool,
    scene_vocabulary,
)
from mmeff.train.loop import StepTrainConfig, train_steps
from mmeff.train.mini import init_projector_from_features

__all__ = [
    "DenseHeads",
    "tower_features",
    "TowerTrainConfig",
    "train_tower",
    "probe_tower",
    "build_pool",
    "LMTrainConfig",
    "Readout",
    "eager_attention",
    "look_loss",
    "vlm_losses",
    "vlm_answer_loss",
    "align_projector",
    "train_lm",
]


class DenseHeads(nn.Module):
    """Linear read-outs of :data:`HEADS` (and the centre ``xy``) from patch features ``(B, N, D)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in HEADS.items()})
        self.xy = nn.Linear(dim, 2)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """``feats`` (B, N, D) -> ``{head: (B, N, classes)}`` plus ``"xy"`` (B, N, 2)."""
        out = {k: h(feats) for k, h in self.heads.items()}
        out["xy"] = self.xy(feats)
        return out


def tower_features(tower: nn.Module, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """What LLaVA's projector reads: ``hidden_states[layer]`` of an HF CLIP tower without the class token.

    ``pixel_values`` (B, 3, S, S) -> (B, N, D); the blocks after ``layer`` are not run."""
    # transformers 5 flattens CLIPVisionModel (embeddings/encoder at the top); 4.x nests vision_model
    vm = getattr(tower, "vision_model", tower)
    h = vm.pre_layrnorm(vm.embeddings(pixel_values))
    n = len(vm.encoder.layers) + 1 + layer if layer < 0 else layer
    for block in vm.encoder.layers[:n]:
        h = block(h, None)
        h = h[0] if isinstance(h, tuple) else h
    return h[:, 1:]


class _TowerWithHeads(nn.Module):
    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.heads = DenseHeads(tower.config.hidden_size)

    def forward(self, px: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(tower_features(self.tower, px))


def _dense_loss(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                count_weight: float = 1.0) -> dict[str, torch.Tensor]:
    parts = {k: F.cross_entropy(pred[k].flatten(0, 1), target[k].flatten()) for k in HEADS}
    for k in ("n_circle", "n_square", "n_triangle"):
        parts[k] = count_weight * parts[k]
    owned = target["colour"] > 0
    parts["xy"] = 10 * F.mse_loss(pred["xy"][owned], target["xy"][owned]) if owned.any() else pred["xy"].sum() * 0
    parts["loss"] = sum(parts.values())
    return parts


@dataclass(kw_only=True)
class TowerTrainConfig(StepTrainConfig):
    """Dense tower stage (:func:`train_tower`); the shared fields are :class:`~mmeff.train.loop.StepTrainConfig`'s."""

    steps: int = 600
    batch_size: int = 32
    warmup_steps: int = 30
    save_every: int = 50
    seed: int = 1234
    count_weight: float = 1.0  # per-shape counts only become learnable once shape is; 0 leaves them out


def train_tower(tower: nn.Module, out_dir: str | Path, cfg: TowerTrainConfig, *, stop_after: int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Train ``tower`` (HF ``CLIPVisionModel``, in place) with the dense heads; resumable from
    ``out_dir/last.pt``. Returns the history of :func:`mmeff.train.loop.train_steps`."""
    net = _TowerWithHeads(tower)
    ds = TowerData(cfg.seed, cfg.steps * cfg.batch_size)

    def loss_fn(model: nn.Module, batch: Any, step: int, device: torch.device) -> dict[str, torch.Tensor]:
        px, target = batch
        return _dense_loss(model(px.to(device)), {k: v.to(device) for k, v in target.items()}, cfg.count_weight)

    hist = train_steps(net, ds, out_dir, cfg, loss_fn, stop_after=stop_after, progress=progress)
    tower.eval()
    return hist


@torch.no_grad()
def probe_tower(tower: nn.Module, n: int = 256, seed: int = 0, batch: int = 64) -> dict[str, float]:
    """Held-out linear read-out of a tower's patch features: a least-squares map to colour and shape, fitted
    on ``n`` images of split ``seed + 7`` and scored on ``n`` of split ``seed`` (the trained heads are not used).

    Returns accuracy over object patches ``{"colour", "shape", "majority_shape"}``.
    """
    def collect(s: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ds = TowerData(s, n, video_every=0)
        feats, tg = [], []
        for i in range(0, n, batch):
            items = [ds[j] for j in range(i, min(n, i + batch))]
            feats.append(tower_features(tower, torch.stack([x for x, _ in items])).flatten(0, 1))
            tg.append({k: torch.stack([t[k] for _, t in items]).flatten(0, 1) for k in ("colour", "shape")})
        return torch.cat(feats).float(), {k: torch.cat([t[k] for t in tg]) for k in ("colour", "shape")}

    xf, yf = collect(seed + 7)
    xt, yt = collect(seed)
    mu, sd = xf.mean(0), xf.std(0).clamp_min(1e-6)
    a, b = torch.cat([(xf - mu) / sd, torch.ones(len(xf), 1)], 1), torch.cat([(xt - mu) / sd, torch.ones(len(xt), 1)], 1)
    out = {}
    obj = yt["colour"] > 0
    for k in ("colour", "shape"):
        onehot = F.one_hot(yf[k], HEADS[k]).float()
        w = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1]), a.T @ onehot)
        out[k] = float(((b @ w).argmax(1) == yt[k])[obj].float().mean())
    out["majority_shape"] = float(torch.bincount(yt["shape"][obj]).max() / obj.sum())
    return out


# ------------------------------------------------------------------------------------------------------
# The language model
# ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def build_pool(tower: nn.Module, n: int, *, video: bool, seed: int, batch: int = 64, workers: int = 1,
               progress: bool = True, single: bool = False) -> FeaturePool:
    """Render ``n`` scene images (or 4-frame scene videos, frames jittered around the evaluation's segment
    midpoints; or, ``single``, :func:`~mmeff.train.grounding_data.single_object_scene` pictures) of split
    ``seed`` and cache the frozen ``tower``'s features."""
    ds = PoolRender(seed, n, video, single)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate_pool)
    feats, items = [], []
    tower.eval()
    for px, meta in tqdm(loader, desc=f"features ({'videos' if video else 'images'})", disable=not progress):
        f = tower_features(tower, px.flatten(0, 1)).to(torch.float16)
        feats.append(f.view(px.shape[0], px.shape[1], *f.shape[1:]))
        items += meta
    return FeaturePool(torch.cat(feats), items, video)



@dataclass(kw_only=True)
class LMTrainConfig(StepTrainConfig):
    """Projector + LM stage (:func:`train_lm`); the shared fields are :class:`~mmeff.train.loop.StepTrainConfig`'s."""

    steps: int = 3000
    batch_size: int = 24
    min_lr: float = 5e-5
    warmup_steps: int = 100
    save_every: int = 100
    seed: int = 1234
    video_every: int = 3
    max_turns: int = 4
    eval_every: int = 250
    eval_per_kind: int = 10
    single_steps: int = 500  # curriculum length (one-object pictures first); 0: none
    align_steps: int = 300  # projector steps that map visual tokens onto their attributes' word embeddings
    # attention supervision: the first look_heads heads of each of look_layers, at the last prompt token,
    # put their mass on the visual tokens that hold the answer (:func:`look_loss`), weighted look_weight
    look_weight: float = 0.0
    look_layers: tuple[int, ...] = (1, 2, 3)
    look_heads: int = 2


class Readout:
    """The answer head restricted to the scene vocabulary plus one zero logit standing for every other
    token (whose embedding row is zero, so its logit is exactly 0 at inference too)."""

    def __init__(self, vocab: Sequence[int], size: int) -> None:
        self.vocab = torch.tensor(list(vocab), dtype=torch.long)
        self.index = torch.full((size,), len(vocab), dtype=torch.long)
        self.index[self.vocab] = torch.arange(len(vocab))

    def loss(self, model: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the answer tokens ``targets`` (n,) from the LM's last hidden states ``h`` (n, D),
        over the scene vocabulary and the zero "other" logit."""
        w = model.get_input_embeddings().weight[self.vocab.to(h.device)]
        logits = torch.cat([h @ w.T, h.new_zeros(len(h), 1)], 1)
        return F.cross_entropy(logits.float(), self.index.to(h.device)[targets])


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s language model with eager attention (the one that returns attention weights) inside
    the block, restoring its own implementation after."""
    cfg = model.model.language_model.config
    before = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        cfg._attn_implementation = before


def look_loss(attentions: Sequence[torch.Tensor], input_ids: torch.Tensor, image_token_id: int,
              looks: Sequence[Sequence[tuple[int, torch.Tensor]]], layers: Sequence[int], heads: int) -> torch.Tensor:
    """Mean over look targets, layers and the first ``heads`` heads of ``-log`` (attention mass that the
    target's position puts on its answer's visual tokens). ``attentions``: per layer (B, H, L, L);
    ``input_ids`` (B, L); ``looks`` per row ``[(position, (N,) bool over that row's visual tokens)]``."""
    terms = []
    for r, row in enumerate(looks):
        if not row:
            continue
        visual = torch.nonzero(input_ids[r] == image_token_id).squeeze(1)
        for pos, mask in row:
            target = visual[mask.to(visual.device)]
            for layer in layers:
                mass = attentions[layer][r, :heads, pos][:, target].sum(-1)
                terms.append(-torch.log(mass.float() + 1e-6).mean())
    return torch.stack(terms).mean() if terms else attentions[0].new_zeros(())


def vlm_losses(model: nn.Module, batch: dict[str, Any], readout: Readout, cfg: LMTrainConfig | None = None
               ) -> dict[str, torch.Tensor]:
    """Answer-token cross-entropy of a LLaVA given cached tower features: exactly what the model computes
    from pixels (features through the projector into the ``<image>`` positions), without the tower; with
    ``cfg.look_weight`` and the batch's ``"looks"``, also :func:`look_loss`. Returns ``{"answer"[, "look"]}``."""
    emb = model.get_input_embeddings()(batch["input_ids"])
    vis = model.model.multi_modal_projector(batch["feats"].to(emb.dtype))
    mask = (batch["input_ids"] == model.config.image_token_id).unsqueeze(-1)
    emb = emb.masked_scatter(mask, vis.reshape(-1, vis.shape[-1]))
    look = cfg is not None and cfg.look_weight > 0 and "looks" in batch
    lm = model.model.language_model
    if look:
        with eager_attention(model):
            o = lm(inputs_embeds=emb, attention_mask=batch["attention_mask"], output_attentions=True)
    else:
        o = lm(inputs_embeds=emb, attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    out = {"answer": readout.loss(model, o.last_hidden_state[:, :-1][keep], labels[keep])}
    if look:
        assert cfg is not None
        out["look"] = look_loss(o.attentions, batch["input_ids"], model.config.image_token_id, batch["looks"],
                                cfg.look_layers, cfg.look_heads)
    return out


def vlm_answer_loss(model: nn.Module, batch: dict[str, torch.Tensor], readout: Readout) -> torch.Tensor:
    """:func:`vlm_losses`' answer term alone."""
    return vlm_losses(model, batch, readout)["answer"]



def align_projector(model: nn.Module, tokenizer: Any, images: FeaturePool, steps: int, *, batch: int = 64,
                    lr: float = 3e-3, progress: bool = True) -> list[float]:
    """Fit the projector (alone) so each visual token is the sum of its attributes' word embeddings
    (:func:`~mmeff.train.grounding_data.attribute_words`; 0 for background) in the LM's own, fresh embedding table. The LM then starts
    from visual tokens that already read as the words its answers use: a copy of the right token gives the
    answer, so the attention that finds the asked-about object has a gradient from the first step."""
    emb = model.get_input_embeddings().weight.detach()
    cache: dict[str, torch.Tensor] = {}

    def word(w: str) -> torch.Tensor:
        if w not in cache:
            cache[w] = emb[tokenizer(w, add_special_tokens=False)["input_ids"]].sum(0)
        return cache[w]

    proj = model.model.multi_modal_projector
    opt = torch.optim.Adam(proj.parameters(), lr=lr)
    rng = np.random.default_rng(0)
    zero = torch.zeros_like(emb[0])
    losses = []
    for _ in tqdm(range(steps), desc="align projector", disable=not progress):
        idx = rng.integers(0, len(images.items), batch)
        feats = images.feats[idx, 0].float()
        target = torch.stack([torch.stack([sum((word(w) for w in ws), zero) for ws in
                                           attribute_words(images.items[j]["objects"], images.items[j]["text"])])
                              for j in idx])
        loss = F.mse_loss(proj(feats), target) / emb.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def train_lm(model: nn.Module, tokenizer: Any, images: FeaturePool, videos: FeaturePool | None,
             out_dir: str | Path, cfg: LMTrainConfig, *, progress: bool = True,
             time_limit: float | None = None, single: FeaturePool | None = None,
             stop_at: int | None = None, fresh_projector: bool = True) -> dict[str, Any]:
    """Train the projector and LM of ``model`` (:func:`mmeff.models.mini_vlm.new_vlm` with a dense tower) on the cached pools,
    evaluating the held-out split every ``cfg.eval_every`` steps. Resumable: ``out_dir/last.pt`` holds the
    trainable weights, ``out_dir/curve.json`` the held-out curve. ``time_limit`` (seconds) pauses after the
    evaluation chunk that passes it; ``stop_at`` pauses at that step of the ``cfg.steps`` schedule (a later
    call goes on). ``fresh_projector=False`` keeps the projector as it is (a model loaded from trained
    weights) instead of standardising and aligning it first. Returns ``{"history", "curve", "vocab"}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pad = int(tokenizer.pad_token_id)
    ds = LMData(images, videos, tokenizer, cfg.steps * cfg.batch_size, batch=cfg.batch_size,
                video_every=cfg.video_every, max_turns=cfg.max_turns, seed=cfg.seed, single=single,
                single_steps=cfg.single_steps, looks=cfg.look_weight > 0)
    vocab_file = out / "vocab.json"
    if vocab_file.is_file():
        vocab = json.loads(vocab_file.read_text())
    else:
        vocab = scene_vocabulary(ds)
        vocab_file.write_text(json.dumps(vocab))
    readout = Readout(vocab, model.config.text_config.vocab_size)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        keep = torch.zeros(len(emb), dtype=torch.bool)
        keep[readout.vocab] = True
        emb[~keep] = 0
    # a prompt token outside the vocabulary (one the vocabulary's samples missed) reads a zero row, as at
    # inference, and its row must stay zero: the weights file keeps the vocabulary's rows only
    row_mask = keep.to(emb.dtype).unsqueeze(1)
    hook = emb.register_hook(lambda g: g * row_mask.to(g.device))
    align: list[float] = []
    if fresh_projector and not (out / "last.pt").is_file():
        init_projector_from_features(model, images.feats[:256].flatten(0, 2))
        if cfg.align_steps:
            align = align_projector(model, tokenizer, images, cfg.align_steps, progress=progress)
            (out / "align.json").write_text(json.dumps(align))
    curve_file = out / "curve.json"
    curve: list[dict[str, Any]] = json.loads(curve_file.read_text()) if curve_file.is_file() else []
    items = heldout_items(cfg.eval_per_kind)

    def loss_fn(net: nn.Module, batch: Any, step: int, device: torch.device) -> dict[str, torch.Tensor]:
        parts = vlm_losses(net, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}, readout, cfg)
        loss = parts["answer"] + cfg.look_weight * parts["look"] if "look" in parts else parts["answer"]
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    t0 = time.perf_counter()
    hist: dict[str, Any] = {}
    last = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    done = json.loads((out / "history.json").read_text())["step"] if (out / "history.json").is_file() else 0
    try:
        while True:
            chunk = max(0, min(cfg.eval_every, last - done))
            hist = train_steps(model, ds, out, cfg, loss_fn, stop_after=chunk, progress=progress,
                               collate_fn=lambda b: collate_lm(b, pad), trainable_only=True,
                               history_extra={"vocab": len(vocab)})
            step = int(hist["step"])
            if not curve or curve[-1]["step"] != step:
                model.eval()
                acc = accuracy_by_kind(answer_scenes(model, tokenizer, items, batch_size=30))
                curve.append({"step": step, "train_seconds": hist.get("train_seconds"),
                              "loss": hist["log"][-1]["loss"] if hist["log"] else None,
                              "answer_loss": hist["log"][-1].get("answer") if hist["log"] else None,
                              **{k: round(v, 4) for k, v in acc.items()}})
                curve_file.write_text(json.dumps(curve, indent=1))
                if progress:
                    print(json.dumps(curve[-1]), flush=True)
            done = step
            if step >= last or (time_limit is not None and time.perf_counter() - t0 > time_limit):
                break
    finally:
        hook.remove()
    return {"history": hist, "curve": curve, "vocab": vocab}
