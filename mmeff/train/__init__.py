"""Training: the one loop every trainer uses (``loop``: steps, exact resume, DDP, tqdm) and the trainers
built on it (mmeff-mini, Eve, restoration, video tokenizers, video classifiers, LLaVA fine-tuning)."""
