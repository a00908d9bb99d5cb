"""One pinned package file from the package index pip is configured with, downloaded without
building or running anything from it.

``pip download`` prepares a source distribution's metadata before it saves the file ("Preparing
metadata (pyproject.toml)"): it runs the package's build backend, i.e. code from the archive, on
this machine. Here the file is found on the index's simple repository API instead (PEP 503 HTML
pages, or PEP 691 JSON when the index offers it) or in pip's ``find-links``, downloaded as bytes,
and checked against the sha256 the index lists for it; the caller checks the pinned sha256 and
reads the file as an archive (:class:`lit_icl.sources.cache.Archive`). Nothing is built,
installed or imported.

pip's configuration is honoured as ``pip download`` reads it: ``python -m pip config list`` gives
the values of pip's configuration files (``PIP_CONFIG_FILE``, the site, user and global
``pip.conf``) and of the ``PIP_*`` environment variables; a value of section ``global`` is
overridden by one of ``download``, and both by the environment. Used: ``index-url`` (default
PyPI), ``extra-index-url``, ``no-index``, ``find-links``, ``proxy``, ``cert``, ``client-cert``,
``trusted-host``, ``timeout`` (``default-timeout``) and ``retries``. Without ``proxy`` the
``http_proxy`` / ``https_proxy`` / ``no_proxy`` variables apply. Credentials come from an index
URL (``https://user:token@host/simple``) or from the netrc file (``$NETRC``, else ``~/.netrc``)
and are sent to that host only, never after a redirect. As pip does, a plain-http index is used
only on the loopback interface or on a ``trusted-host`` (and https to a trusted host is not
verified). Not supported: pip's keyring lookup.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import ipaddress
import json
import netrc
import os
import posixpath
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from packaging.utils import (InvalidSdistFilename, InvalidWheelFilename, canonicalize_name, canonicalize_version,
                             parse_sdist_filename, parse_wheel_filename)

__all__ = ["PipSettings", "RegistryUnreachableError", "download", "find_file"]

PYPI = "https://pypi.org/simple"
ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
RETRY_STATUS = (500, 502, 503, 520, 527)  # pip's: answers worth asking again
SECTIONS = ("global", "download", ":env:")  # pip download's order: later sections override earlier ones


class RegistryUnreachableError(ConnectionError, ValueError):
    """No package index answered (a ValueError too, so command lines report it in one line, like
    :class:`io.UnsupportedOperation` is both an OSError and a ValueError)."""


def _flag(value: str) -> bool:
    """pip's reading of a boolean option's value."""
    if value.lower() in ("1", "true", "yes", "on", "y", "t"):
        return True
    if value.lower() in ("0", "false", "no", "off", "n", "f", ""):
        return False
    raise ValueError(f"pip configuration value {value!r} is not a boolean (allowed: 1/0, true/false, yes/no, on/off)")


@dataclass
class PipSettings:
    """The pip options that decide where and how a package file is downloaded.

    Build one with :meth:`from_pip` (pip's own view of its configuration) or
    :meth:`from_options` (option name -> value, as in a ``pip.conf``)."""

    index_urls: list[str] = field(default_factory=lambda: [PYPI])  # index-url, then extra-index-url
    find_links: list[str] = field(default_factory=list)
    proxy: str | None = None
    cert: str | None = None
    client_cert: str | None = None
    trusted_hosts: list[str] = field(default_factory=list)
    timeout: float = 15.0
    retries: int = 5

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "PipSettings":
        """Settings from pip option names (``index-url``, ``extra-index-url``, ...) and their
        string values; list options are whitespace-separated, as in pip's configuration."""
        get = options.get
        index = [] if _flag(get("no-index", "")) else [get("index-url") or PYPI, *get("extra-index-url", "").split()]
        timeout, retries = get("timeout") or get("default-timeout") or "15", get("retries") or "5"
        try:
            timeout, retries = float(timeout), int(retries)
        except ValueError:
            raise ValueError(f"pip's timeout and retries must be numbers, got {timeout!r} and {retries!r}") from None
        return cls(index_urls=index, find_links=get("find-links", "").split(), proxy=get("proxy") or None,
                   cert=get("cert") or None, client_cert=get("client-cert") or None,
                   trusted_hosts=get("trusted-host", "").split(), timeout=timeout, retries=retries)

    @classmethod
    def from_pip(cls, python: str = sys.executable) -> "PipSettings":
        """The settings ``pip download`` would use: ``python -m pip config list`` (configuration
        files and ``PIP_*`` variables), its sections merged in pip's order. Without pip, the
        ``PIP_*`` variables alone."""
        try:
            proc = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                  env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        except OSError:  # no such interpreter
            proc = None
        if proc is not None and proc.returncode != 0 and "No module named pip" not in proc.stderr:
            said = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise ValueError(f"{python} -m pip config list failed: {said}")
        sections: dict[str, dict[str, str]] = {}
        if proc is not None and proc.returncode == 0:
            for line in proc.stdout.splitlines():
                key, sep, value = line.partition("=")
                section, dot, name = key.partition(".")
                if sep and dot:
                    try:
                        sections.setdefault(section, {})[name] = str(ast.literal_eval(value))
                    except (ValueError, SyntaxError):
                        sections.setdefault(section, {})[name] = value.strip("'\"")
        else:  # no pip in this environment: what pip would read from the environment
            sections[":env:"] = {k[4:].lower().replace("_", "-"): v for k, v in os.environ.items()
                                 if k.startswith("PIP_") and v}
        options: dict[str, str] = {}
        for section in SECTIONS:
            options.update(sections.get(section, {}))
        return cls.from_options(options)


@dataclass(frozen=True)
class Candidate:
    """A package file an index or a find-links location offers: its name, where it is, and the
    hashes the index lists for it (algorithm -> hex digest)."""

    filename: str
    url: str
    hashes: dict[str, str]


class _Links(HTMLParser):
    """The ``<a href>`` targets of a PEP 503 page, and its ``<base href>``."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.base: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "base" and values.get("href") and self.base is None:
            self.base = values["href"]
        elif tag == "a" and values.get("href"):
            self.links.append(values["href"])


def _candidate(url: str, filename: str | None = None, hashes: dict[str, str] | None = None) -> Candidate:
    """A candidate from a link: named ``filename`` (PEP 691 gives it) or, as pip names a link,
    by the URL path's last part; its hashes the ``#sha256=...`` fragment's when none are given."""
    parts = urllib.parse.urlsplit(url)
    filename = filename or urllib.parse.unquote(posixpath.basename(parts.path))
    if hashes is None:
        algorithm, _, digest = parts.fragment.partition("=")
        hashes = {algorithm: digest} if digest and algorithm in hashlib.algorithms_guaranteed else {}
    return Candidate(filename, urllib.parse.urlunsplit(parts._replace(fragment="")), hashes)


def parse_page(body: bytes, url: str, content_type: str) -> list[Candidate]:
    """The files a simple-API project page (PEP 691 JSON, else PEP 503 HTML) or a find-links
    HTML page lists, their URLs made absolute."""
    if content_type.startswith("application/vnd.pypi.simple.v1+json"):
        files = json.loads(body)["files"]
        return [_candidate(urllib.parse.urljoin(url, f["url"]), f["filename"], dict(f.get("hashes") or {}))
                for f in files]
    parser = _Links()
    parser.feed(body.decode("utf-8", errors="replace"))
    base = urllib.parse.urljoin(url, parser.base) if parser.base else url
    return [_candidate(urllib.parse.urljoin(base, href)) for href in parser.links]


def _host(url: str) -> tuple[str, str]:
    """``(hostname, host[:port])`` of ``url``, without credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return host, f"{host}:{parts.port}" if parts.port else host


def _public(url: str) -> str:
    """``url`` without its credentials (for messages)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Session:
    """GET requests with pip's proxy, TLS, trust, credential, timeout and retry settings."""

    def __init__(self, settings: PipSettings) -> None:
        self.settings = settings
        cert = settings.cert
        for option, path in (("cert", cert), ("client-cert", settings.client_cert)):
            if path and not os.path.exists(path):
                raise ValueError(f"pip's {option} {path!r} does not exist (python -m pip config list says where "
                                 "it is set)")
        context = ssl.create_default_context(cafile=cert if cert and os.path.isfile(cert) else None,
                                             capath=cert if cert and os.path.isdir(cert) else None)
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        for c in (context, insecure):
            if settings.client_cert:
                c.load_cert_chain(settings.client_cert)
        proxy = []
        if settings.proxy:  # else urllib's default: http_proxy, https_proxy, no_proxy
            proxy.append(urllib.request.ProxyHandler({"http": settings.proxy, "https": settings.proxy}))
        self.openers = {trusted: urllib.request.build_opener(*proxy, urllib.request.HTTPSHandler(context=c))
                        for trusted, c in ((False, context), (True, insecure))}
        self.credentials: dict[str, tuple[str, str]] = {}  # host[:port] -> (user, password), from the index URLs
        for url in settings.index_urls + settings.find_links:
            parts = urllib.parse.urlsplit(url)
            if parts.username is not None:
                self.credentials[_host(url)[1]] = (urllib.parse.unquote(parts.username),
                                                   urllib.parse.unquote(parts.password or ""))

    def trusted(self, url: str) -> bool:
        host, netloc = _host(url)
        return host in self.settings.trusted_hosts or netloc in self.settings.trusted_hosts

    def secure(self, url: str) -> bool:
        """pip's rule: a local path, file, https, the loopback interface, or a trusted host."""
        return (_local_path(url) is not None or urllib.parse.urlsplit(url).scheme == "https"
                or _loopback(_host(url)[0]) or self.trusted(url))

    def _auth(self, url: str) -> tuple[str, str] | None:
        host, netloc = _host(url)
        if netloc in self.credentials:
            return self.credentials[netloc]
        try:
            found = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            return None
        return (found[0], found[2] or "") if found else None

    def open(self, url: str, accept: str | None = None):
        """The response to GET ``url`` (credentials removed from it and sent as a header that is
        not forwarded on redirects); connection failures and pip's retry statuses are retried
        ``retries`` times with a growing pause."""
        parts = urllib.parse.urlsplit(url)
        headers = {"User-Agent": "lit_icl", **({"Accept": accept} if accept else {})}
        request = urllib.request.Request(_public(url), headers=headers)
        auth = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")) \
            if parts.username is not None else self._auth(url)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_unredirected_header("Authorization", f"Basic {token}")
        opener, attempt = self.openers[self.trusted(url)], 0
        while True:
            try:
                return opener.open(request, timeout=self.settings.timeout)
            except urllib.error.HTTPError as err:
                err.close()
                if err.code not in RETRY_STATUS or attempt >= self.settings.retries:
                    raise
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                if attempt >= self.settings.retries:
                    raise
            time.sleep(min(0.25 * 2 ** attempt, 8.0))
            attempt += 1


def _local_path(location: str) -> Path | None:
    """The local path of a find-links entry or a file:// URL, else None (a URL)."""
    parts = urllib.parse.urlsplit(location)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    return Path(os.path.expanduser(location)) if len(parts.scheme) <= 1 else None  # a path (C:\\ on Windows)


def _listing(session: Session, url: str, project_page: bool) -> list[Candidate]:
    """The files of an index's project page or of a find-links location (a directory, a file, or
    an HTML page of links); [] when the page does not exist."""
    local = _local_path(url)
    if local is not None:
        page = local / "index.html" if project_page and local.is_dir() else local
        if project_page or page.suffix in (".html", ".htm"):
            return parse_page(page.read_bytes(), page.as_uri(), "text/html") if page.is_file() else []
        if local.is_dir():
            return [Candidate(p.name, p.as_uri(), {}) for p in sorted(local.iterdir()) if p.is_file()]
        return [Candidate(local.name, local.as_uri(), {})] if local.is_file() else []
    try:
        with session.open(url, ACCEPT if project_page else "text/html") as response:
            return parse_page(response.read(), response.geturl(), response.headers.get("Content-Type", ""))
    except urllib.error.HTTPError as err:
        if err.code in (404, 410):  # pip's reading: the index does not have the project
            return []
        raise


def _matches(candidate: Candidate, project: str, version: str, binary: bool) -> bool:
    try:
        if binary:
            if not candidate.filename.endswith(".whl"):
                return False
            name, found, _, _ = parse_wheel_filename(candidate.filename)
        else:
            if not candidate.filename.endswith((".tar.gz", ".zip")):
                return False
            name, found = parse_sdist_filename(candidate.filename)
    except (InvalidWheelFilename, InvalidSdistFilename):
        return False
    return name == project and canonicalize_version(found) == canonicalize_version(version)


def find_file(requirement: str, binary: bool, settings: PipSettings, session: Session | None = None) -> Candidate:
    """The file of pinned ``requirement`` (``name==version``), the wheel (``binary``, a
    ``none-any`` one first) or the source distribution, from the first index (``index-url``,
    then ``extra-index-url``) or ``find-links`` location that offers it.

    Raises :class:`RegistryUnreachableError` when no location could be reached and none offered
    it, ``ValueError`` when the reachable ones do not offer it."""
    name, sep, version = requirement.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise ValueError(f"requirement {requirement!r} must be pinned as name==version")
    project, version = canonicalize_name(name.strip()), version.strip()
    session = session or Session(settings)
    kind = "wheel" if binary else "source distribution"
    locations = [(posixpath.join(url.rstrip("/"), project) + "/", True) for url in settings.index_urls]
    locations += [(link, False) for link in settings.find_links]
    if not locations:
        raise ValueError(f"pip is configured with no index (no-index) and no find-links: nowhere to find {requirement}")
    reached, refused, unreachable = [], [], []  # answered; answered with an HTTP error; not answered
    for url, project_page in locations:
        shown = _public(url)
        if not session.secure(url):
            unreachable.append(f"{shown}: plain http to a host that is not a pip trusted-host (ignored, as pip does)")
            continue
        try:
            files = [c for c in _listing(session, url, project_page) if _matches(c, project, version, binary)]
        except urllib.error.HTTPError as err:
            refused.append(f"{shown}: HTTP {err.code} {err.reason}")
            continue
        except (urllib.error.URLError, OSError, TimeoutError, ConnectionError) as err:
            unreachable.append(f"{shown}: {getattr(err, 'reason', None) or err}")
            continue
        reached.append(shown)
        if files:
            return sorted(files, key=lambda c: not c.filename.endswith("-none-any.whl"))[0]
    if not reached and not refused:
        raise RegistryUnreachableError(f"no package registry reachable for {requirement}: " + "; ".join(unreachable)
                                       + " (check the network and pip's index settings: python -m pip config list)")
    failed = "".join(f"; {f}" for f in refused + unreachable)
    raise ValueError(f"no {kind} of {requirement} on {', '.join(reached) or 'any index'}{failed}")


def download(requirement: str, binary: bool, dest: Path, settings: PipSettings | None = None) -> Path:
    """Download the wheel (``binary``) or the source distribution of pinned ``requirement`` into
    directory ``dest`` without building or running it (see the module docstring); the file's
    path. The index's sha256 (or other listed hash) is checked: ``ValueError`` on a mismatch."""
    settings = settings or PipSettings.from_pip()
    session = Session(settings)
    found = find_file(requirement, binary, settings, session)
    if found.filename != os.path.basename(found.filename) or found.filename.startswith("."):
        raise ValueError(f"{requirement}: the index names its file {found.filename!r}, not a plain file name")
    target = Path(dest) / found.filename
    algorithm = next((a for a in ("sha256", *sorted(found.hashes)) if a in found.hashes
                      and a in hashlib.algorithms_guaranteed), None)  # the index's hash to check
    digest = hashlib.new(algorithm) if algorithm else None
    local = _local_path(found.url)
    try:
        with (open(local, "rb") if local is not None else session.open(found.url)) as source, open(target, "wb") as out:
            while block := source.read(1 << 20):
                out.write(block)
                if digest is not None:
                    digest.update(block)
    except urllib.error.HTTPError as err:
        raise ValueError(f"downloading {_public(found.url)} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", None) or err
        raise RegistryUnreachableError(f"downloading {_public(found.url)} failed: {reason}") from None
    if digest is not None and digest.hexdigest() != found.hashes[algorithm]:
        target.unlink()
        raise ValueError(f"{found.filename}: {algorithm} {digest.hexdigest()} differs from the index's "
                         f"{found.hashes[algorithm]}")
    return target

