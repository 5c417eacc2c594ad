"""`zeroshot` evaluator: class-caption likelihoods against a float64 reference from the model's
own full forward pass, on the real `cifar10` TFDS builder (prepared offline from fake CIFAR
binary files) and on locca_shapes region counts; config errors name the field."""
import os
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locca_jax import sharding
from locca_jax.data import input_pipeline
from locca_jax.evaluators import common
from locca_jax.evaluators import zeroshot
from locca_jax.models import locca
from tests.conftest import tiny_config

CIFAR_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck")
NUM_IMAGES = 10


def _context(data_dir):
  """tiny_config (32 px) with a random model whose output head is drawn (not zero), so that
  the class captions get distinct likelihoods."""
  config = tiny_config(data_dir)
  tok = input_pipeline.make_tokenizer(config.input.tokenizer)
  model = locca.make_model(config.model, tok.vocab_size, config.input.seq_len)
  seq = config.input.seq_len
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                   jnp.zeros((1, 1, seq), jnp.int32),
                                   jnp.ones((1, 1, seq, seq), bool))["params"])
  rng = np.random.default_rng(0)

  def draw(path, shape):
    x = 0.1 * rng.normal(size=shape.shape)
    return (1.0 + x if path[-1].key == "scale" else x).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(draw, shapes)
  params["txt"]["head"]["kernel"] = rng.normal(
      size=params["txt"]["head"]["kernel"].shape).astype(np.float32)
  return common.Context(config=config, model=model, params=params, tokenizer=tok,
                        mesh=sharding.make_mesh(config.mesh))


