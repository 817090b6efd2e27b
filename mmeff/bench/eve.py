"""``mmeff bench eve``: Eve built from the real SmolLM2-135M-Instruct and mmeff-mini's trained CLIP tower.

Reported, in one run:

* parameters at the paper's sizes (``meta`` device; :func:`mmeff.models.eve.paper_config`) next to a plain
  LLaVA-style model of the same tower and LM (2-layer MLP projector, 576 visual tokens), and of the
  SmolLM2 Eve;
* text-only perplexity on real offline text (the Python documentation topics that ship with CPython,
  ``pydoc_data.topics``) of the base SmolLM2, of Eve before and after its three training stages, and of
  mmeff-mini (the plain LLaVA-style model on the same LM, whose LM was fine-tuned with LoRA);
* the three stages (projector alignment on captions, instruction tuning, expert tuning; rendered scenes),
  with held-out answer loss and multiple-choice accuracy after each, and how stage 3 routes visual tokens;
* prefill FLOPs (``torch.utils.flop_counter``), prefill latency and per-token decode latency of Eve (16
  visual tokens from the 8x8 grid) against mmeff-mini (64), one image and one question, batch 1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from mmeff.eval.answers import format_question
from mmeff.eval.latency import measure_latency
from mmeff.eval.plotting import pyplot, save_figure
from mmeff.eval.scenes import accuracy_by_kind, answer_scenes, heldout_items
from mmeff.models.embedded import default_model
from mmeff.models.eve import EveForConditionalGeneration, eve_smollm2, paper_config
from mmeff.models.eve import param_counts as eve_counts
from mmeff.models.hf import chat_batch, load_smollm2
from mmeff.train.eve import EveTrainConfig, answer_loss, train_stage

__all__ = ["offline_text_ids", "perplexity", "prefill_flops_measured", "run_eve_bench"]


def offline_text_ids(tokenizer: Any, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of CPython's documentation topics (``pydoc_data.topics``, real English
    prose that ships with Python), topics in sorted order: (tokens,) int64."""
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text[: tokens * 8], add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"the offline text has only {len(ids)} tokens, {tokens} asked")
    return torch.tensor(ids[:tokens])


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512) -> float:
    """Perplexity of a causal LM (or a VLM fed text only) on ``ids`` (N,), in non-overlapping windows."""
    nll, count = 0.0, 0
    for i in range(0, ids.numel() - 1, window):
        chunk = ids[i : i + window][None]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(nll / count)))


