"""Autoregressive decoding with a KV cache: greedy, beam search, sampling, constrained boxes.

B: batch (images), K: beams (1 for greedy and sampling), Lp: prompt width, N: new tokens
(`max_len`), S = Lp + N: positions decoded, V: vocabulary, P: visual tokens, F: decoder width.

    out = decode(model, params, images, prompts, prompt_lens, max_len=8, eos_id=1,
                 method="beam", box_constraint=BoxConstraint.from_tokenizer(tok))

The image is encoded once; its visual tokens feed every step and every beam: beams are the
decoder's task axis T ([B, K, 1] tokens per step), so the cross-attention keys / values are
projected once per image and cached (see `locca_jax.models.decoder`). One pass over positions
0..S-1 from BOS: at a position inside example b's prompt (i < prompt_lens[b]) the prompt token is
fed next whatever the model predicts (teacher forcing, so prompts of different lengths share the
batch); after it, the method chooses. An example stops at eos (kept in the output) or after
`max_len` new tokens; the output is the N tokens after its prompt, pad (0) after eos.

Imports no TensorFlow: `BoxConstraint.from_tokenizer` only calls the tokenizer's methods.
"""
import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from locca_jax import boxes as boxlib
from locca_jax import static_arg
from locca_jax.models import decoder as decoder_lib

PAD_ID = 0
METHODS = ("greedy", "beam", "sample")
# "Impossible" log-probability / logit: finite, so that sums, maxima and softmax never give NaN.
NEG = -1e10


