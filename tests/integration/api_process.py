"""Run ``leadstream api`` as a real process for the integration tests, and talk HTTP to it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from streams import demo


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def http(method: str, url: str, body: bytes | None = None, token: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30.0) -> Reply:
    """One request; 4xx/5xx come back as a Reply (no exception), redirects are not followed."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=hdrs)
    opener = urllib.request.build_opener(_NoRedirect())
    try:
        with opener.open(request, timeout=timeout) as response:
            return Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers), exc.read())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def start_api(env: dict[str, str], port: int, log_path: Path, timeout_s: float = 60.0) -> subprocess.Popen:
    """``leadstream api`` in the background; returns once ``/healthz`` answers."""
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "api"], stdout=log_path.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if http("GET", f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"leadstream api did not start (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    demo.stop_worker(proc)  # the same SIGTERM-then-SIGKILL of the process group as every started process
