"""Tokenizer: SentencePiece in graph == in Python, box codecs, parsing, the shipped vocabulary."""
import itertools
import os

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from locca_jax import tokenizer as toklib

ORDERS = ("xmin ymin xmax ymax", "ymin xmin ymax xmax")
BINS = 500
# A box whose quantized coordinates are, by hand, ymin=40 xmin=12 ymax=310 xmax=200 at 500 bins
# (bin centres: (q + 0.5) / 500).
BOX = np.array([40.5, 12.5, 310.5, 200.5]) / 500


@pytest.fixture(scope="module")
def sp_model():
  return toklib.SHAPES_SP_MODEL


@pytest.fixture(scope="module")
def tokenizers(sp_model):
  return {(codec, order): toklib.Tokenizer(sp_model, box_codec=codec, bins=BINS, box_order=order)
          for codec, order in itertools.product(toklib.BOX_CODECS, ORDERS)}


def _random_boxes(n, seed=0):
  """Random boxes plus edge values: 0, 1, exact bin edges, just below an edge."""
  rng = np.random.default_rng(seed)
  b = rng.uniform(size=(n, 4)).astype(np.float32)
  edges = np.array([[0, 0, 1, 1], [0.5, 0.25, 0.75, 0.999999],
                    [12 / 500, 40 / 500, 200 / 500, 310 / 500],
                    [np.nextafter(np.float32(0.2), 0), 0.002, 0.998, 1 - 1e-7]], np.float32)
  return np.concatenate([edges, b])


def _ragged_rows(r):
  return [list(row) for row in r.to_list()]


# --------------------------------------------------------------------------- shipped vocabulary
def test_shipped_model_has_t5_ids(sp_model):
  with open(sp_model, "rb") as f:
    sp = spm.SentencePieceProcessor(model_proto=f.read())
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  tok = toklib.Tokenizer(sp_model)
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert tok.sp_vocab_size == tok.vocab_size == sp.get_piece_size()
  assert 200 <= tok.sp_vocab_size <= 1024


def test_shipped_model_encodes_generator_text_without_unk_in_few_pieces(tokenizers):
  from locca_jax.data import locca_shapes  # pylint: disable=g-import-not-at-top
  tok = tokenizers["text", ORDERS[0]]
  rng = np.random.default_rng(123)   # not the seed the vocabulary was built from
  texts = []
  for _ in range(50):
    ex = locca_shapes.generate_example(rng, 64)
    texts += list(ex["captions"])
    texts += [o["refexp"] for o in ex["objects"]] + [o["name"] for o in ex["objects"]]
  assert texts
  for text in texts:
    ids = tok.encode(text)
    assert ids and tok.unk_id not in ids, text
    assert tok.decode(ids) == " ".join(text.split())
    for word in text.split():
      assert len(tok.encode(word)) <= 2, word


def test_shipped_model_writes_numbers_in_few_pieces(tokenizers):
  tok = tokenizers["text", ORDERS[0]]
  lengths = [len(tok.encode(str(n))) for n in range(1000)]
  assert max(lengths) <= 2
  assert max(lengths[:BINS]) == 1   # at the default 500 bins a box is 4 tokens
  assert tok.unk_id not in tok.encode(" ".join(str(n) for n in range(1000)))
  for prefix in ("cap:", "aref:", "gcap:", ":"):
    ids = tok.encode(prefix)
    assert len(ids) <= 2 and tok.unk_id not in ids and tok.decode(ids) == prefix


# --------------------------------------------------------------------------- graph == Python
def test_in_graph_tokenize_equals_python_encode(tokenizers):
  tok = tokenizers["text", ORDERS[0]]
  strings = ["cap: a small red circle", "aref: the blue square : 12 40 200 310", "",
             "Unusual Words, punctuation!? 0.5", "  extra   spaces  "]
  got = _ragged_rows(tok.tokenize(tf.constant(strings)))
  assert got == [tok.encode(s) for s in strings]
  assert tok.tokenize(tf.constant(strings[0])).numpy().tolist() == tok.encode(strings[0])

  ds = tf.data.Dataset.from_tensor_slices(strings).map(tok.tokenize)
  assert [x.numpy().tolist() for x in ds] == [tok.encode(s) for s in strings]


