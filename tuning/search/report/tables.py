"""The paper's Tables 1-3 from a search's runs, estimated from unselected replicates.

One row per data set x student. Per method:

- the tuned arm: the cell's chosen configuration trained again with new seeds, as
  mean ± std (n); the figure every comparison reads;
- the selected trial: the chosen trial's own test accuracy, shown apart and never pooled (it
  won its cell on validation accuracy, and its test accuracy shares that luck);
- the default arm: the method's default configuration under the same seeds, and the tuning
  gain, tuned − default, paired by seed;
- the training time of the replicates (the training loop only), which ran interleaved at
  one concurrency, so that the methods' times compare.

Methods are compared on their tuned arms and on their default arms, each paired by seed
(Welch's interval beside it). Every verdict of a report is Holm-corrected with the others.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuning.search.report.stats import Difference, Summary, compare, holm, verdict

# A table's "method" is the objective, prefixed by the student's block where a search runs
# across blocks (`repvgg+alignkd`: a RepVGG student distilled by AlignKD).
METHOD_ORDER = ("alignkd", "jointrd", "jointrd_released", "kd", "ce", "repvgg+alignkd",
                "repvgg+ce", "dirac+jointrd")
METHOD_NAMES = {"alignkd": "AlignKD", "jointrd": "JointRD", "jointrd_released":
                "JointRD (released)", "kd": "KD", "ce": "CE", "repvgg+alignkd": "RepVGG+AlignKD",
                "repvgg+ce": "RepVGG", "dirac+jointrd": "Dirac+JointRD"}
BASELINE = "alignkd"  # with more than two methods, each is compared with this one
CHOSE_DEFAULT = "the search chose the default"

ACCURACY_NOTE = (
    "Test accuracy: mean ± std over n replicates, the configuration trained again with new "
    "seeds, none selected for anything; every method and arm of a row used the same seeds. "
    "*Selected*: the chosen trial's own test accuracy, shown apart: it won its cell on "
    "validation accuracy, so its test accuracy shares that luck and is no estimate. "
    "*Default*: the method's default configuration (the paper's recipe) under the same seeds. "
    "*Gain*: tuned − default in percentage points, paired by seed, with its 95% t interval.")
COVERAGE_NOTE = (
    "Each 95% interval covers the variation between training seeds, for this trained "
    "teacher, this chosen configuration and this test split. It does not cover another "
    "search's choice, another teacher, or data beyond the test split.")
VERDICT_NOTE = (
    " Verdicts read the paired t test where two or more seeds pair up (else Welch's) and are "
    "Holm-corrected over the {k} of this report (gains included), so that the chance of any "
    "false verdict among them is at most 5%.")
TIME_NOTE = ("Times are those of the tuned replicates: the training loop only (no "
             "evaluation, no checkpoints), median over the runs, which ran interleaved {how}.")


@dataclass
class Arms:
    """What a cell's method has to show: its selected trial, its replicates per arm."""

    selected: dict[str, Any] | None = None
    tuned: list[dict[str, Any]] = field(default_factory=list)
    default: list[dict[str, Any]] = field(default_factory=list)
    default_is_tuned: bool = False  # the search chose the default: one arm serves both

    def by_seed(self, arm: str) -> dict[int, float]:
        runs = self.tuned if arm == "tuned" or self.default_is_tuned else self.default
        return {r["seed"]: r["test_acc"] for r in runs}


def _cell_values(cell: str) -> list[tuple[str, str]]:
    return [tuple(kv.split("=", 1)) for kv in cell.split(",") if "=" in kv]


def method_label(method: str, cell: str) -> str:
    """The objective, prefixed by the student's block where the search runs across blocks."""
    block = dict(_cell_values(cell)).get("block", "plain")
    return method if block == "plain" else f"{block}+{method}"


def row_key(run: dict[str, Any]) -> tuple:
    """A table row: the run's cell without its method (and block), so that the methods of one
    data set and student sit side by side, and cells that differ in anything else stay
    apart."""
    rest = tuple((k, v) for k, v in _cell_values(run["cell"]) if k not in ("method", "block"))
    return (run["dataset"], run["depth"], rest)


