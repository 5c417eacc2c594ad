"""Task sequences: exact row contents, loss masks on exactly the flagged parts, sampling."""
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from locca_jax import tokenizer as tokenizer_lib
from locca_jax.data import locca_shapes
from locca_jax.data import preprocess
from locca_jax.data import tasks

PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.Tokenizer(tokenizer_lib.SHAPES_SP_MODEL)


@pytest.fixture(scope="module")
def tiny_builder(shapes_data_dir):
  return locca_shapes.prepare("tiny", shapes_data_dir)


def _config(tasks_=("cap", "aref", "gcap"), seq_len=48, loss=None, prefixes=None):
  c = dict(tasks=tasks_, seq_len=seq_len)
  if loss is not None:
    c["loss"] = loss
  if prefixes is not None:
    c["prefixes"] = prefixes
  return ml_collections.ConfigDict(c)


# A box with dyadic coordinates: floor(v * 500) is exact arithmetic.
# yxyx (0.125, 0.25, 0.5, 0.75) -> xmin ymin xmax ymax = 125, 62, 375, 250.
BOX = [0.125, 0.25, 0.5, 0.75]
BOX_TEXT = "125 62 375 250"


def _example(captions=("a red circle on a white background",), boxes=(BOX,),
             refexps=("the red circle",)):
  return dict(captions=tf.constant(list(captions), tf.string),
              boxes=tf.reshape(tf.constant(list(boxes), tf.float32), [-1, 4]),
              refexps=tf.constant(list(refexps), tf.string))


def _rows(tok, config, example=None, seed=(0, 0)):
  out = tasks.make_task_sequences(example or _example(), tok, config, tf.constant(seed))
  return {k: v.numpy() for k, v in out.items()}


def test_rows_decode_to_the_task_strings(tok):
  out = _rows(tok, _config())
  assert out["text"].shape == (3, 48) and out["text"].dtype == np.int32
  assert out["mask_loss"].shape == (3, 48) and out["mask_loss"].dtype == np.float32
  decoded = [tok.decode(r) for r in out["text"]]
  assert decoded == [
      "cap: a red circle on a white background",
      f"aref: the red circle : {BOX_TEXT}",
      f"gcap: {BOX_TEXT} : the red circle",
  ]
  assert out["truncated"].tolist() == [0, 0, 0]


def _pieces(tok, task, caption):
  """(part, ids) of a row, from the Python tokenizer: an independent reference."""
  prefix = tok.encode(f"{task}:")
  box = tok.encode(BOX_TEXT)
  sep = tok.encode(":")
  text = tok.encode(caption)
  if task == "cap":
    return [("prefix", prefix), ("caption", text), ("eos", [EOS])]
  if task == "aref":
    return [("prefix", prefix), ("caption", text), ("sep", sep), ("box", box), ("eos", [EOS])]
  return [("prefix", prefix), ("box", box), ("sep", sep), ("caption", text), ("eos", [EOS])]


CAPTION = {"cap": "a red circle on a white background", "aref": "the red circle",
           "gcap": "the red circle"}
# For each flag: which parts carry it (sep takes the part before it, eos the last part).
CARRIERS = {
    "cap": {"prefix": {"prefix"}, "caption": {"caption", "eos"}},
    "aref": {"prefix": {"prefix"}, "caption": {"caption", "sep"}, "box": {"box", "eos"}},
    "gcap": {"prefix": {"prefix"}, "box": {"box", "sep"}, "caption": {"caption", "eos"}},
}


def _expected(tok, task, flags, seq_len=48):
  ids, mask = [], []
  carriers = CARRIERS[task]
  for part, piece in _pieces(tok, task, CAPTION[task]):
    on = any(flags[f] for f, parts in carriers.items() if part in parts)
    ids += piece
    mask += [1.0 if on else 0.0] * len(piece)
  pad = seq_len - len(ids)
  return np.array(ids + [PAD] * pad), np.array(mask + [0.0] * pad)


@pytest.mark.parametrize("task", ["cap", "aref", "gcap"])
def test_default_mask_is_one_on_target_and_zero_on_prefix_and_padding(task, tok):
  out = _rows(tok, _config(tasks_=(task,)))
  flags = {f: f != "prefix" for f in CARRIERS[task]}
  ids, mask = _expected(tok, task, flags)
  np.testing.assert_array_equal(out["text"][0], ids)
  np.testing.assert_array_equal(out["mask_loss"][0], mask)
  # Spelled out for aref: [aref :] [the red circle] [:] [125 62 375 250] [eos] pad...
  if task == "aref":
    n = [len(tok.encode("aref:")), len(tok.encode("the red circle")), len(tok.encode(":")),
         len(tok.encode(BOX_TEXT)), 1]
    assert mask.tolist() == [0.0] * n[0] + [1.0] * sum(n[1:]) + [0.0] * (48 - sum(n))


@pytest.mark.parametrize("task,flag", [(t, f) for t in CARRIERS for f in CARRIERS[t]])
def test_switching_one_loss_flag_flips_exactly_its_positions(task, flag, tok):
  default = {f: f != "prefix" for f in CARRIERS[task]}
  switched = dict(default, **{flag: not default[flag]})
  base = _rows(tok, _config(tasks_=(task,), loss={task: default}))["mask_loss"][0]
  out = _rows(tok, _config(tasks_=(task,), loss={task: switched}))["mask_loss"][0]
  _, expected = _expected(tok, task, switched)
  np.testing.assert_array_equal(out, expected)
  # The flipped positions are exactly the tokens of the parts that carry the flag.
  positions, start = [], 0
  for part, piece in _pieces(tok, task, CAPTION[task]):
    if part in CARRIERS[task][flag]:
      positions += list(range(start, start + len(piece)))
    start += len(piece)
  assert np.flatnonzero(out != base).tolist() == positions