@pytest.mark.parametrize("codec,order", list(itertools.product(toklib.BOX_CODECS, ORDERS)))
def test_box_in_graph_equals_python(tokenizers, codec, order):
  tok = tokenizers[codec, order]
  b = _random_boxes(300)
  texts = [t.decode() for t in tok.box_to_text(tf.constant(b)).numpy()]
  assert texts == [tok.format_box(x) for x in b]
  assert _ragged_rows(tok.box_to_tokens(tf.constant(b))) == [tok.encode_box(x) for x in b]
  # Inside tf.data, one box [4] at a time -> dense [L].
  ds = tf.data.Dataset.from_tensor_slices(b[:20]).map(tok.box_to_tokens)
  assert [x.numpy().tolist() for x in ds] == [tok.encode_box(x) for x in b[:20]]


def test_box_text_is_the_quantized_integers_in_the_written_order(tokenizers):
  assert tokenizers["text", "xmin ymin xmax ymax"].format_box(BOX) == "12 40 200 310"
  assert tokenizers["text", "ymin xmin ymax xmax"].format_box(BOX) == "40 12 310 200"
  tok = tokenizers["text", ORDERS[0]]
  assert tok.encode_box(BOX) == tok.encode("12 40 200 310")
  assert tok.decode(tok.encode_box(BOX)) == "12 40 200 310"
  # Clipped to [0, bins - 1]: floor(1.0 * 500) = 500 -> 499.
  assert tok.format_box([0.0, 0.0, 1.0, 1.0]) == "0 0 499 499"
  # Independent arithmetic over many boxes: floor(v * bins) in float32, xmin ymin xmax ymax.
  b = _random_boxes(200, seed=3)
  q = np.clip(np.floor(b * np.float32(BINS)), 0, BINS - 1).astype(int)
  assert [tok.format_box(x) for x in b] == [" ".join(map(str, r[[1, 0, 3, 2]])) for r in q]


def test_loc_codec_ids_are_sp_vocab_size_plus_q(tokenizers):
  tok = tokenizers["loc", "xmin ymin xmax ymax"]
  assert tok.vocab_size == tok.sp_vocab_size + BINS
  n = tok.sp_vocab_size
  assert tok.encode_box(BOX) == [n + 12, n + 40, n + 200, n + 310]
  assert tok.box_to_tokens(tf.constant(BOX, tf.float32)).numpy().tolist() == [
      n + 12, n + 40, n + 200, n + 310]
  assert tok.decode([n + 12, n + 40, n + 200, n + 310]) == "<loc12><loc40><loc200><loc310>"
  text = tok.encode("aref: the red circle :")
  assert (tok.decode(text + tok.encode_box(BOX) + [tok.eos_id, n + 7]) ==
          "aref: the red circle : <loc12><loc40><loc200><loc310>")
  assert tokenizers["loc", "ymin xmin ymax xmax"].encode_box(BOX) == [n + 40, n + 12, n + 310,
                                                                      n + 200]
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([n + BINS])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tokenizers["text", ORDERS[0]].decode([n])


def test_decode_stops_at_eos_and_drops_pad(tokenizers):
  tok = tokenizers["text", ORDERS[0]]
  ids = tok.encode("a red circle")
  assert tok.decode([0] + ids[:1] + [0] + ids[1:] + [1] + tok.encode("junk") + [0, 0]) == (
      "a red circle")
  assert tok.decode(np.array([1, 5, 6])) == ""
  assert tok.decode([]) == ""
  with pytest.raises(ValueError, match="1-D"):
    tok.decode(np.array([[5, 6], [7, 1]]))


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("codec,order", list(itertools.product(toklib.BOX_CODECS, ORDERS)))
def test_parse_box_of_decoded_box_is_within_half_a_bin(tokenizers, codec, order):
  tok = tokenizers[codec, order]
  b = np.random.default_rng(1).uniform(size=(300, 4))
  for x in b:
    ids = tok.encode_box(x)
    for parsed in (tok.parse_box(tok.decode(ids)), tok.parse_box(ids + [tok.eos_id, 9]),
                   tok.parse_box(" : " + tok.decode(ids) + " : a red circle")):
      assert parsed is not None
      assert np.abs(parsed - x).max() <= 0.5 / BINS + 1e-6   # boxes quantized in float32


