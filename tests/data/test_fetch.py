"""Download (against a local HTTP server with Range support) and zip safety."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
from fixtures import zip_folder

from tinyopt.core.errors import DataError
from tinyopt.data import build, fetch
from tinyopt.data import cache as data

CUT_AFTER = 5000


@pytest.fixture
def server(tiny_zip):
    """An HTTP server on 127.0.0.1 serving ``/tiny.zip``; it can cut connections and ignore Range."""
    state = SimpleNamespace(files={"/tiny.zip": tiny_zip.read_bytes()}, requests=[], cuts_left=0,
                            honour_range=True)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            wanted = self.headers.get("Range")
            state.requests.append(wanted)
            payload = state.files.get(self.path)
            if payload is None:
                self.send_error(404)
                return
            start = int(wanted.removeprefix("bytes=").split("-")[0]) if wanted and state.honour_range else 0
            if start >= len(payload) > 0:
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            if state.cuts_left:
                state.cuts_left -= 1
                self.wfile.write(payload[start:start + CUT_AFTER])
                self.close_connection = True
                return
            self.wfile.write(payload[start:])

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/tiny.zip"
    state.payload = state.files["/tiny.zip"]
    state.md5 = hashlib.md5(state.payload).hexdigest()
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_download_shows_progress_and_resumes_a_cut_connection(server, tmp_path, capsys):
    server.cuts_left = 1
    dest = fetch.download(server.url, tmp_path / "tiny.zip", md5=server.md5)
    assert dest.read_bytes() == server.payload
    assert server.requests == [None, f"bytes={CUT_AFTER}-"]
    assert not (tmp_path / "tiny.zip.part").exists()
    assert "download tiny.zip" in capsys.readouterr().err


def test_a_later_call_resumes_the_part_file(server, tmp_path):
    server.cuts_left = 1
    with pytest.raises(DataError, match="failed after 1 attempt.*run again to resume tiny.zip.part"):
        fetch.download(server.url, tmp_path / "tiny.zip", md5=server.md5, attempts=1, progress=False)
    assert (tmp_path / "tiny.zip.part").stat().st_size == CUT_AFTER
    assert not (tmp_path / "tiny.zip").exists()
    fetch.download(server.url, tmp_path / "tiny.zip", md5=server.md5, progress=False)
    assert (tmp_path / "tiny.zip").read_bytes() == server.payload
    assert server.requests[-1] == f"bytes={CUT_AFTER}-"


def test_a_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.honour_range = False
    (tmp_path / "tiny.zip.part").write_bytes(b"stale" * 1000)
    fetch.download(server.url, tmp_path / "tiny.zip", md5=server.md5, progress=False)
    assert (tmp_path / "tiny.zip").read_bytes() == server.payload


def test_a_complete_part_file_is_verified_without_refetching(server, tmp_path):
    (tmp_path / "tiny.zip.part").write_bytes(server.payload)
    fetch.download(server.url, tmp_path / "tiny.zip", md5=server.md5, progress=False)
    assert (tmp_path / "tiny.zip").read_bytes() == server.payload
    assert server.requests == [f"bytes={len(server.payload)}-"]


def test_md5_mismatch_is_an_error_and_removes_the_bad_file(server, tmp_path):
    with pytest.raises(DataError, match=f"md5 {server.md5}, expected {'0' * 32}; the bad file was removed"):
        fetch.download(server.url, tmp_path / "tiny.zip", md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_url_is_one_clear_error(server, tmp_path):
    with pytest.raises(DataError, match="HTTP Error 404") as caught:
        fetch.download(server.url + ".missing", tmp_path / "x.zip", progress=False)
    assert "\n" not in str(caught.value)
    assert len(server.requests) == 1  # a 404 is not retried


def test_prepare_from_url_then_again_without_the_network(server, tiny_cache, tmp_path):
    server.cuts_left = 1
    cache = build.prepare(server.url, tmp_path, md5=server.md5, progress=False)
    for split in data.SPLITS:
        np.testing.assert_array_equal(data.load_split(split, cache)[0], data.load_split(split, tiny_cache)[0])
    assert data.info(cache)["source"] == server.url
    server.files.clear()
    seen = len(server.requests)
    build.prepare(server.url, tmp_path, md5=server.md5, progress=False)
    assert len(server.requests) == seen


def test_prepare_with_a_wrong_md5_leaves_no_cache_and_no_download(server, tmp_path):
    with pytest.raises(DataError, match="md5"):
        build.prepare(server.url, tmp_path, md5="0" * 32, progress=False)
    assert not (tmp_path / "prepared").exists()
    assert list((tmp_path / "downloads").iterdir()) == []


def test_the_official_url_is_the_default_and_its_md5_is_checked(tmp_path, monkeypatch):
    calls = []

    def offline(url, dest, *, md5=None, progress=True):
        calls.append((url, md5))
        raise DataError("offline")

    monkeypatch.setattr(fetch, "download", offline)
    with pytest.raises(DataError, match="offline"):
        build.prepare(cache_dir=tmp_path, progress=False)
    assert calls == [(data.DEFAULT_URL, "90528d7ca1a48142e341f4ef8d21d0de")]


@pytest.mark.parametrize("name", ["../evil.txt", "tiny-imagenet-200/../../evil.txt", "/etc/evil.txt",
                                  "C:/evil.txt", "tiny-imagenet-200\\..\\..\\evil.txt"])
def test_zip_entries_outside_the_folder_are_refused(name, tiny_folder, tmp_path):
    archive = zip_folder(tiny_folder, tmp_path / "evil.zip", extra={name: b"x"})
    with pytest.raises(DataError, match="outside the dataset folder"):
        fetch.open_tree(archive)


def test_odd_but_safe_entry_names_are_fine(tiny_folder, tmp_path):
    archive = zip_folder(tiny_folder, tmp_path / "ok.zip", extra={"tiny-imagenet-200/notes..txt": b"x"})
    tree = fetch.open_tree(archive)
    assert tree.prefix == "tiny-imagenet-200/" and "notes..txt" in tree.files
    assert tree.read("wnids.txt") == (tiny_folder / "wnids.txt").read_bytes()
    tree.close()
