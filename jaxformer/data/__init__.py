"""Corpora, tokenizer, input pipeline and pretraining objectives."""
