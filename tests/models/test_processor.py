"""The default model's own HF processor: the transformers route (AutoProcessor, chat template with image
items, processor(text=, images=)) gives exactly the inputs mmeff's own helpers build, and round-trips."""

from __future__ import annotations

import numpy as np
import torch
from skimage import data
from transformers import AutoProcessor

from mmeff.models.embedded import default_processor
from mmeff.models.hf import build_prompt, chat_batch, left_pad_batch
from mmeff.preprocess import llava_pixel_values


def _chat(processor, question: str, images: int = 1) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_processor_builds_the_inputs_the_model_was_trained_on(default, model_cache, tmp_path):
    model, processor, info = default  # default_model returns the model's own processor
    tokenizer = processor.tokenizer
    assert type(processor).__name__ == "LlavaProcessor" and processor.tokenizer.padding_side == "left"
    assert type(default_processor(model_cache)) is type(processor)
    photos = [data.astronaut(), data.chelsea()]
    questions = ["What is in the picture?", "Which colour is the cat?"]
    ids = [build_prompt(tokenizer, q, 1, info["tokens_per_image"], model.config.image_token_id) for q in questions]
    one = processor(text=_chat(processor, questions[0]), images=photos[:1], return_tensors="pt")
    assert one["input_ids"][0].tolist() == ids[0]
    torch.testing.assert_close(one["pixel_values"], llava_pixel_values(photos[:1], 224), atol=1e-5, rtol=0)
    # a batch of prompts of different lengths is left-padded, each row the single prompt
    both = processor(text=[_chat(processor, q) for q in questions], images=photos, padding=True, return_tensors="pt")
    for row, want in enumerate(ids):
        got = both["input_ids"][row][both["attention_mask"][row].bool()].tolist()
        assert got == want
    assert bool((both["attention_mask"][:, -1] == 1).all())  # left padding
    with torch.no_grad():
        a = model.generate(**one, max_new_tokens=4, do_sample=False)
        b = model.generate(input_ids=torch.tensor([ids[0]]), pixel_values=llava_pixel_values(photos[:1], 224),
                           max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)
    # save_pretrained / AutoProcessor round trip
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    other = again(text=_chat(again, questions[0]), images=photos[:1], return_tensors="pt")
    assert torch.equal(other["input_ids"], one["input_ids"]) and torch.equal(other["pixel_values"], one["pixel_values"])


def test_chat_batch_through_the_processor_equals_the_tokenizer_route(default) -> None:
    """``chat_batch`` (what evaluation, the benches and the demos build inputs with) gives the same batch
    through the model's processor as through the bare tokenizer and LLaVA's CLIP pipeline: clips of several
    frames as one contiguous run, or each frame its own image, left-padded across rows of different lengths."""
    model, processor, info = default
    n = info["tokens_per_image"]
    image_id = model.config.image_token_id
    # frames of one clip share a size; the rocket (427x640) has an odd crop margin at 224 px
    clips = [[im[:300, :400] for im in (data.astronaut(), data.chelsea(), data.coffee())], [data.rocket()]]
    questions = ["What happens in the clip?", "Which object is this, in a few words?"]
    for one_run in (True, False):
        media = [np.stack(c) if one_run else c for c in clips]  # a (T, H, W, 3) clip is one run; a list, images
        got = chat_batch(processor, questions, media, model.config)
        want = chat_batch(processor.tokenizer, questions, media, model.config)
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["attention_mask"], want["attention_mask"])
        torch.testing.assert_close(got["pixel_values"], want["pixel_values"], atol=1e-5, rtol=0)
        assert got["pixel_values"].shape == (4, 3, 224, 224)
        rows = [build_prompt(processor.tokenizer, q, 1, len(c) * n, image_id) if one_run
                else build_prompt(processor.tokenizer, q, len(c), n, image_id) for q, c in zip(questions, clips)]
        assert torch.equal(got["input_ids"], left_pad_batch(rows, processor.tokenizer.pad_token_id)["input_ids"])
    # one run: the three frames' placeholders are adjacent; per image: a newline separates them
    ids = chat_batch(processor, questions[:1], [np.stack(clips[0])], model.config)["input_ids"][0].tolist()
    first = ids.index(image_id)
    assert ids[first : first + 3 * n] == [image_id] * (3 * n)
    apart = chat_batch(processor, questions[:1], clips[:1], model.config)["input_ids"][0].tolist()
    assert apart[apart.index(image_id) + n] != image_id and apart.count(image_id) == 3 * n
