"""Measuring: video QA evaluation (``videoqa``), the synthetic-scene accuracy of mmeff-mini (``scenes``),
analytic FLOPs / KV accounting and latency (``profile``), streaming perplexity, image metrics, reports and
plots."""
