"""A local stand-in for the Hugging Face Hub: the HTTP endpoints huggingface_hub, transformers and datasets call
to load a model or stream a dataset by hub id, served from folders on disk.

The real hub is out of reach here, but loading by hub id is what users do, so the tests run that code path
against this server (``HF_ENDPOINT``). It serves files whole or by byte range, as the hub's ``resolve`` URLs do:
a small file at once, a large one (as the hub's LFS files) by a redirect to ``/_storage/<sha256>`` on a second
port, as the hub redirects to its storage host, with the headers huggingface_hub reads there (X-Linked-Etag,
X-Linked-Size). Without Xet headers, huggingface_hub downloads over plain HTTP. It also answers the
repository, tree and paths-info API calls.

``stop_serving`` makes every later request fail, like a network that went away; ``fail_next`` fails a few
downloads, like a network that comes back; ``stall`` leaves every later request unanswered, like a network
that has stalled. A process under test can ask for any of them itself, at the moment it chooses:
``POST /_fake/down``, ``POST /_fake/fail?downloads=N``, ``POST /_fake/stall``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
# Files from this size on are "LFS" files, served by a redirect to storage.
LFS_BYTES = 10_000
# A slowed link sends files this much at a time.
LINK_CHUNK_BYTES = 64 << 10


class FakeHub:
    """Serves ``repos``: {("model" | "dataset", "org/name"): folder}. Every repository has one current commit,
    whose sha any revision ("main" or a sha) resolves to; ``push`` makes a new one."""

    def __init__(
        self, repos: dict[tuple[str, str], Path], latency_s: float = 0.0, bytes_per_s: float | None = None
    ) -> None:
        self.repos = {key: Path(folder) for key, folder in repos.items()}
        # A link to a far hub, for benchmarks: each answer waits ``latency_s``, and files go at ``bytes_per_s``.
        self.latency_s = latency_s
        self.bytes_per_s = bytes_per_s
        self.requests: list[str] = []
        self.commits: dict[tuple[str, str], int] = {}  # pushes since the first commit, by repository
        self.ranges: list[str | None] = []  # the Range header of each file sent (None: all of it)
        self.serving = True
        self.stalled = threading.Event()
        self._closing = threading.Event()  # releases the stalled requests
        self._failing = 0
        self._lock = threading.Lock()
        # Where a redirect to storage points: sha256 -> file.
        self.stored: dict[str, Path] = {}
        # The hub, and its storage on another origin: huggingface_hub follows a redirect on the same origin
        # itself, but reads the file's metadata from a redirect elsewhere, as on the real hub.
        self._servers = [_Server(("127.0.0.1", 0), _handler(self)) for _ in ("hub", "storage")]
        self._threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in self._servers]

    @property
    def endpoint(self) -> str:
        return _origin(self._servers[0])

    @property
    def storage(self) -> str:
        return _origin(self._servers[1])

    def __enter__(self) -> FakeHub:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def stop_serving(self) -> None:
        """From now on every request gets a 503, as from a hub that is down."""
        self.serving = False

    def stall(self) -> None:
        """From now on every request waits, unanswered, until this hub is closed."""
        self.stalled.set()

    def wait_if_stalled(self) -> bool:
        """Hold a request while ``stall`` says so; True if it was held (it then gets no answer)."""
        if not self.stalled.is_set():
            return False
        self._closing.wait()
        return True

    def fail_next(self, downloads: int) -> None:
        """The next ``downloads`` requests for a file's content get a 503."""
        with self._lock:
            self._failing = downloads

    def failing(self) -> bool:
        """Whether this download is one of those ``fail_next`` asked to fail (and counts it)."""
        with self._lock:
            if self._failing <= 0:
                return False
            self._failing -= 1
            return True

    @staticmethod
    def sha(kind: str, repo: str, commit: int = 0) -> str:
        """The sha of the repository's first commit, or of the one after ``commit`` pushes."""
        return hashlib.sha1((f"{kind}/{repo}" + (f"@{commit}" if commit else "")).encode()).hexdigest()

    def head(self, kind: str, repo: str) -> str:
        """The sha of the repository's current commit."""
        return self.sha(kind, repo, self.commits.get((kind, repo), 0))

    def push(self, kind: str, repo: str) -> None:
        """A new commit: the repository's folder has changed, and "main" now resolves to a new sha."""
        self.commits[(kind, repo)] = self.commits.get((kind, repo), 0) + 1

    def files(self, kind: str, repo: str) -> dict[str, Path]:
        root = self.repos[(kind, repo)]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def entry(self, kind: str, repo: str, path: str) -> dict[str, Any] | None:
        """A tree entry (file or directory) as the hub's API gives it, or None."""
        root = self.repos[(kind, repo)]
        target = root / path if path else root
        if target.is_file():
            stat = target.stat()
            oid, _ = digests(target, stat.st_size, stat.st_mtime_ns)
            return {"type": "file", "path": path, "size": stat.st_size, "oid": oid}
        if target.is_dir():
            return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
        return None

    def tree(self, kind: str, repo: str, path: str, recursive: bool) -> list[dict[str, Any]] | None:
        root = self.repos[(kind, repo)]
        folder = root / path if path else root
        if not folder.is_dir():
            return None
        children = sorted(folder.rglob("*") if recursive else folder.iterdir())
        return [e for c in children if (e := self.entry(kind, repo, c.relative_to(root).as_posix()))]

    def info(self, kind: str, repo: str) -> dict[str, Any]:
        sha = self.head(kind, repo)
        siblings = [{"rfilename": name} for name in self.files(kind, repo)]
        return {
            "_id": sha[:24],
            "id": repo,
            "sha": sha,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "cardData": {},
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # a client gone, with a block read ahead still coming
            return
        super().handle_error(request, client_address)


def _origin(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


@functools.lru_cache(maxsize=256)
def digests(file: Path, size: int, mtime_ns: int) -> tuple[str, str]:
    """A file's git blob id and sha256 (the hub's oid and, for large files, ETag), once per version of it."""
    data = file.read_bytes()
    return hashlib.sha1(b"blob %d\0" % size + data).hexdigest(), hashlib.sha256(data).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("fake hub: " + format, *args)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            self._serve(body=True, form=form)

        def _serve(self, body: bool, form: dict[str, list[str]] | None = None) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            if self.path.startswith("/_fake/"):
                return self._control()
            if hub.wait_if_stalled():
                self.close_connection = True
                return None
            time.sleep(hub.latency_s)
            if self.path.startswith("/_storage/") and hub.serving:
                stored = hub.stored.get(self.path.removeprefix("/_storage/"))
                if stored is None:
                    return self._error(404, "", "no such object")
                return self._send_file(stored, {}, body)
            if not hub.serving:
                return self._error(503, "ServiceUnavailable", "the hub is down")
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            path = urllib.parse.unquote(url.path)
            for pattern, name in ROUTES:
                if m := re.fullmatch(pattern, path):
                    kind = "dataset" if m["prefix"] in ("datasets/", "datasets") else "model"
                    repo = m["repo"]
                    if (kind, repo) not in hub.repos:
                        return self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
                    return getattr(self, name)(kind, repo, m, query, form or {}, body)
            return self._error(404, "", f"no route for {self.path}")

        def _control(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/_fake/down":
                hub.stop_serving()
            elif url.path == "/_fake/stall":
                hub.stall()
            elif url.path == "/_fake/fail":
                hub.fail_next(int(urllib.parse.parse_qs(url.query)["downloads"][0]))
            else:
                return self._error(404, "", f"no control {url.path}")
            self._json({}, body=True)

        def _json(self, value: Any, body: bool) -> None:
            data = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def info(self, kind: str, repo: str, _m: re.Match[str], _query: Any, _form: Any, body: bool) -> None:
            self._json(hub.info(kind, repo), body)

        def tree(
            self, kind: str, repo: str, m: re.Match[str], query: dict[str, list[str]], _form: Any, body: bool
        ) -> None:
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            entries = hub.tree(kind, repo, (m["path"] or "").strip("/"), recursive)
            if entries is None:
                return self._error(404, "EntryNotFound", f"{m['path']} does not exist")
            self._json(entries, body)

        def paths_info(
            self, kind: str, repo: str, m: re.Match[str], _query: Any, form: dict[str, list[str]], body: bool
        ) -> None:
            entries = [e for p in form.get("paths", []) if (e := hub.entry(kind, repo, p.strip("/")))]
            self._json(entries, body)

        def resolve(self, kind: str, repo: str, m: re.Match[str], _query: Any, _form: Any, body: bool) -> None:
            name = m["path"]
            file = hub.files(kind, repo).get(name)
            if file is None:
                return self._error(404, "EntryNotFound", f"{name} does not exist in {repo}")
            stat = file.stat()
            oid, sha256 = digests(file, stat.st_size, stat.st_mtime_ns)
            if stat.st_size < LFS_BYTES:
                return self._send_file(file, {"X-Repo-Commit": hub.head(kind, repo), "ETag": f'"{oid}"'}, body)
            hub.stored[sha256] = file
            self.send_response(302)
            self.send_header("Location", f"{hub.storage}/_storage/{sha256}")
            self.send_header("X-Repo-Commit", hub.head(kind, repo))
            self.send_header("X-Linked-Etag", f'"{sha256}"')
            self.send_header("X-Linked-Size", str(stat.st_size))
            self.send_header("ETag", f'"{oid}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send_file(self, file: Path, headers: dict[str, str], body: bool) -> None:
            """``file``, or the byte range asked for; the next downloads ``fail_next`` asked for fail instead."""
            if body and hub.failing():
                return self._error(503, "", "the hub is having a moment")
            size = file.stat().st_size
            status, start, end = 200, 0, size
            hub.ranges.append(self.headers.get("Range"))
            if (spec := self.headers.get("Range")) and (r := RANGE.match(spec.strip())):
                first, last = r.groups()
                if first:
                    start, end = int(first), min(size, int(last) + 1 if last else size)
                else:
                    start, end = max(0, size - int(last)), size
                status = 206
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if body:
                with file.open("rb") as f:
                    f.seek(start)
                    data = f.read(end - start)
                step = max(1, len(data)) if hub.bytes_per_s is None else LINK_CHUNK_BYTES
                for at in range(0, len(data), step):
                    self.wfile.write(data[at : at + step])
                    if hub.bytes_per_s is not None:
                        time.sleep(step / hub.bytes_per_s)

    return Handler


REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"
# (path pattern, the handler's method for it)
ROUTES = [
    (rf"/api/(?P<prefix>models|datasets)/{REPO}(?:/revision/{REV})?", "info"),
    (rf"/api/(?P<prefix>models|datasets)/{REPO}/tree/{REV}(?P<path>/.*)?", "tree"),
    (rf"/api/(?P<prefix>models|datasets)/{REPO}/paths-info/{REV}", "paths_info"),
    (rf"/(?P<prefix>datasets/)?{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
]


def fake_hub_control(endpoint: str, what: str) -> None:
    """From the process under test: ``what`` is "down" or "fail?downloads=N" (see the module's docstring)."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/_fake/{what}", method="POST"), timeout=10).close()


# The dataset card of uoft-cs/cifar10 as far as datasets reads it: features, and which files make which split.
CIFAR10_CARD = """---
dataset_info:
  config_name: plain_text
  features:
  - name: img
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
{names}
configs:
- config_name: plain_text
  data_files:
{data_files}
  default: true
---
# CIFAR-10 (a local stand-in)
"""


def cifar10_repo(folder: Path, splits: dict[str, list[Path]]) -> Path:
    """A dataset repository laid out as uoft-cs/cifar10 is (card, ``plain_text/{split}-0000i-of-0000n.parquet``),
    whose shards are links to ``splits``' parquet files (``img`` Image, ``label`` ClassLabel of CIFAR-10)."""
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "plain_text").mkdir(parents=True)
    (folder / "README.md").write_text(
        CIFAR10_CARD.format(
            names="\n".join(f"          '{i}': {name}" for i, name in enumerate(names)),
            data_files="\n".join(f"  - split: {split}\n    path: plain_text/{split}-*" for split in splits),
        )
    )
    for split, shards in splits.items():
        for i, shard in enumerate(shards):
            (folder / "plain_text" / f"{split}-{i:05d}-of-{len(shards):05d}.parquet").symlink_to(shard.resolve())
    return folder
