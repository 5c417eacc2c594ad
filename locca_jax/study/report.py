"""The study's results: read back from the runs, carried across machines, written as a report.

`collect` reads each finished arm x seed's final metrics, timings and configs from its
workdirs; `recorded_runs` keeps those an earlier invocation recorded in the report's .json
with the configs this one would run (so a study longer than one machine's lease grows run by
run on fresh checkouts); `write_report` writes the .json (every run's numbers, configs and
provenance) and the Markdown report (`render_report`): per metric, mean ± std over seeds and
every seed's value, the arms' overrides, the commands, wall times, provenance and machine.
"""
import dataclasses
import datetime
import json
import os
import platform
import subprocess

from absl import logging
import jax
import numpy as np

from locca_jax.study import arms as arms_lib
from locca_jax.study import overrides
from locca_jax.study import stages


@dataclasses.dataclass(frozen=True)
class Metric:
  """A reported number: `key` of the final-step metrics of a stage's metrics.jsonl."""
  name: str
  stage: str   # "pretrain" or "transfer"
  key: str
  title: str
  short: str   # the summary table's column
  reference: tuple = ()  # (key, what): a baseline logged with it, e.g. the chance level


METRICS = (
    Metric("transfer_rec_acc", "transfer", "rec/acc@0.5",
           "Frozen-encoder REC transfer: Acc@0.5 (test)", "transfer Acc@0.5"),
    Metric("transfer_rec_miou", "transfer", "rec/miou",
           "Frozen-encoder REC transfer: mIoU (test)", "transfer mIoU"),
    Metric("zeroshot_rec_acc", "pretrain", "rec/acc@0.5",
           "Zero-shot ARef of the pretrained model, no transfer: Acc@0.5 (test)",
           "zero-shot Acc@0.5"),
    Metric("zeroshot_rec_miou", "pretrain", "rec/miou",
           "Zero-shot ARef of the pretrained model, no transfer: mIoU (test)", "zero-shot mIoU"),
    Metric("caption_cider", "pretrain", "caption/cider",
           "Captioning CIDEr of the pretrained model (test)", "CIDEr"),
    Metric("probe_map", "pretrain", "probe/map",
           "Linear probe on the frozen encoder: attribute-presence mAP (test)", "probe mAP",
           ("probe/map_chance", "chance level (mean prevalence of the scored labels)")),
    Metric("probe_count_acc", "pretrain", "probe/count_acc",
           "Linear probe on the frozen encoder: object-count accuracy (test)", "probe count acc",
           ("probe/count_majority", "always predicting the most frequent training count")),
)


def write_report(out: str, *, root: str, arms, seeds, sc: arms_lib.Scale, data_dir,
                 command: str, wall: float, statuses, machine: dict,
                 carried: dict | None = None) -> str:
  """Writes `out` (Markdown) and `out` with suffix .json from the runs finished under `root`
  and the `carried` ones (recorded_runs) it has not; returns the .json path. `machine`:
  machine_info() when the study started (the code it runs)."""
  root = os.path.abspath(root)  # as collect records the runs' workdirs
  generated = datetime.datetime.now().isoformat(timespec="seconds")
  found = collect(root, arms, seeds, sc, data_dir)
  results = {}
  for arm in arms:
    results[arm] = {}
    for seed in map(str, seeds):
      if seed in found[arm]:
        run = found[arm][seed]
        run["recorded"] = dict(generated=generated, git_commit=machine["git_commit"],
                               host=machine["platform"], workdir=root, carried=False)
      elif carried and seed in carried[arm]:
        run = dict(carried[arm][seed], recorded=dict(carried[arm][seed].get("recorded", {}),
                                                     carried=True))
      else:
        continue
      results[arm][seed] = run
  path = record_path(out)
  meta = dict(command=command, scale=dataclasses.asdict(sc), seeds=seeds, arms=arms,
              workdir=root, data_dir=data_dir, invocation_wall_s=wall, generated=generated,
              machine=machine)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(meta, runs=results, statuses=statuses), f, indent=1, sort_keys=True)
  with open(out, "w") as f:
    f.write(render_report(meta, results, sc, data_dir, os.path.basename(path)))
  return path


def record_path(out: str) -> str:
  """The report's .json: every run's numbers, and the record later invocations carry."""
  return os.path.splitext(out)[0] + ".json"


