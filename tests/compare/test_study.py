"""`python -m attnjax.compare`: the study's bookkeeping end to end, its statistics, plots and cost columns."""

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from attnjax import compare, train
from attnjax.compare import cost, plots, report, stats
from attnjax.validate import InputError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
Config = train.Config
STUDY = ["--blocks", "se", "--seeds", "2", "--epochs", "1", "--dataset", "digits", "--cost-repeats", "2"]


def study_command(workdir, *extra):
    return [sys.executable, "-m", "attnjax.compare", *STUDY, "--workdir", str(workdir), "--no-progress", *extra]


def run_study(workdir, *extra):
    return subprocess.run(study_command(workdir, *extra), capture_output=True, text=True, timeout=600, cwd=ROOT)


def read_csv(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def metrics_files(workdir):
    return sorted(Path(workdir, "runs").glob("*/seed-*/metrics.jsonl"))


def implied_verdict(paired, p, p_holm, alpha=0.05):
    """The verdict the paired differences of the one entry compared with the baseline imply, checking the p-values.

    The paired t test's two-sided p, computed here with scipy's own test (identical differences
    have no spread: p is 0 unless they are all 0); Holm's correction over one comparison leaves it
    as it is. Better or worse only when that p is below alpha, by the sign of the mean difference.
    """
    if np.ptp(paired) == 0:
        expected_p = 0.0 if np.mean(paired) != 0 else 1.0
    else:
        expected_p = float(scipy_stats.ttest_1samp(paired, 0.0).pvalue)
    assert p == pytest.approx(expected_p, rel=1e-9, abs=1e-15)
    assert p_holm == pytest.approx(expected_p, rel=1e-9, abs=1e-15)  # m = 1: min(1, 1 * p)
    if expected_p >= alpha:
        return stats.NOISE
    return stats.BETTER if np.mean(paired) > 0 else stats.WORSE


def test_implied_verdict_is_each_verdict_for_differences_that_imply_it():
    # df = 1: p = 1 - (2 / pi) arctan(|t|), t = mean / (sd / sqrt 2)
    assert implied_verdict([0.010, 0.011], 1 - 2 / math.pi * math.atan(21), 1 - 2 / math.pi * math.atan(21)) == (
        stats.BETTER
    )
    assert implied_verdict([-0.010, -0.011], *[1 - 2 / math.pi * math.atan(21)] * 2) == stats.WORSE
    assert implied_verdict([0.01, -0.005], *[1 - 2 / math.pi * math.atan(1 / 3)] * 2) == stats.NOISE
    assert implied_verdict([0.01, 0.01], 0.0, 0.0) == stats.BETTER and implied_verdict([0, 0], 1.0, 1.0) == stats.NOISE


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """A 2-block (none, se) x 2-seed study on digits, 1 epoch, run once without interruption."""
    workdir = tmp_path_factory.mktemp("study") / "digits"
    proc = run_study(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


# --- bookkeeping, end to end -------------------------------------------------------------------


def test_study_runs_end_to_end(finished_study):
    workdir, proc = finished_study
    assert "4 runs, 0 finished; 4 to train" in proc.stdout
    runs = read_csv(workdir / compare.RUNS_CSV)
    assert [(r["block"], r["seed"], r["status"]) for r in runs] == [
        ("none", "0", "finished"),
        ("none", "1", "finished"),
        ("se", "0", "finished"),
        ("se", "1", "finished"),
    ]
    for run in runs:  # each run is an ordinary, inspectable run folder
        history = [json.loads(line) for line in open(workdir / run["workdir"] / "metrics.jsonl")]
        assert len(history) == 1 and float(run["test_accuracy"]) == history[-1]["test_accuracy"]
        saved = json.load(open(workdir / run["workdir"] / "config.json"))["config"]
        assert (saved["block"], saved["seed"], saved["epochs"]) == (run["block"], int(run["seed"]), 1)
    summary = read_csv(workdir / compare.SUMMARY_CSV)
    assert [row["block"] for row in summary] == ["none", "se"]
    for row in summary:
        accuracies = [float(r["test_accuracy"]) for r in runs if r["block"] == row["block"]]
        assert float(row["accuracy_mean"]) == pytest.approx(np.mean(accuracies), abs=1e-12)
        assert int(row["seeds"]) == 2 and int(row["params"]) > 0 and float(row["train_mflops_per_image"]) > 0
    se = summary[1]
    paired = [float(a["test_accuracy"]) - float(b["test_accuracy"]) for a, b in zip(runs[2:], runs[:2], strict=True)]
    assert float(se["diff_mean"]) == pytest.approx(np.mean(paired), abs=1e-12)
    assert se["verdict"] == implied_verdict(paired, float(se["diff_p"]), float(se["diff_p_holm"]))
    text = (workdir / compare.SUMMARY_MD).read_text()
    assert "| se" in text and "4 of 4 runs finished" in text and "python -m attnjax.compare" in text
    for name in (compare.PARETO_PNG, compare.CURVES_PNG):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_every_finished_run(finished_study):
    workdir, _ = finished_study
    before = {path: path.stat().st_mtime_ns for path in metrics_files(workdir)}
    assert len(before) == 4
    proc = run_study(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 runs, 4 finished; 0 to train" in proc.stdout
    assert "measuring the cost" not in proc.stdout  # cost.json is reused
    assert {path: path.stat().st_mtime_ns for path in metrics_files(workdir)} == before


def test_interrupted_study_completes_on_rerun(finished_study, tmp_path):
    reference, _ = finished_study
    workdir = tmp_path / "interrupted"
    proc = subprocess.Popen(study_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    third = workdir / "runs" / "none" / "seed-1" / "progress"  # the third run (seed by seed) has taken a step
    deadline = time.monotonic() + 300
    while not third.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "rerun the same command to continue the study" in err
    partial = read_csv(workdir / compare.RUNS_CSV)  # the finished runs' summary is written on the way out
    assert [r["status"] for r in partial[::2]] == ["finished", "finished"]  # none and se, seed 0
    resumed = run_study(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 finished; 2 to train" in resumed.stdout or "3 finished; 1 to train" in resumed.stdout

    def results(path):
        return [(r["block"], r["seed"], r["status"], r["test_correct"]) for r in read_csv(path / compare.RUNS_CSV)]

    assert results(workdir) == results(reference)  # the same accuracies as the uninterrupted study


def test_a_run_with_other_options_is_refused_before_any_work(finished_study):
    workdir, _ = finished_study
    before = {path: path.stat().st_mtime_ns for path in metrics_files(workdir)}
    proc = run_study(workdir, "--learning-rate", "0.01")
    assert proc.returncode == 2
    assert "holds a run with other options" in proc.stderr and "--learning-rate" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {path: path.stat().st_mtime_ns for path in metrics_files(workdir)} == before


@pytest.mark.parametrize(
    "blocks, message",
    [
        (["sq"], "unknown block 'sq'"),
        (["cbam:reduction=x"], "reduction"),
        (["none:reduction=2"], "has no options"),
    ],
)
def test_bad_blocks_are_one_line_errors(tmp_path, blocks, message):
    proc = subprocess.run(
        [sys.executable, "-m", "attnjax.compare", "--blocks", *blocks, "--workdir", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()


def test_parse_entries():
    entries = compare.parse_entries(["se,eca", "cbam:reduction=8:kernel_size=5", "se"])
    assert [e.label for e in entries] == ["none", "se", "eca", "cbam:reduction=8:kernel_size=5"]
    assert entries[-1].dirname == "cbam+reduction-8+kernel_size-5"
    every = compare.parse_entries(["all"])
    assert every[0].label == "none" and len(every) == len({e.label for e in every}) > 10
    with pytest.raises(InputError, match="valid names"):
        compare.parse_entries(["nope"])


# --- statistics on numbers with known answers ----------------------------------------------------

# Student's t with 2 degrees of freedom has a closed form: F(t) = 1/2 + t / (2 sqrt(t^2 + 2)).
T_975_DF2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))  # solves F(t) = 0.975: 4.302652...


def test_t_interval_known_values():
    interval = stats.t_interval([1.0, 2.0, 3.0])
    assert T_975_DF2 == pytest.approx(4.302652729, abs=1e-9)
    assert (interval.mean, interval.sd, interval.n) == (2.0, 1.0, 3)
    assert interval.low == pytest.approx(2 - T_975_DF2 / math.sqrt(3), abs=1e-12)
    assert interval.high == pytest.approx(2 + T_975_DF2 / math.sqrt(3), abs=1e-12)
    five = stats.t_interval([0.1, 0.2, 0.3, 0.4, 0.5])  # t(0.975, 4) = 2.776 (tables)
    assert five.half_width == pytest.approx(2.776 * np.std([1, 2, 3, 4, 5], ddof=1) / 10 / math.sqrt(5), rel=2e-4)
    one = stats.t_interval([0.9])
    assert one.mean == 0.9 and math.isnan(one.low) and math.isnan(one.sd)


def test_paired_difference_known_values():
    block, baseline = [0.90, 0.92, 0.91], [0.89, 0.90, 0.90]
    difference = stats.paired_difference(block, baseline)
    d = np.array(block) - np.array(baseline)  # 0.01, 0.02, 0.01: mean 1/75, sd 1/(100 sqrt 3), t = 4
    assert difference.interval.mean == pytest.approx(d.mean(), abs=1e-15)
    assert difference.interval.sd == pytest.approx(0.01 / math.sqrt(3), rel=1e-9)
    assert difference.p_value == pytest.approx(1 - 4 / math.sqrt(18), rel=1e-6)  # two-sided, closed form for df=2
    assert difference.interval.half_width == pytest.approx(T_975_DF2 * 0.01 / 3, rel=1e-9)
    # Unpaired, the same numbers are noise: the baseline's seeds vary as much as the gap.
    assert stats.t_interval(block).low < stats.t_interval(baseline).high
    with pytest.raises(ValueError):
        stats.paired_difference([0.9, 0.9], [0.9])


def test_holm_and_verdicts():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.2, math.nan])[0] == 0.2 and math.isnan(stats.holm([0.2, math.nan])[1])
    up = stats.paired_difference([0.95, 0.96, 0.95], [0.90, 0.90, 0.91])
    assert stats.verdict(up, 0.01) == stats.BETTER
    assert stats.verdict(up, 0.06) == stats.NOISE  # corrected p above alpha: never ranked
    down = stats.paired_difference([0.85, 0.86, 0.85], [0.90, 0.90, 0.91])
    assert stats.verdict(down, 0.01) == stats.WORSE


def test_pareto_front():
    #            cheap+bad, cheap+good, dear+best, dear+worse (dominated), tie with cheap+good
    front = stats.pareto_front([1.0, 1.0, 2.0, 2.0, 1.0], [0.80, 0.90, 0.95, 0.85, 0.90])
    assert front == [False, True, True, False, True]


def sample_rows():
    params = {"none": 1000, "se": 1100, "mhsa": 5000}
    times = [(1.0, 1.1, 0.9), (1.2, 1.1, 1.0), (2.0, 2.2, 1.8)]
    costs = {label: cost.NetworkCost(label, params[label], 1e8, 2**20, times[i]) for i, label in enumerate(params)}
    finals = {
        "none": {0: 0.900, 1: 0.905, 2: 0.895},
        "se": {0: 0.950, 1: 0.953, 2: 0.951},
        "mhsa": {0: 0.901, 1: 0.899, 2: 0.906},
    }
    return report.summarize(list(params), "none", costs, finals), finals


def test_summary_rows_known_values():
    rows, finals = sample_rows()
    none, se, mhsa = rows
    assert none.verdict == "baseline" and none.difference is None
    assert se.accuracy.mean == pytest.approx(np.mean([0.950, 0.953, 0.951]))
    assert se.time_ratio == pytest.approx(np.median([1.2 / 1.0, 1.1 / 1.1, 1.0 / 0.9]))  # per round
    assert se.time_ratio_iqr[0] <= se.time_ratio <= se.time_ratio_iqr[1]
    assert se.difference.p_value < 0.05 / 2 and se.verdict == stats.BETTER  # Holm: 2 comparisons
    assert mhsa.verdict == stats.NOISE
    assert [r.front_time for r in rows] == [True, True, False]  # mhsa: dearer than se and less accurate
    lines = report.plain_words(rows, "none")
    assert any("se (+" in line for line in lines) and any(
        "Within the noise of none (not ranked): mhsa" in x for x in lines
    )
    table = report.markdown_table(rows)
    assert table.count("\n") == 4 and "| se ◆ | 3 | 1,100 |" in table


# --- plots: the plotted points are the summary's numbers -----------------------------------------


def test_pareto_points_equal_the_summary(tmp_path):
    rows, _ = sample_rows()
    fig = plots.pareto_figure(rows, "none")
    points = plots.plotted_points(fig)
    for row in rows:
        (time_point, params_point) = points[row.label]
        assert time_point == pytest.approx((row.time_ratio, row.accuracy.mean * 100), abs=1e-9)
        assert params_point == pytest.approx((row.params - 1000, row.accuracy.mean * 100), abs=1e-9)
    bars = {c.get_label(): c for c in fig.axes[0].containers}
    segments = [seg for collection in bars["se"].lines[2] for seg in collection.get_segments()]
    vertical = next(s for s in segments if s[0][0] == s[1][0])
    assert sorted(vertical[:, 1]) == pytest.approx([rows[1].accuracy.low * 100, rows[1].accuracy.high * 100])
    plots.save(fig, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_curves_plot_the_mean_per_epoch():
    curves = {"none": [0.8, 0.9], "se": [0.82, 0.93]}
    fig = plots.curves_figure(curves, "none")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    for label, means in curves.items():
        assert list(lines[label].get_xdata()) == [1, 2]
        assert list(lines[label].get_ydata()) == pytest.approx([m * 100 for m in means])


# --- cost columns: FLOPs grow with input size as the blocks' math says ----------------------------


def test_train_flops_grow_as_the_math_says():
    """Per image, a block's own FLOPs (its network's less the baseline's) at P = 8x8, 12x12, 16x16 positions.

    AttentionNet halves inputs above 8x8 once before the block, so 16, 24, 32-pixel images put the
    block on 64, 144 and 256 positions. Non-local's affinity (P x P x C') and its use (P x P x C')
    are quadratic: 2 matmuls x 2 FLOPs per multiply-add, forward, and twice that backward,
    12 P^2 C' with C' = 32. SE is linear in P (pooling and scaling) plus constant dense layers.
    """
    base = Config(dataset="digits", batch_size=2, block="none")
    sizes, positions = (16, 24, 32), np.array([64.0, 144.0, 256.0])

    def own_flops(block):
        return np.array(
            [
                cost.train_flops_per_image(Config(**{**base.to_dict(), "block": block}), (s, s, 1), 10)
                - cost.train_flops_per_image(base, (s, s, 1), 10)
                for s in sizes
            ]
        )

    # Exact fit of own(P) = a + b P + c P^2 through the three points.
    vandermonde = np.stack([np.ones(3), positions, positions**2], axis=1)
    _, _, quadratic = np.linalg.solve(vandermonde, own_flops("nonlocal"))
    assert quadratic == pytest.approx(12 * 32, rel=0.05)  # the softmax adds a few FLOPs per pair
    se = own_flops("se")
    a, b, c = np.linalg.solve(vandermonde, se)
    assert b > 0 and abs(c) * 256**2 < 0.01 * se[-1]  # linear: no quadratic term