def row_label(key: tuple) -> tuple[str, str]:
    dataset, depth, rest = key
    extra = ", ".join(f"{k}={v}" for k, v in rest if k not in ("dataset", "depth"))
    return dataset, f"Plain-{depth}" + (f" ({extra})" if extra else "")


def _replicates(runs: list[dict[str, Any]], cell: str, arm: str) -> list[dict[str, Any]]:
    """A cell's replicates of one arm, one per seed: a finished run where there is one; a run
    that failed counts as failed (NaN); a run killed by an interruption and run again later
    is left out."""
    found: dict[int, dict[str, Any]] = {}
    for r in runs:
        if r["role"] != "replicate" or r["cell"] != cell or r["arm"] != arm:
            continue
        if r["status"] == "KILLED":
            continue
        if r["status"] != "FINISHED":
            r = {**r, "test_acc": math.nan}
        kept = found.get(r["seed"])
        if kept is None or (not math.isfinite(kept["test_acc"]) and math.isfinite(r["test_acc"])):
            found[r["seed"]] = r
    return [found[s] for s in sorted(found)]


def finalists(runs: list[dict[str, Any]]) -> dict[tuple, Arms]:
    """(row key, method) -> its Arms."""
    out: dict[tuple, Arms] = {}
    for chosen in (r for r in runs if r["chosen"] and r["role"] == "trial"):
        default = _replicates(runs, chosen["cell"], "default")
        out[(row_key(chosen), chosen["method"])] = Arms(
            selected=chosen, tuned=_replicates(runs, chosen["cell"], "tuned"), default=default,
            default_is_tuned=not default and chosen.get("default_config", False))
    return out


def method_key(m: str) -> int:
    return METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)


def _gain(arms: Arms) -> tuple[Difference | None, str]:
    """tuned − default, paired by seed; None where the default arm was not trained."""
    if arms.default_is_tuned:
        return Difference(0.0, math.nan, math.nan, math.nan, "paired", len(arms.tuned),
                          CHOSE_DEFAULT), CHOSE_DEFAULT
    if not arms.default:
        return None, ""
    return compare(arms.by_seed("tuned"), arms.by_seed("default"))[0], ""


