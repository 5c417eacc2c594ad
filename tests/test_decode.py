"""Decoding: KV cache vs the full decoder, beam search, sampling, constrained boxes.

Tiny models with random parameters; the output head (zero-initialized for training) is drawn at
random so that the logits carry a preference. The expected values come from the training-path
forward pass driven by plain Python loops, from enumeration, or from arithmetic.
Every distinct shape / method is one XLA compilation: the tests share a few on purpose.
"""
import functools
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locca_jax import boxes as boxlib
from locca_jax import decode as decode_lib
from locca_jax.models import decoder as decoder_lib
from locca_jax.models import locca
from tests.conftest import tiny_config

EOS = 1
WIDTH, NEW = 6, 8  # prompt width Lp, new tokens N (decoder max_len 16 >= Lp + N)
PROMPTS = np.array([[5, 6, 7, 8, 9, 0],
                    [9, 0, 0, 0, 0, 0],
                    [0, 0, 0, 0, 0, 0],
                    [3, 4, 5, 0, 0, 0]], np.int32)
PROMPT_LENS = np.array([5, 1, 0, 3], np.int32)


@functools.lru_cache(maxsize=None)
def _model(vocab: int, scan: bool = False, max_len: int = 16):
  config = tiny_config(data_dir=None)
  config.model.scan = scan
  # Several layers: each has its own cache (stacked with scan). The other vocabularies serve
  # tests about search and constraints, where one layer compiles faster.
  config.model.decoder.num_layers = 2 if vocab == 40 else 1
  return locca.make_model(config.model, vocab_size=vocab, max_len=max_len)


@functools.lru_cache(maxsize=None)
def _param_shapes(vocab: int, max_len: int = 16):
  """The no-scan parameter tree as ShapeDtypeStructs (traced, not compiled: compiling the
  initializers costs more than everything else here)."""
  model = _model(vocab, False, max_len)
  return nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                 jnp.zeros((1, 1, max_len), jnp.int32),
                                 jnp.ones((1, 1, max_len, max_len), bool))["params"])