def collect(root: str, arms, seeds, sc: arms_lib.Scale, data_dir) -> dict:
  """{arm: {seed: {stage: {metrics, wall_s, ...}}}} read back from the runs' files, for the
  arm x seeds that finished: every stage at its last step with all its evaluations logged
  (pretraining's, the probe's, the transfer's); the others are left out."""
  root = os.path.abspath(root)  # as portable_config writes paths
  out = {}
  for arm in arms:
    out[arm] = {}
    for seed in seeds:
      dirs = arms_lib.run_workdirs(root, arm, seed)
      configs = arms_lib.stage_configs(arm, sc, seed, root, data_dir)
      if not stages.finished(configs, dirs):
        continue
      out[arm][str(seed)] = {
          stage: dict(workdir=workdir, step=configs[stage].total_steps,
                      metrics=stages.final_step_metrics(workdir, configs[stage].total_steps),
                      timing=stages.read_timing(workdir), img_per_sec=median_img_per_sec(workdir),
                      config=portable_config(configs[stage], root))
          for stage, workdir in dirs.items()}
  return out


def portable_config(config, root: str) -> dict:
  """The flattened config with paths under `root` written relative to it ("<workdir>/..."),
  so that runs made under another --workdir, on another machine, compare equal."""
  prefix = os.path.abspath(root) + os.sep
  return {k: ("<workdir>/" + v[len(prefix):] if isinstance(v, str) and v.startswith(prefix)
              else overrides.normalized(v))
          for k, v in overrides.flatten(config).items()}


def recorded_runs(json_path: str, root: str, arms, seeds, sc: arms_lib.Scale, data_dir) -> dict:
  """{arm: {seed: run}} of the arm x seeds an earlier invocation recorded in `json_path` (an
  earlier report's .json) whose every stage's config equals the one this study would run
  (but for the workdir and data_dir paths).

  A recorded run with another config (another scale, a changed arm) is left out, and logged.
  """
  root = os.path.abspath(root)  # as portable_config writes paths
  if not os.path.exists(json_path):
    return {arm: {} for arm in arms}
  with open(json_path) as f:
    recorded = json.load(f).get("runs", {})
  out = {}
  for arm in arms:
    out[arm] = {}
    for seed in seeds:
      run = recorded.get(arm, {}).get(str(seed))
      if run is None:
        continue
      expected = arms_lib.stage_configs(arm, sc, seed, root, data_dir)
      differences = []
      for stage, config in expected.items():
        if "config" not in run.get(stage, {}):
          differences.append(f"{stage}: no config recorded")
          continue
        changed, removed = overrides.config_diff(run[stage]["config"],
                                                 portable_config(config, root))
        differences += [f"{stage} {k}: {run[stage]['config'].get(k)!r} -> {v!r}"
                        for k, v in sorted(changed.items())
                        if not k.endswith("data_dir")]  # where the data is, not what
        differences += [f"{stage} {k}: removed" for k in removed]
      if differences:
        logging.warning("study: %s records %s seed %d with another config than this study "
                        "runs (%s); it will be rerun", json_path, arm, seed,
                        "; ".join(differences[:4]))
        continue
      out[arm][str(seed)] = run
  return out


def median_img_per_sec(workdir: str) -> float | None:
  """The median of the training throughput lines in WORKDIR/metrics.jsonl (None: none)."""
  values = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "img_per_sec" in record:
        values.append(record["img_per_sec"])
  return float(np.median(values)) if values else None


def mean_std(values) -> tuple[float, float | None]:
  """(mean, sample std with ddof=1, or None for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def fmt(value: float) -> str:
  """How every number appears in the report (4 decimals)."""
  return f"{value:.4f}"


def _cell(values) -> str:
  if not values:
    return "n/a"
  mean, std = mean_std(values)
  return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def metric_values(results: dict, arm: str, metric: Metric) -> list[float]:
  """The metric's per-seed values of `arm` (seed order); [] where the arm has none."""
  values = []
  for seed in results[arm]:
    m = results[arm][seed][metric.stage]["metrics"]
    if metric.key in m:
      values.append(float(m[metric.key]))
  return values


