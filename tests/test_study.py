"""The study runner: arms, scales, the probe's arithmetic, and a tiny end-to-end study."""
import json
import os
import shlex
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from configs import cap_b16
from configs import cappa_b16
from configs import locca_b16
from locca_jax.evaluators import probe
from locca_jax.study import arms as arms_lib
from locca_jax.study import overrides
from locca_jax.study import report as report_lib
from locca_jax.study import runner
from locca_jax.study import stages
from tests.conftest import REPO


def _without_evals(config):
  flat = overrides.flatten(config)
  return {k: overrides.normalized(v) for k, v in flat.items() if not k.startswith("evals.")}


def test_cap_and_cappa_arms_equal_the_shipped_baseline_configs():
  base = locca_b16.get_config("runlocal")
  assert _without_evals(arms_lib.ARMS["cap"].transform(base)) == _without_evals(
      cap_b16.get_config("runlocal"))
  assert _without_evals(arms_lib.ARMS["cappa"].transform(base)) == _without_evals(
      cappa_b16.get_config("runlocal"))


def test_arms_are_pure_and_change_only_what_they_name():
  base = locca_b16.get_config("runlocal")
  before = base.to_json()
  diffs = {name: overrides.config_diff(base, arm.transform(base))
           for name, arm in arms_lib.ARMS.items()}
  assert base.to_json() == before  # no arm mutated its input
  assert diffs["locca"] == ({}, [])  # the base config is LocCa
  assert diffs["cap"] == ({"input.tasks": ("cap",)}, [])
  assert diffs["cappa"] == ({"input.tasks": ("cap",), "model.parallel_fraction": 0.75}, [])
  assert diffs["locca_no_aref"] == ({"input.tasks": ("cap", "gcap")}, [])
  assert diffs["locca_no_gcap"] == ({"input.tasks": ("cap", "aref")}, [])
  assert diffs["locca_loc"] == ({"input.tokenizer.box_codec": "loc"}, [])


@pytest.mark.parametrize("arm", ["cap", "locca_loc"])
def test_the_reported_train_command_rebuilds_the_study_config(arm):
  """The override lines of the report, parsed by ml_collections as the trainer's --config
  flag would, give the study's config (up to the evaluators it deletes)."""
  sc = arms_lib.parse_scale("default")
  config = arms_lib.pretrain_config(arm, sc, seed=2)
  base = locca_b16.get_config("runlocal")
  lines = [l for l in overrides.override_lines(base, config) if not l.startswith("#")]
  argv = ["prog", f"--config={os.path.join(REPO, 'configs', 'locca_b16.py')}:runlocal",
          *shlex.split(" ".join(lines))]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  _, removed = overrides.config_diff(base, config)
  keep = lambda flat: {k: overrides.normalized(v) for k, v in flat.items()
                       if not any(k == r or k.startswith(r + ".") for r in removed)}
  assert keep(overrides.flatten(fv.config)) == keep(overrides.flatten(config))
  assert fv.config.seed == 2 and fv.config.total_steps == sc.pretrain_steps


