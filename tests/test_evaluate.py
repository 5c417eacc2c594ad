"""Evaluators: metric arithmetic (by hand, and against pycocoevalcap), every example counted
exactly once under padding on 1 and 8 devices, and `python -m locca_jax.evaluate` end to end."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from locca_jax import tokenizer as tokenizer_lib
from locca_jax.evaluators import caption
from locca_jax.evaluators import rec
from locca_jax.evaluators import scoring

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = tokenizer_lib.EOS_ID
EVAL_IMAGES = 12  # max_examples: the first 12 validation images (~40 objects)
EVAL_BATCH = 8    # global eval batch: 12 images / ~40 objects -> the last batch is padded
METRIC_KEYS = {
    "rec": {"acc@0.5", "miou", "unparsable", "truncated", "num_examples"},
    "caption": {"cider", "bleu4", "rouge_l", "num_examples"},
    "gcap": {"cider", "bleu4", "rouge_l", "num_examples"},
    "perplexity": {"nll", "ppl", "num_examples"} | {f"{m}_{t}" for m in ("nll", "ppl", "tokens")
                                                    for t in ("cap", "aref", "gcap")},
    "zeroshot": {"acc", "acc_top5", "num_examples"},
    "dense": {"map", "ap50", "ap75", "predictions_per_image", "unparsable", "unknown_text",
              "num_examples", "num_regions"},
}


# ------------------------------------------------------------------------------ rec metrics
def test_rec_counts_iou_of_exactly_one_half_as_correct_and_an_unparsable_box_as_iou_0():
  # 4 bins: coordinates decode to the bin centres 0.125, 0.375, 0.625, 0.875 (exact in
  # binary), so every IoU below is exact. Text order: xmin ymin xmax ymax.
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.SHAPES_SP_MODEL, bins=4)
  pred = "0 0 1 3"  # yxyx [0.125, 0.125, 0.875, 0.375]: 0.75 high, 0.25 wide, area 0.1875
  cases = [  # (continuation text, ground truth yxyx, IoU by hand)
      (pred, [0.125, 0.125, 0.875, 0.375], 1.0),
      # Inside the prediction, half its area: IoU = 0.09375 / 0.1875 = 0.5 exactly.
      (pred, [0.125, 0.125, 0.5, 0.375], 0.5),
      # Sticks out by 0.025 in x: inter 0.09375, union 0.1875 + 0.103125 - 0.09375.
      (pred, [0.125, 0.125, 0.5, 0.4], 0.09375 / 0.196875),
      ("2 2 3 3", [0.0, 0.0, 0.5, 0.5], 0.0),  # parsable, disjoint
      ("the red circle", [0.125, 0.125, 0.875, 0.375], 0.0),  # not a box
  ]
  records = [dict(tokens=tok.encode(text) + [EOS, 0, 0], gt_box=gt) for text, gt, _ in cases]
  metrics, out = rec.score(tok, records)
  expected_iou = [c[2] for c in cases]
  np.testing.assert_allclose([r["iou"] for r in out], expected_iou, rtol=1e-12)
  assert out[1]["iou"] == 0.5  # the boundary case is exactly 0.5, and counts as correct
  assert metrics["acc@0.5"] == 2 / 5
  assert metrics["miou"] == pytest.approx(sum(expected_iou) / 5, rel=1e-12)
  assert metrics["unparsable"] == 1 / 5
  assert metrics["num_examples"] == 5 and metrics["truncated"] == 0
  assert out[4]["pred_box"] is None and out[0]["pred_box"] == [0.125, 0.125, 0.875, 0.375]
  assert out[0]["prediction"] == pred


# ------------------------------------------------------------------------------ caption metrics
def test_caption_tokens_lowercase_and_split_on_punctuation():
  assert (scoring.caption_tokens("A red-circle, LEFT of  the Star.")
          == "a red circle left of the star")
  assert scoring.caption_tokens("it's 2 squares!") == "it s 2 squares"
  assert scoring.caption_tokens(" ... ") == ""


def test_caption_scores_equal_pycocoevalcap_on_the_same_tokenized_inputs():
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top
  predictions = ["A red circle, and a blue square.", "Two GREEN stars", "",
                 "a yellow diamond on a gray background"]
  references = [["A red circle and a blue square!", "a blue square, a red circle"],
                ["two green stars on a white background", "Two stars."],
                ["a purple cross"],
                ["an image of a yellow diamond", "A yellow diamond on a gray background."]]
  # The same texts, tokenized by hand as documented (lowercase, punctuation dropped).
  res = {0: ["a red circle and a blue square"], 1: ["two green stars"], 2: [""],
         3: ["a yellow diamond on a gray background"]}
  gts = {0: ["a red circle and a blue square", "a blue square a red circle"],
         1: ["two green stars on a white background", "two stars"],
         2: ["a purple cross"],
         3: ["an image of a yellow diamond", "a yellow diamond on a gray background"]}
  records = [dict(prediction=p, references=r) for p, r in zip(predictions, references)]
  metrics, out = caption.score(records)
  cider, per_example = Cider().compute_score(gts, res)
  assert metrics["cider"] == pytest.approx(cider, rel=1e-12)
  np.testing.assert_allclose([r["cider"] for r in out], per_example, rtol=1e-12)
  assert metrics["bleu4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3],
                                           rel=1e-12)
  assert metrics["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
  assert metrics["num_examples"] == 4 and 0 < metrics["cider"] < 10


def test_captions_equal_to_their_only_reference_score_cider_10():
  # Identical tf-idf vectors have cosine 1 for every n-gram order (each caption has >= 4
  # words and some n-gram of each order that no other image has) and no length penalty:
  # CIDEr = 10 x mean over n of 1.
  refs = ["a small red circle", "two blue squares on a white background",
          "the left green star"]
  metrics, _ = scoring.caption_scores([r.upper() + "." for r in refs], [[r] for r in refs])
  assert metrics["cider"] == pytest.approx(10.0, rel=1e-9)
  assert metrics["bleu4"] == pytest.approx(1.0, rel=1e-6)
  assert metrics["rouge_l"] == pytest.approx(1.0, rel=1e-12)


# ------------------------------------------------------------------------------ config
def test_check_evals_accepts_the_runlocal_config_and_names_the_bad_field():
  from configs import locca_b16  # pylint: disable=g-import-not-at-top
  from locca_jax import evaluate, sharding  # pylint: disable=g-import-not-at-top
  from locca_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config = locca_b16.get_config("runlocal")
  mesh = sharding.make_mesh(config.mesh)
  tok = input_pipeline.make_tokenizer(config.input.tokenizer)
  assert sorted(evaluate.check_evals(config, tok, mesh)) == ["caption", "dense", "gcap",
                                                             "perplexity", "rec", "zeroshot"]
  assert evaluate.evals_due(config, config.total_steps, config.total_steps) == sorted(
      config.evals.keys())
  config.evals.rec.max_len = config.input.seq_len
  with pytest.raises(ValueError, match=r"config.evals.rec.max_len"):
    evaluate.check_evals(config, tok, mesh)
  config.evals.rec.max_len = 8
  config.evals.zeroshot.template = "{} shapes {}"
  with pytest.raises(ValueError, match=r"config.evals.zeroshot.template"):
    evaluate.check_evals(config, tok, mesh)
  config.evals.zeroshot.template = "{} shapes"
  config.evals.dense.num_samples = 0
  with pytest.raises(ValueError, match=r"config.evals.dense.num_samples=0"):
    evaluate.check_evals(config, tok, mesh)
  config.evals.dense.num_samples = 5
  config.evals.caption.type = "bleu"
  with pytest.raises(ValueError, match=r"config.evals.caption.type='bleu'"):
    evaluate.check_evals(config, tok, mesh)


# ------------------------------------------------------------------------------ prompts
def test_rec_and_gcap_prompts_are_how_the_training_rows_of_the_same_region_start(
    shapes_data_dir):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from locca_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from locca_jax.evaluators import common  # pylint: disable=g-import-not-at-top
  from locca_jax.evaluators import gcap  # pylint: disable=g-import-not-at-top
  config = tiny_config(shapes_data_dir, with_evals=True)
  tok = input_pipeline.make_tokenizer(config.input.tokenizer)
  data = dict(name="locca_shapes/tiny", split="validation", data_dir=shapes_data_dir)
  # Training rows (one sampled region per image and task), unpadded, in split order.
  (rows,) = input_pipeline.make_eval_dataset(
      config, tok, data=dict(data, split=f"validation[:{EVAL_IMAGES}]"),
      batch_size=EVAL_IMAGES).as_numpy_iterator()
  regions = {}
  for ex in common.examples(config, common.eval_data(config, "x", dict(data=data)),
                            per_object=True, limit=EVAL_IMAGES).as_numpy_iterator():
    regions.setdefault(int(ex["index"]), []).append(ex)
  assert sorted(regions) == list(range(EVAL_IMAGES))
  width = config.input.seq_len
  tasks = list(config.input.tasks)
  for i in range(EVAL_IMAGES):
    aref = [int(t) for t in rows["text"][i, tasks.index("aref")] if t]
    gcap_row = [int(t) for t in rows["text"][i, tasks.index("gcap")] if t]
    aref_matches = gcap_matches = 0
    for ex in regions[i]:
      refexp = ex["refexp"].decode()
      prompt, truncated = rec.prompt_ids(tok, config, refexp, width)
      assert not truncated
      # aref row = rec prompt + the region's box + eos; gcap row = gcap prompt + refexp + eos.
      aref_matches += aref == prompt + tok.encode_box(ex["box"]) + [EOS]
      gcap_matches += gcap_row == (gcap.prompt_ids(tok, config, ex["box"]) + tok.encode(refexp)
                                   + [EOS])
    assert aref_matches == 1 and gcap_matches == 1, (i, tok.decode(aref), tok.decode(gcap_row))


def test_max_examples_beyond_the_split_takes_the_whole_split(shapes_data_dir):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from locca_jax.evaluators import common  # pylint: disable=g-import-not-at-top
  config = tiny_config(shapes_data_dir, with_evals=True)
  data = dict(name="locca_shapes/tiny", split="validation", data_dir=shapes_data_dir)
  spec = common.eval_data(config, "x", dict(data=data))
  ds = common.examples(config, spec, per_object=False, limit=10_000)  # the split holds 32
  assert sorted(int(ex["index"]) for ex in ds.as_numpy_iterator()) == list(range(32))
  with pytest.raises(ValueError, match="plain split name"):
    common.examples(config, dict(spec, split="validation[:8]"), per_object=False, limit=4)


# ------------------------------------------------------------------------------ end to end
_CONFIG_FILE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from tests.conftest import tiny_config

    def get_config(arg=None):
      c = tiny_config({data_dir!r}, with_evals=True)
      for name in c.evals:
        c.evals[name].data = dict(name="locca_shapes/tiny", split="validation",
                                  data_dir={data_dir!r})
        c.evals[name].batch_size = {batch}
        c.evals[name].max_examples = {images}
      # One decoding length for caption and gcap: they share one compiled decoder.
      c.evals.caption.max_len = c.evals.gcap.max_len = 16
      c.evals.dense.num_samples = 2
      if arg == "mesh222":
        c.mesh = (("data", 2), ("fsdp", 2), ("tensor", 2))
      return c
""")

