"""A converted checkpoint's Hugging Face tokenizer (HfTokenizer) against transformers itself."""

import json
import os
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from jaxformer.convert import runs  # noqa: E402
from jaxformer.data import hf_tokenizer  # noqa: E402
from jaxformer.data.hf_tokenizer import HfTokenizer, MissingTokenizerPackage  # noqa: E402
from jaxformer.data.tokenizer import (  # noqa: E402
    Tokenizer,
    check_objective_ids,
    load_tokenizer,
    load_tokenizer_file,
    model_vocab_size,
    train_tokenizer,
)

CORPUS = [
    "def f(x):\n    return x * 2\n\nclass A:\n    pass\n",
    "café naïve résumé déjà vu",
    "🙂👍🏽 emoji 😀 and more 🙂",
    "中文字符测试 日本語のテキスト",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "import os\nimport sys\n\tprint('hi')  # comment\n",
] * 4
# Code with indentation and blank lines, accents, emoji (one with a skin-tone modifier), CJK, and
# characters no training text had (byte fallback / unknown).
MIXED = (
    "def add(a, b):\n    if a:\n        return a + b\n\n\treturn None\n"
    "café naïve 🙂👍🏽 中文字 ß Ω  two  spaces"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Write code:\nprint(1)  "},
    {"role": "assistant", "content": "print(1)"},
]


def _byte_level(directory: str) -> None:
    """GPT-2 / Llama-3 / Qwen style: byte-level BPE, a chat template, several eos ids."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=LLAMA3_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=LLAMA3_TEMPLATE,
    ).save_pretrained(directory)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": [1, 4]}, f)


def _wordpiece(directory: str) -> None:
    """BERT style: WordPiece with [CLS] [SEP] [MASK] [PAD]."""
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        CORPUS,
        trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(directory)


def _metaspace(directory: str) -> None:
    """Llama-2 / Gemma style: BPE over '▁'-escaped text with <0xNN> byte-fallback pieces."""
    trained = tokenizers.Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in spec["merges"]]
    tok = tokenizers.Tokenizer(
        models.BPE(
            vocab={p: i for i, p in enumerate(pieces)},
            merges=merges,
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(directory)


BUILDERS = {"byte_level": _byte_level, "wordpiece": _wordpiece, "metaspace": _metaspace}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf_tokenizers")
    dirs = {}
    for name, build in BUILDERS.items():
        dirs[name] = str(root / name)
        build(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def pairs(hf_dirs) -> dict[str, tuple[HfTokenizer, object]]:
    """(ours, transformers' AutoTokenizer) for each style."""
    return {
        name: (HfTokenizer.from_directory(d), transformers.AutoTokenizer.from_pretrained(d))
        for name, d in hf_dirs.items()
    }


@pytest.mark.parametrize("style", list(BUILDERS))
def test_encode_and_decode_match_transformers(pairs, style):
    ours, ref = pairs[style]
    ids = ours.encode(MIXED)
    assert ids == ref.encode(MIXED, add_special_tokens=False)
    assert ours.encode_batch([MIXED, "", "x"]) == [
        ids,
        [],
        ref.encode("x", add_special_tokens=False),
    ]
    assert ours.decode(ids) == ref.decode(ids)
    if style != "wordpiece":  # BERT lowercases and strips accents: no round trip there either
        assert ref.decode(ids) == MIXED
        assert ours.decode(ids + [ours.pad_id] * 3) == MIXED
    assert ours.vocab_size == len(ref)
    assert ours.id_to_piece(ids[0]) == ref.convert_ids_to_tokens(ids[0])


def test_special_ids_and_fallbacks(pairs):
    bl, ref = pairs["byte_level"][0], pairs["byte_level"][1]
    eot, eot_text = (
        ref.convert_tokens_to_ids("<|eot_id|>"),
        ref.convert_tokens_to_ids("<|end_of_text|>"),
    )
    assert (bl.eos_id, bl.bos_id) == (eot, ref.convert_tokens_to_ids("<|begin_of_text|>"))
    # Every eos id of generation_config.json stops generation; no pad token: pad is eos.
    assert bl.stop_ids[0] == eot and set(bl.stop_ids) == {eot, eot_text}
    assert bl.pad_id == eot and bl.unk_id == -1 and bl.mask_id is None
    assert bl.num_sentinels == 0
    with pytest.raises(ValueError, match="<extra_id_i>"):
        bl.sentinel_id(0)
    wp, ref = pairs["wordpiece"]
    ids = {t: ref.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    # BERT has no bos/eos: [CLS] starts and [SEP] ends a text.
    assert (wp.pad_id, wp.unk_id, wp.bos_id, wp.eos_id, wp.mask_id) == tuple(ids.values())
    assert wp.stop_ids == (ids["[SEP]"],)
    ms, ref = pairs["metaspace"]
    assert (ms.unk_id, ms.bos_id, ms.eos_id, ms.pad_id) == (0, 1, 2, 2)


def test_sentinels_of_a_t5_style_vocabulary(tmp_path):
    tok = tokenizers.Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[f"<extra_id_{i}>" for i in range(3)],
    )
    fast.save_pretrained(tmp_path)
    t5 = HfTokenizer.from_directory(str(tmp_path))
    assert t5.num_sentinels == 3
    assert [t5.sentinel_id(i) for i in range(3)] == [
        fast.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(3)
    ]
    with pytest.raises(ValueError, match="out of range"):
        t5.sentinel_id(3)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_as_transformers(pairs, add_generation_prompt):
    ours, ref = pairs["byte_level"]
    assert ours.chat_template == LLAMA3_TEMPLATE
    text = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    expected = ref.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected and text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert text.endswith("<|end_header_id|>\n\n") == add_generation_prompt
    ms = pairs["metaspace"][0]
    assert ms.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        ms.apply_chat_template(MESSAGES)


@pytest.mark.parametrize("style", list(BUILDERS))
def test_bundle_bytes_round_trip(hf_dirs, pairs, style, tmp_path):
    ours = pairs[style][0]
    data = ours.serialized_model()
    assert (
        data.startswith(b"{")
        and HfTokenizer.from_directory(hf_dirs[style]).serialized_model() == data
    )
    back = load_tokenizer(data)
    assert isinstance(back, HfTokenizer)
    assert back.encode(MIXED) == ours.encode(MIXED) and back.stop_ids == ours.stop_ids
    assert back.serialized_model() == data
    ours.save(str(tmp_path / "tok.bundle"))
    assert load_tokenizer_file(str(tmp_path / "tok.bundle")).encode(MIXED) == ours.encode(MIXED)
    assert load_tokenizer_file(hf_dirs[style]).encode(MIXED) == ours.encode(MIXED)


def test_a_slow_sentencepiece_tokenizer_is_stored_converted(tmp_path):
    import sentencepiece as spm

    model = tmp_path / "sp.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        character_coverage=0.99,
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "tokenizer.model").write_bytes(model.read_bytes())
    (slow / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"})
    )
    ref = transformers.AutoTokenizer.from_pretrained(slow)
    data = runs.find_tokenizer(str(slow))
    tok = load_tokenizer(data)
    # transformers converted it once; the bundle holds the fast files only.
    assert "tokenizer.json" in tok.files and "tokenizer.model" not in tok.files
    assert tok.encode(MIXED) == ref.encode(MIXED, add_special_tokens=False)
    assert tok.decode(tok.encode(MIXED)) == ref.decode(ref.encode(MIXED, add_special_tokens=False))
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)


