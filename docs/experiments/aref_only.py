"""Issue 5 diagnostic: configs/locca_b16.py:runlocal trained on ARef rows only, REC along the run.

Through the one trainer (`train.train_and_evaluate`); only `rec` (200 validation images, every
--rec_every steps) and optionally the linear probe (fit on train, strength chosen and scored on
500 validation images, every --probe_every steps) are evaluated. Results: README.md, sections
6 and 8.

  PYTHONPATH=. .venv/bin/python docs/experiments/aref_only.py --workdir=/tmp/aref \\
      --steps=1500 --rec_every=500 [--bins=64] [--image_size=128 --patch=16] [--stem=conv] \\
      [--lr=1e-3] [--warmup=200 --probe_every=2000] [--aref_rows=4] \\
      [--decoder_layers=1] [--box_loss_only] [--init_encoder=W0 --freeze_encoder] [--task=cap] \\
      [--dataset=tiny --rec_split=train] [--dataset=colors]

--dataset=tiny trains on locca_shapes/tiny's 96 training images: with --rec_split=train, a
check that the model can fit (memorize) boxes at all. --dataset=colors: the one-shape scenes
(locca_shapes.py), referents told apart by colour, size and position.
"""
import argparse

from configs import locca_b16
from locca_jax import train
from locca_jax.data import locca_shapes
from locca_jax.study import arms


def config_from(args):
  c = locca_b16.get_config("runlocal")
  c.total_steps = args.steps
  # Several ARef rows per image each sample an object (with replacement); their per-task
  # loss metrics share one name, the last row's is logged.
  c.input.tasks = ("aref",) * args.aref_rows if args.task == "aref" else ("cap",)
  if args.dataset != "base":
    c.input.data = dict(name=f"locca_shapes/{args.dataset}", split="train", data_dir=None)
  if args.dataset == "tiny":
    c.input.shuffle_buffer = 96
  c.input.tokenizer.bins = args.bins
  c.input.image_size = args.image_size
  c.model.encoder["variant"] = f"Ti/{args.patch}"
  c.model.encoder["stem"] = args.stem
  c.lr = args.lr
  c.model.decoder["num_layers"] = args.decoder_layers
  if args.box_loss_only:
    c.input.loss.aref.caption = False
  if args.init_encoder:  # the transfer protocol's start: another run's encoder
    c.init_from = dict(workdir=args.init_encoder, step=None, params="img/.*")
  if args.freeze_encoder:
    c.frozen = ("img/.*",)
  if args.warmup is not None:
    c.schedule.warmup_steps = args.warmup
  c.ckpt_every = min(1000, args.steps)
  c.keep_ckpts = 1
  c.log_every = 50
  rec = c.evals.rec
  rec.log_steps, rec.max_examples = args.rec_every, 200
  rec.data = dict(name=f"locca_shapes/{args.dataset}", split=args.rec_split)
  c.evals = dict(rec=rec) if args.task == "aref" else {}
  if args.probe_every:
    probe = arms.probe_eval(arms.SCALES["default"])
    probe.update(log_steps=args.probe_every, max_examples=500,
                 data=dict(name="locca_shapes/base", split="validation"))
    c.evals["probe"] = probe
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--rec_every", type=int, default=500)
  p.add_argument("--bins", type=int, default=500)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--patch", type=int, default=8)
  p.add_argument("--aref_rows", type=int, default=1)
  p.add_argument("--task", default="aref", choices=("aref", "cap"),
                 help="cap: a captioning run instead (a Cap encoder for --init_encoder); no rec")
  p.add_argument("--dataset", default="base", choices=("base", "tiny", "colors"))
  p.add_argument("--rec_split", default="validation")
  p.add_argument("--stem", default="patch", choices=("patch", "conv"))
  p.add_argument("--decoder_layers", type=int, default=2)
  p.add_argument("--box_loss_only", action="store_true",
                 help="no loss on the refexp tokens of the ARef row, only on its box")
  p.add_argument("--init_encoder", default=None,
                 help="workdir whose last checkpoint's encoder (img/.*) initializes this run")
  p.add_argument("--freeze_encoder", action="store_true",
                 help="train the decoder only (with --init_encoder: the REC transfer protocol)")
  p.add_argument("--lr", type=float, default=locca_b16.get_config("runlocal").lr)
  p.add_argument("--warmup", type=int, default=None)
  p.add_argument("--probe_every", type=int, default=0)
  args = p.parse_args()
  locca_shapes.prepare(args.dataset)
  train.train_and_evaluate(config_from(args), args.workdir)


if __name__ == "__main__":
  main()
