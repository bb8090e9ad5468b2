"""Measuring models: perplexity here; zero-shot tasks through lm-evaluation-harness."""
