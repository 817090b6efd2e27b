"""Measuring: video QA evaluation (``videoqa``, with answer scoring in ``answers`` and results files in
``results``), the synthetic-scene accuracy of mmeff-mini (``scenes``), analytic FLOPs / KV accounting
(``flops``), measured latency (``latency``) and both on a real model (``profile``), streaming perplexity,
image metrics, reports and plots."""
