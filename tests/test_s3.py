"""Tune's storage and the teacher store on S3, against a real S3-compatible HTTP server (moto's
server mode) started on 127.0.0.1 and stopped by its process group. pyarrow and boto3 reach it
through the standard AWS_ENDPOINT_URL; the searches run as real subprocesses."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from faultutil import kill_group, spawn, wait_for
from searchutil import search_args

pytestmark = pytest.mark.slow
BUCKET = "plainkd"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server_bin = Path(sys.executable).parent / "moto_server"
    if not server_bin.exists():
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(server_bin), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    patch = pytest.MonkeyPatch()  # the fixture is per module: no monkeypatch fixture here
    for key, value in env.items():
        patch.setenv(key, value)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2)
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.5)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield boto3.client("s3")
    finally:
        patch.undo()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def keys(client, prefix: str) -> list[str]:
    """The objects under `prefix` (not pyarrow's empty directory markers, `.../`)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])
            if not o["Key"].endswith("/")]


def s3_args(root: Path, name: str, *extra: str) -> list[str]:
    return search_args(root, name, *extra, "--storage-path", f"s3://{BUCKET}/ray",
                       "--teacher-store", f"s3://{BUCKET}/teachers")


def run(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return spawn(["-m", "tuning.search", *args], log, cwd=cwd)


def test_a_search_on_s3_resumes_from_another_folder_and_shares_its_teachers(s3, tmp_path):
    name = "on-s3"
    log = tmp_path / "first.log"
    first = run(s3_args(tmp_path, name, "--set", "checkpoint_interval_s=0", "--num-samples",
                        "2", "--epochs", "3", "--max-concurrent", "1", "--scheduler", "fifo"),
                log, tmp_path / "a")
    try:
        wait_for(lambda: [k for k in keys(s3, f"ray/{name}/") if k.endswith("checkpoint.pt")],
                 420, first, log, interval=0.5)
    finally:
        kill_group(first)  # SIGKILL, mid-trial
    stored = keys(s3, "")
    assert f"ray/{name}/search.yaml" in stored and f"ray/{name}/results.csv" not in stored
    teachers = sorted(k for k in stored if k.startswith("teachers/"))
    assert len(teachers) == 3  # the Plain-18 cell's teacher: model, checkpoint, config
    # Resumed by a driver in another folder: the settings come from the bucket.
    log = tmp_path / "resume.log"
    resumed = run(["--resume", "--name", name, "--storage-path", f"s3://{BUCKET}/ray"], log,
                  tmp_path / "b")
    try:
        assert resumed.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        kill_group(resumed)
    table = (tmp_path / "b" / "searches" / name / "results.csv").read_text().splitlines()
    assert len(table) == 3 and all(",COMPLETED," in row for row in table[1:]), table
    published = keys(s3, f"ray/{name}/")
    assert {f"ray/{name}/results.csv", f"ray/{name}/cells.csv"} <= set(published)
    assert any("/checkpoint_" in k for k in published)  # Tune's checkpoints are in S3
    # A second search finds its teacher in the store and trains none.
    log = tmp_path / "second.log"
    second = run(s3_args(tmp_path, "again-on-s3", "--num-samples", "1", "--epochs", "1",
                         "--scheduler", "fifo"), log, tmp_path / "c")
    try:
        assert second.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        kill_group(second)
    assert "teachers: 1 needed, 1 in the store" in log.read_text()
    assert sorted(k for k in keys(s3, "teachers/")) == teachers


def test_an_unreachable_bucket_is_one_line(s3, tmp_path, capsys):
    from tuning.search.cli.search import main

    code = main(search_args(tmp_path, "nobucket", "--storage-path", "s3://no-such-bucket/x"))
    err = capsys.readouterr().err
    assert code == 2 and "--storage-path s3://no-such-bucket/x is not writable" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists()
