"""The data section of a run's configuration."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One dataset of a mixture and its share of every batch."""

    dataset: str = "stdlib_code"
    weight: float = 1.0
    """Relative share of each global batch's rows (realised per batch, to 1/batch_size)."""
    text_key: str = "text"
    data_dir: str = ""
    """TFDS data directory; empty means the data section's data_dir."""
    train_split: str = "train"
    eval_split: str = "validation"
    max_documents: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"mixture weight of {self.dataset!r} must be > 0, got {self.weight}")


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
    mixture: tuple[SourceConfig, ...] = ()
    """Several datasets with weights (e.g. code and prose) instead of `dataset`; validation loss
    is reported per source."""
    tokens_dir: str = ""
    """Where tokenized shards (and trained tokenizers) live; empty means
    <data_dir>/jaxformer_tokens. A gs:// path works on pods (all hosts read the same shards)."""
    docs_per_shard: int = 65536
    """Documents per token shard file (the unit of parallel and resumable preparation)."""
    prepare_workers: int = 0
    """Processes tokenizing shards in parallel; 0 uses every core (one in-process for one shard)."""
    tokenizer_docs: int = 100_000
    """Documents sampled (seeded, spread over the split) to train the tokenizer on."""
    prefetch: int = 4
    """Batches prepared ahead of the step on background threads (0: on demand)."""
    prefetch_threads: int = 2
    mask_rate: float = 0.15
    noise_density: float = 0.15
    mean_noise_span: float = 3.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "target_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)}: must be >= 1")
        if self.prefetch < 0 or self.prefetch_threads < 1:
            raise ValueError("data.prefetch must be >= 0 and data.prefetch_threads >= 1")
        if self.docs_per_shard < 1 or self.prepare_workers < 0 or self.tokenizer_docs < 1:
            raise ValueError(
                "data.docs_per_shard and data.tokenizer_docs must be >= 1, "
                "data.prepare_workers >= 0"
            )
        names = [s.dataset for s in self.mixture]
        if len(set(names)) != len(names):
            raise ValueError(f"data.mixture names a dataset twice: {names}")

    def sources(self) -> tuple[SourceConfig, ...]:
        """The datasets a run reads: the mixture, or `dataset` alone."""
        if self.mixture:
            return tuple(
                dataclasses.replace(s, data_dir=s.data_dir or self.data_dir) for s in self.mixture
            )
        return (
            SourceConfig(
                self.dataset,
                1.0,
                self.text_key,
                self.data_dir,
                self.train_split,
                self.eval_split,
                self.max_documents,
            ),
        )
