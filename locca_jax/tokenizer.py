"""SentencePiece tokenizer plus the box <-> tokens codec, in graph (tf.data) and in Python.

TensorFlow is imported here on purpose: the tokenizer and the data pipeline are the only
modules allowed to depend on it (the models, trainer and decoding are JAX only).

Ids follow T5 / C4 SentencePiece models: pad=0, eos=1, unk=2, no bos. The model file is read
with `tf.io.gfile`, so local paths and gs:// both work; the same bytes feed
`tensorflow_text.SentencepieceTokenizer` (in graph, inside `tf.data.Dataset.map`) and the
`sentencepiece` package (Python-side `encode` / `decode`), so both sides agree by construction.

Boxes (internal convention, see `locca_jax.boxes`: normalized [ymin, xmin, ymax, xmax]) are
quantized to `q = clip(floor(v * bins), 0, bins - 1)` (in float32, identically in graph and in
Python), reordered to `box_order` (default "xmin ymin xmax ymax"), and written with one of two
codecs:
  box_codec="text": the integers as text, "12 40 200 310", then SentencePiece-tokenized (so a
    box is a few ordinary tokens; the model vocabulary is the SentencePiece one).
  box_codec="loc": one dedicated token per coordinate, `<loc{q}>` with id
    `sp_vocab_size + q`; the model vocabulary is `sp_vocab_size + bins`.
Decoding a box returns the bin centres `(q + 0.5) / bins`: the round trip is within half a bin.

Usage:
  tok = Tokenizer(SHAPES_SP_MODEL)                     # the small vocabulary shipped here
  ds.map(lambda ex: {"caption": tok.tokenize(ex["caption"]),       # [L] int32
                     "box": tok.box_to_tokens(ex["bbox"])})        # [4] -> [Lb] int32
  tok.encode("a red circle"), tok.decode(ids), tok.parse_box("12 40 200 310")
"""
import os
import re

import numpy as np
import sentencepiece as spm
import tensorflow as tf
import tensorflow_text as tf_text

from locca_jax import boxes as boxlib

SHAPES_SP_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                               "locca_shapes_sp.model")
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
BOX_CODECS = ("text", "loc")

_TEXT_BOX_RE = re.compile(r"\s*(?::\s*)?(\d+)\s+(\d+)\s+(\d+)\s+(\d+)(?=\s|:|$)")
_LOC_BOX_RE = re.compile(r"\s*(?::\s*)?<loc(\d+)>\s*<loc(\d+)>\s*<loc(\d+)>\s*<loc(\d+)>")


def _read_model(path):
  if not tf.io.gfile.exists(path):
    raise ValueError(f"sp_model: SentencePiece model file {path!r} does not exist (expected "
                     "a .model file, e.g. tokenizer.SHAPES_SP_MODEL; build one with "
                     "`python -m locca_jax.data.build_vocab`)")
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


