"""Show what each reducer keeps, on a real photo.

Each 14×14 patch of a 336×336 photo is one token (its pixels, D = 588). Every grid reducer runs on those
tokens; the picture shows the tokens that reach the LLM, drawn back at the positions they stand for
(dropped patches are dark, merged patches show their merged value).

    python demos/token_maps.py --tokens 144 --out token_maps.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import mmeff  # noqa: E402
from mmeff.core import BudgetReducer, get_reducer_class  # noqa: E402
from mmeff.datasets.media import sample_image  # noqa: E402
from mmeff.models import llava_pixel_values  # noqa: E402

PATCH, SIZE = 14, 336


def patch_tokens(image: str) -> torch.Tensor:
    """A photo as patch tokens ``(1, 576, 588)`` with pixel values in [0, 1]."""
    x = llava_pixel_values([sample_image(image)], SIZE)
    mean = torch.tensor(mmeff.models.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(mmeff.models.CLIP_STD).view(1, 3, 1, 1)
    x = (x * std + mean).clamp(0, 1)
    g = SIZE // PATCH
    return x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).permute(0, 2, 3, 1, 4, 5).reshape(1, g * g, -1)


def render(red: mmeff.Reduction, g: int) -> torch.Tensor:
    """Image ``(SIZE, SIZE, 3)`` of the reduced tokens drawn at the input positions they stand for."""
    out = torch.zeros(g * g, red.tokens.shape[-1]) + 0.08
    a = red.assignment[0]
    out[a >= 0] = red.tokens[0, a[a >= 0]].float()
    img = out.view(g, g, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2).reshape(SIZE, SIZE, 3)
    return img


def main() -> None:
    """Render one panel per grid reducer (those that need only the grid) into a PNG."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default="astronaut")
    p.add_argument("--tokens", type=int, default=144)
    p.add_argument("--out", default="token_maps.png")
    args = p.parse_args()
    tokens = patch_tokens(args.image)
    g = SIZE // PATCH
    ctx = mmeff.TokenContext(grid=(g, g))
    names = [n for n in mmeff.list_reducers()
             if issubclass(get_reducer_class(n), BudgetReducer) and "scores" not in get_reducer_class(n).needs]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3.4))
    axes[0].imshow(render(mmeff.Reduction.identity(tokens), g))
    axes[0].set_title(f"input: {g * g} tokens")
    for ax, name in zip(axes[1:], names):
        red = mmeff.create_reducer(name, tokens=args.tokens)(tokens, ctx)
        ax.imshow(render(red, g))
        ax.set_title(f"{name}: {red.num_tokens} tokens")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
