"""SepLLM fine-tuning on a tiny random Llama: the mask that reaches the attention is SepLLM's (against a
brute-force construction), training under it lowers the masked loss, and a run cut short resumes exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmeff.train.sepllm import SepLLMTrainConfig, TokenWindows, sepllm_loss, train_sepllm, window_at

SEPS = (5, 6)


def _model(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def _text(n: int = 3000) -> list[int]:
    # a periodic text with separators: learnable, and a window of a few tokens cannot see a whole period
    g = torch.Generator().manual_seed(1)
    period = torch.randint(8, 64, (24,), generator=g)
    period[[5, 11, 17, 23]] = torch.tensor([5, 6, 5, 6])
    return period.repeat(n // 24 + 1)[:n].tolist()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_attention_gets_sepllms_mask(attn):
    model = _model(attn)
    ids = torch.tensor([_text(40), _text(47)[7:]])
    seen = {}

    def grab(mod, args, kwargs):
        seen["mask"] = kwargs["attention_mask"]

    hook = model.model.layers[1].self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        loss = sepllm_loss(model, ids, SEPS, init_size=2, local_size=4)
    finally:
        hook.remove()
    brute = torch.zeros(2, 1, 40, 40, dtype=torch.bool)
    for b in range(2):
        for i in range(40):
            for j in range(i + 1):
                brute[b, 0, i, j] = j < 2 or int(ids[b, j]) in SEPS or i - j < 4
    assert torch.equal(seen["mask"] == 0, brute)
    dense = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and abs(loss.item() - dense.item()) > 1e-4  # the mask changed what was attended


def test_training_lowers_the_masked_loss(tmp_path):
    model = _model()
    text = _text()
    cfg = SepLLMTrainConfig(seq_len=48, init_size=2, local_sizes=(4, 8), steps=40, batch_size=4, lr=3e-3,
                            min_lr=3e-4, warmup_steps=4, save_every=20)
    probe = torch.stack([TokenWindows(text, 48, 8, seed=9)[i] for i in range(8)])
    with torch.no_grad():
        before = sepllm_loss(model, probe, SEPS, 2, 4).item()
    history = train_sepllm(model, text, SEPS, cfg, None, progress=False, log=lambda s: None)
    with torch.no_grad():
        after = sepllm_loss(model, probe, SEPS, 2, 4).item()
    assert after < 0.6 * before
    assert [r["step"] for r in history["log"]] == [20, 40]
    assert {window_at(s, cfg) for s in range(40)} == {4, 8}
    assert not any(p.requires_grad for p in model.parameters())


def test_resume_is_exact(tmp_path):
    text = _text()
    cfg = SepLLMTrainConfig(seq_len=32, init_size=2, local_sizes=(4, 6, 8), steps=4, batch_size=2, lr=1e-3,
                            warmup_steps=1, save_every=2)
    straight = _model()
    h1 = train_sepllm(straight, text, SEPS, cfg, tmp_path / "a", progress=False, log=lambda s: None)
    cut = _model()
    train_sepllm(cut, text, SEPS, cfg, tmp_path / "b", stop_after=2, progress=False, log=lambda s: None)
    resumed = _model()
    h2 = train_sepllm(resumed, text, SEPS, cfg, tmp_path / "b", progress=False, log=lambda s: None)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["loss"] for r in h1["log"]] == [r["loss"] for r in h2["log"]]
    with pytest.raises(ValueError, match="local_sizes"):
        SepLLMTrainConfig(local_sizes=())
