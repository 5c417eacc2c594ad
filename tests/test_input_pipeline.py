"""Input pipeline: batch layout, determinism, per-process disjointness, exact resume, eval padding."""
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from locca_jax.data import input_pipeline
from locca_jax.data import iterator_checkpoint
from locca_jax.data import locca_shapes

TINY_TRAIN, TINY_VALIDATION = 96, 32


def _config(data_dir, **overrides):
  c = ml_collections.ConfigDict(dict(
      seed=0,
      input=dict(
          data=dict(name="locca_shapes/tiny", split="train", data_dir=data_dir),
          batch_size=8, image_size=32, resize="squash", seq_len=48,
          tasks=("cap", "aref", "gcap"),
          prefixes=dict(cap="cap:", aref="aref:", gcap="gcap:"),
          loss=dict(cap=dict(prefix=False, caption=True),
                    aref=dict(prefix=False, caption=True, box=True),
                    gcap=dict(prefix=False, box=True, caption=True)),
          shuffle_buffer=64,
          tokenizer=dict(sp_model="locca_jax/assets/locca_shapes_sp.model", box_codec="text",
                         bins=500, box_order="xmin ymin xmax ymax"))))
  for k, v in overrides.items():
    c.input[k] = v
  return c


@pytest.fixture(scope="module")
def tok():
  return input_pipeline.make_tokenizer(_config(None).input.tokenizer)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_batches_have_the_documented_shapes_and_dtypes(shapes_data_dir, tok):
  it = input_pipeline.make_train_iterator(_config(shapes_data_dir), tok, process_index=0,
                                          process_count=1)
  batch = next(it)
  assert set(batch) == {"image", "text", "mask_loss"}
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["text"].shape == (8, 3, 48) and batch["text"].dtype == np.int32
  assert batch["mask_loss"].shape == (8, 3, 48) and batch["mask_loss"].dtype == np.float32
  assert batch["image"].max() > batch["image"].min()   # pixels, not a constant
  rows = [tok.decode(r) for r in batch["text"][0]]
  assert rows[0].startswith("cap: ") and rows[1].startswith("aref: ")
  assert rows[2].startswith("gcap: ")
  assert tok.parse_box(rows[1].split(" : ")[1]) is not None


def test_same_seed_same_batches_other_seed_other_batches(shapes_data_dir, tok):
  make = lambda c: input_pipeline.make_train_iterator(c, tok, process_index=0, process_count=1)
  config = _config(shapes_data_dir)
  first = _take(make(config), 4)
  _assert_same(first, _take(make(config), 4))
  other = _config(shapes_data_dir)
  other.seed = 1
  assert not np.array_equal(first[0]["text"], next(make(other))["text"])


def test_processes_read_disjoint_parts_that_cover_the_split(shapes_data_dir, tok):
  config = _config(shapes_data_dir, shuffle_buffer=0)   # In file order: one epoch = 12 batches.
  ids = []
  for p in range(2):
    it = input_pipeline.make_train_iterator(config, tok, process_index=p, process_count=2,
                                            extra_fields=("image/id",))
    batches = _take(it, TINY_TRAIN // 2 // 4)
    assert all(b["image"].shape[0] == 4 for b in batches)  # 8 global = 4 per process.
    ids.append(np.concatenate([b["image/id"] for b in batches]))
  assert len(set(ids[0])) == len(ids[0]) == TINY_TRAIN // 2
  assert not set(ids[0]) & set(ids[1])
  assert set(ids[0]) | set(ids[1]) == set(range(TINY_TRAIN))


def test_batch_size_not_divisible_by_process_count_is_an_error(shapes_data_dir, tok):
  with pytest.raises(ValueError, match="batch_size=8 is not divisible by process_count=3"):
    input_pipeline.make_train_iterator(_config(shapes_data_dir), tok, process_index=0,
                                       process_count=3)


def test_unknown_split_is_an_error(shapes_data_dir, tok):
  config = _config(shapes_data_dir)
  config.input.data.split = "trian"
  with pytest.raises(ValueError, match="'trian' not in locca_shapes"):
    input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)


def test_map_function_has_no_stateful_randomness(shapes_data_dir, tok):
  # Symbolic checkpointing recomputes in-flight elements on restore: only pure functions of
  # (stream position, example) give the same elements again.
  config = _config(shapes_data_dir)
  raw = input_pipeline._read(input_pipeline.get_builder(config.input.data), "train")
  fn = input_pipeline._process_fn(config, tok, process_index=0)
  graph = tf.function(fn).get_concrete_function(
      tf.TensorSpec([], tf.int64), raw.element_spec).graph
  stateful = {op.type for op in graph.get_operations() if op.op_def.is_stateful}
  assert stateful <= {"SentencepieceTokenizeOp", "CheckNumerics"}
  assert any(op.type.startswith("StatelessRandom") for op in graph.get_operations())


