"""mmeff demos (``mmeff.demos``): one Gradio app with a tab per part, and a standalone script per tab.

``mmeff demo`` (or ``python -m mmeff.demos.app``) starts the app on localhost; every tab runs offline on
the embedded default models (mmeff-mini, the shipped Instruct-IPT miniature, SmolLM2 from its wheel).
The scripts draw the same pictures without a browser:

* ``python -m mmeff.demos.video_qa``: answer a question about a clip with a method and budget, next to the
  uncompressed run; frames, scores, RoI boxes and kept tokens in a PNG;
* ``python -m mmeff.demos.token_maps``: which patches of a real photo each method keeps or merges;
* ``python -m mmeff.demos.restore``: degrade a photo, restore it by instruction, PSNR/SSIM;
* ``python -m mmeff.demos.llm``: SepLLM cache occupancy over streamed text, FlatQuant perplexity and size.

The functions behind each tab are plain Python (``run_*``) returning images and tables, so they are
tested without a browser; the app only lays them out.
"""
