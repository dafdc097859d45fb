"""Cost per message of the two forwarding loops, fed from memory (no sockets, no broker).

    python loadtests/hotpath.py                      # CPU time per message, best of 7
    python loadtests/hotpath.py --callgrind          # instructions per message (valgrind)
    python loadtests/hotpath.py --callgrind --root /tmp/before   # another checkout's loops
    python loadtests/hotpath.py --churn              # instructions per churn cycle (valgrind)

The client leg (`ClientSession._forward_loop`) is fed reads of 100 whole 1 KB publishes on one
channel, with and without content properties; the upstream leg (`Upstream._read_loop`) reads of
10 deliveries. The peers on the other side only count bytes. Timings on a shared VM vary from
run to run; `--callgrind` counts the instructions of two run lengths under valgrind and prints
the difference per message, with PYTHONHASHSEED=0: the same number on every run, so a change
of a few percent is visible (docs/BENCHMARKS.md records such before/after pairs).

`--churn` counts what a short-lived client costs the whole proxy process: the real `amqproxy`
(of `--root`, at its defaults) runs under valgrind in front of the broker at `--broker`, one
client does connect, handshake, channel.open, publish 1, close, in a loop, and the counters are
zeroed after a warm-up (`callgrind_control -z`) and read after `--cycles` cycles: instructions
per cycle, accept to teardown, whatever the machine is doing (the churn workload of
loadtests/bench.py measures the same cycle in seconds, which the noise of a shared VM hides).
AMQPROXY_PURE_PYTHON=1 measures the Python reference instead of the compiled data path.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("publish", "publish-properties", "deliver")
PER_READ = {"publish": 100, "publish-properties": 100, "deliver": 10}


class _EndOfInput(Exception):
    pass


class _Socket:
    def __init__(self, data: bytes, reads: int) -> None:
        self.data = data
        self.left = reads

    def recv(self, size: int) -> bytes:
        if not self.left:
            raise _EndOfInput
        self.left -= 1
        return self.data


class _Upstream:
    """The far side of the client loop: counts bytes, never backs up (older trees read `outbox`)."""

    max_body = 131072 - 8
    outbox = None
    alive = True

    def __init__(self) -> None:
        self.sent = 0

    def send(self, data: bytes | bytearray, received_at: float = 0.0) -> None:
        self.sent += len(data)

    def backed_up(self) -> bool:
        return False


class _Client:
    closing = False
    max_body = 131072 - 8

    def __init__(self) -> None:
        self.received = 0

    def deliver(self, data: bytes | bytearray, received_at: float) -> None:
        self.received += len(data)


def _message(method: object, body: bytes, properties: object) -> bytes:
    import pamqp.body
    import pamqp.frame
    import pamqp.header

    return (
        pamqp.frame.marshal(method, 1)
        + pamqp.frame.marshal(pamqp.header.ContentHeader(0, len(body), properties), 1)
        + pamqp.frame.marshal(pamqp.body.ContentBody(body), 1)
    )


def _open_state():
    """The open state of the tree being measured (an enum today, a string in older trees)."""
    try:
        from amqproxy.upstream import UpstreamState
    except ImportError:
        return "open"
    return UpstreamState.OPEN


def _publish_role():
    try:
        from amqproxy.protocol.rules import Role
    except ImportError:
        return "publish"
    return Role.PUBLISH


def run(kind: str, reads: int) -> float:
    """Feed `reads` reads through one loop; returns CPU seconds per message."""
    import pamqp.commands as pc

    from amqproxy.channel import Link
    from amqproxy.client import ClientSession
    from amqproxy.protocol.frames import FrameReader
    from amqproxy.upstream import Upstream

    body = b"x" * 1024
    per_read = PER_READ[kind]
    if kind == "deliver":
        data = b"".join(
            _message(pc.Basic.Deliver("bench", tag + 1, False, "", "q"), body, pc.Basic.Properties())
            for tag in range(per_read)
        )
        upstream = Upstream.__new__(Upstream)
        upstream.sock = _Socket(data, reads)  # type: ignore[assignment]
        upstream._handshake = FrameReader(131072)
        upstream.frame_max = 131072
        upstream.links = {}
        upstream.last_recv = 0.0
        upstream.state = _open_state()
        client = _Client()
        upstream.links[1] = Link(client, 1, upstream, 1)  # type: ignore[arg-type]
        loop = upstream._read_loop
        forwarded = lambda: client.received  # noqa: E731
    else:
        properties = (
            pc.Basic.Properties(content_type="application/json", delivery_mode=2)
            if kind == "publish-properties"
            else pc.Basic.Properties()
        )
        data = _message(pc.Basic.Publish(exchange="", routing_key="q"), body, properties) * per_read
        session = ClientSession.__new__(ClientSession)
        session.sock = _Socket(data, reads)  # type: ignore[assignment]
        session._reader = reader = FrameReader(131072)  # older trees read it here
        session.core = SimpleNamespace(reader=reader)
        session._batches = defaultdict(bytearray)
        session.channels = {}
        session.closing = session.throttled = False
        session._byte_bucket = None
        session.bytes_in = session.messages_in = 0
        session.last_recv = session._received_at = 0.0
        sink = _Upstream()
        link = Link(session, 1, sink, 1)  # type: ignore[arg-type]
        link.role = _publish_role()
        session.channels[1] = link
        loop = session._forward_loop
        forwarded = lambda: sink.sent  # noqa: E731
    started = time.process_time()
    try:
        loop()
    except _EndOfInput:
        pass
    elapsed = time.process_time() - started
    if forwarded() != len(data) * reads:
        raise AssertionError(f"{kind}: {forwarded()} bytes forwarded of {len(data) * reads}")
    return elapsed / (reads * per_read)


def callgrind(kind: str, root: Path) -> int:
    """Instructions per message: valgrind counts two run lengths, the difference cancels start-up."""

    def count(reads: int) -> int:
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(root)}
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__]
        cmd += ["--one", kind, "--reads", str(reads), "--root", str(root)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stderr
        return int(re.search(r"Collected : (\d+)", out).group(1))  # type: ignore[union-attr]

    short, long = 10, 30
    scale = {"deliver": 10}.get(kind, 1)  # deliveries: more reads, fewer messages per read
    return (count(long * scale) - count(short * scale)) // ((long - short) * scale * PER_READ[kind])


def churn(root: Path, broker: str, cycles: int) -> tuple[int, str]:
    """Instructions per churn cycle of the proxy process, and the data path it ran."""
    import socket
    import tempfile

    sys.path.insert(0, str(REPO_ROOT))
    from loadtests.benchmark.client import encode_publish
    from loadtests.benchmark.targets import Target
    from loadtests.benchmark.workers import _raw_cycle

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(root)}
    out = Path(tempfile.mkdtemp(prefix="hotpath-churn-")) / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m", "amqproxy"]
    cmd += ["--listen", f"127.0.0.1:{port}", "--upstream", f"amqp://{broker}", "--http-listen", "off"]
    cmd += ["--log-level", "warning"]
    proxy = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = Target("proxy", "127.0.0.1", port)
    frames = encode_publish("hotpath-churn", b"x" * 1024)  # the default exchange drops it: no queue
    try:
        deadline = time.monotonic() + 120  # the interpreter's start-up under valgrind
        while True:
            try:
                _raw_cycle(target, frames)
                break
            except OSError:
                if proxy.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the proxy did not start under valgrind: {proxy.stderr.read()}") from None
                time.sleep(0.5)
        for _ in range(20):  # warm-up: the upstream connection, caches, the specialising interpreter
            _raw_cycle(target, frames)
        subprocess.run(["callgrind_control", "-z", str(proxy.pid)], check=True, capture_output=True)
        for _ in range(cycles):
            _raw_cycle(target, frames)
        subprocess.run(["callgrind_control", "-d", str(proxy.pid)], check=True, capture_output=True)
    finally:
        proxy.terminate()
        proxy.wait(60)
    dump = Path(f"{out}.1").read_text(errors="replace")
    total = int(re.search(r"^summary: (\d+)", dump, re.M).group(1))  # type: ignore[union-attr]
    version = subprocess.run(
        [sys.executable, "-m", "amqproxy", "--version"], cwd=root, env=env, capture_output=True, text=True
    ).stdout.strip()
    return total // cycles, version


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=REPO_ROOT, help="checkout whose amqproxy is measured")
    ap.add_argument("--callgrind", action="store_true", help="instructions per message under valgrind")
    ap.add_argument("--churn", action="store_true", help="instructions per churn cycle of the proxy process")
    ap.add_argument("--broker", default="127.0.0.1:5672", help="--churn: the broker (guest/guest)")
    ap.add_argument("--cycles", type=int, default=300, help="--churn: cycles counted after the warm-up")
    ap.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)  # a single run (for --callgrind)
    ap.add_argument("--reads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(args.root))
    if args.one:
        run(args.one, args.reads)
        return 0
    if args.churn:
        per_cycle, version = churn(args.root, args.broker, args.cycles)
        print(f"churn cycle {per_cycle:12,} instructions per cycle ({version}, {args.cycles} cycles)", flush=True)
        return 0
    for kind in KINDS:
        if args.callgrind:
            print(f"{kind:20} {callgrind(kind, args.root):8,} instructions per message", flush=True)
        else:
            best = min(run(kind, {"deliver": 1500}.get(kind, 150)) for _ in range(7))
            print(f"{kind:20} {best * 1e6:6.2f} us CPU per message (best of 7)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
