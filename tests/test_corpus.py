"""The stdlib_code TFDS dataset and text_source over built-in and named TFDS datasets."""

import hashlib
import os
import platform
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds
from etils import epath

from jaxformer.data import corpus


def _paths(data_dir: str, split: str) -> list[str]:
    return list(corpus.text_source("stdlib_code", split, data_dir, text_key="path"))


def _expected_files() -> set[str]:
    """The stdlib .py files that are valid, non-empty UTF-8 (what the corpus must hold)."""
    root = corpus.stdlib_root()
    keep = set()
    for rel in corpus.stdlib_files():
        raw = open(os.path.join(root, rel), "rb").read()
        try:
            if raw.decode("utf-8"):
                keep.add(rel)
        except UnicodeDecodeError:
            pass
    return keep


def test_file_listing_skips_tests_and_tooling():
    files = corpus.stdlib_files()
    assert files == sorted(files)
    assert "os.py" in files and "json/decoder.py" in files
    for rel in files:
        parts = rel.split("/")
        assert not {"test", "tests", "idlelib", "site-packages"} & set(parts[:-1]), rel
        assert rel.endswith(".py")


def test_splits_are_disjoint_cover_all_files_and_follow_the_path_hash(stdlib_data_dir):
    train, val = _paths(stdlib_data_dir, "train"), _paths(stdlib_data_dir, "validation")
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert not set(train) & set(val)
    assert set(train) | set(val) == _expected_files()
    assert all(corpus.split_of(p) == "train" for p in train)
    assert all(corpus.split_of(p) == "validation" for p in val)
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.15


def test_build_is_deterministic_across_directories(stdlib_data_dir, tmp_path):
    other = str(tmp_path / "tfds")
    corpus.build_stdlib_corpus(other)
    for split in ("train", "validation"):
        assert _paths(other, split) == _paths(stdlib_data_dir, split)


def test_documents_are_the_exact_file_contents(stdlib_data_dir):
    texts = corpus.text_source("stdlib_code", "validation", stdlib_data_dir)
    paths = _paths(stdlib_data_dir, "validation")
    root = corpus.stdlib_root()
    for path, text in zip(paths, texts):
        assert isinstance(text, str)
        assert text == open(os.path.join(root, path), "rb").read().decode("utf-8"), path


def test_metadata_records_python_version_and_file_list_hash(stdlib_data_dir):
    builder = corpus.StdlibCode(data_dir=stdlib_data_dir)  # a fresh object reads what was stored
    assert builder.is_prepared()
    meta = corpus.metadata(builder)
    assert meta["python_version"] == platform.python_version()
    expected = hashlib.sha256("\n".join(corpus.stdlib_files()).encode()).hexdigest()
    assert meta["file_list_sha256"] == expected
    assert builder.info.file_format.value == "array_record"


def test_second_build_reuses_the_prepared_data(stdlib_data_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("regenerated a prepared dataset")

    monkeypatch.setattr(corpus.StdlibCode, "_generate_examples", fail)
    builder = corpus.build_stdlib_corpus(stdlib_data_dir)
    assert builder.info.splits["train"].num_examples > 100


def test_a_corpus_built_from_another_stdlib_is_refused(stdlib_data_dir, monkeypatch):
    files = corpus.stdlib_files()
    monkeypatch.setattr(corpus, "stdlib_files", lambda root=None: files[:-1])
    with pytest.raises(ValueError, match="another interpreter"):
        corpus.build_stdlib_corpus(stdlib_data_dir)


def test_max_documents_and_indexing(stdlib_data_dir):
    full = corpus.text_source("stdlib_code", "train", stdlib_data_dir)
    few = corpus.text_source("stdlib_code", "train", stdlib_data_dir, max_documents=5)
    assert len(few) == 5
    assert list(few) == [full[i] for i in range(5)]
    assert few[-1] == full[4] and few[1:3] == [full[1], full[2]]
    with pytest.raises(IndexError):
        few[5]


def test_clear_errors_for_bad_split_feature_and_empty_selection(stdlib_data_dir):
    with pytest.raises(ValueError, match="split 'test' not in dataset 'stdlib_code'"):
        corpus.text_source("stdlib_code", "test", stdlib_data_dir)
    with pytest.raises(ValueError, match="feature 'txt' not in dataset 'stdlib_code'"):
        corpus.text_source("stdlib_code", "train", stdlib_data_dir, text_key="txt")
    with pytest.raises(ValueError, match="no documents"):
        corpus.text_source("stdlib_code", "train", stdlib_data_dir, max_documents=0)


def test_named_tfds_dataset_loads_through_mock_data():
    with tfds.testing.mock_data(num_examples=7):
        texts = corpus.text_source("lm1b", "train", "/nonexistent/tfds")
        assert len(texts) == 7
        assert all(isinstance(t, str) and t for t in texts)
        with pytest.raises(
            ValueError, match="feature 'txt' not in dataset 'lm1b'; available: text"
        ):
            corpus.text_source("lm1b", "train", "/nonexistent/tfds", text_key="txt")


def test_empty_named_dataset_is_an_error():
    with tfds.testing.mock_data(num_examples=0):
        with pytest.raises(ValueError, match="'lm1b' split 'train' has no documents"):
            corpus.text_source("lm1b", "train", "/nonexistent/tfds")


def test_unprepared_or_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'lm1b' is not prepared in .*tfds build lm1b"):
        corpus.text_source("lm1b", "train", str(tmp_path))
    with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_dataset_xyz'"):
        corpus.text_source("no_such_dataset_xyz", "train", str(tmp_path))


class JaxformerTinyText(tfds.core.GeneratorBasedBuilder):
    """A real (unmocked) three-document dataset for the generic TFDS path."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, text in enumerate(["first\n", "  second ✓\n", "third"]):
            yield i, {"body": text}


def test_named_prepared_dataset_reads_without_mocks(tmp_path):
    data_dir = str(tmp_path)
    JaxformerTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    texts = corpus.text_source("jaxformer_tiny_text", "train", data_dir, text_key="body")
    assert sorted(texts) == sorted(["first\n", "  second ✓\n", "third"])
    with pytest.raises(ValueError, match="split 'validation' not in dataset 'jaxformer_tiny_text'"):
        corpus.text_source("jaxformer_tiny_text", "validation", data_dir, text_key="body")


def test_building_and_reading_never_imports_tensorflow(tmp_path):
    # A fresh interpreter: where TensorFlow happens to be installed, this catches any use of it.
    code = (
        "import sys\n"
        "from jaxformer.data import corpus\n"
        f"texts = corpus.text_source('stdlib_code', 'validation', {str(tmp_path)!r})\n"
        "assert len(texts) > 0 and 'def ' in ''.join(texts)\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
