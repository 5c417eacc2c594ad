"""Builds the small SentencePiece vocabulary shipped as `locca_jax/assets/locca_shapes_sp.model`.

Regenerate (deterministic: same code and generator -> same model bytes):
  python -m locca_jax.data.build_vocab --out=locca_jax/assets/locca_shapes_sp.model

The corpus is the project's own text, nothing downloaded:
  - the task prefixes `cap:` `aref:` `gcap:` and the separator `:`, as whole task rows
    ("aref: the red circle : 12 40 200 310");
  - every integer 0..999 written as box text (four per line, as a box is written), so any
    `bins` <= 1000 is covered; 0..bins_hint-1 (the default 500 bins) weigh more, so that they
    end up as single pieces where the vocabulary allows;
  - captions, referring expressions and names from
    `locca_jax.data.locca_shapes.generate_example(rng, image_size)` over `--num_examples`
    images of a fixed seed;
  - one line of printable ASCII, so that any English text encodes without unk.
Trained with the `sentencepiece` package: BPE (on this small, repetitive corpus the unigram
trainer kept rare numbers and split common words), ids pad=0, eos=1, unk=2, no bos (T5 / C4
convention), the whole corpus used in its fixed order (`input_sentence_size=0`, no shuffling)
on one thread. Only the .model is written (no .vocab: list the pieces with `--print_pieces`).

With the defaults (768 pieces): every generator word is one piece (two with a trailing "," or
":", e.g. "aref:" -> "▁aref" ":"), every integer in [0, 500) is one piece ("12 40 200 310" ->
4 tokens) and every integer in [0, 1000) at most two. `tests/test_tokenizer.py` checks these
facts on the shipped file (rerun this script whenever the generator's wording changes).
"""
import argparse
import io
import os
import string
import sys

import numpy as np
import sentencepiece as spm

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "assets", "locca_shapes_sp.model")
PREFIXES = ("cap:", "aref:", "gcap:")
SEPARATOR = ":"
VOCAB_SIZE = 768


def _box_text(q):
  return " ".join(str(int(v)) for v in q)


def generator_texts(num_examples, seed, image_size):
  """[(captions, [(refexp, name, box_q_xyxy)])] from the synthetic generator."""
  from locca_jax import boxes as boxlib  # pylint: disable=g-import-not-at-top
  from locca_jax.data import locca_shapes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_examples):
    ex = locca_shapes.generate_example(rng, image_size)
    objs = []
    for o in ex["objects"]:
      q = boxlib.reorder(boxlib.quantize(np.asarray(o["bbox"], np.float32), 500))
      objs.append((str(o["refexp"]), str(o["name"]), q))
    out.append(([str(c) for c in ex["captions"]], objs))
  return out


def corpus(num_examples=500, seed=0, image_size=64, bins_hint=500, number_repeats=(6, 2)):
  """The training sentences, in a fixed order."""
  lines = [string.printable.strip()]
  # Numbers: every integer in [0, 1000) in box-shaped lines of four, with a fixed stride so
  # that neighbours differ; [0, bins_hint) repeated number_repeats[0] times, the rest [1].
  for rep in range(max(number_repeats)):
    for lo, hi, r in ((0, bins_hint, number_repeats[0]), (bins_hint, 1000, number_repeats[1])):
      if rep >= r:
        continue
      n = hi - lo
      stride = 37 if np.gcd(37, n) == 1 else 41
      seq = [lo + (rep * 7 + i * stride) % n for i in range(n)]
      lines += [_box_text(seq[i:i + 4]) for i in range(0, n, 4)]
  for captions, objs in generator_texts(num_examples, seed, image_size):
    for c in captions:
      lines.append(f"{PREFIXES[0]} {c}")
    for refexp, name, q in objs:
      lines.append(f"{PREFIXES[1]} {refexp} {SEPARATOR} {_box_text(q)}")
      lines.append(f"{PREFIXES[2]} {_box_text(q)} {SEPARATOR} {refexp}")
      lines.append(name)
  return lines


def train(lines, vocab_size):
  """Trains the SentencePiece model on `lines`; returns the serialized model bytes."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model,
      model_type="bpe", vocab_size=vocab_size,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      character_coverage=1.0, input_sentence_size=0, shuffle_input_sentence=False,
      num_threads=1, hard_vocab_limit=True, split_digits=False,
      max_sentence_length=4096, minloglevel=2)
  return model.getvalue()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=DEFAULT_OUT, help="where to write the .model")
  p.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
  p.add_argument("--num_examples", type=int, default=500,
                 help="generator examples whose text joins the corpus")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--image_size", type=int, default=64,
                 help="image_size passed to generate_example")
  p.add_argument("--print_pieces", action="store_true", help="print the vocabulary")
  args = p.parse_args(argv)

  lines = corpus(args.num_examples, args.seed, args.image_size)
  model = train(lines, args.vocab_size)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "wb") as f:
    f.write(model)
  sp = spm.SentencePieceProcessor(model_proto=model)
  print(f"wrote {args.out}: {sp.get_piece_size()} pieces, {len(model)} bytes, "
        f"{len(lines)} training lines", file=sys.stderr)
  if args.print_pieces:
    for i in range(sp.get_piece_size()):
      print(i, sp.id_to_piece(i), sp.get_score(i))


if __name__ == "__main__":
  main()