# 8 simulated CPU devices, mesh data=2 x fsdp=2 x tensor=2: params restored sharded. Also
# computes the perplexity reference: the training loss on ONE unpadded batch of exactly the
# evaluated images.
_DEVICES_WORKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {config_dir!r})
    import jax, jax.numpy as jnp
    import eval_config
    from locca_jax import evaluate, sharding, train_step
    from locca_jax.data import input_pipeline
    from locca_jax.models import decoder as decoder_lib, locca
    assert jax.device_count() == 8, jax.devices()
    config = eval_config.get_config("mesh222")
    mesh = sharding.make_mesh(config.mesh)
    tok = input_pipeline.make_tokenizer(config.input.tokenizer)
    model = locca.make_model(config.model, tok.vocab_size, config.input.seq_len)
    # Started while the checkpoint is being trained: wait for the test's go-ahead.
    deadline = time.monotonic() + 600
    while not os.path.exists({ready!r}) and time.monotonic() < deadline:
      time.sleep(0.2)
    if not os.path.exists({ready!r}):
      sys.exit("no checkpoint after 600 s")
    step, params = evaluate.restore_params(config, model, mesh, {workdir!r})
    assert any(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(params))
    metrics = evaluate.run_evals(config, params, model, tok, mesh, step, {out!r}, names={names!r})

    data = dict(config.evals.perplexity.data, split="validation[:{images}]")
    ds = input_pipeline.make_eval_dataset(config, tok, data=data, batch_size={images})
    (batch,) = list(ds.as_numpy_iterator())
    assert batch["mask_valid"].all()
    text = jnp.asarray(batch["text"])
    tokens, mask = decoder_lib.decoder_inputs(text, jnp.zeros(text.shape[:2], bool))
    logits = jax.jit(model.apply)({{"params": params}}, jnp.asarray(batch["image"]), tokens, mask)
    loss, ref = train_step.compute_loss(logits, text, jnp.asarray(batch["mask_loss"]),
                                        config.input.tasks)
    ref = {{k: float(v) for k, v in ref.items()}}
    for t, task in enumerate(config.input.tasks):
      ref[f"tokens_{{task}}"] = float(batch["mask_loss"][:, t].sum())
    print(json.dumps(dict(metrics=metrics, reference=ref)))