class Tokenizer:
  """SentencePiece + box codec. See the module docstring for the conventions.

  Attributes (read-only properties):
    pad_id, eos_id, unk_id: 0, 1, 2.
    sp_vocab_size: size of the SentencePiece vocabulary.
    vocab_size: size of the model's vocabulary: sp_vocab_size (+ bins with box_codec="loc").
    bins, box_codec, box_order.
  """

  def __init__(self, sp_model: str, box_codec: str = "text", bins: int = 500,
               box_order: str = boxlib.DEFAULT_ORDER):
    if box_codec not in BOX_CODECS:
      raise ValueError(f"box_codec: expected one of {BOX_CODECS}, got {box_codec!r}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
      raise ValueError(f"bins: expected a positive integer, got {bins!r}")
    self._order_idx = boxlib.order_indices(box_order)   # validates box_order
    self._box_codec = box_codec
    self._bins = int(bins)
    self._box_order = " ".join(boxlib.COORDS[i] for i in self._order_idx)
    self._path = sp_model

    model = _read_model(sp_model)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model)
    except RuntimeError as e:
      raise ValueError(f"sp_model: {sp_model!r} is not a SentencePiece model ({e})") from e
    got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
    if got != (PAD_ID, EOS_ID, UNK_ID, -1):
      raise ValueError(f"sp_model: {sp_model!r} has (pad, eos, unk, bos) ids {got}, expected "
                       f"({PAD_ID}, {EOS_ID}, {UNK_ID}, -1) as in T5 / C4 models")
    self._tf_sp = tf_text.SentencepieceTokenizer(model=model, out_type=tf.int32)

  def __repr__(self):
    return (f"Tokenizer({self._path!r}, box_codec={self._box_codec!r}, bins={self._bins}, "
            f"box_order={self._box_order!r})")

  # ---------------------------------------------------------------------------- properties
  @property
  def pad_id(self):
    return PAD_ID

  @property
  def eos_id(self):
    return EOS_ID

  @property
  def unk_id(self):
    return UNK_ID

  @property
  def sp_vocab_size(self):
    return self._sp.get_piece_size()

  @property
  def vocab_size(self):
    return self.sp_vocab_size + (self._bins if self._box_codec == "loc" else 0)

  @property
  def bins(self):
    return self._bins

  @property
  def box_codec(self):
    return self._box_codec

  @property
  def box_order(self):
    return self._box_order

  # ---------------------------------------------------------------------------- in graph
  def tokenize(self, strings):
    """Text -> ids, no eos. tf string [] -> int32 [L]; [N] -> RaggedTensor int32 [N, None]."""
    return self._tf_sp.tokenize(strings)

  def _tf_quantize(self, boxes):
    """float [..., 4] yxyx -> int32 [..., 4] in box_order (the graph twin of _np_quantize)."""
    boxes = tf.convert_to_tensor(boxes)
    if boxes.shape.rank is not None and (boxes.shape.rank not in (1, 2)
                                         or boxes.shape[-1] not in (None, 4)):
      raise ValueError(f"boxes: expected shape [4] or [N, 4] (normalized ymin, xmin, ymax, "
                       f"xmax), got shape {boxes.shape}")
    # No tf.debugging.check_numerics: it is stateful and breaks tf.data's symbolic
    # checkpointing; non-finite boxes are dropped upstream (preprocess.clip_and_filter_boxes).
    boxes = tf.cast(boxes, tf.float32)
    q = tf.clip_by_value(tf.floor(boxes * tf.constant(self._bins, tf.float32)), 0.0,
                         self._bins - 1.0)
    return tf.gather(tf.cast(q, tf.int32), list(self._order_idx), axis=-1)

  def box_to_text(self, boxes):
    """float [N, 4] (or [4]) yxyx -> tf string [N] (or []), as `format_box` writes it.

    text codec: "12 40 200 310"; loc codec: "<loc12><loc40><loc200><loc310>" (for display /
    comparison only: `tokenize` of that string does NOT give loc ids, use `box_to_tokens`).
    """
    q = tf.strings.as_string(self._tf_quantize(boxes))
    if self._box_codec == "loc":
      return tf.strings.reduce_join("<loc" + q + ">", axis=-1)
    return tf.strings.reduce_join(q, axis=-1, separator=" ")

  def box_to_tokens(self, boxes):
    """float [N, 4] yxyx -> RaggedTensor int32 [N, None] ([4] -> int32 [L]); no eos.

    text codec: the SentencePiece ids of `box_to_text`; loc codec: `sp_vocab_size + q`
    (exactly 4 per box).
    """
    if self._box_codec == "loc":
      ids = self._tf_quantize(boxes) + self.sp_vocab_size
      return ids if ids.shape.rank == 1 else tf.RaggedTensor.from_tensor(ids)
    return self.tokenize(self.box_to_text(boxes))

  # ---------------------------------------------------------------------------- Python
  def encode(self, text: str) -> list[int]:
    """Text -> SentencePiece ids (no eos)."""
    if not isinstance(text, str):
      raise ValueError(f"text: expected a str, got {type(text).__name__} {text!r}")
    return list(self._sp.encode(text, out_type=int))

  def _np_quantize(self, box):
    b = np.asarray(box, dtype=np.float32)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
      raise ValueError(f"box: expected 4 finite numbers [ymin, xmin, ymax, xmax] in [0, 1], "
                       f"got {np.asarray(box).tolist()}")
    return boxlib.reorder(boxlib.quantize(b, self._bins), self._box_order)

  def format_box(self, box) -> str:
    """One yxyx box [4] -> its text: "12 40 200 310" (text) / "<loc12>...<loc310>" (loc)."""
    q = self._np_quantize(box)
    if self._box_codec == "loc":
      return "".join(f"<loc{int(v)}>" for v in q)
    return " ".join(str(int(v)) for v in q)

  def encode_box(self, box) -> list[int]:
    """One yxyx box [4] -> ids (no eos): SentencePiece ids of its text, or 4 loc ids."""
    if self._box_codec == "loc":
      return [self.sp_vocab_size + int(v) for v in self._np_quantize(box)]
    return self.encode(self.format_box(box))

  def decode(self, ids) -> str:
    """Ids -> text. Stops at the first eos, drops pad, renders loc ids as `<loc{q}>`.

    Loc tokens are written back to back ("<loc12><loc40>"), separated from text by a space.
    """
    arr = np.asarray(ids)
    if arr.ndim > 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
      raise ValueError(f"ids: expected a 1-D sequence of integer ids, got shape {arr.shape} "
                       f"dtype {arr.dtype}")
    ids = [int(i) for i in arr.reshape(-1)]
    if EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    ids = [i for i in ids if i != PAD_ID]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids: {bad[:5]} outside the vocabulary [0, {self.vocab_size}) "
                       f"(box_codec={self._box_codec!r}, bins={self._bins})")
    parts, run, run_is_loc = [], [], None
    def flush():
      if run:
        parts.append("".join(f"<loc{i - self.sp_vocab_size}>" for i in run) if run_is_loc
                     else self._sp.decode(run))
    for i in ids:
      is_loc = i >= self.sp_vocab_size
      if is_loc != run_is_loc:
        flush()
        run, run_is_loc = [], is_loc
      run.append(i)
    flush()
    return " ".join(p for p in parts if p)

  def parse_box(self, ids_or_text):
    """Reads a box: ids (decoded first) or text -> np.float64 [4] yxyx, or None.

    Expects, after optional whitespace and an optional ":" separator, the first 4 coordinates
    in `box_order` written by this codec ("12 40 200 310" / "<loc12><loc40><loc200><loc310>");
    anything after them is ignored. Returns the bin centres, or None when the text does not
    start with 4 coordinates or one is outside [0, bins).
    """
    if isinstance(ids_or_text, str):
      text = ids_or_text
    else:
      try:
        text = self.decode(ids_or_text)
      except ValueError:
        return None
    m = (_LOC_BOX_RE if self._box_codec == "loc" else _TEXT_BOX_RE).match(text)
    if m is None:
      return None
    q = np.array([int(g) for g in m.groups()], np.int64)
    if np.any(q >= self._bins):
      return None
    return boxlib.reorder_inverse(boxlib.dequantize(q, self._bins), self._box_order)