def test_token_byte_lengths(pairs):
    bl, ref = pairs["byte_level"]
    lengths = bl.token_byte_lengths()
    assert lengths.shape == (bl.vocab_size,)
    # Byte-level BPE: exact, emoji and CJK split mid-character included.
    assert lengths[bl.encode(MIXED)].sum() == len(MIXED.encode("utf-8"))
    assert all(lengths[ref.convert_tokens_to_ids(t)] == 0 for t in LLAMA3_SPECIALS)
    wp, ref = pairs["wordpiece"]
    lengths = wp.token_byte_lengths()
    vocab = ref.get_vocab()
    word = next(p for p in vocab if p.isalpha() and len(p) > 2 and not p.startswith("["))
    suffix = next(p for p in vocab if p.startswith("##") and p[2:].isalpha())
    assert lengths[vocab[word]] == len(word.encode()) + 1  # with the space before it
    assert lengths[vocab[suffix]] == len(suffix[2:].encode())
    assert lengths[[wp.pad_id, wp.bos_id, wp.eos_id, wp.mask_id]].sum() == 0
    ms, ref = pairs["metaspace"]
    lengths = ms.token_byte_lengths()
    vocab = ref.get_vocab()
    assert lengths[vocab["<0xC3>"]] == 1 and lengths[vocab["\u2581"]] == 1
    assert lengths[[ms.unk_id, ms.bos_id, ms.eos_id]].sum() == 0
    # Only the dummy-prefix space the normalizer prepends is counted beyond the text.
    assert lengths[ms.encode(MIXED)].sum() == len(MIXED.encode("utf-8")) + 1


def test_sentencepiece_tokenizer_has_the_same_members():
    texts = ["def f(x):\n    return x  # café ▁ 🙂\n" * 3, "class A:\n\tpass\n"] * 20
    spm = train_tokenizer(texts, vocab_size=512)
    assert spm.stop_ids == (spm.eos_id,) and spm.chat_template is None
    assert spm.apply_chat_template(MESSAGES[:2], add_generation_prompt=True) == (
        "<|system|>\nYou are terse.\n<|user|>\n  Write code:\nprint(1)  \n<|assistant|>\n"
    )
    with pytest.raises(ValueError, match="message 0"):
        spm.apply_chat_template([{"role": "user"}])
    lengths = spm.token_byte_lengths()
    text = texts[0] + "Ω ß"  # byte fallback too
    assert lengths[spm.encode(text)].sum() == len(text.encode("utf-8"))
    back = load_tokenizer(spm.serialized_model())
    assert isinstance(back, Tokenizer) and back.encode(text) == spm.encode(text)


