"""data.download.fetch against a real local HTTP server, real archives and real processes."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from test_data import CIFAR10_NAMES, write_cifar10

from data import DataError, load_arrays
from data.cifar import CIFAR10_ARCHIVE
from data.download import HEAD_BYTES, MIRROR_ENV, Archive, _Progress, fetch
from data.imagewoof import ARCHIVE as WOOF_ARCHIVE
from data.imagewoof import WNID_NAMES

REPO = Path(__file__).resolve().parents[1]
CIFAR_TGZ = "cifar-10-python.tar.gz"


class _CountingHandler(SimpleHTTPRequestHandler):
    """Serves the server's folder, counting GETs per path and optionally answering slowly."""

    def do_GET(self) -> None:
        with self.server.count_lock:
            self.server.gets[self.path] += 1
        time.sleep(self.server.delay)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Server:
    httpd: ThreadingHTTPServer
    folder: Path
    url: str

    @property
    def gets(self) -> Counter:
        return self.httpd.gets


@pytest.fixture
def server(tmp_path: Path):
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_CountingHandler, directory=str(folder)))
    httpd.gets, httpd.count_lock, httpd.delay = Counter(), threading.Lock(), 0.0
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(httpd, folder, f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(root: Path) -> set[str]:
    """Everything in root except the lock files (which may stay; they hold no data)."""
    if not root.exists():
        return set()
    return {p.name for p in root.iterdir() if not p.name.endswith(".lock")}


def digests(path: Path) -> dict:
    data = path.read_bytes()
    return dict(
        md5=hashlib.md5(data).hexdigest(),
        size=len(data),
        head_md5=hashlib.md5(data[:HEAD_BYTES]).hexdigest(),
    )


def cifar_tgz(build: Path, out: Path, drop: str | None = None, extra=()) -> dict:
    """A CIFAR-10 python-version archive of write_cifar10's batches; returns its reference."""
    ref = write_cifar10(build)
    folder = build / "cifar-10-batches-py"
    if drop:
        (folder / drop).unlink()
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
        for info, payload in extra:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return ref


def cifar_archive(server: Server, name: str = CIFAR_TGZ) -> Archive:
    """The real CIFAR-10 description, pointed at the served file and with its own checksums."""
    return replace(
        CIFAR10_ARCHIVE,
        url=f"{server.url}/{name}",
        **{k: v for k, v in digests(server.folder / name).items() if k != "head_md5"},
    )


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_fetch_then_load_cifar10(server: Server, tmp_path: Path, capfd) -> None:
    ref = cifar_tgz(tmp_path / "build", server.folder / CIFAR_TGZ)
    archive = cifar_archive(server)
    root = tmp_path / "root"
    root.mkdir()
    stale = root / f".{CIFAR_TGZ}.killed.part"  # left by a killed run: cleaned under the lock
    stale.write_bytes(b"half")
    assert fetch(archive, root) == root / "cifar-10-batches-py"
    assert leftovers(root) == {"cifar-10-batches-py"}
    err = capfd.readouterr().err
    assert f"downloading CIFAR-10 from {archive.url}" in err and "100%" in err
    arrays = load_arrays("cifar10", root)
    np.testing.assert_array_equal(arrays.train_images, ref["train_x"])
    np.testing.assert_array_equal(arrays.test_labels, ref["test_y"])
    assert arrays.classes == CIFAR10_NAMES
    # Present now: neither fetch nor a download=True load asks the server again.
    fetch(archive, root)
    load_arrays("cifar10", root, download=True)
    assert server.gets == {f"/{CIFAR_TGZ}": 1}


def test_mirror_serving_wrong_content_fails_checksum(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cifar_tgz(tmp_path / "build", server.folder / CIFAR_TGZ)  # right name, not the real file
    monkeypatch.setenv(MIRROR_ENV, server.url + "/")
    root = tmp_path / "root"
    with pytest.raises(DataError) as err:
        load_arrays("cifar10", root, download=True)
    message = one_line(err)
    assert "did not match its checksum" in message and CIFAR10_ARCHIVE.md5 in message
    assert f"{server.url}/{CIFAR_TGZ} (from {MIRROR_ENV})" in message
    assert server.gets == {f"/{CIFAR_TGZ}": 1}
    assert leftovers(root) == set()


CHILD = """
import sys, time
from dataclasses import replace
from pathlib import Path
from data.cifar import CIFAR10_ARCHIVE
from data.download import fetch
url, md5, size, root, barrier, me = sys.argv[1:]
Path(barrier, me).touch()
while len(list(Path(barrier).iterdir())) < 2:
    time.sleep(0.01)
fetch(replace(CIFAR10_ARCHIVE, url=url, md5=md5, size=int(size)), root)
"""


def test_two_processes_download_once(server: Server, tmp_path: Path) -> None:
    ref = cifar_tgz(tmp_path / "build", server.folder / CIFAR_TGZ)
    archive = cifar_archive(server)
    server.httpd.delay = 2.0  # the first holds the lock well past the second's arrival
    root, barrier = tmp_path / "root", tmp_path / "barrier"
    barrier.mkdir()
    env = {k: v for k, v in os.environ.items() if k != MIRROR_ENV}
    env["PYTHONPATH"] = str(REPO)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                archive.url,
                archive.md5,
                str(archive.size),
                str(root),
                str(barrier),
                name,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert server.gets == {f"/{CIFAR_TGZ}": 1}
    errs = [err for _, err in outs]
    assert sum("waiting for another process" in e for e in errs) == 1
    assert sum("downloading CIFAR-10" in e for e in errs) == 1
    assert leftovers(root) == {"cifar-10-batches-py"}
    np.testing.assert_array_equal(load_arrays("cifar10", root).train_images, ref["train_x"])


def _member(name: str, payload: bytes | None = b"x", link: str | None = None):
    info = tarfile.TarInfo(name)
    if link is not None:
        info.type, info.linkname, payload = tarfile.SYMTYPE, link, None
    else:
        info.size = len(payload)
    return info, payload


@pytest.mark.parametrize(
    "case, expected",
    [
        ("truncated", "bytes, expected"),
        ("traversal", "unsafe member"),
        ("symlink_out", "unsafe member"),
        ("missing_batch", "lacks data_batch_5 in cifar-10-batches-py"),
        ("not_a_tar", "could not be extracted"),
        ("wrong_top_folder", "has no top-level folder cifar-10-batches-py"),
    ],
)
def test_bad_archives_are_refused_and_removed(
    server: Server, tmp_path: Path, case: str, expected: str
) -> None:
    served = server.folder / CIFAR_TGZ
    build = tmp_path / "build"
    if case == "traversal":
        cifar_tgz(build, served, extra=[_member("../evil")])
    elif case == "symlink_out":
        cifar_tgz(build, served, extra=[_member("cifar-10-batches-py/evil", link="/etc/passwd")])
    elif case == "missing_batch":
        cifar_tgz(build, served, drop="data_batch_5")
    elif case == "not_a_tar":
        served.write_bytes(os.urandom(5000))
    elif case == "wrong_top_folder":
        write_cifar10(build)
        with tarfile.open(served, "w:gz") as tar:
            tar.add(build / "cifar-10-batches-py", arcname="cifar10")
    else:
        cifar_tgz(build, served)
    archive = cifar_archive(server)
    if case == "truncated":  # the description keeps the full size and md5
        served.write_bytes(served.read_bytes()[: archive.size // 2])
    root = tmp_path / "data" / "root"
    with pytest.raises(DataError) as err:
        fetch(archive, root)
    message = one_line(err)
    assert expected in message and archive.url in message
    assert leftovers(root) == set()
    assert not (tmp_path / "data" / "evil").exists() and not (root / "evil").exists()
    # The loader then reports the absent folder as before.
    with pytest.raises(DataError, match="drop --no-download to download it"):
        load_arrays("cifar10", root)


def test_no_network_names_smoke_and_folder(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "root"
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(DataError) as err:
        fetch(replace(CIFAR10_ARCHIVE, url=f"{url}/{CIFAR_TGZ}"), root)
    message = one_line(err)
    assert "could not download CIFAR-10" in message and "--smoke" in message
    assert f"{root / 'cifar-10-batches-py'} holds data_batch_1..5, test_batch, batches.meta" in (
        message
    )
    assert f"set {MIRROR_ENV}" in message
    assert leftovers(root) == set()

    monkeypatch.setenv(MIRROR_ENV, url)
    for name, folder in (("cifar10", "cifar-10-batches-py"), ("imagewoof", "imagewoof2-320")):
        with pytest.raises(DataError) as err:
            load_arrays(name, root, download=True)
        message = one_line(err)
        assert "--smoke" in message and f"{root / folder} holds" in message
        assert f"check {MIRROR_ENV}={url}" in message
    assert leftovers(root) == set()


def woof_tgz(build: Path, out: Path, wnids, filler: int = 0) -> None:
    """A tiny imagewoof2-320 archive: one JPEG per class and split, plus random filler bytes."""
    from PIL import Image

    folder = build / "imagewoof2-320"
    for split in ("train", "val"):
        for i, wnid in enumerate(wnids):
            (folder / split / wnid).mkdir(parents=True)
            Image.new("RGB", (48, 40), (20 * i, 100, 200)).save(folder / split / wnid / "a.JPEG")
    (folder / "noise.bin").write_bytes(os.urandom(filler))  # incompressible: a >1 MiB archive
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname="imagewoof2-320")


def test_imagewoof_size_and_first_mib_checks(server: Server, tmp_path: Path) -> None:
    name = WOOF_ARCHIVE.filename
    woof_tgz(tmp_path / "build", server.folder / name, sorted(WNID_NAMES), filler=HEAD_BYTES)
    sums = digests(server.folder / name)
    assert sums["size"] > HEAD_BYTES and sums["head_md5"] != sums["md5"]
    archive = replace(
        WOOF_ARCHIVE, url=f"{server.url}/{name}", size=sums["size"], head_md5=sums["head_md5"]
    )
    root = tmp_path / "root"
    fetch(archive, root)
    assert leftovers(root) == {"imagewoof2-320"}
    arrays = load_arrays("imagewoof", root, cache_size=32, image_size=32)
    assert len(arrays.classes) == 10 and len(arrays.train_images) == 10

    # A byte changed in the first MiB: same size, wrong checksum.
    data = bytearray((server.folder / name).read_bytes())
    data[HEAD_BYTES // 2] ^= 0xFF
    (server.folder / name).write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        fetch(archive, tmp_path / "root2")
    assert "did not match its checksum (md5 of the first MiB" in one_line(err)
    assert leftovers(tmp_path / "root2") == set()

    # Nine classes: verified, extracted, then refused by the structure check.
    woof_tgz(tmp_path / "build9", server.folder / name, sorted(WNID_NAMES)[:9])
    sums = digests(server.folder / name)
    with pytest.raises(DataError) as err:
        fetch(replace(archive, size=sums["size"], head_md5=sums["head_md5"]), tmp_path / "root3")
    message = one_line(err)
    assert "has 9 class folders in imagewoof2-320/train" in message and "n02115641" in message
    assert leftovers(tmp_path / "root3") == set()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_terminal_and_lines_otherwise() -> None:
    lines = io.StringIO()
    progress = _Progress("CIFAR-10", 1000, lines)
    for done in range(0, 1001, 7):
        progress.update(done)
    progress.update(1000, final=True)
    out = lines.getvalue().splitlines()
    assert [line.split(":")[1].split("%")[0].strip() for line in out] == [
        str(p) for p in range(10, 101, 10)
    ]
    tty = _Terminal()
    bar = _Progress("CIFAR-10", 1000, tty)
    bar.update(500, final=True)
    assert tty.getvalue().startswith("\rCIFAR-10 [" + "#" * 15 + "-" * 15 + "]  50%")