def _stack_layers(tree):
  """No-scan parameters -> the scan layout: layer_0, layer_1, ... stacked into `layers`."""
  if not isinstance(tree, dict):
    return tree
  layers = sorted((k for k in tree if re.fullmatch(r"layer_\d+", k)), key=lambda k: int(k[6:]))
  out = {k: _stack_layers(v) for k, v in tree.items() if k not in layers}
  if layers:
    out["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[tree[k] for k in layers])
  return out


def _params(vocab, seed, *, max_len=16, head_scale=0.5, bias=None):
  """Random no-scan parameters: N(0, 0.1) everywhere (LayerNorm scales 1 + that), and an
  output head with kernel N(0, head_scale) and bias N(0, 0.5) + `bias`."""
  rng = np.random.default_rng(seed)
  def draw(path, shape):
    x = 0.1 * rng.normal(size=shape.shape)
    return (1.0 + x if path[-1].key == "scale" else x).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(draw, _param_shapes(vocab, max_len))
  head = params["txt"]["head"]
  head["kernel"] = (head_scale * rng.normal(size=head["kernel"].shape)).astype(np.float32)
  head["bias"] = (0.5 * rng.normal(size=head["bias"].shape)
                  + (0.0 if bias is None else np.asarray(bias))).astype(np.float32)
  return params


def _images(batch, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, 32, 32, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _forward(vocab, max_len=16):
  """The training-path model (no scan): logits [B, T, L, V] for teacher-forcing inputs."""
  model = _model(vocab, False, max_len)
  return jax.jit(lambda p, images, tokens, mask: model.apply({"params": p}, images, tokens,
                                                             mask))


def _causal_inputs(seqs):
  """[B, T, L] sequences -> the decoder's inputs: BOS + seqs[..., :-1], causal mask."""
  seqs = np.asarray(seqs)
  tokens = np.concatenate([np.full(seqs.shape[:-1] + (1,), decoder_lib.BOS_ID), seqs[..., :-1]],
                          -1)
  mask = np.broadcast_to(np.tril(np.ones((seqs.shape[-1],) * 2, bool)),
                         seqs.shape + seqs.shape[-1:])
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


def _reference_greedy(vocab, params, images, prompts, prompt_lens, max_len, eos_id):
  """Python loop: re-run the full model on the sequence so far, feed the prompt token while
  inside the prompt, else the argmax; stop at eos or after max_len new tokens."""
  b, width = prompts.shape
  s = width + max_len
  seqs = np.zeros((b, s), np.int64)
  new = np.zeros(b, int)
  done = np.zeros(b, bool)
  for i in range(s):
    tokens, mask = _causal_inputs(seqs[:, None])
    logits = np.asarray(_forward(vocab)(params, images, tokens, mask))[:, 0, i]
    for row in range(b):
      if i < prompt_lens[row]:
        seqs[row, i] = prompts[row, i]
      elif not done[row]:
        seqs[row, i] = np.argmax(logits[row])
        new[row] += 1
        done[row] = seqs[row, i] == eos_id or new[row] == max_len
  return np.stack([seqs[row, prompt_lens[row]:prompt_lens[row] + max_len] for row in range(b)])


def _greedy(model, params, images, **kw):
  return decode_lib.decode(model, params, images, PROMPTS, PROMPT_LENS, max_len=NEW,
                           eos_id=EOS, **kw)


# ------------------------------------------------------------------------------- cache = rerun
@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_equals_rerunning_the_full_decoder_with_argmax(scan):
  # The reference is the no-scan training path; the scan model gets the same weights stacked.
  vocab = 40
  model, images = _model(vocab, scan), _images(4)
  eos_bias = np.zeros(vocab)
  eos_bias[EOS] = 2.0  # some rows stop early: exercises eos and the pad after it
  stopped = 0
  for seed, bias in [(1, None), (2, eos_bias), (3, eos_bias)]:
    params = _params(vocab, seed, bias=bias)
    got = _greedy(model, _stack_layers(params) if scan else params, images)
    want = _reference_greedy(vocab, params, images, PROMPTS, PROMPT_LENS, NEW, EOS)
    np.testing.assert_array_equal(got, want)
    stopped += int((got == EOS).any(1).sum())
  assert 0 < stopped < 12  # both ways of ending were covered


def test_beam_search_with_cache_equals_beam_search_rerunning_the_full_decoder():
  # The cache of every beam must follow its hypothesis when beams are reordered.
  vocab = 40
  model, images = _model(vocab), _images(4)
  eos_bias = np.zeros(vocab)
  eos_bias[EOS] = 2.0
  params = _params(vocab, 4, bias=eos_bias)
  kw = dict(max_len=NEW, eos_id=EOS, method="beam", beam_size=3)
  np.testing.assert_array_equal(
      decode_lib.decode(model, params, images, PROMPTS, PROMPT_LENS, **kw),
      decode_lib.decode_without_cache(model, params, images, PROMPTS, PROMPT_LENS, **kw))


def test_beam_size_1_equals_greedy():
  vocab = 40
  model, images = _model(vocab), _images(4)
  eos_bias = np.zeros(vocab)
  eos_bias[EOS] = 2.0
  for seed, bias in [(5, None), (6, eos_bias), (7, eos_bias)]:
    params = _params(vocab, seed, bias=bias)
    np.testing.assert_array_equal(_greedy(model, params, images, method="beam", beam_size=1),
                                  _greedy(model, params, images))


def test_beam_search_wide_enough_finds_the_best_length_penalized_sequence_by_enumeration():
  # V=6, 3 new tokens: with 36 beams no hypothesis is ever pruned, so beam search must return
  # the argmax over all continuations of log p / ((5 + n) / 6)^alpha, n = new tokens incl. eos.
  vocab, new, alpha = 6, 3, 0.6
  model = _model(vocab)
  images = _images(3, seed=1)
  prompts = np.array([[0, 0], [4, 2], [3, 0]], np.int32)
  prompt_lens = np.array([0, 2, 1], np.int32)
  eos_bias = np.zeros(vocab)
  eos_bias[EOS] = 1.0  # eos competes with longer continuations
  params = _params(vocab, 8, head_scale=1.0, bias=eos_bias)
  got = decode_lib.decode(model, params, images, prompts, prompt_lens, max_len=new,
                          eos_id=EOS, method="beam", beam_size=vocab ** 2,
                          length_penalty=alpha)

  conts = []  # every distinct finished continuation: ... eos (n <= 3) or 3 tokens (capped)
  for n in range(1, new + 1):
    for body in itertools.product([t for t in range(vocab) if t != EOS], repeat=n - 1):
      conts.append(list(body) + [EOS])
    if n == new:
      conts += [list(c) for c in itertools.product([t for t in range(vocab) if t != EOS],
                                                   repeat=n)]
  for row in range(3):
    p = list(prompts[row, :prompt_lens[row]])
    seqs = np.zeros((1, len(conts), prompts.shape[1] + new), np.int64)  # one shape: one compile
    for j, c in enumerate(conts):
      seqs[0, j, :len(p) + len(c)] = p + c
    tokens, mask = _causal_inputs(seqs)
    logits = np.asarray(_forward(vocab)(params, images[row:row + 1], tokens, mask),
                        np.float64)[0]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    scores = []
    for j, c in enumerate(conts):
      lp = sum(logp[j, len(p) + t, c[t]] for t in range(len(c)))
      scores.append(lp / ((5 + len(c)) / 6) ** alpha)
    best = conts[int(np.argmax(scores))]
    np.testing.assert_array_equal(got[row], best + [0] * (new - len(best)))


# ------------------------------------------------------------------------------- prompts, eos
def test_prompt_is_teacher_forced_so_feeding_the_first_new_token_shifts_the_output():
  # Greedy from prompt + its own first new token must continue exactly as before.
  vocab = 40
  model, images = _model(vocab), _images(4)
  params = _params(vocab, 9)
  first = _greedy(model, params, images)
  assert (first[:, 0] != EOS).all()
  longer = PROMPTS.copy()
  longer[np.arange(4), PROMPT_LENS] = first[:, 0]
  second = decode_lib.decode(model, params, images, longer, PROMPT_LENS + 1, max_len=NEW,
                             eos_id=EOS)
  np.testing.assert_array_equal(second[:, :NEW - 1], first[:, 1:])
  # And the prompt changes the result: the same image with another prompt continues otherwise.
  other = decode_lib.decode(model, params, images, PROMPTS[::-1].copy(),
                            PROMPT_LENS[::-1].copy(), max_len=NEW, eos_id=EOS)
  assert (other != first).any(1).all()


def test_output_keeps_eos_and_pads_after_it():
  vocab = 40
  model, images = _model(vocab), _images(4)
  eos_bias = np.zeros(vocab)
  eos_bias[EOS] = 50.0  # eos wins everywhere
  params = _params(vocab, 10, bias=eos_bias)
  for method in ("greedy", "beam"):
    out = _greedy(model, params, images, method=method, beam_size=3 if method == "beam" else 4)
    assert out.dtype == np.int32 and out.shape == (4, NEW)
    np.testing.assert_array_equal(out, np.array([[EOS] + [0] * (NEW - 1)] * 4))
  eos_bias[EOS] = 2.0
  out = _greedy(model, _params(vocab, 2, bias=eos_bias), images)
  for row in out:
    ends = np.flatnonzero(row == EOS)
    if ends.size:
      assert ends.size == 1 and (row[ends[0] + 1:] == 0).all()


def test_bad_arguments_raise_clear_errors():
  vocab = 40
  model, images = _model(vocab), _images(4)
  params = _params(vocab, 0)
  kw = dict(eos_id=EOS)
  with pytest.raises(ValueError, match="decoder's max_len 16"):
    decode_lib.decode(model, params, images, PROMPTS, PROMPT_LENS, max_len=12, **kw)
  with pytest.raises(ValueError, match=r"prompt_lens\[1\] = 7"):
    decode_lib.decode(model, params, images, PROMPTS, np.array([1, 7, 0, 0]), max_len=4, **kw)
  with pytest.raises(ValueError, match="method"):
    decode_lib.decode(model, params, images, PROMPTS, PROMPT_LENS, max_len=4, method="top", **kw)
  with pytest.raises(ValueError, match="needs rng"):
    decode_lib.decode(model, params, images, PROMPTS, PROMPT_LENS, max_len=4, method="sample",
                      **kw)
  with pytest.raises(ValueError, match="prompts: expected int"):
    decode_lib.decode(model, params, images, PROMPTS[:2], PROMPT_LENS, max_len=4, **kw)


# ------------------------------------------------------------------------------- sampling
def test_sampling_with_top_k_1_equals_greedy():
  vocab = 40
  model, images = _model(vocab), _images(4)
  params = _params(vocab, 11)
  np.testing.assert_array_equal(
      _greedy(model, params, images, method="sample", top_k=1, temperature=0.7,
              rng=jax.random.PRNGKey(3)),
      _greedy(model, params, images))


def test_sampling_draws_from_the_tempered_top_k_distribution():
  # 4 identical rows x 256 seeds: the first new token's frequencies against the softmax of the
  # training-path logits / temperature over the top k.
  vocab, seeds, temperature, top_k = 40, 256, 2.0, 5
  model = _model(vocab)
  params = _params(vocab, 12)
  images = np.repeat(_images(1, seed=3), 4, 0)
  prompts = np.zeros_like(PROMPTS)
  prompts[:, :2] = [7, 3]
  lens = np.full(4, 2, np.int32)
  sample = functools.partial(decode_lib.decode, model, params, images, prompts, lens,
                             max_len=NEW, eos_id=EOS, method="sample", temperature=temperature,
                             top_k=top_k)
  draws = np.concatenate([sample(rng=jax.random.PRNGKey(seed)) for seed in range(seeds)])
  np.testing.assert_array_equal(draws[:4], sample(rng=jax.random.PRNGKey(0)))  # reproducible
  assert (draws[:4] != draws[4:8]).any()  # another seed, other draws

  seqs = np.zeros((4, 1, WIDTH + NEW), np.int64)
  seqs[:, 0, :2] = [7, 3]
  tokens, mask = _causal_inputs(seqs)
  logits = np.asarray(_forward(vocab)(params, images, tokens, mask), np.float64)[0, 0, 2]
  top = np.argsort(logits)[::-1][:top_k]
  p = np.exp(logits[top] / temperature)
  p /= p.sum()
  assert set(np.unique(draws[:, 0])) <= set(top.tolist())
  freq = np.array([(draws[:, 0] == t).mean() for t in top])
  assert 0.5 * np.abs(freq - p).sum() < 0.08, (freq, p)  # total variation; ~0.03 expected


# ------------------------------------------------------------------------------- box constraint
@pytest.fixture(scope="module")
def tokenizers():
  from locca_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return {codec: tokenizer_lib.Tokenizer(tokenizer_lib.SHAPES_SP_MODEL, box_codec=codec)
          for codec in ("text", "loc")}


def test_box_constraint_allows_exactly_the_tokenizers_coordinate_tokens(tokenizers):
  text = decode_lib.BoxConstraint.from_tokenizer(tokenizers["text"])
  cv = np.asarray(text.coord_value)
  assert cv.shape == (tokenizers["text"].vocab_size,) and text.bins == 500
  for q in (0, 7, 123, 499):
    (piece,) = tokenizers["text"].encode(str(q))
    assert cv[piece] == q
  assert (cv >= 0).sum() == 500
  assert text.prefix_ids == tuple(tokenizers["text"].encode("aref:"))
  assert text.suffix_ids == tuple(tokenizers["text"].encode(":"))
  loc = decode_lib.BoxConstraint.from_tokenizer(tokenizers["loc"])
  sp = tokenizers["loc"].sp_vocab_size
  np.testing.assert_array_equal(np.asarray(loc.coord_value)[sp:], np.arange(500))
  assert (np.asarray(loc.coord_value)[:sp] == -1).all()


def test_box_constraint_refuses_a_vocabulary_without_one_piece_per_bin():
  from locca_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  # The shipped vocabulary has the pieces 0..499 only; "999" takes two.
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.SHAPES_SP_MODEL, box_codec="text", bins=1000)
  with pytest.raises(ValueError, match="cannot write every bin as one piece"):
    decode_lib.BoxConstraint.from_tokenizer(tok)


def test_box_constraint_applies_only_to_prompts_that_end_where_a_box_is_due(tokenizers):
  tok = tokenizers["text"]
  constraint = decode_lib.BoxConstraint.from_tokenizer(tok)
  rows = [tok.encode("aref:") + tok.encode("the red circle") + tok.encode(":"),
          tok.encode("cap:"),
          tok.encode("aref:") + tok.encode("the red circle"),  # no separator yet
          tok.encode("gcap:") + tok.encode(":")]
  prompts = np.zeros((4, 8), np.int32)
  for r, ids in enumerate(rows):
    prompts[r, :len(ids)] = ids
  active = constraint.active(jnp.asarray(prompts), jnp.asarray([len(r) for r in rows]))
  np.testing.assert_array_equal(active, [True, False, False, False])


def _valid_order(coords, order_idx):
  yxyx = np.empty(4)
  yxyx[list(order_idx)] = coords
  return yxyx[2] > yxyx[0] and yxyx[3] > yxyx[1]


@pytest.mark.parametrize("order", [" ".join(p) for p in itertools.permutations(boxlib.COORDS)])
def test_box_constraint_mask_admits_only_valid_boxes_for_every_coordinate_order(order):
  # Random logits, every order: pick the best allowed token step by step, like greedy does.
  bins, vocab, n = 8, 20, 256
  coord_ids = np.random.default_rng(0).permutation(np.arange(2, vocab))[:bins]
  constraint = decode_lib.BoxConstraint.create(coord_ids, vocab, order)
  rng = np.random.default_rng(1)
  seqs = np.zeros((n, 1, 7), np.int32)
  plen = np.full(n, 2, np.int32)
  for i in range(2, 7):
    mask = np.asarray(constraint.allowed(jnp.asarray(seqs), i, jnp.asarray(plen),
                                         jnp.ones(n, bool), EOS))
    assert mask[:, 0].any(-1).all()  # never a dead end
    logits = rng.normal(size=(n, vocab)) * 10
    seqs[:, 0, i] = np.argmax(np.where(mask[:, 0], logits, -np.inf), -1)
  value = np.asarray(constraint.coord_value)[seqs[:, 0, 2:6]]
  assert (value >= 0).all() and (seqs[:, 0, 6] == EOS).all()
  assert all(_valid_order(v, boxlib.order_indices(order)) for v in value)
  # Small bins and extreme logits reach the edges: both ends of the range were written.
  assert value.min() == 0 and value.max() == bins - 1


@pytest.mark.parametrize("codec", ["text", "loc"])
def test_constrained_decoding_never_yields_an_invalid_box(tokenizers, codec):
  # One model with the loc vocabulary (sp + 500 ids) serves both codecs, so the constraint is
  # the only difference (and the compiled decoders are shared).
  tok, vocab = tokenizers[codec], tokenizers["loc"].vocab_size
  constraint = decode_lib.BoxConstraint.from_tokenizer(tok)
  if codec == "text":  # the text pieces, in a vocabulary that also holds loc tokens
    cv = np.asarray(constraint.coord_value)
    constraint = decode_lib.BoxConstraint.create(
        [int(np.flatnonzero(cv == q)[0]) for q in range(tok.bins)], vocab, tok.box_order,
        constraint.prefix_ids, constraint.suffix_ids)
  coord_ids = np.flatnonzero(np.asarray(constraint.coord_value) >= 0)
  coord_q = np.asarray(constraint.coord_value)[coord_ids]
  refexps = ["the red circle", "a small blue square", "triangle", "the large green star",
             "purple diamond", "a cross"]
  rows = [tok.encode("aref:") + tok.encode(r) + tok.encode(":") for r in refexps]
  width = max(map(len, rows))
  prompts = np.zeros((len(rows), width), np.int32)
  for r, ids in enumerate(rows):
    prompts[r, :len(ids)] = ids
  lens = np.array([len(r) for r in rows], np.int32)
  model, images = _model(vocab), _images(len(rows), seed=5)
  rng = np.random.default_rng(0)
  checked = 0
  for seed in range(6):
    # Adversarial heads: stopping (eos) and the extreme bins (which would give x2 <= x1) are
    # made likely, on top of random logits.
    bias = np.zeros(vocab)
    bias[EOS] = 5.0
    bias[coord_ids] = rng.choice([-1, 1]) * 8.0 * coord_q / tok.bins
    params = _params(vocab, 100 + seed, head_scale=1.0, bias=bias)
    for method in ("greedy", "beam", "sample"):
      out = decode_lib.decode(model, params, images, prompts, lens, max_len=6, eos_id=EOS,
                              method=method, beam_size=3, rng=jax.random.PRNGKey(seed),
                              box_constraint=constraint)
      for row in out:
        np.testing.assert_array_equal(row[4:], [EOS, 0])  # 4 coordinates, eos, pad
        if codec == "loc":
          assert ((row[:4] >= tok.sp_vocab_size) & (row[:4] < vocab)).all()
        box = tok.parse_box(row)
        assert box is not None, (method, row, tok.decode(row))
        ymin, xmin, ymax, xmax = box
        assert xmax > xmin and ymax > ymin, (method, row, box)
        checked += 1
  assert checked == 6 * 3 * len(rows)
