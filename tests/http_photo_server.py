"""A loopback HTTP server for the download tests and benchmark: real photos, plus the ways a
photo URL goes wrong in the wild (404, a slow answer, text served as image/jpeg, a redirect).

It listens on 127.0.0.1 with a port the OS picks, answers from a fixed route table (nothing is
fetched from anywhere else), caps the requests it serves at once, and stops with its `with` block;
a slow answer waits on the stop event, so stopping never waits for a sleeping handler.

    with PhotoServer({"/a.jpg": photo(path), "/gone.jpg": status(404)}, folders={"/p/": dir}) as s:
        s.url("/a.jpg")
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Reply:
    status: int = 200
    path: Optional[Path] = None  # body read from this file at request time
    body: bytes = b""
    content_type: str = "image/jpeg"
    location: str = ""           # for redirects
    delay_s: float = 0.0         # wait before answering (a server slower than the client's timeout)


def photo(path: Path, delay_s: float = 0.0) -> Reply:
    return Reply(path=Path(path), delay_s=delay_s)


def status(code: int, text: str = "") -> Reply:
    return Reply(status=code, body=(text or f"status {code}\n").encode(), content_type="text/plain")


def redirect(location: str, code: int = 302) -> Reply:
    return Reply(status=code, location=location, content_type="text/plain")


def text_as_jpeg(text: str) -> Reply:
    """A page that claims to be a JPEG: what a CDN's error page often looks like."""
    return Reply(body=text.encode(), content_type="image/jpeg")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 drops connections when many client threads connect at
    # once; the client then retries after a second, which looks like a slow server.
    request_queue_size = 256

    def __init__(self, routes: dict, folders: dict, max_concurrent: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes
        self.folders = folders
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.stopping = threading.Event()
        self.hits: Counter = Counter()
        self.hits_lock = threading.Lock()

    def process_request(self, request, client_address):
        # The bound: at most max_concurrent handler threads; further connections wait in accept.
        self.slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = unquote(urlsplit(self.path).path)
        with self.server.hits_lock:
            self.server.hits[path] += 1
        reply = self._reply(path)
        if reply.delay_s and self.server.stopping.wait(reply.delay_s):
            return  # the server is stopping: drop the connection instead of answering
        body = reply.body
        if reply.path is not None:
            try:
                body = reply.path.read_bytes()
            except OSError:
                reply, body = Reply(status=404, content_type="text/plain"), b"no such file\n"
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(body)))
        if reply.location:
            self.send_header("Location", reply.location)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): nothing to answer

    def _reply(self, path: str) -> Reply:
        if path in self.server.routes:
            return self.server.routes[path]
        for prefix, folder in self.server.folders.items():
            name = path[len(prefix):]
            if path.startswith(prefix) and name and "/" not in name and name not in (".", ".."):
                return photo(Path(folder) / name)
        return status(404)

    def log_message(self, *args):  # keep test and benchmark output quiet
        pass


class PhotoServer:
    """routes: exact path -> Reply; folders: path prefix -> directory served flat (file names only)."""

    def __init__(self, routes: Optional[dict] = None, folders: Optional[dict] = None,
                 max_concurrent: int = 64):
        self._server = _Server(dict(routes or {}), dict(folders or {}), max_concurrent)
        self._thread = threading.Thread(target=self._server.serve_forever, name="photo-server",
                                        daemon=True)

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def hits(self) -> Counter:
        with self._server.hits_lock:
            return Counter(self._server.hits)

    def __enter__(self) -> "PhotoServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
