"""The machine side of a benchmark, read from /proc: CPU seconds and RSS of a process and its
descendants, the process listening on a port (the broker), CPU pinning, the open-files limit,
and py-spy on the proxy."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from /proc/<pid>/stat, or None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)
    except (OSError, IndexError, ValueError):
        return None


def proc_tree(pid: int) -> list[int]:
    """pid and its descendants (a proxy with --workers forks worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def proc_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def tree_rss_kb(pid: int) -> int | None:
    values = [v for v in (proc_rss_kb(p) for p in proc_tree(pid)) if v is not None]
    return sum(values) if values else None


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of pid and its descendants (a proxy's --workers processes included)."""
    values = [proc_cpu_seconds(p) for p in proc_tree(pid)]
    return sum(v for v in values if v is not None)


def listener_pid(port: int) -> int | None:
    """The process listening on TCP port (any address), from /proc/net/tcp{,6} and fd links."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in targets:
                    return int(entry)
        except OSError:
            continue
    return None


def find_broker_pid(port: int | None = None) -> int | None:
    """The RabbitMQ node's beam.smp: the one listening on port when it can be told (other
    nodes may run on the machine), else the first `-s rabbit boot` beam.smp (not rabbitmqctl's,
    which also runs beam.smp)."""
    if port is not None:
        pid = listener_pid(port)
        if pid is not None:
            return pid
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"beam.smp") and b"rabbit" in argv and b"boot" in argv:
            return int(entry)
    return None


def start_py_spy(pid: int, out: Path) -> subprocess.Popen | None:
    """py-spy record (collapsed stacks, 100 Hz, idle samples excluded) on the proxy until stopped."""
    import shutil

    exe = shutil.which("py-spy")
    if exe is None:
        print("warning: --py-spy: py-spy not found (pip install py-spy)", file=sys.stderr)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "record", "-p", str(pid), "-r", "100", "-f", "raw", "-o", str(out), "--subprocesses"]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_py_spy(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def profile_top(path: Path, n: int = 25) -> str:
    """Top functions of a py-spy collapsed-stack file: self and inclusive share of CPU samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        return f"(no profile: {e})"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # per function, not per line
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    if not total:
        return "(empty profile)"
    out = [f"{total} samples (CPU only; idle excluded)", f"{'self %':>7} {'total %':>8}  function (file)"]
    for f, c in own.most_common(n):
        out.append(f"{100 * c / total:>7.1f} {100 * incl[f] / total:>8.1f}  {f}")
    out.append("")
    out.append(f"{'total %':>8}  function (file), inclusive, amqproxy frames only")
    for f, c in [kv for kv in incl.most_common() if "amqproxy/" in kv[0]][:n]:
        out.append(f"{100 * c / total:>8.1f}  {f}")
    return "\n".join(out)


def parse_cpus(text: str) -> set[int]:
    """'0', '0,1' or '0-3' -> a CPU set."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def set_process_affinity(pid: int, cpus: set[int]) -> dict[int, set[int]]:
    """Pin every thread of `pid`; returns each thread's previous CPU set (for restore_affinity)."""
    previous = {}
    for tid in (int(t) for t in os.listdir(f"/proc/{pid}/task")):
        try:
            previous[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            pass
    return previous


def restore_affinity(previous: dict[int, set[int]]) -> None:
    for tid, cpus in previous.items():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; the proxy and the load processes inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
