"""Measuring a model's quality on a text: perplexity and KL-divergence against a base model, as llama-perplexity."""