def test_model_vocab_size_keeps_a_checkpoints_padded_embedding(pairs):
    tok = pairs["byte_level"][0]
    assert model_vocab_size(tok) == tok.vocab_size  # a fresh model: the tokenizer's size
    assert model_vocab_size(tok, tok.vocab_size + 64) == tok.vocab_size + 64
    # A smaller stored vocabulary is left to the model check (it names both sizes).
    assert model_vocab_size(tok, tok.vocab_size - 1) == tok.vocab_size


def test_objectives_name_the_token_a_tokenizer_lacks(pairs):
    bl, wp = pairs["byte_level"][0], pairs["wordpiece"][0]
    check_objective_ids(bl, "causal_lm")
    check_objective_ids(wp, "masked_lm")
    with pytest.raises(ValueError, match="masked_lm needs a mask token"):
        check_objective_ids(bl, "masked_lm")
    with pytest.raises(ValueError, match="span_corruption needs sentinel"):
        check_objective_ids(wp, "span_corruption")


def test_missing_transformers_names_the_extra(pairs, monkeypatch):
    data = pairs["byte_level"][0].serialized_model()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingTokenizerPackage, match=r"\.\[tokenizers\]"):
        load_tokenizer(data)
    with pytest.raises(ValueError, match="not a 'jaxformer-hf-tokenizer'"):
        load_tokenizer(b'{"format": "other"}')


def test_importing_the_tokenizer_module_does_not_import_transformers():
    code = (
        "import sys, jaxformer.data.tokenizer, jaxformer.data.hf_tokenizer; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_find_and_write_tokenizer_for_convert(hf_dirs, pairs, tmp_path):
    data = runs.find_tokenizer(hf_dirs["byte_level"])
    assert data == pairs["byte_level"][0].serialized_model()
    spm_dir = tmp_path / "spm"
    spm_dir.mkdir()
    (spm_dir / "spiece.model").write_bytes(b"\x0a\x03abc")
    assert runs.find_tokenizer(str(spm_dir)) == b"\x0a\x03abc"  # no HF files: as before
    assert runs.find_tokenizer(str(tmp_path)) == b""
    # The exported model's own generation_config.json gets the tokenizer's eos ids back.
    out = tmp_path / "out"
    out.mkdir()
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 4, "max_length": 9}))
    written = runs.write_tokenizer(data, str(out))
    assert "tokenizer.json" in written and "generation_config.json" in written
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"eos_token_id": [1, 4], "max_length": 9, "bos_token_id": 0}
    ref = transformers.AutoTokenizer.from_pretrained(out)
    assert ref.encode(MIXED, add_special_tokens=False) == pairs["byte_level"][0].encode(MIXED)
    assert HfTokenizer.from_directory(str(out)).stop_ids == pairs["byte_level"][0].stop_ids
    assert runs.write_tokenizer(b"\x0a\x03abc", str(tmp_path / "none")) == []
    assert not (tmp_path / "none").exists()
    assert hf_tokenizer.is_bundle(data) and not hf_tokenizer.is_bundle(b"\x0a\x03abc")


def test_convert_command_keeps_the_tokenizer_both_ways(hf_dirs, pairs, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from jaxformer.convert.__main__ import main as convert_cli
    from jaxformer.training.checkpoint import Checkpointer

    ours = pairs["byte_level"][0]
    torch.manual_seed(0)
    # The embedding is padded past the tokenizer, as Hugging Face models often are.
    config = transformers.GPT2Config(
        vocab_size=ours.vocab_size + 16, n_positions=16, n_embd=16, n_layer=1, n_head=2
    )
    hf = tmp_path / "hf"
    transformers.GPT2LMHeadModel(config).save_pretrained(hf)
    ours.save_pretrained(str(hf))
    assert convert_cli(["from-hf", str(hf), str(tmp_path / "run")]) == 0
    assert "with its Hugging Face tokenizer" in capsys.readouterr().out
    meta = Checkpointer(str(tmp_path / "run"), create=False).read_meta()
    assert meta["tokenizer"] == ours.serialized_model()
    assert meta["config"]["model"]["vocab_size"] == ours.vocab_size + 16
    assert convert_cli(["to-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back.encode(MIXED, add_special_tokens=False) == ours.encode(MIXED)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 4]
    # A tokenizer with more ids than the model's vocabulary is refused, naming both sizes.
    small = tmp_path / "small"
    config.vocab_size = ours.vocab_size - 1
    transformers.GPT2LMHeadModel(config).save_pretrained(small)
    ours.save_pretrained(str(small))
    assert convert_cli(["from-hf", str(small), str(tmp_path / "run2")]) == 2
    assert f"has {ours.vocab_size} ids" in capsys.readouterr().err