def _median(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def tables(runs: list[dict[str, Any]], teacher_acc: dict[str, float]) -> list[dict[str, Any]]:
    """One row per data set x student (x any other across-dimension), with every method's
    columns (numbers and words, not formatted text); verdicts Holm-corrected together."""
    final = finalists(runs)
    methods = sorted({k[1] for k in final}, key=method_key)
    rows: list[dict[str, Any]] = []
    tests: list[tuple[dict[str, Any], str, Difference, str, str]] = []  # for Holm
    for key in sorted({k[0] for k in final}, key=str):
        dataset, student = row_label(key)
        row: dict[str, Any] = {"dataset": dataset, "student": student}
        for m in methods:
            arms = final.get((key, m))
            if arms is None:
                continue
            tuned = Summary.of([r["test_acc"] for r in arms.tuned])
            default = Summary.of([r["test_acc"] for r in (arms.tuned if arms.default_is_tuned
                                                         else arms.default)])
            row.update({
                f"{m}_mean": tuned.mean, f"{m}_std": tuned.std, f"{m}_n": tuned.n,
                f"{m}_failed": tuned.failed,
                f"{m}_selected": arms.selected["test_acc"] if arms.selected else math.nan,
                f"{m}_default_mean": default.mean, f"{m}_default_std": default.std,
                f"{m}_default_n": default.n, f"{m}_default_failed": default.failed,
                f"{m}_train_min": _median([r["train_time"] for r in arms.tuned]) / 60,
                f"{m}_s_per_epoch": _median([r["epoch_time"] for r in arms.tuned]),
                f"{m}_concurrency": next((r["concurrency"] for r in arms.tuned
                                          if r["concurrency"]), "")})
            gain, note = _gain(arms)
            if gain is not None:
                row.update({f"{m}_gain": gain.diff, f"{m}_gain_low": gain.low,
                            f"{m}_gain_high": gain.high, f"{m}_gain_test": gain.test})
                if note:
                    row[f"{m}_gain_verdict"] = note
                else:
                    tests.append((row, f"{m}_gain", gain, "tuned", "default"))
        teachers = [teacher_acc.get(arms.selected["teacher_run_id"], math.nan)
                    for arms in (final.get((key, m)) for m in methods) if arms and arms.selected]
        row["teacher"] = next((t for t in teachers if math.isfinite(t)), math.nan)
        present = [m for m in methods if (key, m) in final]
        pairs = ([("diff", "alignkd", "jointrd")] if {"alignkd", "jointrd"} <= set(present)
                 and len(present) == 2 else
                 [(f"{m}_vs_{BASELINE}", m, BASELINE) for m in present if m != BASELINE]
                 if BASELINE in present else [])
        for name, a, b in pairs:
            fa, fb = final[(key, a)], final[(key, b)]
            for suffix, arm in (("", "tuned"), ("_default", "default")):
                if arm == "default" and not ((fa.default or fa.default_is_tuned) and
                                             (fb.default or fb.default_is_tuned)):
                    continue
                if arm == "default" and fa.default_is_tuned and fb.default_is_tuned:
                    continue  # the same runs as the tuned comparison: not a second test
                used, w = compare(fa.by_seed(arm), fb.by_seed(arm))
                row.update({f"{name}{suffix}": used.diff, f"{name}{suffix}_low": used.low,
                            f"{name}{suffix}_high": used.high, f"{name}{suffix}_test": used.test,
                            f"{name}{suffix}_welch_low": w.low,
                            f"{name}{suffix}_welch_high": w.high})
                tests.append((row, f"{name}{suffix}", used, METHOD_NAMES.get(a, a),
                              METHOD_NAMES.get(b, b)))
        if ("diff", "alignkd", "jointrd") in pairs:
            j = row.get("jointrd_s_per_epoch", math.nan)
            row["time_ratio"] = row.get("alignkd_s_per_epoch", math.nan) / j if j else math.nan
        rows.append(row)
    adjusted = holm([d.p for _, _, d, _, _ in tests])
    for (row, name, d, a, b), p_adj in zip(tests, adjusted, strict=True):
        row[f"{name}_p"], row[f"{name}_p_holm"] = d.p, p_adj
        word = verdict(d, a, b, p_adj)
        row[f"{name}_verdict"] = GAIN_WORDS.get(word, word) if name.endswith("_gain") else word
    for row in rows:
        row["comparisons"] = sum(math.isfinite(p) for p in adjusted)
    return rows


def _pct(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{100 * v:.2f}"


def _num(v: float, digits: int) -> str:
    return "-" if not math.isfinite(v) else f"{v:.{digits}f}"


def _acc(r: dict[str, Any], prefix: str) -> str:
    n = r.get(f"{prefix}_n", 0)
    failed = r.get(f"{prefix}_failed", 0)
    lost = f", {failed} failed" if failed else ""
    if n == 0:
        return "-" if not failed else f"- (0{lost})"
    if n == 1:
        return f"{_pct(r[f'{prefix}_mean'])} (n=1{lost})"
    return f"{_pct(r[f'{prefix}_mean'])} ± {_pct(r[f'{prefix}_std'])} (n={n}{lost})"


def _ci(r: dict[str, Any], name: str, welch: bool = False) -> str:
    if name not in r:
        return ""
    low, high = (r[f"{name}_welch_low"], r[f"{name}_welch_high"]) if welch else \
        (r[f"{name}_low"], r[f"{name}_high"])
    if not math.isfinite(r[name]):
        return "-"
    if not math.isfinite(low):
        return f"{100 * r[name]:+.2f}"
    return f"{100 * r[name]:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k[:-len("_default_mean")] for r in rows for k in r
                   if k.endswith("_default_mean")}, key=method_key)


GAIN_WORDS = {"tuned better": "search helped", "default better": "search hurt",
              "no difference at this n": "no gain shown"}