def machine_info() -> dict:
  """Platform, CPUs, JAX devices, package versions and git commit of the running code."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow",
              "tensorflow-datasets", "numpy", "ml_collections"):
    try:
      versions[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      versions[pkg] = None
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
    commit = head.stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
    if status.stdout.strip():
      commit += " (with uncommitted changes)"
  except (OSError, subprocess.CalledProcessError):
    commit = None
  return dict(platform=platform.platform(), processor=platform.processor() or None,
              cpu_count=os.cpu_count(), python=platform.python_version(),
              devices=[str(d) for d in jax.devices()], backend=jax.default_backend(),
              versions=versions, git_commit=commit)


def render_report(meta: dict, results: dict, sc: arms_lib.Scale, data_dir, json_name: str) -> str:
  """The Markdown report: tables, overrides, commands, wall times, machine."""
  arms, seeds = meta["arms"], meta["seeds"]
  n = len(seeds)
  lines = ["# LocCa study in miniature: results", "",
           f"Produced by `{meta['command']}` ({meta['generated']}). Every number is read "
           f"from the runs' `metrics.jsonl` under `{meta['workdir']}`, or, for runs this "
           "invocation carried from an earlier one's record, where that one read them "
           f"(see Provenance); every per-run number is in `{json_name}`.", "",
           f"Scale `{sc.name}` (`locca_shapes/{sc.dataset}`), seeds {', '.join(map(str, seeds))}"
           f" (n = {n}). Cells: mean ± std over seeds, std = sample standard deviation "
           "(numpy, ddof=1)" + ("" if n > 1 else "; with one seed, the value alone") + ". "
           f"Evaluations on the test split (first {sc.eval_images or 'all'} images for caption "
           f"/ rec; probe on {sc.probe_examples[2] or 'all'} test images).", "",
           "## Summary", ""]
  pending = [f"{a} seed {s}" for s in seeds for a in arms if str(s) not in results[a]]
  if pending:
    lines[-2:-2] = [
        f"**Partial**: {len(arms) * n - len(pending)} of {len(arms) * n} runs (arm x seed) "
        "finished; pending (cells `pending`, left out of the means): "
        f"{', '.join(pending)}. Rerun the command to continue.", ""]
  lines.append("| arm | " + " | ".join(m.short for m in METRICS) + " |")
  lines.append("|---" * (len(METRICS) + 1) + "|")
  for arm in arms:
    lines.append(f"| {arms_lib.ARMS[arm].title} | " + " | ".join(
        _cell(metric_values(results, arm, m)) if results[arm] else "pending"
        for m in METRICS) + " |")
  lines += ["", "n/a: the arm does not train ARef, so it has no zero-shot ARef.", ""]

  for m in METRICS:
    note = f"`{m.key}` at the last step of the {m.stage} runs."
    if m.reference:
      ref = [float(run[m.stage]["metrics"][m.reference[0]])
             for a in arms for run in results[a].values()
             if m.reference[0] in run[m.stage]["metrics"]]
      if ref:
        note += f" Baseline, {m.reference[1]}: {fmt(float(np.mean(ref)))} (`{m.reference[0]}`)."
    lines += [f"## {m.title}", "", note, "",
              "| arm | mean ± std | n | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---" * (3 + n) + "|"]
    for arm in arms:
      per_seed = []
      for s in seeds:
        run = results[arm].get(str(s))
        v = None if run is None else run[m.stage]["metrics"].get(m.key)
        per_seed.append("pending" if run is None else "n/a" if v is None else fmt(float(v)))
      values = metric_values(results, arm, m)
      lines.append(f"| {arms_lib.ARMS[arm].title} | {_cell(values)} | {len(values)} | "
                   + " | ".join(per_seed) + " |")
    lines.append("")

  base = arms_lib.scaled_base(sc, data_dir)
  lines += ["## Arms", "",
            f"Each arm is a pure transformation of `{arms_lib.BASE_CONFIG}` "
            "(`locca_jax.study.arms.ARMS`). "
            "Equal compute per arm = the same encoder and decoder, the same "
            f"{sc.pretrain_steps} steps at batch {sc.batch_size} "
            f"({sc.pretrain_steps * sc.batch_size} images seen per arm), the same optimizer "
            "and schedule. The decoder work is not equal: one decoder row per task per image "
            "(the paper, too, compares at equal examples seen); the measured training "
            "throughput shows the cost.", "",
            "| arm | what | decoder rows / image | train img/s (median) | pretrain s | probe s "
            "| transfer s |", "|---|---|---|---|---|---|---|"]
  for arm in arms:
    cfg = arms_lib.pretrain_config(arm, sc, seeds[0], data_dir)
    runs = results[arm].values()
    ips = [r["pretrain"]["img_per_sec"] for r in runs if r["pretrain"]["img_per_sec"]]
    wall = lambda stage, key: [r[stage]["timing"][key]["wall_s"] for r in runs
                               if key in r[stage]["timing"]]
    walls = [_wall_cell(wall(st, key)) for st, key in (
        ("pretrain", "pretrain"), ("pretrain", "probe"), ("transfer", "transfer"))]
    lines.append(f"| {arms_lib.ARMS[arm].title} | {arms_lib.ARMS[arm].description} | "
                 f"{len(cfg.input.tasks)} | "
                 f"{f'{np.mean(ips):.1f}' if ips else 'n/a'} | " + " | ".join(walls) + " |")
  lines += ["", "Wall times (s): mean over seeds of the time the study's invocations spent on "
            "each stage (an invocation killed mid-stage is not counted); pretrain and transfer "
            "include their final evaluations.", "",
            "Overrides of each arm against the scaled base config (below):", ""]
  for arm in arms:
    lines += [f"**{arms_lib.ARMS[arm].title}** (`--arms={arm}`):", "", "```"]
    lines += (overrides.override_lines(base, arms_lib.ARMS[arm].transform(base))
              or ["(none: the base config)"])
    lines += ["```", ""]

  example = arms_lib.pretrain_config(arms[0], sc, seeds[0], data_dir)
  example_dirs = arms_lib.run_workdirs(meta["workdir"], arms[0], seeds[0])
  transfer = arms_lib.transfer_config(sc, seeds[0], example_dirs["pretrain"], data_dir)
  lines += ["## Shared settings and commands", "",
            f"Pretraining = `{arms_lib.BASE_CONFIG}` with these overrides (the scale, the "
            "seed, the test-split evaluators), then the arm's overrides; shown for "
            f"`{arms[0]}`, seed {seeds[0]}:", "", "```"]
  lines += overrides.train_command(arms_lib.BASE_CONFIG, arms_lib.base_config(), example,
                                   example_dirs["pretrain"])
  lines += ["```", "", f"Transfer = `{arms_lib.TRANSFER_CONFIG}` with (every arm alike; "
            "`init_from.workdir` = that run's pretrain workdir):", "", "```"]
  lines += overrides.train_command(arms_lib.TRANSFER_CONFIG, arms_lib.transfer_base_config(),
                                   transfer, example_dirs["transfer"])
  lines += ["```", "",
            "Probe (`locca_jax/evaluators/probe.py`, run by the study on the pretrain "
            "checkpoint; results appended to its metrics.jsonl as `probe/*`):", "", "```",
            json.dumps(arms_lib.probe_eval(sc)), "```", "",
            "Each run's complete config is its `config.json`; workdirs are "
            f"`{meta['workdir']}/<arm>/seed<k>/{{pretrain,transfer}}`.", "",
            f"Wall time of this invocation: {meta['invocation_wall_s']:.0f} s (stages it "
            "skipped as complete cost nothing).", "",
            "## Provenance", "",
            "Where and when each run's numbers were read from its workdir's files, by which "
            "code. Carried: kept from the record of an earlier invocation of this command "
            "(another machine or checkout) whose configs equal this invocation's, not rerun.",
            "", "| arm | seed | read from | read at | git commit | carried |",
            "|---|---|---|---|---|---|"]
  for arm in arms:
    for seed, run in results[arm].items():
      rec = run.get("recorded", {})
      lines.append(f"| {arms_lib.ARMS[arm].title} | {seed} | `{rec.get('workdir', '?')}` on "
                   f"{rec.get('host', '?')} | {rec.get('generated', '?')} | "
                   f"{rec.get('git_commit') or 'unknown'} | "
                   f"{'yes' if rec.get('carried') else 'no'} |")
  lines += ["", "## Machine", "", "This invocation's:", ""]
  mi = meta["machine"]
  lines += [f"- {mi['platform']}, {mi['cpu_count']} CPUs, backend `{mi['backend']}`, devices "
            f"{', '.join(mi['devices'])}",
            f"- Python {mi['python']}; " + ", ".join(
                f"{k} {v}" for k, v in mi["versions"].items() if v),
            f"- git commit {mi['git_commit'] or 'unknown'}", ""]
  return "\n".join(lines)


def _wall_cell(values) -> str:
  return f"{np.mean(values):.0f}" if values else "n/a"
