r"""The LocCa paper's encoder comparison in miniature, on `locca_shapes`, by one command.

  python -m locca_jax.study --out=docs/RESULTS.md                   # default scale, 3 seeds
  python -m locca_jax.study --out=/tmp/R.md --scale=tiny --seeds=0 --arms=cap,locca
  python -m locca_jax.study --out=docs/RESULTS.md --scale=full       # where LocCa's effect shows

For each arm (a named, pure transformation of configs/locca_b16.py:runlocal, see arms.ARMS)
and each seed, the study runs, each stage in its own workdir under `--workdir` (default
workdirs/study; the trainer's flag, reused), every stage through the one trainer
(`train.train_and_evaluate`) and the evaluators of `locca_jax.evaluate`:

  1. pretrain   WORKDIR/<arm>/seed<k>/pretrain: the arm's pretraining; at its last step the
                trainer evaluates, on the held-out TEST split, captioning (`caption`: CIDEr)
                and, for arms that train ARef, the model's own zero-shot ARef (`rec`:
                Acc@0.5, mIoU; no transfer).
  2. probe      in the same workdir: a linear probe on the frozen, mean-pooled encoder
                features (`evaluators/probe.py`: which colours / kinds / sizes / colour-kind
                pairs an image holds (mAP) and its object count (accuracy)); fit on train,
                strength chosen on validation, scored on test; appended to metrics.jsonl.
  3. transfer   WORKDIR/<arm>/seed<k>/transfer: the paper's Table 2 protocol,
                configs/transfer/refcoco.py: the encoder (`img/.*`) loaded from the pretrain
                workdir and frozen, a fresh decoder trained on ARef rows (the same transfer
                config for every arm), `rec` on the test split at the last step.

Then it writes `--out` (Markdown: per metric, mean ± std over seeds per arm, and every
per-seed value; the arms' config overrides; the shared settings; commands; wall times;
machine and versions) and `--out` with suffix .json (every run's final metrics, read back
from its metrics.jsonl). Every number in the report is read from the runs' metrics.jsonl files.

Resuming: a stage whose final checkpoint and final-step results exist is skipped; a stage
interrupted mid-training resumes from its last checkpoint (the trainer's own resume); one
whose final checkpoint exists but whose results are missing is evaluated from that checkpoint.
So rerunning an interrupted study continues it. A workdir whose config.json differs from the
config the study would run (another --scale, another code version) is an error, not a reuse.

Carrying runs across machines: every finished arm x seed is recorded in `--out`'s .json with
each stage's config and where and when it was read (`recorded`). A later invocation with the
same --out keeps the recorded arm x seeds whose configs equal the ones it would run (workdir
paths aside) and runs only the rest, so a study longer than one machine's lease grows, run by
run, on fresh checkouts; a recorded run whose config differs is rerun (logged), and
--nokeep_recorded reruns them all. A run finished under --workdir wins over its record. The
report says which runs it carried and from which invocation (git commit, date).

Equal compute per arm: every arm trains the same encoder and decoder for the same number of
steps at the same batch size with the same optimizer and schedule, so every encoder sees the
same images, the same number of times. The decoder work is NOT equal: the decoder runs one
row per task per image (Cap / CapPa 1, the LocCa ablations 2, LocCa 3), as in the paper,
which also compares at equal examples seen. The report lists each arm's rows per image and its
measured training throughput.

Scale (`--scale`): `tiny` (the test suite's model and `locca_shapes/tiny`, a few steps: a smoke
run), `default` (configs/locca_b16.py:runlocal's model at 64 px on `locca_shapes/colors`,
batch 32, 200 pretraining + 100 transfer steps: 6 arms x 3 seeds in about 30 minutes on a
2-core CPU of its own, estimated from measured step times; under 40), `full` (the default x 35:
7000 pretraining + 3500 transfer steps, past the point where ARef's readout is learned;
docs/RESULTS.md; about 16.5 hours on 2 CPU cores, measured), or a
positive number m: the default scale with every step count (pretraining, transfer, warmup,
checkpoint interval) times m. See arms.SCALES. The model is the same at every scale but `tiny`, so
scales differ in training length. The default and `full` train on `colors` (1-3 squares:
referents told apart by colour, size and position) rather than `base` (shapes, too): this
model learns shapes far too slowly for a CPU study (docs/experiments/README.md, 6-8);
`--dataset` replaces the scale's locca_shapes config, e.g. `--dataset=base`.

Order and partial reports: seed by seed (every arm at seed 0 first), and the report is
rewritten after each arm x seed, so an interrupted study leaves a report of the runs it
finished, marked partial, its arms compared on the same seeds so far.

One process: the study runs the stages one after another in this process (for multi-host
training, run `python -m locca_jax.train` per stage with the overrides the report lists).

Modules: `arms` (what runs: ARMS, SCALES, each stage's config), `stages` (running one stage,
resumably), `report` (reading the runs back, the record, the report), `overrides` (config
differences as --config flags), `runner` (the study: every arm x seed, then the report);
`python -m locca_jax.study` is `__main__`.
"""