""")


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


@pytest.fixture(scope="module")
def trained(shapes_data_dir, tmp_path_factory):
  """A tiny_config workdir trained for 6 steps, its eval config file, and both eval runs: the
  CLI (1 device) and the 8-device worker (started first: it imports and builds while the
  checkpoint trains, then waits for the `ready` file)."""
  from locca_jax import train  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("evaluate")
  config_dir, workdir, out8, ready = (root / "config", root / "workdir", root / "out8",
                                      root / "ready")
  config_dir.mkdir()
  (config_dir / "eval_config.py").write_text(_CONFIG_FILE.format(
      repo=REPO, data_dir=shapes_data_dir, batch=EVAL_BATCH, images=EVAL_IMAGES))
  sys.path.insert(0, str(config_dir))
  try:
    import eval_config  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(config_dir))
  config = eval_config.get_config()
  names = ["caption", "dense", "gcap", "perplexity", "rec", "zeroshot"]
  # 8 devices: rec (per-region inputs, as gcap), perplexity (per-image rows) and zeroshot
  # (class rows against sharded visual tokens); the 1-device CLI run covers the per-image
  # captioning inputs. Fewer compiles keep the test short.
  names8 = [n for n in names if n in ("rec", "perplexity", "zeroshot")]
  worker = subprocess.Popen(
      [sys.executable, "-c", _DEVICES_WORKER.format(
          repo=REPO, config_dir=str(config_dir), workdir=str(workdir), out=str(out8),
          names=names8, images=EVAL_IMAGES, ready=str(ready))],
      cwd=REPO, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    train.train_and_evaluate(config, str(workdir))
  except BaseException:
    worker.kill()
    raise
  (root / "ready.tmp").write_text("ok")
  (root / "ready.tmp").rename(ready)  # atomic: the worker never reads a half-written file
  cli = subprocess.Popen(
      [sys.executable, "-m", "locca_jax.evaluate", f"--config={config_dir}/eval_config.py",
       f"--workdir={workdir}", f"--evals={','.join(names)}"],
      cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  runs = {}
  for key, proc in (("cli", cli), ("devices8", worker)):
    stdout, stderr = proc.communicate(timeout=600)
    runs[key] = dict(returncode=proc.returncode, stdout=stdout, stderr=stderr)
  return dict(config=config, workdir=workdir, out8=out8, names=names, runs=runs,
              data_dir=shapes_data_dir)


def _expected_examples(data_dir):
  """(image, object) keys of the first EVAL_IMAGES validation images, read straight from TFDS."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from locca_jax.data import locca_shapes  # pylint: disable=g-import-not-at-top
  builder = locca_shapes.prepare("tiny", data_dir)
  ds = builder.as_dataset(split=f"validation[:{EVAL_IMAGES}]", shuffle_files=False)
  return sorted((i, j) for i, ex in enumerate(tfds.as_numpy(ds))
                for j in range(len(ex["objects"]["bbox"])))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_evaluate_cli_prints_one_json_object_with_every_metric_and_writes_predictions(trained):
  run = trained["runs"]["cli"]
  assert run["returncode"] == 0, run["stderr"][-4000:]
  lines = run["stdout"].strip().splitlines()
  assert len(lines) == 1, run["stdout"]
  result = json.loads(lines[0])
  expected = {"step"} | {f"{n}/{k}" for n in trained["names"] for k in METRIC_KEYS[n]}
  assert set(result) == expected
  assert result["step"] == trained["config"].total_steps
  assert all(math.isfinite(v) for v in result.values())
  keys = _expected_examples(trained["data_dir"])
  assert result["rec/num_examples"] == result["gcap/num_examples"] == len(keys)
  assert result["caption/num_examples"] == result["perplexity/num_examples"] == EVAL_IMAGES
  assert 0 <= result["rec/acc@0.5"] <= 1 and 0 <= result["rec/miou"] <= 1
  for name, n in (("rec", len(keys)), ("gcap", len(keys)), ("caption", EVAL_IMAGES)):
    records = _read_jsonl(trained["workdir"] / "eval" / f"{name}_step{result['step']}.jsonl")
    assert len(records) == n, name
  rec_records = _read_jsonl(trained["workdir"] / "eval" / f"rec_step{result['step']}.jsonl")
  assert {"refexp", "gt_box", "pred_box", "prediction", "iou"} <= set(rec_records[0])


