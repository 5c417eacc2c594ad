"""LocCa-B/16 pretraining (Wan et al. 2024): Cap + ARef + GCap from one encoder pass per image.

Run:   python -m locca_jax.train --config=configs/locca_b16.py --workdir=W
Tiny CPU variant on the built-in locca_shapes dataset (a few minutes on 2 cores):
       python -m locca_jax.train --config=configs/locca_b16.py:runlocal --workdir=W
Any field can be overridden: --config.total_steps=1000 --config.input.batch_size=64
"""
import ml_collections

TASKS = ("cap", "aref", "gcap")


def get_config(arg=None):
  runlocal = arg == "runlocal"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 600 if runlocal else 366_500  # paper: ~3B examples at batch 8192

  c.input = ml_collections.ConfigDict()
  if runlocal:
    c.input.data = dict(name="locca_shapes/base", split="train", data_dir=None)
  else:
    # WebLI-like image-text data with pseudo-boxes; point at your own TFDS dataset.
    c.input.data = dict(name="locca_shapes/base", split="train", data_dir=None)
  c.input.batch_size = 32 if runlocal else 8192
  c.input.image_size = 64 if runlocal else 224
  c.input.resize = "squash"
  c.input.seq_len = 48 if runlocal else 64
  c.input.tasks = TASKS
  c.input.prefixes = dict(cap="cap:", aref="aref:", gcap="gcap:")
  # Which parts of each task sequence carry loss (the paper's ablation switches).
  c.input.loss = dict(cap=dict(prefix=False, caption=True),
                      aref=dict(prefix=False, caption=True, box=True),
                      gcap=dict(prefix=False, box=True, caption=True))
  c.input.shuffle_buffer = 2_000 if runlocal else 50_000
  # Shuffle 50k examples in blocks of 64 (input_pipeline._shuffle): a per-example shuffle
  # of that size caps the input at ~280 images/s per process (docs/PERFORMANCE.md).
  c.input.shuffle_block = 1 if runlocal else 64
  c.input.tokenizer = dict(
      sp_model="locca_jax/assets/locca_shapes_sp.model" if runlocal else "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model",
      box_codec="text", bins=500, box_order="xmin ymin xmax ymax")

  c.model = ml_collections.ConfigDict()
  if runlocal:
    # Fixed sincos2d positions and a random output head: on the box-readout toys both cut
    # the steps before boxes are learned several-fold (docs/experiments/README.md, 3-4).
    c.model.encoder = dict(variant="Ti/8", width=128, depth=4, mlp_dim=512, num_heads=4,
                           posemb="sincos2d")
    c.model.decoder = dict(num_layers=2, width=None, mlp_dim=None, num_heads=None,
                           use_bias=True, head_zeroinit=False)
  else:
    c.model.encoder = dict(variant="B/16", width=None, depth=None, mlp_dim=None,
                           num_heads=None, posemb="learn")
    # Decoder of the encoder's width (width/mlp_dim/num_heads None = take the encoder's).
    c.model.decoder = dict(num_layers=6, width=None, mlp_dim=None, num_heads=None,
                           use_bias=True, head_zeroinit=True)
  c.model.parallel_fraction = 0.0  # CapPa-style parallel prediction on this fraction of Cap rows
  c.model.dtype = "float32" if runlocal else "bfloat16"  # compute; params stay float32
  c.model.scan = not runlocal
  c.model.remat_policy = "none" if runlocal else "nothing_saveable"
  # jax.nn.dot_product_attention backend: "auto" = cuDNN flash attention on GPU where it
  # applies (bf16, head dim % 8 == 0, <= 128), XLA otherwise; or "xla" / "cudnn".
  c.model.attention = "auto"

  # Cross-entropy over pieces of this many text positions, never the whole [B, T, L, V]
  # float32 logits (train_step.chunked_token_nll); 0: whole logits (small vocabularies).
  c.xent_chunk = 0 if runlocal else 16

  # runlocal too: at 3e-3 the box readout learns ~3x slower (docs/experiments/README.md, 9).
  c.lr = 1e-3
  c.wd = 1e-4
  c.grad_clip_norm = 1.0
  c.schedule = dict(warmup_steps=50 if runlocal else 10_000, decay_type="cosine")
  c.optax = dict(beta2_cap=0.999, momentum=0.9, dtype_momentum="bfloat16",
                 clipping_threshold=None)

  # (data, fsdp, tensor); -1 takes all remaining devices.
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))

  c.log_every = 10 if runlocal else 100
  # Dispatched train steps that may still be running (train.StepsInFlight): bounds the
  # device memory held by queued batches; the host prepares the next batch meanwhile.
  c.steps_in_flight = 2
  c.ckpt_every = 200 if runlocal else 1000
  c.keep_ckpts = 2

  # Evaluators: python -m locca_jax.evaluate --config=... --workdir=W (the trainer runs each
  # every log_steps). Any TFDS dataset with locca_shapes' features works (e.g. a RefCOCO /
  # COCO-Captions conversion); max_len = decoded tokens (prompt width = seq_len - max_len).
  val = dict(name="locca_shapes/base", split="validation")
  every = 600 if runlocal else 10_000
  eval_batch = 32 if runlocal else 1024
  eval_images = 300 if runlocal else None  # None: the whole split
  c.evals = ml_collections.ConfigDict()
  c.evals.rec = dict(type="rec", data=val, batch_size=eval_batch, max_examples=eval_images,
                     log_steps=every, max_len=8)
  c.evals.caption = dict(type="caption", data=val, batch_size=eval_batch, max_examples=eval_images,
                         log_steps=every, max_len=32)
  c.evals.gcap = dict(type="gcap", data=val, batch_size=eval_batch, max_examples=eval_images,
                      log_steps=every, max_len=24)
  c.evals.perplexity = dict(type="perplexity", data=val, batch_size=eval_batch,
                            max_examples=eval_images, log_steps=every // 3)
  # Zero-shot counting (locca_shapes has no per-image label): class = number of shapes (2-5),
  # scored as the caption "cap: <n> shapes <eos>" (see locca_jax/evaluators/zeroshot.py).
  c.evals.zeroshot = dict(type="zeroshot", data=val, batch_size=eval_batch,
                          max_examples=100 if runlocal else None, log_steps=every,
                          label_key="num_objects", template="{} shapes",
                          class_names=("zero", "one", "two", "three", "four", "five"))
  # Dense captioning: sampled `aref:` (region text, box) pairs, COCO mAP, exact text match.
  c.evals.dense = dict(type="dense", data=val, batch_size=eval_batch,
                       max_examples=100 if runlocal else None, log_steps=every, max_len=32,
                       num_samples=5 if runlocal else 8)
  return c
