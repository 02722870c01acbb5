"""Tests for fusion_jax.data.text: file expansion, records, splits, tokenizers and packing."""

import json
import math
import os
import re

import numpy as np
import pytest

from fusion_jax.data import text, tokenize

# ---------------------------------------------------------------------------------------------
# expand_sources


def _write(path, content="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return str(path)


def test_expand_directory_recursive_sorted_skips_dat_and_symlinks(tmp_path):
    root = tmp_path / "fortunes"
    _write(root / "zen")
    _write(root / "art")
    _write(root / "art.dat")
    _write(root / "de" / "quotes")
    _write(root / "de" / "quotes.dat")
    os.symlink(root / "art", root / "art.u8")
    assert text.expand_sources(str(root)) == [
        str(root / "art"),
        str(root / "de" / "quotes"),
        str(root / "zen"),
    ]


def test_expand_keeps_item_order_and_deduplicates(tmp_path):
    b = _write(tmp_path / "b.txt")
    a = _write(tmp_path / "a.txt")
    c = _write(tmp_path / "sub" / "c.txt")
    # Items keep their order (b before the glob); within the glob, sorted; b appears once.
    got = text.expand_sources(f"{b}, {tmp_path}/**/*.txt")
    assert got == [b, a, c]
    # A sequence gives the same result as the comma-separated string.
    assert text.expand_sources([b, f"{tmp_path}/**/*.txt"]) == got


def test_expand_glob_skips_dat(tmp_path):
    a = _write(tmp_path / "a")
    _write(tmp_path / "a.dat")
    assert text.expand_sources(str(tmp_path / "a*")) == [a]


def test_expand_missing_item_raises_exact_message(tmp_path):
    a = _write(tmp_path / "a.txt")
    missing = str(tmp_path / "nothing*.txt")
    with pytest.raises(FileNotFoundError) as info:
        text.expand_sources([a, missing])
    assert str(info.value) == f"no text files match {missing!r}"


def test_expand_rejects_empty_sources():
    with pytest.raises(ValueError, match="no text sources"):
        text.expand_sources(" , ")


def test_expand_only_dat_counts_as_no_match(tmp_path):
    _write(tmp_path / "d" / "x.dat")
    item = str(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no text files match {item!r}")):
        text.expand_sources(item)


# ---------------------------------------------------------------------------------------------
# read_documents


FORTUNE = "\nFirst line\n  indented second\n\n%\n%\n\n\nSecond record\n%\nThird\n%\n"


def test_read_fortune_records(tmp_path):
    path = _write(tmp_path / "f", FORTUNE)
    assert text.read_documents([path], record_separator="%") == [
        "First line\n  indented second",
        "Second record",
        "Third",
    ]


def test_read_records_only_split_on_exact_separator_lines(tmp_path):
    # "%%" and " %" are text, not separators; a record without a final separator is kept.
    path = _write(tmp_path / "f", "a\n%%\n %\n%\nb")
    assert text.read_documents([path], record_separator="%") == ["a\n%%\n %", "b"]


def test_read_whole_files_in_order_with_replacement(tmp_path):
    a = _write(tmp_path / "a", "alpha\n%\nbeta\n")
    b = tmp_path / "b"
    b.write_bytes(b"caf\xc3\xa9 \xff!")
    assert text.read_documents([str(b), a]) == ["café \ufffd!", "alpha\n%\nbeta\n"]


# ---------------------------------------------------------------------------------------------
# split_documents


def test_split_deterministic_disjoint_covering_ordered():
    docs = [f"doc{i}" for i in range(20)]
    train, val = text.split_documents(docs, seed=3, val_fraction=0.25)
    assert (train, val) == text.split_documents(docs, seed=3, val_fraction=0.25)
    assert len(val) == 5 and len(train) == 15
    assert sorted(train + val) == sorted(docs)
    assert not set(train) & set(val)
    # Original relative order is kept in both parts.
    assert train == sorted(train, key=docs.index)
    assert val == sorted(val, key=docs.index)
    # Validation is the head of the seed's permutation.
    perm = np.random.default_rng(3).permutation(20)
    assert val == [docs[i] for i in sorted(perm[:5])]
    # Another seed gives another split.
    assert text.split_documents(docs, seed=4, val_fraction=0.25)[1] != val


def test_split_at_least_one_validation_document():
    train, val = text.split_documents(["a", "b", "c"], seed=0, val_fraction=0.01)
    assert len(val) == 1 and len(train) == 2
    train, val = text.split_documents(["a", "b", "c"], seed=0, val_fraction=0.0)
    assert (train, val) == (["a", "b", "c"], [])


def test_split_keeps_one_training_document():
    # round(0.9 * 3) = 3 would leave nothing to train on; validation is capped at n - 1.
    train, val = text.split_documents(["a", "b", "c"], seed=0, val_fraction=0.9)
    assert len(train) == 1 and len(val) == 2


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_split_rejects_bad_fraction(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        text.split_documents(["a", "b"], seed=0, val_fraction=bad)


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer_round_trip_non_ascii():
    tok = tokenize.ByteTokenizer()
    s = "Grüße, 世界! ∑ 🙂"
    ids = tok.encode(s)
    assert ids[:4] == [71, 114, 0xC3, 0xBC]  # "G", "r", then the two UTF-8 bytes of "ü"
    assert len(ids) == len(s.encode("utf-8"))
    assert tok.decode(ids) == s
    # Specials are dropped; a cut multi-byte character decodes to U+FFFD.
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id]) == "hi"
    assert tok.decode(np.array([104, 0xC3])) == "h\ufffd"
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)