def test_scale_multiplier_scales_the_default_steps_and_rejects_nonsense():
  d, half = arms_lib.SCALES["default"], arms_lib.parse_scale("0.5")
  assert (half.pretrain_steps, half.transfer_steps) == (d.pretrain_steps // 2,
                                                        d.transfer_steps // 2)
  assert half.pretrain_warmup == d.pretrain_warmup // 2
  assert (half.batch_size, half.eval_images) == (d.batch_size, d.eval_images)
  for bad in ("0", "-1", "huge", "inf"):
    with pytest.raises(ValueError, match="--scale"):
      arms_lib.parse_scale(bad)


def test_dataset_flag_moves_every_stage_to_that_locca_shapes_config():
  sc = arms_lib.with_dataset(arms_lib.parse_scale("default"), "colors")
  assert sc.dataset == "colors" and sc.pretrain_steps == arms_lib.SCALES["default"].pretrain_steps
  pretrain = arms_lib.pretrain_config("locca", sc, seed=0)
  transfer = arms_lib.transfer_config(sc, 0, "/w/pretrain")
  names = {pretrain.input.data.name, transfer.input.data.name,
           *(e.data.name for c in (pretrain, transfer) for e in c.evals.values()),
           arms_lib.probe_eval(sc)["data"]["name"]}
  assert names == {"locca_shapes/colors"}
  assert arms_lib.with_dataset(sc, None) is sc
  with pytest.raises(ValueError, match="--dataset='colours'"):
    arms_lib.with_dataset(sc, "colours")


def test_pretraining_evaluates_zero_shot_aref_only_for_arms_that_train_it():
  sc = arms_lib.parse_scale("default")
  for arm in arms_lib.ARMS:
    evals = arms_lib.pretrain_config(arm, sc, seed=0).evals
    expected = {"caption", "rec"} if arm in ("locca", "locca_no_gcap", "locca_loc") else {
        "caption"}
    assert set(evals.keys()) == expected
    assert all(evals[n].data.split == "test" for n in expected)
  transfer = arms_lib.transfer_config(sc, 0, "/w/pretrain")
  assert set(transfer.evals.keys()) == {"rec"} and transfer.evals.rec.data.split == "test"
  assert transfer.frozen == ("img/.*",) and transfer.init_from.workdir == "/w/pretrain"


def test_an_arm_without_the_metric_reports_n_a():
  results = {"cap": {"0": {"pretrain": {"metrics": {"caption/cider": 0.5}}}}}
  zeroshot = next(m for m in report_lib.METRICS if m.name == "zeroshot_rec_acc")
  assert report_lib.metric_values(results, "cap", zeroshot) == []
  assert report_lib._cell([]) == "n/a"  # pylint: disable=protected-access


def test_mean_std_is_the_sample_std():
  mean, std = report_lib.mean_std([1.0, 2.0, 3.0, 6.0])
  assert mean == 3.0
  assert std == pytest.approx(np.sqrt(((4 + 1 + 0 + 9) / 3)))  # ddof=1 by hand
  assert report_lib.mean_std([0.25]) == (0.25, None)


def test_average_precision_by_hand():
  # Ranked: +, -, +, -: precision 1/1 at the first positive, 2/3 at the second.
  assert probe.average_precision(np.array([0.9, 0.8, 0.7, 0.6]),
                                 np.array([1, 0, 1, 0], bool)) == pytest.approx((1 + 2 / 3) / 2)
  # All tied: one threshold, precision = prevalence.
  assert probe.average_precision(np.zeros(4), np.array([1, 0, 0, 0], bool)) == 0.25
  # A tie between a positive and a negative at the top counts as one threshold (P = 1/2).
  assert probe.average_precision(np.array([1.0, 1.0, 0.0]),
                                 np.array([1, 0, 0], bool)) == 0.5


def test_ridge_probe_reads_linearly_coded_labels():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, size=(400, 3)) * 2.0 - 1  # +-1 targets
  x = np.concatenate([y @ rng.normal(size=(3, 8)), rng.normal(size=(400, 4))], axis=1)
  x = x + 0.05 * rng.normal(size=x.shape)
  train, test = probe.standardize(x[:300], x[300:])
  scores = probe.ridge_predict(train, y[:300], test, l2=1e-3)
  for k in range(3):
    assert probe.average_precision(scores[:, k], y[300:, k] > 0) == 1.0


