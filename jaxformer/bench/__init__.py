"""Benchmarks: `python -m jaxformer.bench train|peak|generate|plan` (see `__main__`)."""