def _save_word_tokenizer(directory):
    """A whitespace WordLevel tokenizer whose post-processor would append </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 2)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_hf_tokenizer_eos_from_config_dict(tmp_path):
    d = _save_word_tokenizer(tmp_path / "tok")
    config = {"eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = tokenize.HFTokenizer(str(d))
    assert tok.vocab_size == 5
    assert (tok.eos_id, tok.pad_id) == (2, 2)
    # No "</s>" from the post-processor: special tokens are not added, except to a prompt
    # (transformers' tokenizer adds them by default).
    assert tok.encode("hello world nope") == [3, 4, 0]
    assert tok.encode_prompt("hello world") == [3, 4, 2]
    assert tokenize.ByteTokenizer().encode_prompt("hé") == [104, 195, 169]
    assert tok.decode([3, 2, 4]) == "hello world"


@pytest.mark.parametrize("template", ["<s> $A", "<s> $A </s>"])
def test_hf_documents_are_packed_as_the_tokenizer_gives_them(tmp_path, template):
    # A Llama-style post-processor puts <s> before each document; each is closed by one </s>,
    # also when the post-processor appends one (add_eos_token).
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    _write(tmp_path / "docs", "hello world\n%\nworld\n%\n")
    tokenizer = tokenize.HFTokenizer(str(tmp_path / "tok"))
    tokens, mask = text.load_text(str(tmp_path / "docs"), tokenizer, 3, record_separator="%")
    # Stream <s> hello world </s> <s> world </s>: 6 targets, two windows of 3.
    np.testing.assert_array_equal(tokens, [[1, 3, 4, 2], [2, 1, 4, 2]])
    np.testing.assert_array_equal(mask, np.ones((2, 3)))
    # special_tokens=False (workdirs from before): hello world </s> world </s>, padded with </s>.
    tokens, mask = text.load_text(
        str(tmp_path / "docs"), tokenizer, 3, record_separator="%", special_tokens=False
    )
    np.testing.assert_array_equal(tokens, [[3, 4, 2, 4], [4, 2, 2, 2]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])


def test_hf_tokenizer_eos_from_config_string_and_argument(tmp_path):
    d = _save_word_tokenizer(tmp_path / "tok")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    # A file path works too, and the config beside it is read.
    assert tokenize.HFTokenizer(str(d / "tokenizer.json")).eos_id == 2
    # An explicit eos_token wins over the config.
    tok = tokenize.HFTokenizer(str(d), eos_token="<pad>")
    assert (tok.eos_id, tok.pad_id) == (1, 1)
    with pytest.raises(ValueError, match="'<bos>' is not in the vocabulary"):
        tokenize.HFTokenizer(str(d), eos_token="<bos>")


def test_hf_tokenizer_without_eos(tmp_path):
    d = _save_word_tokenizer(tmp_path / "tok")
    tok = tokenize.load_tokenizer(str(d))
    assert isinstance(tok, tokenize.HFTokenizer)
    assert (tok.eos_id, tok.pad_id) == (None, 0)


def test_hf_tokenizer_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        tokenize.HFTokenizer(str(tmp_path))
    assert str(info.value) == f"no tokenizer.json at {str(tmp_path)!r}"


def test_load_tokenizer_bytes():
    assert isinstance(tokenize.load_tokenizer("bytes"), tokenize.ByteTokenizer)


# ---------------------------------------------------------------------------------------------
# pack, load_text, bits_per_byte


def test_pack_exact_table_with_eos():
    # Stream: 1 2 3 E 4 5 E (E = 9): 6 targets -> two windows of 5 tokens, overlapping by one.
    tokens, mask = text.pack([[1, 2, 3], [4, 5]], seq_len=4, eos_id=9, pad_id=0)
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 9, 4], [4, 5, 9, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 0, 0]])
    assert tokens.dtype == np.int32 and mask.dtype == np.float32


def test_pack_without_eos_exact_fit_has_no_padding_window():
    # Stream 1..7: 6 targets fill exactly two windows of 3, so no extra window appears.
    tokens, mask = text.pack([[1, 2, 3], [4, 5, 6, 7]], seq_len=3, eos_id=None, pad_id=-1)
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 4], [4, 5, 6, 7]])
    np.testing.assert_array_equal(mask, np.ones((2, 3)))


def test_pack_masks_padding_by_position_when_pad_equals_eos():
    tokens, mask = text.pack([[5, 6]], seq_len=4, eos_id=7, pad_id=7)
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 7, 7]])
    # The first 7 is the document's real end token and stays a target.
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0]])


def test_pack_every_target_once():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, 100, size=n)) for n in (7, 1, 12, 3)]
    tokens, mask = text.pack(docs, seq_len=5, eos_id=100, pad_id=101)
    stream = [t for d in docs for t in [*d, 100]]
    targets = tokens[:, 1:][mask == 1]
    np.testing.assert_array_equal(targets, stream[1:])
    np.testing.assert_array_equal(tokens[:, 0], stream[0::5][: len(tokens)])


@pytest.mark.parametrize("docs, eos", [([], 1), ([[]], None), ([[3]], None)])
def test_pack_too_short_raises(docs, eos):
    with pytest.raises(ValueError, match=r"^no text to pack: "):
        text.pack(docs, seq_len=4, eos_id=eos, pad_id=0)


def test_load_text_fortune_bytes(tmp_path):
    _write(tmp_path / "f", "ab\n%\nc\n%\n")
    _write(tmp_path / "f.dat", "binary index")
    tokens, mask = text.load_text(
        str(tmp_path), tokenize.ByteTokenizer(), seq_len=3, record_separator="%"
    )
    e, p = 258, 256
    # Stream: a b E c E -> 4 targets -> windows [a b E c], [c E p p].
    np.testing.assert_array_equal(tokens, [[97, 98, e, 99], [99, e, p, p]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])


def test_bits_per_byte():
    assert text.bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    assert text.bits_per_byte(math.log(256) * 10, 10) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="num_bytes"):
        text.bits_per_byte(1.0, 0)