# ------------------------------------------------------------------------------- box constraint
@flax.struct.dataclass
class BoxConstraint:
  """Constrained box decoding: right after a prompt that asks for a box, only a valid box.

  For the 4 steps after such a prompt only coordinate tokens are allowed, in `order`, each
  bounded so that every max coordinate ends strictly greater than its min (xmax > xmin,
  ymax > ymin, whatever the order: a min written first stays <= bins-2, leaving room); the 5th
  step allows only eos. The mask is computed from `coord_value` with jax.numpy inside the jitted
  loop, for every method (so an invalid box can never be produced, whatever the logits).

  A prompt asks for a box when it starts with `prefix_ids` and ends with `suffix_ids` (the
  ARef row `aref: <refexp> :`); empty tuples match every prompt.

  Fields:
    coord_value: int32 [V] (numpy), the coordinate q in [0, bins) a token id writes, -1 for
      other tokens.
    bins: number of quantization bins.
    order: the written coordinate order as indices into yxyx (`boxes.order_indices`).
    prefix_ids, suffix_ids: token ids (see above).
  """
  coord_value: np.ndarray
  bins: int = flax.struct.field(pytree_node=False)
  order: tuple[int, ...] = flax.struct.field(pytree_node=False, default=(1, 0, 3, 2))
  prefix_ids: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  suffix_ids: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

  @classmethod
  def create(cls, coord_ids: Sequence[int], vocab_size: int,
             box_order: str = boxlib.DEFAULT_ORDER, prefix_ids: Sequence[int] = (),
             suffix_ids: Sequence[int] = ()) -> "BoxConstraint":
    """`coord_ids[q]` is the one token id that writes coordinate q (bins = len(coord_ids))."""
    ids = [int(i) for i in coord_ids]
    bins = len(ids)
    if bins < 2:
      raise ValueError(f"box constraint: need at least 2 bins for xmax > xmin, got {bins}")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
      raise ValueError(f"box constraint: coordinate token ids {bad[:5]} outside the "
                       f"vocabulary [0, {vocab_size})")
    if len(set(ids)) != bins:
      dup = sorted({i for i in ids if ids.count(i) > 1})
      raise ValueError(f"box constraint: token ids {dup[:5]} write several coordinates "
                       "(expected one distinct token per bin)")
    coord_value = np.full([vocab_size], -1, np.int32)
    coord_value[ids] = np.arange(bins, dtype=np.int32)
    return cls(coord_value, bins=bins, order=boxlib.order_indices(box_order),
               prefix_ids=tuple(int(i) for i in prefix_ids),
               suffix_ids=tuple(int(i) for i in suffix_ids))

  @classmethod
  def from_tokenizer(cls, tokenizer, prefix: str | None = "aref:",
                     separator: str | None = ":") -> "BoxConstraint":
    """From a `locca_jax.tokenizer.Tokenizer`: its codec, bins and box order.

    "loc" codec: the coordinate tokens are `sp_vocab_size + q`. "text" codec: the one piece
    the tokenizer writes for each integer q in [0, bins) (e.g. "▁123"); a ValueError if some
    bin takes several pieces, since a box could then not be masked token by token.
    The constraint applies to prompts starting with the tokens of `prefix` and ending with
    those of `separator` (each tokenized on its own, as `data/tasks.py` builds the rows);
    None for either drops that condition.
    """
    bins = tokenizer.bins
    if tokenizer.box_codec == "loc":
      ids = [tokenizer.sp_vocab_size + q for q in range(bins)]
    elif tokenizer.box_codec == "text":
      ids, bad = [], []
      for q in range(bins):
        piece = tokenizer.encode(str(q))
        if len(piece) == 1 and tokenizer.decode(piece) == str(q):
          ids.append(piece[0])
        else:
          bad.append((q, piece))
      if bad:
        q, piece = bad[0]
        raise ValueError(
            f"box constraint: the vocabulary of {tokenizer!r} cannot write every bin as one "
            f"piece: {len(bad)} of the integers in [0, {bins}) are not a single piece (e.g. "
            f"{q} -> ids {piece}); constrained decoding of text boxes needs one piece per "
            "integer: use box_codec='loc', fewer bins, or a vocabulary holding these pieces")
    else:
      raise ValueError(f"box constraint: unknown box_codec {tokenizer.box_codec!r}")
    return cls.create(ids, tokenizer.vocab_size, tokenizer.box_order,
                      prefix_ids=tokenizer.encode(prefix) if prefix else (),
                      suffix_ids=tokenizer.encode(separator) if separator else ())

  def active(self, prompts: jax.Array, prompt_lens: jax.Array) -> jax.Array:
    """bool [B]: the prompt (int [B, Lp], lengths [B]) asks for a box."""
    b, width = prompts.shape
    if len(self.prefix_ids) + len(self.suffix_ids) > width:
      return jnp.zeros([b], bool)
    on = jnp.ones([b], bool)
    if self.prefix_ids:
      n = len(self.prefix_ids)
      on &= (prompt_lens >= n) & jnp.all(prompts[:, :n] == jnp.asarray(self.prefix_ids), -1)
    if self.suffix_ids:
      n = len(self.suffix_ids)
      idx = jnp.clip(prompt_lens[:, None] - n + jnp.arange(n), 0, width - 1)
      tail = jnp.take_along_axis(prompts, idx, axis=1)
      on &= (prompt_lens >= n + len(self.prefix_ids)) & jnp.all(
          tail == jnp.asarray(self.suffix_ids), -1)
    return on

  def allowed(self, seqs: jax.Array, i: jax.Array, prompt_lens: jax.Array,
              active: jax.Array, eos_id: int) -> jax.Array:
    """bool [B, K, V]: tokens allowed at position i given the sequences so far [B, K, S]."""
    b, k, s = seqs.shape
    step = (i - prompt_lens)[:, None]  # [B, 1]: index of the token chosen now after the prompt
    idx = jnp.clip(prompt_lens[:, None, None] + jnp.arange(4), 0, s - 1)
    coord_value = jnp.asarray(self.coord_value)
    prev = coord_value[jnp.take_along_axis(seqs, jnp.broadcast_to(idx, (b, k, 4)), 2)]
    lo = jnp.full([b, k], -1)  # exclusive bounds on the coordinate written at this step
    hi = jnp.full([b, k], self.bins)
    for pos, coord in enumerate(self.order):
      partner = self.order.index((coord + 2) % 4)  # ymin <-> ymax, xmin <-> xmax
      is_max = coord >= 2
      if partner < pos:  # partner already written: be strictly on the right side of it
        lo_p, hi_p = (prev[..., partner], self.bins) if is_max else (-1, prev[..., partner])
      else:  # partner comes later: leave it at least one bin
        lo_p, hi_p = (0, self.bins) if is_max else (-1, self.bins - 1)
      lo = jnp.where(step == pos, lo_p, lo)
      hi = jnp.where(step == pos, hi_p, hi)
    value = coord_value[None, None]  # -1 for non-coordinates: never > lo >= -1
    coord_ok = (value > lo[..., None]) & (value < hi[..., None])
    eos_ok = (jnp.arange(coord_value.shape[0]) == eos_id)[None, None]
    ok = jnp.where((step < 4)[..., None], coord_ok, eos_ok)
    applies = (active[:, None] & (step >= 0))[..., None]
    return ok | ~applies