def test_unknown_loss_part_and_unknown_task_are_errors(tok):
  with pytest.raises(ValueError, match="config.input.loss.cap"):
    _rows(tok, _config(tasks_=("cap",), loss=dict(cap=dict(box=True))))
  with pytest.raises(ValueError, match="unknown task 'vqa'"):
    _rows(tok, _config(tasks_=("cap", "vqa")))


def test_rows_follow_the_configured_task_order_and_prefixes(tok):
  out = _rows(tok, _config(tasks_=("gcap", "cap"), prefixes=dict(cap="caption:")))
  assert [tok.decode(r) for r in out["text"]] == [
      f"gcap: {BOX_TEXT} : the red circle", "caption: a red circle on a white background"]


def test_image_without_objects_gives_empty_aref_and_gcap_rows(tok):
  out = _rows(tok, _config(), _example(boxes=(), refexps=()))
  assert tok.decode(out["text"][0]) == "cap: a red circle on a white background"
  np.testing.assert_array_equal(out["text"][1:], PAD)
  np.testing.assert_array_equal(out["mask_loss"][1:], 0.0)


def test_truncated_rows_are_cut_without_eos_and_counted(tok):
  out = _rows(tok, _config(seq_len=6))
  full = [sum(len(p) for _, p in _pieces(tok, t, CAPTION[t])) for t in ("cap", "aref", "gcap")]
  assert all(n > 6 for n in full)
  assert out["truncated"].tolist() == [1, 1, 1]
  assert out["text"].shape == (3, 6)
  assert not np.any(out["text"] == EOS) and not np.any(out["text"] == PAD)
  ids, _ = _expected(tok, "aref", {"prefix": False, "caption": True, "box": True}, seq_len=48)
  np.testing.assert_array_equal(out["text"][1], ids[:6])


def test_loc_codec_writes_four_location_tokens(tok):
  loc = tokenizer_lib.Tokenizer(tokenizer_lib.SHAPES_SP_MODEL, box_codec="loc")
  out = _rows(loc, _config(tasks_=("gcap",)))
  v = loc.sp_vocab_size
  n_prefix = len(loc.encode("gcap:"))
  assert out["text"][0, n_prefix:n_prefix + 4].tolist() == [v + 125, v + 62, v + 375, v + 250]
  assert loc.decode(out["text"][0]) == "gcap: <loc125><loc62><loc375><loc250> : the red circle"


def test_sampling_is_a_function_of_the_seed_and_aref_gcap_sample_independently(tok):
  boxes = [[0.1 * i, 0.1 * i, 0.1 * i + 0.05, 0.1 * i + 0.05] for i in range(5)]
  ex = _example(captions=[f"caption {i}" for i in range(3)], boxes=boxes,
                refexps=[f"the red circle {i}" for i in range(5)])
  config = _config()
  a = _rows(tok, config, ex, seed=(7, 11))
  b = _rows(tok, config, ex, seed=(7, 11))
  np.testing.assert_array_equal(a["text"], b["text"])
  picks = set()
  for s in range(40):
    rows = [tok.decode(r) for r in _rows(tok, config, ex, seed=(s, 3))["text"]]
    cap = rows[0].split()[-1]
    aref = rows[1].split(" : ")[0].split()[-1]
    gcap = rows[2].split()[-1]
    picks.add((cap, aref, gcap))
  caps, arefs, gcaps = (set(p[i] for p in picks) for i in range(3))
  assert caps == {"0", "1", "2"} and arefs == gcaps == {str(i) for i in range(5)}
  assert any(p[1] != p[2] for p in picks)  # aref and gcap do not share their draw.


def test_aref_and_gcap_boxes_are_the_dataset_boxes_of_the_named_object(tok, tiny_builder):
  config = _config()
  ds = tiny_builder.as_dataset(split="train", shuffle_files=False).take(32)
  checked = 0
  for i, example in enumerate(ds):
    ex = preprocess.preprocess_example(example, image_size=64, resize="squash")
    rows = [tok.decode(r) for r in _rows(tok, config, ex, seed=(1, i))["text"]]
    truth = {r.decode(): b for r, b in zip(example["objects"]["refexp"].numpy(),
                                          example["objects"]["bbox"].numpy())}
    assert rows[1].startswith("aref: ") and rows[2].startswith("gcap: ")
    refexp, box_text = rows[1][len("aref: "):].split(" : ")
    assert box_text == tok.format_box(truth[refexp])
    box_text, refexp = rows[2][len("gcap: "):].split(" : ")
    assert box_text == tok.format_box(truth[refexp])
    caption = rows[0][len("cap: "):]
    assert caption in [c.decode() for c in example["captions"].numpy()]
    checked += 1
  assert checked == 32


def test_locca_shapes_fits_seq_len_48_without_truncation(tok):
  # Lengths from the Python tokenizer over freshly generated scenes (longest row of each).
  rng = np.random.default_rng(123)
  longest = 0
  for _ in range(300):
    ex = locca_shapes.generate_example(rng)
    for c in ex["captions"]:
      longest = max(longest, len(tok.encode("cap:")) + len(tok.encode(c)) + 1)
    for o in ex["objects"]:
      longest = max(longest, len(tok.encode("aref:")) + len(tok.encode(o["refexp"]))
                    + len(tok.encode(":")) + len(tok.encode(tok.format_box(o["bbox"]))) + 1)
  assert longest <= 48