def _gain_cells(r: dict[str, Any], m: str) -> list[str]:
    if f"{m}_gain" not in r:
        return ["(no baseline)", ""]
    word = r.get(f"{m}_gain_verdict", "")
    if word == CHOSE_DEFAULT:
        return ["0", CHOSE_DEFAULT]
    return [_ci(r, f"{m}_gain"), word]


def accuracy_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per data set x student x method: its tuned, selected and default figures and
    its tuning gain."""
    lines = ["| data set | student | method | test acc (%) | selected (%) | default (%) | "
             "gain (pp), 95% CI | gain verdict | teacher (%) |", "|" + "---|" * 9]
    for r in rows:
        for m in _methods(rows):
            if f"{m}_n" not in r:
                continue
            cells = [r["dataset"], r["student"], METHOD_NAMES.get(m, m), _acc(r, m),
                     _pct(r[f"{m}_selected"]), _acc(r, f"{m}_default"), *_gain_cells(r, m),
                     _pct(r["teacher"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """Each comparison of methods: tuned arms, then default arms; paired and Welch."""
    lines = ["| data set | student | comparison | arms | difference (pp), 95% CI | test | "
             "Welch 95% CI | p (Holm) | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        names = sorted({k[:-len("_verdict")] for k in r if k.endswith("_verdict")
                        and not k.endswith("_gain_verdict") and "_default" not in k})
        for name in names:
            a, b = ("AlignKD", "JointRD") if name == "diff" else (
                METHOD_NAMES.get(name.removesuffix(f"_vs_{BASELINE}"), name),
                METHOD_NAMES[BASELINE])
            for suffix, arms in (("", "tuned"), ("_default", "default")):
                key = name + suffix
                if f"{key}_verdict" not in r:
                    continue
                p = r.get(f"{key}_p_holm", math.nan)
                lines.append(f"| {r['dataset']} | {r['student']} | {a} − {b} | {arms} | "
                             f"{_ci(r, key)} | {r[f'{key}_test']} | {_ci(r, key, welch=True)} "
                             f"| {_num(p, 3)} | {r[f'{key}_verdict']} |")
    return "\n".join(lines)


def time_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| data set | student | method | train min (loop only) | s/epoch (loop only) | "
             "s/epoch ÷ AlignKD's |", "|" + "---|" * 6]
    for r in rows:
        base = r.get(f"{BASELINE}_s_per_epoch", math.nan)
        for m in _methods(rows):
            if f"{m}_n" not in r:
                continue
            per_epoch = r.get(f"{m}_s_per_epoch", math.nan)
            lines.append(f"| {r['dataset']} | {r['student']} | {METHOD_NAMES.get(m, m)} | "
                         f"{_num(r.get(f'{m}_train_min', math.nan), 1)} | "
                         f"{_num(per_epoch, 2)} | {_num(per_epoch / base if base else math.nan, 2)}"
                         " |")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The three tables (accuracy, comparisons, times), each with what it covers."""
    if not rows:
        return "(no cell has a chosen trial yet)"
    k = rows[0]["comparisons"]
    how = next((r[f"{m}_concurrency"] for r in rows for m in _methods(rows)
                if r.get(f"{m}_concurrency")), "")
    parts = ["### Test accuracy", accuracy_markdown(rows), "", ACCURACY_NOTE]
    comparisons = comparison_markdown(rows)
    note = COVERAGE_NOTE + (VERDICT_NOTE.format(
        k=f"{k} comparison{'s' if k > 1 else ''}") if k else "")
    if comparisons.count("\n") > 1:
        parts += ["", "### Comparisons", comparisons, "", note]
    else:
        parts += ["", note]
    parts += ["", "### Training time", time_markdown(rows), "",
              TIME_NOTE.format(how=f"({how})" if how else "")]
    return "\n".join(parts)


def csv_text(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def data_name(params: dict[str, str]) -> str:
    """A run's data set as people name it: an npz file by its file name."""
    if params.get("dataset") == "npz" and params.get("data_path"):
        return Path(params["data_path"]).stem
    return params.get("dataset", "")