# ------------------------------------------------------------------------------- steppers
class _Stepper(NamedTuple):
  """How a search gets next-token logits; the cached and re-running paths differ only here."""
  init: Callable[[], Any]  # -> state
  logits: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
  # (state, seqs [B, K, S], i) -> (float32 logits [B, K, V] for position i, state)
  reorder: Callable[[Any, jax.Array], Any]  # (state, flat beam index [B*K]) -> state


def _cached_stepper(model, params, visual, batch: int, beams: int) -> _Stepper:
  """One token per step through the decoder's KV cache (`decode=True`)."""
  dec = model.clone(decoder={**model.decoder, "decode": True})

  def run(cache, tokens):  # tokens [B, K, 1]
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    logits, updated = dec.apply(variables, tokens, visual, None, method="decode",
                                mutable=["cache"])
    return logits[:, :, 0].astype(jnp.float32), updated["cache"]

  def init():  # creates the cache: zeros, the visual keys / values projected
    return run(None, jnp.zeros([batch, beams, 1], jnp.int32))[1]

  def logits(cache, seqs, i):
    prev = jax.lax.dynamic_index_in_dim(seqs, jnp.maximum(i - 1, 0), 2, keepdims=False)
    tokens = jnp.where(i == 0, decoder_lib.BOS_ID, prev)
    return run(cache, tokens[..., None])

  def reorder(cache, flat_idx):
    # Only the self-attention keys / values are per beam ([(layers,) B*K, C, H, D]); the
    # visual ones are per image and the indices are shared.
    def take(path, x):
      names = [getattr(p, "key", None) for p in path]
      if "self_attn" in names and names[-1] in ("cached_key", "cached_value"):
        return jnp.take(x, flat_idx, axis=x.ndim - 4)
      return x
    return jax.tree_util.tree_map_with_path(take, cache)

  return _Stepper(init, logits, reorder)


def _rerun_stepper(model, params, visual) -> _Stepper:
  """Reference: the full (training-path) decoder over all S positions at every step."""

  def logits(state, seqs, i):
    tokens, mask = decoder_lib.decoder_inputs(seqs)
    out = model.apply({"params": params}, tokens, visual, mask, method="decode")
    return jax.lax.dynamic_index_in_dim(out, i, 2, keepdims=False).astype(jnp.float32), state

  return _Stepper(lambda: (), logits, lambda state, _: state)


# ------------------------------------------------------------------------------- searches
def _constrain(logits, seqs, i, prompt_lens, active, constraint, eos_id):
  if constraint is None:
    return logits
  return jnp.where(constraint.allowed(seqs, i, prompt_lens, active, eos_id), logits, NEG)


