"""The sentencepiece tokenizer: exact round trips, special ids, caching, document tokenization."""

import numpy as np
import pytest
import sentencepiece as spm
from data_fixtures import TEST_VOCAB
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxformer.data import corpus
from jaxformer.data import tokenizer as tok_lib
from jaxformer.data.tokenizer import Tokenizer, train_tokenizer

TRICKY = [
    "",
    "\n",
    "\n\n\n",
    "def f(x):\n\treturn x  \r\n",
    "    indented\n        more\n",
    "trailing spaces   \n   leading",
    "a  b   c    d",
    "\u2581 literal lower-one-eighth block \u2581\u2581",
    "<mask> <extra_id_0><extra_id_99><extra_id_100> <newline> <U+2581> <pad> </s> <unk> <s>",
    "\x00\x01\x7f\u200b\ufeff é 中文 😀 \U0010fffd",
    "1234567890 3.14e-10",
    " ",
    "\r",
    "\t\t",
]


def test_every_validation_file_round_trips(stdlib_tokenizer, stdlib_data_dir):
    texts = corpus.text_source("stdlib_code", "validation", stdlib_data_dir)
    assert len(texts) > 5
    for text, ids in zip(texts, stdlib_tokenizer.encode_batch(list(texts))):
        assert stdlib_tokenizer.decode(ids) == text
        assert ids == stdlib_tokenizer.encode(text)
    # Code compresses: far fewer tokens than characters.
    n_chars = sum(len(t) for t in texts)
    n_tokens = sum(len(stdlib_tokenizer.encode(t)) for t in texts)
    assert n_tokens < 0.5 * n_chars


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_text_round_trips(stdlib_tokenizer, text):
    assert stdlib_tokenizer.decode(stdlib_tokenizer.encode(text)) == text


_PIECES = ["\n", "\r", "\t", " ", "  ", "\u2581", "<mask>", "<extra_id_3>", "<newline>", "<0x0A>"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(), st.sampled_from(_PIECES))).map("".join))
def test_any_text_round_trips(stdlib_tokenizer, text):
    assert stdlib_tokenizer.decode(stdlib_tokenizer.encode(text)) == text


def test_special_ids_are_distinct_and_in_range(stdlib_tokenizer):
    t = stdlib_tokenizer
    assert (t.pad_id, t.eos_id, t.unk_id, t.bos_id) == (0, 1, 2, 3)
    assert t.num_sentinels == 100
    special = [t.pad_id, t.eos_id, t.unk_id, t.bos_id, t.newline_id, t.space_mark_id, t.mask_id]
    special += [t.sentinel_id(i) for i in range(t.num_sentinels)]
    assert len(set(special)) == len(special)
    assert all(0 <= i < t.vocab_size for i in special)
    assert t.vocab_size == TEST_VOCAB
    with pytest.raises(ValueError, match="sentinel index 100"):
        t.sentinel_id(100)


def test_mask_and_sentinels_encode_and_decode_as_single_ids(stdlib_tokenizer):
    t = stdlib_tokenizer
    assert t.encode("<mask>") == [t.mask_id]
    for i in (0, 1, 10, 99):
        assert t.encode(f"<extra_id_{i}>") == [t.sentinel_id(i)]
        assert t.decode([t.sentinel_id(i)]) == f"<extra_id_{i}>"
    assert t.decode([t.mask_id]) == "<mask>"


def test_newline_has_its_own_id_and_its_name_is_just_text(stdlib_tokenizer):
    t = stdlib_tokenizer
    assert t.encode("\n") == [t.newline_id]
    assert t.encode("a\nb").count(t.newline_id) == 1
    assert t.newline_id not in t.encode("<newline>")  # control pieces never match input text
    assert t.decode([t.newline_id] * 3) == "\n\n\n"


def test_decode_drops_pad_and_eos(stdlib_tokenizer):
    t = stdlib_tokenizer
    ids = t.encode("x = 1\n")
    assert t.decode([t.pad_id, *ids, t.eos_id, t.pad_id, t.pad_id]) == "x = 1\n"
    assert t.decode(np.asarray(ids, dtype=np.int32)) == "x = 1\n"


def test_serialize_save_and_load_give_the_same_tokenizer(stdlib_tokenizer, tmp_path):
    text = "class A:\n    pass\n"
    clone = Tokenizer.from_bytes(stdlib_tokenizer.serialized_model())
    path = str(tmp_path / "sub" / "tok.model")
    stdlib_tokenizer.save(path)
    loaded = Tokenizer.load(path)
    for other in (clone, loaded):
        assert other.serialized_model() == stdlib_tokenizer.serialized_model()
        assert other.encode(text) == stdlib_tokenizer.encode(text)
        assert other.mask_id == stdlib_tokenizer.mask_id


def test_existing_model_path_is_loaded_not_retrained(stdlib_tokenizer, tmp_path, monkeypatch):
    path = str(tmp_path / "cached.model")
    stdlib_tokenizer.save(path)
    monkeypatch.setattr(
        tok_lib, "_train", lambda *a, **k: pytest.fail("retrained a cached tokenizer")
    )
    assert (
        train_tokenizer(["anything"], 4096, path).serialized_model()
        == stdlib_tokenizer.serialized_model()
    )


def test_training_is_deterministic_and_works_at_vocab_512(stdlib_data_dir):
    texts = list(corpus.text_source("stdlib_code", "train", stdlib_data_dir, max_documents=40))
    a = train_tokenizer(texts, 512, "", max_sentences=5000)
    b = train_tokenizer(texts, 512, "", max_sentences=5000)
    assert a.vocab_size == 512
    assert a.serialized_model() == b.serialized_model()
    assert all(a.decode(a.encode(t)) == t for t in texts[:5])


def test_bad_training_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", "\n\n"], 512, "")
    with pytest.raises(ValueError, match="vocab_size 300 is too small"):
        train_tokenizer(["abc"], 300, "")


def test_a_plain_sentencepiece_model_is_rejected(tmp_path):
    prefix = str(tmp_path / "plain")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world", "more text here"] * 50),
        model_prefix=prefix,
        vocab_size=15,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="lacks the piece '<newline>'"):
        Tokenizer.load(prefix + ".model")
