"""Base models: backbone adapters, loading, the built-in models and the CLIP tokenizer."""
