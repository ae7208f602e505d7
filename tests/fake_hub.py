"""A stand-in for the Hub's upload API on 127.0.0.1, recording every request (tests only).

It answers what `HfApi.create_repo` and `HfApi.upload_folder` ask, with every file in "regular"
upload mode so its content travels inside the commit request, where the test can read it back.
It listens on the loopback interface only, on a free port, and shuts itself down after
`lifetime` seconds even if a test forgets to.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class FakeHub:
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # path fragment -> HTTP status to answer
    delay: dict[str, float] = field(default_factory=dict)  # path fragment -> seconds to wait first

    def committed_files(self) -> dict[str, bytes]:
        """The files of the last commit, decoded from its ndjson body."""
        commits = [r for r in self.requests if "/commit/" in r.path]
        files = {}
        for line in commits[-1].body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return files

    def write_commit(self, folder: Path) -> Path:
        for name, content in self.committed_files().items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(content)
        return folder


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            hub.requests.append(Request(self.command, self.path, headers, body))
            for fragment, seconds in hub.delay.items():
                if fragment in self.path:
                    time.sleep(min(seconds, 10.0))
            status, payload = 200, self._payload(body)
            for fragment, code in hub.fail.items():
                if fragment in self.path:
                    status, payload = code, {"error": "fake hub: internal error"}
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        def _payload(self, body: bytes) -> dict:
            if self.path.startswith("/api/repos/create"):
                request = json.loads(body or b"{}")
                return {"url": f"{hub.url}/{request.get('organization') or 'user'}/{request['name']}"}
            if "/preupload/" in self.path:
                files = json.loads(body)["files"]
                return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            if "/commit/" in self.path:
                repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                return {"commitUrl": f"{hub.url}/{repo}/commit/0123abcd", "commitOid": "0123abcd" * 5,
                        "pullRequestUrl": None}
            return {}  # validate-yaml and anything else: fine

        do_GET = do_POST = do_PUT = _answer

    return Handler


def start_fake_hub(lifetime: float = 120.0) -> tuple[FakeHub, ThreadingHTTPServer]:
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stopper = threading.Timer(lifetime, server.shutdown)  # bounded even if the test never stops it
    stopper.daemon = True
    stopper.start()
    return hub, server
