"""``mmeff eve build|train|eval``: Eve (elastic visual experts) on SmolLM2."""

from __future__ import annotations

import argparse
import json

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mmeff.bench.eve import offline_text_ids, perplexity
from mmeff.checkpoint import local_or_hub
from mmeff.eval.scenes import accuracy_by_kind, answer_scenes, heldout_items
from mmeff.models.eve import EveForConditionalGeneration, eve_smollm2
from mmeff.models.hf import load_smollm2
from mmeff.train.eve import EveTrainConfig, answer_loss, train_stage


def _eve_build(args: argparse.Namespace) -> int:
    model, tok = eve_smollm2(experts=args.experts)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"wrote {args.out}")
    return 0


def _load(args: argparse.Namespace) -> tuple[EveForConditionalGeneration, PreTrainedTokenizerBase]:
    ref = local_or_hub(args.model, "Eve model")
    model = EveForConditionalGeneration.from_pretrained(ref).eval()
    tok = AutoTokenizer.from_pretrained(ref)
    tok.padding_side = "left"
    return model, tok


def _eve_train(args: argparse.Namespace) -> int:
    model, tok = _load(args)
    train = tuple(t.strip() for t in args.train.split(",")) if args.train else None
    cfg = EveTrainConfig(args.stage, steps=args.steps, batch_size=args.batch_size, lr=args.lr, train=train,
                         save_every=args.save_every, seed=args.seed)
    train_stage(model, tok, args.out, cfg, resume=not args.no_resume)
    print(f"wrote {args.out}/model")
    return 0


def _eve_eval(args: argparse.Namespace) -> int:
    model, tok = _load(args)
    res = answer_scenes(model, tok, heldout_items(args.per_kind, video=False), batch_size=8, progress=True)
    text = offline_text_ids(tok, args.text_tokens)
    ppl = {"model": perplexity(model, text)}
    if args.compare_smollm2:
        ppl["smollm2"] = perplexity(load_smollm2()[0], text)
    report = {"accuracy": accuracy_by_kind(res), "heldout_answer_loss": answer_loss(model, tok),
              "text_perplexity": ppl}
    print(json.dumps(report, indent=1))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mmeff eve`` (tasks build, train and eval) to ``build_parser``'s sub-parsers."""
    ev = sub.add_parser("eve", help="Eve (elastic visual experts): build from SmolLM2, train a stage, evaluate")
    etasks = ev.add_subparsers(dest="task", required=True)
    eb = etasks.add_parser("build", help="Eve from SmolLM2-135M-Instruct (its wheel) and mmeff-mini's CLIP tower, "
                           "saved with save_pretrained")
    eb.add_argument("--out", required=True)
    eb.add_argument("--experts", action="store_true", help="insert the experts now (default: stage 3 does)")
    et = etasks.add_parser("train", help="one training stage on rendered scenes (resumes from --out/last.pt; DDP "
                           "under torchrun); writes --out/model")
    et.add_argument("--model", required=True, help="a folder from 'mmeff eve build' or an earlier stage's --out/model")
    et.add_argument("--stage", required=True, choices=["align", "instruct", "experts"])
    et.add_argument("--out", required=True)
    et.add_argument("--steps", type=int, default=150)
    et.add_argument("--batch-size", type=int, default=8, help="conversations per step (per rank under torchrun)")
    et.add_argument("--lr", type=float, default=None, help="default: 1e-3 for stages 1-2, 1e-4 for stage 3")
    et.add_argument("--train", default=None,
                    help="comma-separated parts to train (projector, experts, adapters, vision_tower, language_model); "
                    "default per stage")
    et.add_argument("--save-every", type=int, default=50)
    et.add_argument("--seed", type=int, default=1234)
    et.add_argument("--no-resume", action="store_true")
    ee = etasks.add_parser("eval", help="held-out scene accuracy and answer loss, and text perplexity vs the base LM")
    ee.add_argument("--model", required=True)
    ee.add_argument("--per-kind", type=int, default=8, help="held-out image questions per kind")
    ee.add_argument("--text-tokens", type=int, default=2048, help="tokens of offline text for the perplexity")
    ee.add_argument("--compare-smollm2", action="store_true", help="also the base SmolLM2's perplexity")
    for q, fn in ((eb, _eve_build), (et, _eve_train), (ee, _eve_eval)):
        q.set_defaults(fn=fn)
    return ev