def _reference_scores(ctx, images, texts):
  """float64 [N, C]: sum of log p(token) over `cap: <text> <eos>` after the prefix, from the
  full training-path forward (one row per call, all seq_len positions, causal mask by hand)
  and a numpy log-softmax."""
  tok, seq = ctx.tokenizer, ctx.config.input.seq_len
  head = tok.encode("cap:")
  apply = jax.jit(ctx.model.apply)
  out = np.zeros((len(images), len(texts)))
  for c, text in enumerate(texts):
    target = head + tok.encode(text) + [tok.eos_id]
    row = np.zeros(seq, np.int32)
    row[:len(target)] = target
    inputs = np.concatenate([[0], row[:-1]])  # BOS (= pad id 0), then the targets shifted
    tokens = np.broadcast_to(inputs, (len(images), 1, seq))
    mask = np.broadcast_to(np.tril(np.ones((seq, seq), bool)), (len(images), 1, seq, seq))
    logits = np.asarray(apply({"params": ctx.params}, images, tokens, mask), np.float64)[:, 0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    positions = np.arange(len(head), len(target))
    out[:, c] = logp[:, positions, row[positions]].sum(-1)
  return out


def _write_cifar_binaries(root, images, labels):
  """The files of cifar-10-binary.tar.gz: records of 1 label byte + 3072 bytes (R, G, B
  planes), and batches.meta.txt with the class names."""
  d = os.path.join(root, "cifar-10-batches-bin")
  os.makedirs(d)
  def write(name, imgs, labs):
    with open(os.path.join(d, name), "wb") as f:
      for img, lab in zip(imgs, labs):
        f.write(bytes([int(lab)]) + np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes())
  for i in range(1, 6):
    write(f"data_batch_{i}.bin", images[:1], [0])
  write("test_batch.bin", images, labels)
  with open(os.path.join(d, "batches.meta.txt"), "w") as f:
    f.write("\n".join(CIFAR_NAMES) + "\n")


def test_zeroshot_on_cifar10_scores_every_class_as_the_full_forward_pass_and_counts_accuracy(
    tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ctx = _context(str(tmp_path / "unused"))
  images = np.random.default_rng(1).integers(0, 256, (NUM_IMAGES, 32, 32, 3), dtype=np.uint8)
  model_input = images.astype(np.float32) / 127.5 - 1.0  # 32 px: the resize keeps the pixels
  texts = [f"a photo of a {n}" for n in CIFAR_NAMES]
  ref = _reference_scores(ctx, model_input, texts)
  rank = np.argsort(-ref, axis=1)
  gaps = -np.diff(np.sort(ref, axis=1)[:, ::-1], axis=1)
  assert gaps.min() > 1e-3, gaps.min()  # no near ties: float32 vs float64 cannot flip a rank
  # Labels chosen from the reference: images 0-5 the best class (top-1 hit), 6-7 the second
  # best (top-5 hit only), 8-9 the worst (miss): acc = 6/10, acc_top5 = 8/10.
  labels = np.concatenate([rank[:6, 0], rank[6:8, 1], rank[8:, -1]])
  fake = tmp_path / "download"
  _write_cifar_binaries(str(fake), images, labels)
  data_dir = str(tmp_path / "tfds")
  # The real cifar10 builder, fed the fake download (as TFDS's own builder tests do).
  with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                         return_value=str(fake)):
    tfds.builder("cifar10", data_dir=data_dir).download_and_prepare()

  cfg = dict(type="zeroshot", data=dict(name="cifar10", split="test", data_dir=data_dir),
             batch_size=4, template="a photo of a {}", class_chunk=4)  # 10 = 4 + 4 + 2 (+2 pad)
  metrics, records = zeroshot.evaluate(ctx, "zs", cfg)
  assert metrics == dict(acc=0.6, acc_top5=0.8, num_examples=NUM_IMAGES)
  # TFDS stores the split in its own order: match records to images by the CIFAR record id.
  split = list(tfds.as_numpy(tfds.builder("cifar10", data_dir=data_dir).as_dataset(
      split="test", shuffle_files=False)))
  assert [r["index"] for r in records] == list(range(NUM_IMAGES))
  for r, ex in zip(records, split):
    j = int(ex["id"].decode().removeprefix("test_"))
    np.testing.assert_array_equal(ex["image"], images[j])
    assert r["label"] == labels[j] and r["label_name"] == CIFAR_NAMES[labels[j]]
    assert r["top5"] == list(rank[j, :5])
    np.testing.assert_allclose(r["top5_scores"], ref[j, rank[j, :5]], rtol=1e-4, atol=1e-4)
    assert r["label_score"] == pytest.approx(ref[j, labels[j]], rel=1e-4, abs=1e-4)
    assert r["correct"] == (j < 6)


def test_zeroshot_num_objects_labels_are_the_region_counts_of_locca_shapes(shapes_data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from locca_jax.data import locca_shapes  # pylint: disable=g-import-not-at-top
  ctx = _context(shapes_data_dir)
  words = ("zero", "one", "two", "three", "four", "five")
  cfg = dict(type="zeroshot", data=dict(name="locca_shapes/tiny", split="validation"),
             batch_size=8, max_examples=12, label_key="num_objects", template="{} shapes",
             class_names=words)
  metrics, records = zeroshot.evaluate(ctx, "zs", cfg)
  ds = locca_shapes.prepare("tiny", shapes_data_dir).as_dataset(split="validation[:12]",
                                                                 shuffle_files=False)
  counts = [len(ex["objects"]["bbox"]) for ex in tfds.as_numpy(ds)]
  assert [r["label"] for r in records] == counts and 2 <= min(counts) <= max(counts) <= 5
  assert [r["label_name"] for r in records] == [words[n] for n in counts]
  assert metrics["num_examples"] == 12
  assert metrics["acc"] == np.mean([r["top5"][0] == n for r, n in zip(records, counts)])
  assert metrics["acc_top5"] == np.mean([n in r["top5"] for r, n in zip(records, counts)])


def test_class_rows_are_cap_rows_with_loss_on_the_text_and_eos():
  config = tiny_config(None)
  tok = input_pipeline.make_tokenizer(config.input.tokenizer)
  rows, weights = zeroshot.class_rows(tok, config, ["two shapes", "a star"], "x")
  head = tok.encode("cap:")
  first, second = head + tok.encode("two shapes") + [1], head + tok.encode("a star") + [1]
  width = max(len(first), len(second))
  assert rows.tolist() == [first + [0] * (width - len(first)),
                           second + [0] * (width - len(second))]
  assert weights.tolist() == [[0.0] * len(head) + [1.0] * (len(first) - len(head))
                              + [0.0] * (width - len(first)),
                              [0.0] * len(head) + [1.0] * (len(second) - len(head))
                              + [0.0] * (width - len(second))]


@pytest.mark.parametrize("field, value, match", [
    ("template", "a photo", r"config.evals.zs.template='a photo'"),
    ("template", "{} and {}", r"exactly one"),
    ("class_names", ["cat", "cat"], r"config.evals.zs.class_names: expected distinct"),
    ("class_chunk", 0, r"config.evals.zs.class_chunk=0"),
    ("label_key", "", r"config.evals.zs.label_key=''"),
])
def test_zeroshot_options_name_the_bad_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    zeroshot.options("zs", {field: value})


def test_num_objects_needs_class_names_and_a_missing_label_feature_is_named(shapes_data_dir):
  with pytest.raises(ValueError, match=r"config.evals.zs.class_names: required"):
    zeroshot.options("zs", dict(label_key="num_objects"))
  config = tiny_config(shapes_data_dir)
  spec = common.eval_data(config, "zs", dict(
      data=dict(name="locca_shapes/tiny", split="validation")))
  with pytest.raises(ValueError, match=r"config.evals.zs.label_key='label'.*ClassLabel"):
    zeroshot.labelled_examples(config, "zs", spec, "label", None)
