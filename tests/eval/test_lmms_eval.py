"""lmms-eval model ``mmeff`` (:mod:`mmeff.eval.lmms`) where lmms-eval is installed (skipped otherwise).

Requests are built by hand as lmms-eval's evaluator builds them (``Instance`` objects over an in-memory "task"
of scikit-image pictures and a bundled mp4), then lmms-eval's own evaluator runs a tiny local task offline.
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402
from PIL import Image  # noqa: E402

from mmeff.datasets.media import sample_image, sample_video_path  # noqa: E402
from mmeff.eval.lmms import MMEff, lmms_eval_manifest  # noqa: E402
from mmeff.eval.videoqa import to_model  # noqa: E402
from mmeff.models.embedded import default_processor  # noqa: E402
from mmeff.models.hf import chat_batch  # noqa: E402
from mmeff.models.tiny import tiny_qwen2_vl_folder  # noqa: E402

TASK, SPLIT = "tiny", "test"
QUESTIONS = ["What is in the image?", "What animal is this?", "What is on the table?"]
GEN = {"max_new_tokens": 6, "temperature": 0, "until": ["\n\n"]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add synchronisation on a shared CPU
    yield
    torch.set_num_threads(old)


def _docs() -> list[dict[str, Any]]:
    pictures = ("astronaut", "chelsea", "coffee")
    return [{"image": Image.fromarray(sample_image(p)), "q": q} for p, q in zip(pictures, QUESTIONS)]


def _images(doc: dict[str, Any]) -> list[Image.Image]:
    return [doc["image"]]


def _video(doc: dict[str, Any]) -> list[str]:
    return [str(sample_video_path("bikes"))]


def _request(kind: str, doc_id: int, second: Any, visual=_images, context: str | None = None) -> Instance:
    # (context, gen_kwargs or continuation, doc_to_visual, doc_id, task, split), as lmms-eval's tasks build them
    args = (context if context is not None else QUESTIONS[doc_id], second, visual, doc_id, TASK, SPLIT)
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def _model(model_cache: Path, method: str = "none", pretrained: str = "default", **kwargs: Any) -> MMEff:
    lm = MMEff(pretrained=pretrained, method=method, device="cpu", cache_dir=str(model_cache), **kwargs)
    lm.task_dict = {TASK: {SPLIT: _docs()}}  # what lmms-eval's evaluator sets before the requests
    return lm


def test_registered_as_lmms_eval_model() -> None:
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    if "mmeff" not in MODEL_REGISTRY_V2.list_model_names():
        # mmeff installed without its entry point (an editable checkout): register it as the entry point does
        MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)
    assert get_model("mmeff") is MMEff


def test_generate_until_keep_all_matches_none_and_a_reducer_reduces(model_cache) -> None:
    answers, tokens = {}, {}
    for method, kw in (("none", {}), ("uniform", {"ratio": 1.0}), ("fourier", {"ratio": 0.25})):
        lm = _model(model_cache, method, batch_size=2, **kw)
        answers[method] = lm.generate_until([_request("generate_until", i, dict(GEN)) for i in range(3)])
        tokens[method] = [r["visual_tokens"] for r in lm.visual_tokens]
        if method == "none":
            # the task's stop strings cut the answer at the first of them
            longest = max(answers[method], key=len)
            assert len(longest) >= 2, answers
            i = answers[method].index(longest)
            cut = lm.generate_until([_request("generate_until", i, {**GEN, "until": [longest[1:]]})])
            assert cut == [longest[:1]]
        lm.close()
    assert answers["uniform"] == answers["none"] and all(isinstance(a, str) for a in answers["none"])
    assert tokens["none"] == tokens["uniform"] == [64, 64, 64]  # mmeff-mini: 64 tokens per image
    assert tokens["fourier"] == [16, 16, 16]


def test_loglikelihood_is_the_continuations_log_prob(model_cache) -> None:
    lm = _model(model_cache)
    model, processor = lm.model, lm.processor
    doc = _docs()[0]
    # the greedy next token after the prompt, as text: its log-prob is the max, and it is the greedy one
    ctx = to_model(chat_batch(processor, [QUESTIONS[0]], [[doc["image"]]], model.config), model)
    with torch.inference_mode():
        logits = model(**ctx).logits[0, -1].float()
    greedy = processor.tokenizer.decode([int(logits.argmax())])
    continuation = " a man in a suit"
    got = lm.loglikelihood([_request("loglikelihood", 0, greedy), _request("loglikelihood", 0, continuation)])
    assert got[0][1] is True and got[0][0] == pytest.approx(torch.log_softmax(logits, -1).max().item(), abs=1e-4)
    # direct: transformers' own loss over the continuation tokens (labels -100 on the prompt), times their count
    full = to_model(chat_batch(processor, [QUESTIONS[0]], [[doc["image"]]], model.config, answers=[continuation]), model)
    n_ctx = ctx["input_ids"].shape[1]
    labels = full["input_ids"].clone()
    labels[:, :n_ctx] = -100
    with torch.inference_mode():
        loss = model(**full, labels=labels).loss.item()
    n_cont = full["input_ids"].shape[1] - n_ctx
    assert got[1][1] is False and got[1][0] == pytest.approx(-loss * n_cont, rel=1e-4, abs=1e-3)
    lm.close()

    reduced = _model(model_cache, "fourier", ratio=0.25)
    (logp, _), = reduced.loglikelihood([_request("loglikelihood", 0, continuation)])
    assert reduced.visual_tokens[-1]["visual_tokens"] == 16 and logp < 0 and logp != pytest.approx(got[1][0])
    reduced.close()


def test_video_file_becomes_frames(model_cache) -> None:
    for method, per_frame in (("none", 64), ("pool", 16)):
        lm = _model(model_cache, method, max_frames=2, **({"tokens": 16} if method == "pool" else {}))
        out = lm.generate_until([_request("generate_until", 0, dict(GEN), _video, "What are the people riding?")])
        assert isinstance(out[0], str)
        assert lm.visual_tokens[-1]["visual_tokens"] == 2 * per_frame  # LlavaProcessor: each frame an image
        lm.close()






def test_any_hf_vlm_qwen2_vl_images_and_video(model_cache, tmp_path: Path) -> None:
    folder = tiny_qwen2_vl_folder(tmp_path / "qwen", default_processor(model_cache).tokenizer)
    tokens = {}
    for method in ("none", "fourier"):
        lm = _model(model_cache, method, pretrained=str(folder), max_frames=4,
                    **({"ratio": 0.25} if method == "fourier" else {}))
        out = lm.generate_until([_request("generate_until", 0, dict(GEN)),
                                 _request("generate_until", 0, dict(GEN), _video, "What are the people riding?")])
        (logp, _), = lm.loglikelihood([_request("loglikelihood", 1, " a cat")])
        assert len(out) == 2 and all(isinstance(o, str) for o in out) and logp < 0
        tokens[method] = [r["visual_tokens"] for r in lm.visual_tokens]
        lm.close()
    assert all(f < n for f, n in zip(tokens["fourier"], tokens["none"])), tokens


def test_lmms_eval_evaluator_runs_a_local_task(model_cache, tmp_path: Path, monkeypatch) -> None:
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if importlib.util.find_spec("filelock._api") is None:
        # lmms-eval 0.7.3 patches filelock<4 internals for multi-rank dataset loading; one process needs no lock
        monkeypatch.setattr(evaluator._enable_reentrant_filelocks, "_patched", True, raising=False)
    docs = _docs()[:2]
    ds = datasets.Dataset.from_dict(
        {"image": [d["image"] for d in docs], "question": QUESTIONS[:2], "answer": ["astronaut", "cat"]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "utils.py").write_text(textwrap.dedent('''
        def doc_to_visual(doc):
            return [doc["image"].convert("RGB")]


        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["question"]
    '''))
    (tmp_path / "mmeff_tiny.yaml").write_text(textwrap.dedent(f'''
        task: mmeff_tiny
        dataset_path: {tmp_path / "data"}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          temperature: 0
          until: ["\\n"]
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
    '''))
    lm = MMEff(pretrained="default", method="fourier", ratio=0.25, device="cpu", batch_size=2,
               cache_dir=str(model_cache))
    out = evaluator.simple_evaluate(model=lm, tasks=["mmeff_tiny"], task_manager=TaskManager(
        "WARNING", include_path=str(tmp_path)), log_samples=True, bootstrap_iters=0, process_docs_parallel=1,
        verbosity="WARNING")
    assert 0.0 <= out["results"]["mmeff_tiny"]["exact_match,none"] <= 1.0
    answers = [s["resps"][0][0] for s in out["samples"]["mmeff_tiny"]]
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert sorted(r["doc_id"] for r in lm.visual_tokens) == [0, 1]
    assert {r["visual_tokens"] for r in lm.visual_tokens} == {16}  # fourier kept a quarter of 64
    lm.close()