def _greedy_or_sample(stepper, forced, prompt_lens, active, rng, temperature, *, max_len,
                      eos_id, sample, top_k, constraint):
  """seqs [B, S]: forced prompt tokens, then argmax or samples, pad after eos."""
  b, s = forced.shape

  def cond(carry):
    i, _, done, _ = carry
    return (i < s) & ~jnp.all(done)

  def body(carry):
    i, seqs, done, state = carry
    logits, state = stepper.logits(state, seqs[:, None], i)
    logits = _constrain(logits, seqs[:, None], i, prompt_lens, active, constraint, eos_id)[:, 0]
    if sample:
      logits = logits / temperature
      # top_k is a traced value (one compilation for all k): threshold at the k-th largest.
      desc = jnp.flip(jnp.sort(logits, -1), -1)
      kth = jax.lax.dynamic_index_in_dim(desc, jnp.clip(top_k - 1, 0, desc.shape[-1] - 1), 1)
      logits = jnp.where((top_k > 0) & (logits < kth), NEG, logits)
      tok = jax.random.categorical(jax.random.fold_in(rng, i), logits)
    else:
      tok = jnp.argmax(logits, -1)
    generating = i >= prompt_lens
    tok = jnp.where(generating, tok, forced[:, i])
    tok = jnp.where(done, PAD_ID, tok).astype(seqs.dtype)
    seqs = jax.lax.dynamic_update_index_in_dim(seqs, tok, i, 1)
    done |= generating & ((tok == eos_id) | (i - prompt_lens + 1 >= max_len))
    return i + 1, seqs, done, state

  init = (jnp.zeros([], jnp.int32), jnp.zeros([b, s], jnp.int32), jnp.zeros([b], bool),
          stepper.init())
  return jax.lax.while_loop(cond, body, init)[1]


def _beam_search(stepper, forced, prompt_lens, active, alpha, *, beams, max_len, eos_id,
                 constraint):
  """seqs [B, S]: the best hypothesis by log p / ((5 + n) / 6)^alpha (GNMT, big_vision).

  n counts the new tokens, eos included; the prompt is not scored. Each step expands the K
  alive beams to their 2K best extensions (2K so that K survive even if K of them end). As in
  fairseq, an eos extension finishes a hypothesis only when it ranks among the K best, and an
  example stops once K hypotheses finished or at `max_len` new tokens (where the K best
  extensions finish as they are): with K = 1 this is exactly greedy decoding.
  """
  b, s = forced.shape
  k = beams

  def cond(carry):
    return (carry["i"] < s) & ~jnp.all(carry["done"])

  def body(c):
    i = c["i"]
    logits, state = stepper.logits(c["state"], c["alive"], i)
    logits = _constrain(logits, c["alive"], i, prompt_lens, active, constraint, eos_id)
    logp = jax.nn.log_softmax(logits)  # [B, K, V]
    vocab = logp.shape[-1]
    generating = (i >= prompt_lens)[:, None]  # [B, 1]
    # Inside the prompt every beam is extended by the prompt token only, at no cost.
    is_forced = jnp.arange(vocab) == forced[:, i][:, None, None]
    logp = jnp.where(generating[..., None], logp, jnp.where(is_forced, 0.0, NEG))
    cand = (c["alive_logp"][..., None] + logp).reshape(b, k * vocab)
    vals, idx = jax.lax.top_k(cand, 2 * k)  # [B, 2K], best first
    beam, tok = idx // vocab, idx % vocab
    seqs = jnp.take_along_axis(c["alive"], beam[..., None], 1)  # [B, 2K, S]
    seqs = jnp.where(jnp.arange(s) == i, tok[..., None], seqs)

    length = (i - prompt_lens + 1)[:, None]  # new tokens so far, this one included
    last = generating & (length >= max_len)
    is_eos = generating & (tok == eos_id)
    finish = ((is_eos | last) & (jnp.arange(2 * k) < k) & (vals > NEG / 2)
              & ~c["done"][:, None])
    scores = jnp.where(finish, vals / ((5.0 + length) / 6.0) ** alpha, NEG)
    all_scores = jnp.concatenate([c["fin_scores"], scores], 1)  # [B, 3K]
    fin_scores, top = jax.lax.top_k(all_scores, k)
    fin = jnp.take_along_axis(jnp.concatenate([c["fin"], seqs], 1), top[..., None], 1)
    fin_count = c["fin_count"] + finish.sum(1)

    alive_logp, keep = jax.lax.top_k(jnp.where(is_eos, NEG, vals), k)
    alive = jnp.take_along_axis(seqs, keep[..., None], 1)
    parent = jnp.take_along_axis(beam, keep, 1)
    state = stepper.reorder(state, (jnp.arange(b)[:, None] * k + parent).reshape(-1))
    done = c["done"] | (fin_count >= k) | last[:, 0]
    return dict(i=i + 1, alive=alive, alive_logp=alive_logp, fin=fin, fin_scores=fin_scores,
                fin_count=fin_count, done=done, state=state)

  zeros = jnp.zeros([b, k, s], jnp.int32)
  init = dict(i=jnp.zeros([], jnp.int32), alive=zeros,
              # One live beam to start with: K copies of it would fill the beam with duplicates.
              alive_logp=jnp.tile(jnp.array([0.0] + [NEG] * (k - 1)), [b, 1]),
              fin=zeros, fin_scores=jnp.full([b, k], NEG), fin_count=jnp.zeros([b], jnp.int32),
              done=jnp.zeros([b], bool), state=stepper.init())
  out = jax.lax.while_loop(cond, body, init)
  best = jnp.argmax(out["fin_scores"], 1)
  best_fin = jnp.take_along_axis(out["fin"], best[:, None, None], 1)[:, 0]
  # No finished hypothesis only if no beam ever had a finite score; keep the best alive then.
  return jnp.where((out["fin_count"] > 0)[:, None], best_fin, out["alive"][:, 0])