def test_parse_box_returns_yxyx_bin_centres(tokenizers):
  np.testing.assert_allclose(tokenizers["text", "xmin ymin xmax ymax"].parse_box("12 40 200 310"),
                             BOX)
  np.testing.assert_allclose(tokenizers["text", "ymin xmin ymax xmax"].parse_box("40 12 310 200"),
                             BOX)
  np.testing.assert_allclose(
      tokenizers["loc", ORDERS[0]].parse_box("<loc12> <loc40><loc200><loc310>"), BOX)


def test_parse_box_of_garbage_is_none(tokenizers):
  text, loc = tokenizers["text", ORDERS[0]], tokenizers["loc", ORDERS[0]]
  for garbage in ("", "the red circle", "12 40 200", "12 40 foo 200 310", "12 40 200 500",
                  "12 40 200 310.5", "-12 40 200 310", "the red circle : 12 40 200 310",
                  "<loc12><loc40><loc200><loc310>"):
    assert text.parse_box(garbage) is None, garbage
  assert text.parse_box(text.encode("12 40 200")) is None
  assert text.parse_box([text.sp_vocab_size + 5] * 4) is None   # not in this vocabulary
  for garbage in ("12 40 200 310", "<loc12><loc40><loc200>", "<loc12><loc40><loc200><loc500>",
                  "<loc12> x <loc40><loc200><loc310>"):
    assert loc.parse_box(garbage) is None, garbage
  n = loc.sp_vocab_size
  assert loc.parse_box([n + 1, n + 2, n + 3, loc.eos_id, n + 4]) is None


# --------------------------------------------------------------------------- errors
def test_errors_name_what_was_expected(sp_model, tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    toklib.Tokenizer(os.path.join(tmp_path, "missing.model"))
  with pytest.raises(ValueError, match="box_codec"):
    toklib.Tokenizer(sp_model, box_codec="digits")
  with pytest.raises(ValueError, match="permutation"):
    toklib.Tokenizer(sp_model, box_order="x y x y")
  with pytest.raises(ValueError, match="bins"):
    toklib.Tokenizer(sp_model, bins=0)
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    toklib.Tokenizer(str(bad))
  tok = toklib.Tokenizer(sp_model)
  with pytest.raises(ValueError, match="box"):
    tok.encode_box([0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="boxes"):
    tok.box_to_tokens(tf.zeros([2, 3]))


def test_model_with_other_special_ids_is_rejected(tmp_path):
  # sentencepiece defaults: unk=0, bos=1, eos=2 (not the T5 convention).
  prefix = str(tmp_path / "default_ids")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g"] * 10),
                                 model_prefix=prefix, vocab_size=12, minloglevel=2)
  with pytest.raises(ValueError, match=r"\(pad, eos, unk, bos\)"):
    toklib.Tokenizer(prefix + ".model")


def test_build_vocab_is_deterministic(tmp_path):
  from locca_jax.data import build_vocab  # pylint: disable=g-import-not-at-top
  lines = build_vocab.corpus(num_examples=100)
  assert lines == build_vocab.corpus(num_examples=100)
  assert "aref:" in " ".join(lines) and "gcap:" in " ".join(lines)
  assert build_vocab.train(lines, 400) == build_vocab.train(list(lines), 400)
  out = tmp_path / "v.model"
  build_vocab.main([f"--out={out}", "--num_examples=100", "--vocab_size=400"])
  assert out.read_bytes() == build_vocab.train(lines, 400)
  tok = toklib.Tokenizer(str(out))
  assert tok.sp_vocab_size == 400 and (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