def test_probe_names_a_label_feature_the_dataset_lacks(shapes_data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("locca_shapes/tiny", data_dir=shapes_data_dir)
  assert probe.class_names(builder, "probe", ("size",)) == {"size": ["small", "large"]}
  with pytest.raises(ValueError, match=r"config.evals.probe.labels: .* objects/texture"):
    probe.class_names(builder, "probe", ("color", "texture"))


def test_a_workdir_made_with_another_config_is_not_reused(tmp_path):
  sc = arms_lib.parse_scale("default")
  other = arms_lib.pretrain_config("locca", arms_lib.parse_scale("2"), seed=0)
  (tmp_path / "config.json").write_text(other.to_json())
  with pytest.raises(ValueError, match=r"config.json: .*total_steps: 400 -> 200"):
    stages.ensure_trained(arms_lib.pretrain_config("locca", sc, seed=0), str(tmp_path), "pretrain")


def _final_metrics(workdir, step):
  """Independent of the study code: the values logged at `step` in metrics.jsonl."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["step"] == step:
        out.update(record)
  return out


def _report_row(report, title, arm_title):
  section = report.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cells[0] == arm_title:
      return cells
  raise AssertionError(f"no row {arm_title!r} under {title!r}")


def test_a_partial_study_reports_the_finished_runs_and_marks_the_rest_pending(tmp_path):
  sc = arms_lib.parse_scale("default")

  def log(workdir, step, **record):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(dict(step=step, **record)) + "\n")

  pretrained = {"caption/cider": 1.0, "probe/map": 0.9, "probe/count_acc": 0.5}
  done = arms_lib.run_workdirs(tmp_path, "cap", 0)
  unevaluated = arms_lib.run_workdirs(tmp_path, "cap", 1)
  log(done["pretrain"], sc.pretrain_steps, **pretrained)
  log(done["transfer"], sc.transfer_steps, **{"rec/acc@0.5": 0.25, "rec/miou": 0.3})
  log(unevaluated["pretrain"], sc.pretrain_steps, **pretrained)
  log(unevaluated["transfer"], sc.transfer_steps, loss=1.0)  # killed before its rec
  # Seed 2 never started.
  results = report_lib.collect(str(tmp_path), ["cap"], [0, 1, 2], sc, None)
  assert list(results["cap"]) == ["0"]

  meta = dict(command="python -m locca_jax.study", seeds=[0, 1, 2], arms=["cap"],
              workdir=str(tmp_path), generated="now", invocation_wall_s=1.0,
              machine=report_lib.machine_info())
  report = report_lib.render_report(meta, results, sc, None, "R.json")
  assert "**Partial**: 1 of 3 runs (arm x seed) finished" in report
  assert "cap seed 1, cap seed 2" in report
  cells = _report_row(report, "Frozen-encoder REC transfer: Acc@0.5 (test)", "Cap")
  assert cells[1:] == ["0.2500", "1", "0.2500", "pending", "pending"]
  assert "| Cap | 0.2500 | 0.3000 | n/a | n/a | 1.0000 | 0.9000 | 0.5000 |" in report

  results = report_lib.collect(str(tmp_path), ["cap", "cappa"], [0], sc, None)
  report = report_lib.render_report(dict(meta, seeds=[0], arms=["cap", "cappa"]), results,
                                    sc, None, "R.json")
  assert "| CapPa | " + " | ".join(["pending"] * len(report_lib.METRICS)) + " |" in report


def test_runs_recorded_by_an_earlier_report_are_carried_to_a_fresh_workdir(tmp_path):
  # A study longer than one machine's lease: machine A finished Cap seed 0 and recorded it in
  # the report's .json; machine B, with an empty --workdir, keeps that run instead of
  # rerunning it, but only while the config it would run is the recorded one.
  sc = arms_lib.parse_scale("default")
  first_root, out = tmp_path / "machine_a", tmp_path / "R.md"
  done = arms_lib.run_workdirs(first_root, "cap", 0)
  for stage, step, record in (
      ("pretrain", sc.pretrain_steps, {"caption/cider": 1.5, "probe/map": 0.8,
                                       "probe/count_acc": 0.5}),
      ("transfer", sc.transfer_steps, {"rec/acc@0.5": 0.25, "rec/miou": 0.3})):
    os.makedirs(done[stage])
    with open(os.path.join(done[stage], "metrics.jsonl"), "w") as f:
      f.write(json.dumps(dict(step=step, **record)) + "\n")
  machine = dict(report_lib.machine_info(), git_commit="abc123", platform="machine-a")
  kwargs = dict(arms=["cap"], seeds=[0, 1], sc=sc, data_dir=None, command="study",
                wall=1.0, statuses=[], machine=machine)
  report_lib.write_report(str(out), root=str(first_root), **kwargs)

  second_root = str(tmp_path / "machine_b")
  carried = report_lib.recorded_runs(str(tmp_path / "R.json"), second_root,
                                     ["cap", "cappa"], [0, 1], sc, None)
  assert list(carried["cap"]) == ["0"] and carried["cappa"] == {}
  longer = report_lib.recorded_runs(str(tmp_path / "R.json"), second_root, ["cap"], [0],
                                    arms_lib.parse_scale("2"), None)
  assert longer["cap"] == {}  # another scale's configs: rerun, not carried
  elsewhere = report_lib.recorded_runs(str(tmp_path / "R.json"), second_root, ["cap"], [0],
                                       sc, "/data/tfds")
  assert list(elsewhere["cap"]) == ["0"]  # the same data in another place

  report_lib.write_report(str(out), root=second_root, carried=carried,
                          **dict(kwargs, machine=dict(machine, git_commit="def456")))
  report = out.read_text()
  cells = _report_row(report, "Frozen-encoder REC transfer: Acc@0.5 (test)", "Cap")
  assert cells[1:] == ["0.2500", "1", "0.2500", "pending"]
  provenance = _report_row(report, "Provenance", "Cap")
  assert provenance[1] == "0" and str(first_root) in provenance[2]
  assert provenance[4:] == ["abc123", "yes"]
  # Carried again from the rewritten record, it keeps its first provenance.
  again = report_lib.recorded_runs(str(tmp_path / "R.json"), second_root, ["cap"], [0], sc, None)
  assert again["cap"]["0"]["recorded"]["git_commit"] == "abc123"


@pytest.mark.slow
def test_tiny_study_reports_the_runs_numbers_and_resumes(shapes_data_dir, tmp_path):
  # One arm, LocCa (it has every metric), keeps this under a minute on 2 cores; the arms'
  # configs are checked above without training, and every arm runs the same stage code.
  root, out = tmp_path / "runs", tmp_path / "docs" / "RESULTS.md"
  arms, sc = ["locca"], arms_lib.SCALES["tiny"]
  kwargs = dict(out=str(out), root=str(root), seeds=["0"], scale="tiny", arms=arms,
                data_dir=shapes_data_dir, command="python -m locca_jax.study --scale=tiny")
  first = runner.run_study(**kwargs)
  assert {r["status"] for r in first["runs"]} == {"trained", "probed"}
  report = out.read_text()
  raw = json.loads((tmp_path / "docs" / "RESULTS.json").read_text())
  assert "`python -m locca_jax.study --scale=tiny`" in report

  steps = dict(pretrain=sc.pretrain_steps, transfer=sc.transfer_steps)
  for arm in arms:
    logged = {stage: _final_metrics(root / arm / "seed0" / stage, step)
              for stage, step in steps.items()}
    for m in report_lib.METRICS:
      cells = _report_row(report, m.title, arms_lib.ARMS[arm].title)
      value = logged[m.stage][m.key]
      assert np.isfinite(value)
      assert raw["runs"][arm]["0"][m.stage]["metrics"][m.key] == value
      assert cells[1:4] == [f"{value:.4f}", "1", f"{value:.4f}"]  # mean, n, seed 0
    assert 0.0 <= logged["pretrain"]["probe/map"] <= 1.0
    assert logged["pretrain"]["probe/num_labels"] == 6 + 6 + 2 + 36
  assert "**LocCa** (`--arms=locca`)" in report and "**Cap**" not in report
  assert "--config.evals.rec.data.split=test" in report

  # A second invocation finds every stage complete: it runs nothing and changes no run's file.
  before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
  start = time.monotonic()
  second = runner.run_study(**kwargs)
  assert {r["status"] for r in second["runs"]} == {"skipped"}
  assert len(second["runs"]) == 3 * len(arms)
  assert time.monotonic() - start < 10
  assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
  assert out.read_text().split("## Arms")[0].split("\n", 3)[3] == report.split(
      "## Arms")[0].split("\n", 3)[3]  # the same tables (the first lines carry the date)

  # On a fresh workdir (another machine), the recorded runs are kept: nothing runs.
  third = runner.run_study(**dict(kwargs, root=str(tmp_path / "elsewhere")))
  assert {r["status"] for r in third["runs"]} == {"recorded"}
  assert not (tmp_path / "elsewhere").exists() or not any(
      p.is_file() for p in (tmp_path / "elsewhere").rglob("*"))
  assert out.read_text().split("## Arms")[0].split("\n", 3)[3] == report.split(
      "## Arms")[0].split("\n", 3)[3]


def test_the_command_line_reaches_the_study_with_its_flags(tmp_path):
  """`python -m locca_jax.study` parses its flags and hands them to the runner, which rejects a
  bad --scale before running anything."""
  result = subprocess.run(
      [sys.executable, "-m", "locca_jax.study", f"--out={tmp_path / 'R.md'}",
       f"--workdir={tmp_path / 'w'}", "--scale=bogus", "--seeds=0", "--arms=cap"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  assert "--scale='bogus': expected one of ['default', 'full', 'tiny']" in result.stderr
  assert not (tmp_path / "R.md").exists()
