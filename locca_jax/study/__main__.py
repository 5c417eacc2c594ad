"""`python -m locca_jax.study --out=REPORT.md`: the command line of `runner.run_study`.

See the package docstring (`locca_jax/study/__init__.py`). --workdir is the trainer's flag
(locca_jax.train defines it on import), reused: here, the root of the study's runs.
"""
import os

from absl import app
from absl import flags
from absl import logging
import jax

from locca_jax import train
from locca_jax.study import arms as arms_lib
from locca_jax.study import runner

flags.declare_key_flag("workdir")
_OUT = flags.DEFINE_string("out", None, "The Markdown report to write (and <out>.json).",
                           required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed) of every arm.")
_SCALE = flags.DEFINE_string("scale", "default", f"One of {sorted(arms_lib.SCALES)}, or a "
                             "positive multiplier of the default scale's steps.")
_ARMS = flags.DEFINE_list("arms", list(arms_lib.ARMS),
                          f"Arms to run, of {list(arms_lib.ARMS)}.")
_DATASET = flags.DEFINE_string("dataset", None, "A locca_shapes config replacing the scale's "
                               "(e.g. colors: 1-3 squares, referents told apart by colour, "
                               "size, position); default: the scale's.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir of locca_shapes (default: "
                                "~/tensorflow_datasets).")
_KEEP_RECORDED = flags.DEFINE_bool("keep_recorded", True, "Keep the arm x seeds that "
                                   "<out>.json records with this study's configs (run earlier, "
                                   "maybe elsewhere) instead of rerunning them.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if flags.FLAGS["config"].present:
    raise app.UsageError("--config is not a study flag: the arms are built from "
                         f"{arms_lib.BASE_CONFIG} (see locca_jax.study.arms: ARMS, SCALES)")
  # The trainer's filter: orbax's per-save INFO lines stay out of the progress log.
  quiet = train._quiet_library_info  # pylint: disable=protected-access
  logging.get_absl_handler().addFilter(quiet)
  # TensorFlow only feeds the input pipeline: keep it off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  root = flags.FLAGS.workdir or runner.DEFAULT_ROOT
  # Programs that recur across runs (every seed's train step, every arm's transfer) compile
  # once: JAX's persistent compilation cache, kept with the runs.
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(root),
                                                              "jax_cache"))
  runner.run_study(out=_OUT.value, root=root, seeds=_SEEDS.value, scale=_SCALE.value,
                   arms=_ARMS.value, data_dir=_DATA_DIR.value, dataset=_DATASET.value,
                   keep_recorded=_KEEP_RECORDED.value)


if __name__ == "__main__":
  app.run(main)