# ------------------------------------------------------------------------------- entry points
@functools.partial(jax.jit, static_argnames=("static_model",))
def _encode_jit(static_model, params, images):
  # Its own jit: one encoder compilation serves every method and decoding option.
  return static_model.model.apply({"params": params}, images, method="encode")


@functools.partial(jax.jit, static_argnames=("static_model", "max_len", "eos_id", "method",
                                             "beam_size", "use_cache"))
def _decode_jit(static_model, params, visual, prompts, prompt_lens, rng, box_constraint,
                length_penalty, temperature, top_k, *, max_len, eos_id, method, beam_size,
                use_cache):
  model = static_model.model
  b, width = prompts.shape
  s = width + max_len
  forced = jnp.pad(prompts, [(0, 0), (0, max_len)])  # [B, S]
  active = (box_constraint.active(prompts, prompt_lens) if box_constraint is not None
            else jnp.zeros([b], bool))
  beams = beam_size if method == "beam" else 1
  stepper = (_cached_stepper(model, params, visual, b, beams) if use_cache
             else _rerun_stepper(model, params, visual))
  if method == "beam":
    seqs = _beam_search(stepper, forced, prompt_lens, active, length_penalty, beams=beam_size,
                        max_len=max_len, eos_id=eos_id, constraint=box_constraint)
  else:
    seqs = _greedy_or_sample(stepper, forced, prompt_lens, active, rng, temperature,
                             max_len=max_len, eos_id=eos_id, sample=method == "sample",
                             top_k=top_k, constraint=box_constraint)
  idx = jnp.minimum(prompt_lens[:, None] + jnp.arange(max_len), s - 1)
  out = jnp.take_along_axis(seqs, idx, 1)  # [B, N]
  is_eos = out == eos_id
  after_eos = (jnp.cumsum(is_eos, 1) - is_eos) > 0
  return jnp.where(after_eos, PAD_ID, out)


def _scalar(x) -> int:
  """A reduction's value: replicated, so readable on every process even for global arrays."""
  return int(np.asarray(x))


