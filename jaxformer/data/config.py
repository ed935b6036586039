"""The data section of a run's configuration."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is tokenized, and the shape of a batch."""

    dataset: str = "stdlib_code"
    """'stdlib_code' (built in, offline) or any TFDS name such as 'lm1b' or 'c4/en'."""
    data_dir: str = ""
    """TFDS data directory; empty means ~/.cache/jaxformer/tfds."""
    text_key: str = "text"
    """Feature holding the document text in a TFDS dataset."""
    train_split: str = "train"
    eval_split: str = "validation"
    max_documents: Optional[int] = None
    """Use only the first N documents of each split (quick experiments)."""
    vocab_size: int = 2048
    """Size of the sentencepiece vocabulary trained on the train split."""
    tokenizer_path: str = ""
    """An existing sentencepiece .model to use instead of training one."""
    seq_len: int = 128
    """Tokens per row (encoder input length for span corruption)."""
    target_len: int = 32
    """Decoder length for span corruption."""
    batch_size: int = 16
    """Global batch size in rows, split over all processes."""
    objective: str = "auto"
    """'auto' (from the model family), 'causal_lm', 'masked_lm' or 'span_corruption'."""
    mask_rate: float = 0.15
    noise_density: float = 0.15
    mean_noise_span: float = 3.0