@pytest.mark.slow
def test_padded_eval_counts_every_example_once_on_1_and_on_8_devices(trained):
  cli, dev8 = trained["runs"]["cli"], trained["runs"]["devices8"]
  assert cli["returncode"] == 0, cli["stderr"][-4000:]
  assert dev8["returncode"] == 0, dev8["stderr"][-4000:]
  one = json.loads(cli["stdout"].strip().splitlines()[-1])
  eight = json.loads(dev8["stdout"].strip().splitlines()[-1])["metrics"]
  # Perplexity: the same token counts (so the same rows, none twice, no padding) and NLL.
  for task in ("cap", "aref", "gcap"):
    assert one[f"perplexity/tokens_{task}"] == eight[f"perplexity/tokens_{task}"] > 0
    assert one[f"perplexity/nll_{task}"] == pytest.approx(eight[f"perplexity/nll_{task}"],
                                                          rel=1e-5)
  assert one["perplexity/num_examples"] == eight["perplexity/num_examples"] == EVAL_IMAGES
  # Decoding: each (image, object) of the split exactly once, with the same predictions.
  keys = _expected_examples(trained["data_dir"])
  step = one["step"]
  runs = [_read_jsonl(d / f"rec_step{step}.jsonl")
          for d in (trained["workdir"] / "eval", trained["out8"] / "eval")]
  for records in runs:
    assert sorted((r["index"], r["object"]) for r in records) == keys
  assert one["rec/num_examples"] == eight["rec/num_examples"] == len(keys)
  agree = np.mean([a["prediction"] == b["prediction"] for a, b in zip(*runs)])
  assert agree >= 0.9, agree  # float reduction order (tensor parallel) may flip a near tie
  gcap_records = _read_jsonl(trained["workdir"] / "eval" / f"gcap_step{step}.jsonl")
  assert sorted((r["index"], r["object"]) for r in gcap_records) == keys
  captions = _read_jsonl(trained["workdir"] / "eval" / f"caption_step{step}.jsonl")
  assert [r["index"] for r in captions] == list(range(EVAL_IMAGES))
  # Zeroshot: every image once, the same class likelihoods on 1 and on 8 devices.
  zs = [_read_jsonl(d / f"zeroshot_step{step}.jsonl")
        for d in (trained["workdir"] / "eval", trained["out8"] / "eval")]
  for records in zs:
    assert [r["index"] for r in records] == list(range(EVAL_IMAGES))
  assert one["zeroshot/num_examples"] == eight["zeroshot/num_examples"] == EVAL_IMAGES
  np.testing.assert_allclose([r["label_score"] for r in zs[0]],
                             [r["label_score"] for r in zs[1]], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_perplexity_over_padded_batches_equals_the_training_loss_on_one_unpadded_batch(trained):
  cli, dev8 = trained["runs"]["cli"], trained["runs"]["devices8"]
  assert cli["returncode"] == 0, cli["stderr"][-4000:]
  assert dev8["returncode"] == 0, dev8["stderr"][-4000:]
  got = json.loads(cli["stdout"].strip().splitlines()[-1])
  ref = json.loads(dev8["stdout"].strip().splitlines()[-1])["reference"]
  for task in trained["config"].input.tasks:
    assert got[f"perplexity/nll_{task}"] == pytest.approx(ref[f"train/loss_{task}"], rel=1e-5)
    assert got[f"perplexity/ppl_{task}"] == pytest.approx(math.exp(ref[f"train/loss_{task}"]),
                                                          rel=1e-5)
    assert got[f"perplexity/tokens_{task}"] == ref[f"tokens_{task}"]
  assert got["perplexity/nll"] == pytest.approx(ref["train/loss"], rel=1e-5)
  assert got["perplexity/ppl"] == pytest.approx(math.exp(ref["train/loss"]), rel=1e-5)


@pytest.mark.slow
def test_trainer_runs_the_evaluators_at_the_last_step_into_metrics_jsonl(trained):
  records = _read_jsonl(trained["workdir"] / "metrics.jsonl")
  last = trained["config"].total_steps
  evals = [r for r in records if r["step"] == last and "rec/acc@0.5" in r]
  assert len(evals) == 1
  expected = {f"{n}/{k}" for n in trained["names"] for k in METRIC_KEYS[n]}
  assert expected <= set(evals[0])
  # The same checkpointed params: the standalone CLI reports the same perplexity.
  cli = json.loads(trained["runs"]["cli"]["stdout"].strip().splitlines()[-1])
  assert evals[0]["perplexity/nll"] == pytest.approx(cli["perplexity/nll"], rel=1e-5)


def test_perplexity_sums_in_pieces_equal_those_of_whole_logits():
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from locca_jax import sharding, train_step  # pylint: disable=g-import-not-at-top
  from locca_jax.evaluators import perplexity  # pylint: disable=g-import-not-at-top
  from locca_jax.models import locca  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir=None)
  mesh = sharding.make_mesh(config.mesh)
  model = locca.make_model(config.model, 50, config.input.seq_len)
  params = nn.unbox(model.init(jax.random.PRNGKey(0),
                               *train_step.dummy_inputs(32, 3, 48))["params"])
  rng = np.random.default_rng(0)
  params["txt"]["head"]["kernel"] = rng.normal(
      size=params["txt"]["head"]["kernel"].shape).astype(np.float32)
  batch = sharding.global_batch(dict(
      image=rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
      text=rng.integers(1, 50, (4, 3, 48)).astype(np.int32),
      mask_loss=(rng.uniform(size=(4, 3, 48)) > 0.3).astype(np.float32),
      mask_valid=np.array([1, 1, 1, 0], np.float32)), mesh)
  whole = jax.device_get(perplexity.nll_sums(model, mesh, params, batch, 0))
  pieces = jax.device_get(perplexity.nll_sums(model, mesh, params, batch, 12))
  for got, want in zip(pieces, whole):
    np.testing.assert_allclose(got, want, rtol=1e-5)
  assert whole[2] == 3  # the padding row does not count