def _decode(model, params, images, prompts, prompt_lens, *, max_len, eos_id, method,
            beam_size, length_penalty, temperature, top_k, rng, box_constraint, use_cache):
  """Checks the arguments, then runs `_encode_jit` and `_decode_jit`.

  Inputs may be numpy or (global, sharded) jax.Arrays: value checks use reductions, which are
  replicated, so they also work when no process holds all the rows (multi-host).
  """
  if method not in METHODS:
    raise ValueError(f"method {method!r}: expected one of {METHODS}")
  dec_cfg = getattr(model, "decoder", None)
  if not isinstance(dec_cfg, dict) or "max_len" not in dec_cfg:
    raise ValueError(f"model: expected a LocCa model (`models.locca.make_model`) with a decoder "
                     f"config dict, got {type(model).__name__}")
  limit, vocab = int(dec_cfg["max_len"]), int(dec_cfg["vocab_size"])
  images = images if isinstance(images, jax.Array) else np.asarray(images, np.float32)
  prompts = prompts if isinstance(prompts, jax.Array) else np.asarray(prompts)
  prompt_lens = prompt_lens if isinstance(prompt_lens, jax.Array) else np.asarray(prompt_lens)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images: expected float [B, H, W, 3], got shape {images.shape}")
  b = images.shape[0]
  if prompts.ndim != 2 or prompts.shape[0] != b or not jnp.issubdtype(prompts.dtype, jnp.integer):
    raise ValueError(f"prompts: expected int [B={b}, Lp] (right-padded with {PAD_ID}), got "
                     f"shape {prompts.shape} dtype {prompts.dtype}")
  if prompt_lens.shape != (b,) or not jnp.issubdtype(prompt_lens.dtype, jnp.integer):
    raise ValueError(f"prompt_lens: expected int [B={b}], got shape {prompt_lens.shape} dtype "
                     f"{prompt_lens.dtype}")
  if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
    raise ValueError(f"max_len: expected a positive number of tokens, got {max_len!r}")
  if b == 0:
    return np.zeros((0, max_len), np.int32)
  width = prompts.shape[1]
  bad = (prompt_lens < 0) | (prompt_lens > width)
  if _scalar(jnp.any(bad)):
    row = _scalar(jnp.argmax(bad))
    value = _scalar(jnp.max(jnp.where(jnp.arange(b) == row, prompt_lens, -2**31)))
    raise ValueError(f"prompt_lens[{row}] = {value}: expected 0..{width} (the prompts' width)")
  if width and (_scalar(jnp.min(prompts)) < 0 or _scalar(jnp.max(prompts)) >= vocab):
    raise ValueError(f"prompts: token ids outside the vocabulary [0, {vocab}) (min "
                     f"{_scalar(jnp.min(prompts))}, max {_scalar(jnp.max(prompts))})")
  if width + max_len > limit:
    # Columns past the longest prompt are padding: drop them rather than refuse.
    width = _scalar(jnp.max(prompt_lens))
    if width + max_len > limit:
      raise ValueError(f"longest prompt ({width} tokens) + max_len ({max_len}) = "
                       f"{width + max_len} positions > the decoder's max_len {limit}: ask for "
                       "fewer new tokens or shorten the prompts")
    prompts = prompts[:, :width]
  if not 0 <= eos_id < vocab:
    raise ValueError(f"eos_id {eos_id}: expected an id in the vocabulary [0, {vocab})")
  if method == "beam" and (not isinstance(beam_size, (int, np.integer)) or beam_size < 1):
    raise ValueError(f"beam_size: expected a positive integer, got {beam_size!r}")
  if method == "sample":
    if not temperature > 0:
      raise ValueError(f"temperature: expected > 0, got {temperature!r} (use method='greedy' "
                       "for argmax decoding)")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
      raise ValueError(f"top_k: expected an integer >= 0 (0 = no top-k), got {top_k!r}")
    if rng is None:
      raise ValueError("method='sample' needs rng (a jax.random key)")
  # Small host values go in as numpy: replicated inputs on every process, whatever the mesh.
  if rng is None:
    rng = np.zeros([2], np.uint32)  # unused by greedy and beam search
  elif jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = np.asarray(jax.random.key_data(rng))
  else:
    rng = np.asarray(rng)
  if box_constraint is not None:
    if box_constraint.coord_value.shape[0] != vocab:
      raise ValueError(f"box_constraint: built for a vocabulary of "
                       f"{box_constraint.coord_value.shape[0]} tokens, the model has {vocab} "
                       "(build it from the tokenizer the model was trained with)")
    box_constraint = box_constraint.replace(coord_value=np.asarray(box_constraint.coord_value))
  static_model = static_arg.StaticModel(model)
  visual = _encode_jit(static_model, params, images)  # once per image
  out = _decode_jit(
      static_model, params, visual, prompts.astype(np.int32), prompt_lens.astype(np.int32), rng,
      box_constraint, np.float32(length_penalty), np.float32(temperature), np.int32(top_k),
      max_len=int(max_len), eos_id=int(eos_id), method=method,
      beam_size=int(beam_size) if method == "beam" else 1, use_cache=use_cache)
  if not out.is_fully_addressable:  # multi-host: every process gets every row
    out = multihost_utils.process_allgather(out, tiled=True)
  return np.asarray(out, np.int32)


