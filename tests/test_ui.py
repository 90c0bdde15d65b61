"""The MLflow UI after a real search: served by `mlflow ui` on 127.0.0.1 and read by a real
headless Chromium (Playwright), and the same data checked over MLflow's REST API.

The browser test skips, with the reason, where no Chromium or Playwright is installed.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from searchutil import rows, search_args, tracking_uri

from tuning.search.cli.search import main

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    """A smoke search: two depth cells, two trials each, one replicate of each winner."""
    root = tmp_path_factory.mktemp("ui")
    log = root / "console.txt"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(search_args(root, "ui", "--num-samples", "2", "--epochs", "2",
                                "--scheduler", "fifo", depth=None, replicates=1))
    log.write_text(out.getvalue())
    assert code == 0, out.getvalue()[-3000:]
    return root


@pytest.fixture(scope="module")
def ui(searched):
    """`mlflow ui` on 127.0.0.1 (the README's command), stopped by its process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui",
                             "--backend-store-uri", tracking_uri(searched), "--host",
                             "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "mlflow ui did not start"
                time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


def printed_links(root: Path, base: str) -> dict[str, str]:
    """The view links the search printed, pointed at this test's server."""
    text = (root / "console.txt").read_text()
    links = {}
    for name, key in (("each cell's chosen trial", "chosen"),
                      ("every trial, best first", "trials")):
        match = re.search(rf"{re.escape(name)}:\s+(\S+)", text)
        assert match, f"the search did not print the link to {name!r}"
        links[key] = match.group(1).replace("http://127.0.0.1:5000", base)
    assert "mlflow ui --backend-store-uri" in text and "optuna-dashboard" in text
    return links


def test_the_records_say_what_the_ui_shows_over_rest(searched, ui):
    """The REST-level check of what the browser test sees (it runs without a browser)."""
    exp = api(ui, "experiments/get-by-name?experiment_name=ui")["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "depth=18" in tags["mlflow.note.content"]
    views = {k.removeprefix("mlflow.sharedViewState."): json.loads(v) for k, v in tags.items()
             if k.startswith("mlflow.sharedViewState.")}
    assert set(views) == {"chosen", "trials", "replicates"}
    chosen_view = json.loads(views["chosen"]["state"])
    assert chosen_view["searchFilter"] == "tags.chosen = 'true'"
    assert "metrics.`val/acc`" in chosen_view["selectedColumns"]
    trials_view = json.loads(views["trials"]["state"])
    assert "groupBy" not in trials_view  # a group's row would mix several trials' values
    searched = [c for c in trials_view["selectedColumns"] if c.startswith("params.")]
    assert "params.`eta_span`" in searched  # the space's own name for what it searched
    runs = api(ui, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                   "max_results": 100})["runs"]
    by_role = {}
    for run in runs:
        run_tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        by_role.setdefault(run_tags.get("role"), []).append((run, run_tags))
    names = sorted(r["info"]["run_name"] for r, _ in by_role["trial"])
    assert names == ["alignkd · digits · P18 · #00 · default", "alignkd · digits · P18 · #01",
                     "alignkd · digits · P34 · #00 · default", "alignkd · digits · P34 · #01"]
    assert all(" · seed 1" in r["info"]["run_name"] for r, _ in by_role["replicate"])
    chosen = [r for r, t in by_role["trial"] if t.get("chosen") == "true"]
    assert len(chosen) == 2
    for run in chosen:
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"val/acc", "test/acc", "time/train_total_s"} <= metrics
    (parent, _), = by_role["search"]
    listed = api(ui, f"artifacts/list?run_id={parent['info']['run_id']}")
    assert "cells.json" in {f["path"] for f in listed["files"]}  # the per-cell table


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: install it (apt-get install "
                                              "chromium); the REST test checks the same data")
def test_a_browser_opens_the_printed_links_on_the_runs_table(searched, ui, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    links = printed_links(searched, ui)
    table = rows(searched, "ui")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            # A first visit: a fresh profile, nothing configured.
            page = browser.new_context(viewport={"width": 2200, "height": 900}).new_page()
            page.goto(links["chosen"])
            page.wait_for_selector("text=matching runs", timeout=180_000)
            page.wait_for_selector("text=alignkd · digits · P34", timeout=60_000)
            text = page.inner_text("body")
            shot = os.environ.get("UI_SCREENSHOT")
            page.screenshot(path=shot or str(tmp_path / "chosen.png"))
            assert "Runs" in text and "Token Usage" not in text  # not the GenAI overview
            assert "2 matching runs" in text
            for row in (r for r in table if r["chosen"] == "True"):
                assert f"alignkd · digits · P{row['depth']} · #{int(row['study_trial']):02d}" \
                    in text
            assert "val/acc" in text and "test/acc" in text  # visible without configuring
            page.goto(links["trials"])
            page.wait_for_selector("text=4 matching runs", timeout=180_000)
            page.wait_for_selector("text=alignkd · digits · P34", timeout=60_000)
            text = page.inner_text("body")
            assert "Group:" not in text  # one row per trial: no row mixes several trials
            assert text.count("alignkd · digits · P") >= 4
        finally:
            browser.close()
