"""The methods' algorithms: pure functions and reducers on token tensors, no hooks.

``baselines`` (random, uniform, pool, cls_attn), ``fourier`` (Fourier-VLM), ``freevideo`` (Free Video-LLM),
``tome`` (ToMe's merge step), ``tocom`` (ToCom's gate), ``vistog`` (VisToG's grouping). How each attaches to
a host model lives in :mod:`mmeff.adapters`; ``mmeff.apply`` picks the attachment.
"""