def test_restored_iterator_continues_the_identical_batches(shapes_data_dir, tok, tmp_path):
  config = _config(shapes_data_dir)
  make = lambda: input_pipeline.make_train_iterator(config, tok, process_index=0,
                                                    process_count=1)
  it = make()
  _take(it, 3)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(3, args=ocp.args.Composite(
      state=ocp.args.StandardSave(dict(step=np.array(3, np.int32))),
      data=iterator_checkpoint.IteratorSave(it)))
  expected = _take(it, 2)     # Taken while the save may still be finishing.
  mngr.wait_until_finished()
  files = sorted(p.name for p in (tmp_path / "ckpt" / "3" / "data").iterdir())
  assert "process_0_of_1.index" in files
  assert any(f.startswith("process_0_of_1.data-") for f in files)

  fresh = make()
  assert not np.array_equal(next(fresh)["text"], expected[0]["text"])  # Moved; not there yet.
  restored = ocp.CheckpointManager(tmp_path / "ckpt").restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(dict(step=np.array(0, np.int32))),
      data=iterator_checkpoint.IteratorRestore(fresh)))
  assert int(restored["state"]["step"]) == 3
  assert restored["data"] is fresh
  _assert_same(_take(fresh, 2), expected)


def test_restoring_with_another_process_count_is_an_error(shapes_data_dir, tok, tmp_path):
  config = _config(shapes_data_dir)
  it = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
  next(it)
  handler = iterator_checkpoint.IteratorCheckpointHandler()
  handler.save(tmp_path, args=iterator_checkpoint.IteratorSave(it))
  other = input_pipeline.InputIterator(it.dataset, process_index=0, process_count=2)
  with pytest.raises(FileNotFoundError, match="process 0 of 2.*process_0_of_1.index"):
    handler.restore(tmp_path, args=iterator_checkpoint.IteratorRestore(other))


@pytest.mark.parametrize("process_count,batch_size", [(2, 12), (3, 12)])
def test_eval_counts_every_example_exactly_once(shapes_data_dir, tok, process_count,
                                                batch_size):
  config = _config(shapes_data_dir)
  seen, num_batches = [], set()
  for p in range(process_count):
    ds = input_pipeline.make_eval_dataset(
        config, tok, split="validation", batch_size=batch_size, process_index=p,
        process_count=process_count, extra_fields=("image/id",))
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == int(ds.cardinality())
    num_batches.add(len(batches))
    for b in batches:
      assert b["image"].shape[0] == batch_size // process_count
      valid = b["mask_valid"] == 1.0
      assert set(np.unique(b["mask_valid"])) <= {0.0, 1.0}
      np.testing.assert_array_equal(b["text"][~valid], 0)
      np.testing.assert_array_equal(b["mask_loss"][~valid], 0.0)
      seen += b["image/id"][valid].tolist()
  assert len(num_batches) == 1   # Every process runs the same number of eval steps.
  offset = locca_shapes.ID_OFFSETS["validation"]
  assert sorted(seen) == list(range(offset, offset + TINY_VALIDATION))


def test_eval_is_deterministic(shapes_data_dir, tok):
  config = _config(shapes_data_dir)
  ds = input_pipeline.make_eval_dataset(config, tok, split="validation", process_index=0,
                                        process_count=1)
  _assert_same(list(ds.as_numpy_iterator()), list(ds.as_numpy_iterator()))


def test_make_tokenizer_finds_the_packaged_model_from_any_cwd(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  tok = input_pipeline.make_tokenizer(
      dict(sp_model="locca_jax/assets/locca_shapes_sp.model", box_codec="text", bins=500))
  assert tok.decode(tok.encode("the red circle")) == "the red circle"


def test_block_shuffle_yields_every_example_once_per_epoch_and_resumes_exactly(
    shapes_data_dir, tok, tmp_path):
  config = _config(shapes_data_dir, shuffle_buffer=48, shuffle_block=8)
  make = lambda: input_pipeline.make_train_iterator(config, tok, process_index=0,
                                                    process_count=1, extra_fields=("image/id",))
  it = make()
  ids = np.concatenate([b["image/id"] for b in _take(it, 4 * TINY_TRAIN // 8)])  # 4 epochs
  # The stream repeats before it is shuffled, so epochs blur only at their edges: over 4 epochs
  # every example comes 4 times, give or take one, and nothing is lost.
  counts = np.bincount(ids, minlength=TINY_TRAIN)
  assert counts.sum() == 4 * TINY_TRAIN and set(counts) <= {3, 4, 5}, counts
  epoch = ids[:TINY_TRAIN]
  assert epoch.tolist() != list(range(TINY_TRAIN))
  # Examples move between blocks, not only whole blocks: some batch mixes examples from
  # different blocks of 8 consecutive ids.
  assert any(len(set(b // 8)) > 1 for b in epoch.reshape(-1, 8))
  unblocked = _config(shapes_data_dir, shuffle_buffer=48)
  other = input_pipeline.make_train_iterator(unblocked, tok, process_index=0, process_count=1,
                                             extra_fields=("image/id",))
  assert not np.array_equal(next(other)["image/id"], epoch[:8])

  # Exact resume in the middle of the second epoch.
  it = make()
  _take(it, 15)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(15, args=ocp.args.Composite(data=iterator_checkpoint.IteratorSave(it)))
  mngr.wait_until_finished()
  expected = _take(it, 3)
  fresh = make()
  ocp.CheckpointManager(tmp_path / "ckpt").restore(15, args=ocp.args.Composite(
      data=iterator_checkpoint.IteratorRestore(fresh)))
  _assert_same(_take(fresh, 3), expected)


def test_block_shuffle_needs_a_buffer_of_two_blocks(shapes_data_dir, tok):
  config = _config(shapes_data_dir, shuffle_buffer=12, shuffle_block=8)
  with pytest.raises(ValueError, match="shuffle_block=8 needs shuffle_buffer >= 16"):
    input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