@torch.no_grad()
def prefill_flops_measured(model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward over ``inputs`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them
    (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(**inputs)
    return int(counter.get_total_flops())


def _prompt(model: nn.Module, tokenizer: Any, item: dict[str, Any]) -> dict[str, torch.Tensor]:
    return chat_batch(tokenizer, [format_question(item["question"], item["options"])], [list(item["frames"])],
                      model.config)


def run_eve_bench(
    out_dir: str | Path = "bench_eve",
    *,
    steps: Sequence[int] = (150, 150, 150),
    batch_size: int = 8,
    eval_per_kind: int = 8,
    text_tokens: int = 4096,
    repeats: int = 5,
    decode_tokens: int = 16,
    resume: bool = True,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Everything in the module docstring; writes ``out/eve.json``, ``out/eve.png`` and each stage's
    ``out/stage<k>/model`` (resumed when present)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"setup": {"steps": list(steps), "batch_size": batch_size, "eval_per_kind": eval_per_kind,
                                         "text_tokens": text_tokens, "device": "cpu",
                                         "threads": torch.get_num_threads()}}

    # ---- parameters at the paper's sizes
    pc = paper_config()
    with torch.device("meta"):
        paper = EveForConditionalGeneration(pc)
        llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=CLIPVisionConfig(**pc.vision_config.to_dict()),
                                                          text_config=pc.text_config, image_token_id=47999))
    results["paper_sizes"] = {"eve": eve_counts(paper), "llava_style": sum(p.numel() for p in llava.parameters()),
                              "eve_visual_tokens": pc.tokens_per_image, "llava_visual_tokens": pc.grid ** 2}
    del paper, llava

    # ---- the SmolLM2 Eve
    lm, tok = load_smollm2()
    eve, etok = eve_smollm2()
    mini, mtok, _ = default_model()
    text = offline_text_ids(tok, text_tokens)
    ppl: dict[str, float] = {"smollm2": perplexity(lm, text), "eve_untrained": perplexity(eve, text),
                             "mmeff_mini_llava": perplexity(mini, text)}
    items = heldout_items(eval_per_kind, video=False)

    def evaluate(model: nn.Module, tokenizer: Any) -> dict[str, Any]:
        res = answer_scenes(model, tokenizer, items, batch_size=8)
        acc = accuracy_by_kind(res)
        return {"accuracy": acc["all"], "by_kind": acc}

    stages: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for k, (stage, n) in enumerate(zip(("align", "instruct", "experts"), steps), start=1):
        folder = out / f"stage{k}"
        if resume and (folder / "model" / "config.json").is_file():
            eve = EveForConditionalGeneration.from_pretrained(folder / "model").eval()
            hist = json.loads((folder / "history.json").read_text())
        else:
            hist = train_stage(eve, etok, folder, EveTrainConfig(stage, steps=n, batch_size=batch_size,
                                                                  save_every=max(1, n // 5)), progress=progress)
        row = {"stage": stage, "steps": n, "train_seconds": hist.get("train_seconds"),
               "trainable_parameters": hist.get("trainable_parameters"),
               "final_loss": hist["log"][-1]["lm"] if hist.get("log") else None,
               "heldout_answer_loss": answer_loss(eve, etok, n=48), **evaluate(eve, etok)}
        if stage == "experts":
            prompt = _prompt(eve, etok, items[0])
            with torch.no_grad():
                eve(**prompt)
            row["routing_one_image"] = eve.last_routing  # visual tokens per expert in each expert layer
        stages.append(row)
        print_fn(f"stage {k} {stage}: answer loss {row['heldout_answer_loss']:.3f}, accuracy {row['accuracy']:.3f}")
    results["stages"] = stages
    results["train_seconds"] = time.perf_counter() - t0
    ppl["eve_trained"] = perplexity(eve, text)
    results["text_perplexity"] = ppl
    results["mmeff_mini_llava"] = {"heldout_answer_loss": None, **evaluate(mini, mtok)}
    results["params"] = {"eve": eve_counts(eve), "mmeff_mini_llava": sum(p.numel() for p in mini.parameters())}

    # ---- cost: one image + one question, batch 1
    cost = {}
    for name, model, tokenizer, per_image in (("eve", eve, etok, eve.config.tokens_per_image),
                                              ("llava_style", mini, mtok, 64)):
        prompt = _prompt(model, tokenizer, items[0])
        lat = measure_latency(model, prompt, decode_tokens=decode_tokens, repeats=repeats)
        cost[name] = {"visual_tokens": per_image, "prompt_tokens": int(prompt["input_ids"].shape[1]),
                      "prefill_flops": prefill_flops_measured(model, prompt), "prefill_s": lat.prefill_s,
                      "decode_s_per_token": lat.decode_s_per_token}
    for row in cost.values():
        row["flops_vs_llava"] = row["prefill_flops"] / cost["llava_style"]["prefill_flops"]
        row["prefill_vs_llava"] = row["prefill_s"] / cost["llava_style"]["prefill_s"]
        row["decode_vs_llava"] = row["decode_s_per_token"] / cost["llava_style"]["decode_s_per_token"]
    results["cost"] = cost
    (out / "eve.json").write_text(json.dumps(results, indent=1))
    results["figure"] = str(_plot(results, out / "eve.png"))
    (out / "eve.json").write_text(json.dumps(results, indent=1))
    _report(results, print_fn)
    return results


def _plot(results: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    st = results["stages"]
    names = [f"{i + 1}: {s['stage']}" for i, s in enumerate(st)]
    axes[0].plot(names, [s["heldout_answer_loss"] for s in st], "o-", label="Eve held-out answer loss")
    axes[0].set_ylabel("nats / answer token")
    ax2 = axes[0].twinx()
    ax2.plot(names, [s["accuracy"] for s in st], "s--", color="tab:orange", label="Eve accuracy")
    ax2.axhline(results["mmeff_mini_llava"]["accuracy"], color="tab:gray", ls=":", label="mmeff-mini accuracy")
    ax2.set_ylabel("multiple-choice accuracy")
    axes[0].set_title("after each training stage")
    fig.legend(loc="lower left", fontsize=7)
    ppl = results["text_perplexity"]
    axes[1].bar(list(ppl), list(ppl.values()), color=["tab:gray", "tab:blue", "tab:red", "tab:blue"])
    axes[1].set_ylabel("perplexity (pydoc topics)")
    axes[1].set_title("text-only perplexity")
    axes[1].tick_params(axis="x", labelrotation=20, labelsize=7)
    c = results["cost"]
    keys = ["flops_vs_llava", "prefill_vs_llava", "decode_vs_llava"]
    x = range(len(keys))
    axes[2].bar([i - 0.2 for i in x], [c["llava_style"][k] for k in keys], 0.4, label="LLaVA-style (64 tokens)")
    axes[2].bar([i + 0.2 for i in x], [c["eve"][k] for k in keys], 0.4, label="Eve (16 tokens)")
    axes[2].set_xticks(list(x), ["prefill FLOPs", "prefill time", "decode time/token"])
    axes[2].set_ylabel("relative to LLaVA-style")
    axes[2].legend(fontsize=7)
    axes[2].set_title("cost, one image + question")
    return save_figure(fig, path)


def _report(results: dict[str, Any], print_fn: Callable[[str], None]) -> None:
    p = results["paper_sizes"]
    e = p["eve"]
    print_fn(f"paper sizes: Eve base {e['base'] / 1e9:.3f}B (tower {e['vision_tower'] / 1e6:.1f}M, projector "
             f"{e['projector'] / 1e6:.1f}M, LM {e['language_model'] / 1e9:.3f}B) + experts {e['experts'] / 1e6:.1f}M + "
             f"adapters {e['adapters'] / 1e6:.2f}M = {e['total'] / 1e9:.3f}B; LLaVA-style {p['llava_style'] / 1e9:.3f}B; "
             f"visual tokens {p['eve_visual_tokens']} vs {p['llava_visual_tokens']}")
    print_fn("text perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in results["text_perplexity"].items()))
    for i, s in enumerate(results["stages"], start=1):
        print_fn(f"stage {i} {s['stage']}: {s['steps']} steps, {s['trainable_parameters']} trainable, "
                 f"{s['train_seconds']:.0f} s; held-out answer loss {s['heldout_answer_loss']:.3f}, "
                 f"accuracy {s['accuracy']:.3f}")
    print_fn(f"mmeff-mini (LLaVA-style, LoRA-tuned LM): accuracy {results['mmeff_mini_llava']['accuracy']:.3f}")
    for name, c in results["cost"].items():
        print_fn(f"{name}: {c['visual_tokens']} visual / {c['prompt_tokens']} prompt tokens, prefill "
                 f"{c['prefill_flops'] / 1e9:.2f} GFLOPs ({c['flops_vs_llava']:.2f}x), {c['prefill_s'] * 1e3:.1f} ms "
                 f"({c['prefill_vs_llava']:.2f}x), decode {c['decode_s_per_token'] * 1e3:.1f} ms/token "
                 f"({c['decode_vs_llava']:.2f}x)")