def decode(model, params, images, prompts, prompt_lens, *, max_len: int, eos_id: int,
           method: str = "greedy", beam_size: int = 4, length_penalty: float = 0.6,
           temperature: float = 1.0, top_k: int = 0, rng=None,
           box_constraint: BoxConstraint | None = None) -> np.ndarray:
  """Continues each prompt; returns np.int32 [B, max_len], the tokens after the prompt.

  Args:
    model: a `models.locca.LocCa` (e.g. from `make_model`); params: its parameters.
    images: [B, H, W, 3] uint8 pixels or float in [-1, 1] (`models.vit.ViT`).
    prompts: int [B, Lp], right-padded with 0; prompt_lens: int [B] (0 = start from BOS).
    max_len: new tokens N per example; Lp + N (or longest prompt + N) <= the decoder's
      max_len.
    eos_id: ends a sequence; kept in the output, pad (0) after it.
    method: "greedy" (argmax), "beam" (`beam_size` beams, GNMT length penalty
      ((5 + n) / 6)^length_penalty; beam_size=1 is greedy) or "sample" (softmax of
      logits / temperature, restricted to the top_k most likely tokens if top_k > 0; needs rng).
    box_constraint: only valid boxes after prompts that ask for one (see `BoxConstraint`).
  """
  return _decode(model, params, images, prompts, prompt_lens, max_len=max_len, eos_id=eos_id,
                 method=method, beam_size=beam_size, length_penalty=length_penalty,
                 temperature=temperature, top_k=top_k, rng=rng, box_constraint=box_constraint,
                 use_cache=True)


def decode_without_cache(model, params, images, prompts, prompt_lens, *, max_len: int,
                         eos_id: int, method: str = "greedy", beam_size: int = 4,
                         length_penalty: float = 0.6, temperature: float = 1.0, top_k: int = 0,
                         rng=None, box_constraint: BoxConstraint | None = None) -> np.ndarray:
  """`decode`, but every step re-runs the full training-path decoder over all S positions.

  A reference for tests and for timing the cache: same arguments, same results (up to float
  rounding), O(S) times the decoder work per step.
  """
  return _decode(model, params, images, prompts, prompt_lens, max_len=max_len, eos_id=eos_id,
                 method=method, beam_size=beam_size, length_penalty=length_penalty,
                 temperature=temperature, top_k=top_k, rng=rng, box_constraint=box_constraint,
                 use_cache=False)
