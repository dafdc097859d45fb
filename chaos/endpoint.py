"""Where the Toxiproxy API is: TOXIPROXY_URL's server, or a fault proxy started here.

The chaos suite and the load suite both use this, so the same code runs against the real
Toxiproxy (the appliance installs it) and against chaos.faultproxy (CI, where no registry
carries Toxiproxy)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 15.0


def _version(url: str) -> str:
    with urllib.request.urlopen(url + "/version", timeout=2) as resp:
        return json.loads(resp.read())["version"]


@contextlib.contextmanager
def toxiproxy_endpoint() -> Iterator[str]:
    """Yield the API base URL (``http://host:port``): TOXIPROXY_URL when set, else a fault
    proxy subprocess on a free port, stopped when the context ends."""
    given = os.environ.get("TOXIPROXY_URL")
    if given:
        yield given.rstrip("/")
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "chaos.faultproxy", "--listen", "127.0.0.1:0"],
        cwd=str(REPO_ROOT),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "faultproxy API listening on http://127.0.0.1:PORT"
        if "http://" not in line:
            raise RuntimeError(f"fault proxy did not start (exit code {proc.poll()}): {line!r}")
        url = line[line.index("http://") :].strip()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                _version(url)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
