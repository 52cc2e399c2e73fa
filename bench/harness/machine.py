"""What else the machine is doing: per-core and per-process CPU, disk flushes, TIME_WAIT
sockets, and the RSS of a process tree under load."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from harness.common import CLK_TCK, TIME_WAIT_LOW
from harness.processes import pid_tree, proc_status_kb


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per-core (busy, total) jiffies from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in vals]
                idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
                out[name] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def cpu_busy(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, float]:
    """Busy % per core between two cpu_times() readings: tells which side was the bottleneck."""
    busy: dict[str, float] = {}
    for name, (b1, t1) in after.items():
        b0, t0 = before.get(name, (0, 0))
        if t1 > t0:
            busy[name] = round(100.0 * (b1 - b0) / (t1 - t0), 1)
    return busy


def foreign_cpu_ticks() -> dict[int, int]:
    """utime+stime of every user-space process that is not this script or its descendants.

    The machine may be shared (tests, another proxy...): CPU that others burn during a run
    makes that run's numbers suspect, so each run reports it.
    """
    ours = set(pid_tree(os.getpid()))
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        ppid = int(fields[1])
        if int(entry) == 2 or ppid == 2:  # kernel threads
            continue
        out[int(entry)] = int(fields[11]) + int(fields[12])
    return out


def tree_cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process tree, threads included."""
    user = system = 0
    for p in pid_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rfind(")") + 2 :].split()
            user += int(fields[11])
            system += int(fields[12])
    return user, system


def disk_counters() -> tuple[int, int]:
    """(writes, flushes) completed by the machine's disks, from /proc/diskstats."""
    writes = flushes = 0
    with contextlib.suppress(OSError):
        disks = {d for d in os.listdir("/sys/block") if not d.startswith(("loop", "ram", "zram"))}
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if len(f) < 14 or f[2] not in disks:
                continue
            writes += int(f[7])
            if len(f) >= 20:  # kernel 5.5+: flush requests completed
                flushes += int(f[18])
    return writes, flushes


def fs_type(path: Path) -> str:
    """The filesystem type holding path (from /proc/mounts): tmpfs would make fsync free."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            f = line.split()
            inside = str(path) == f[1] or str(path).startswith(f[1].rstrip("/") + "/")
            if len(f) >= 3 and inside and len(f[1]) > len(best):
                best, kind = f[1], f[2]
    return kind


def foreign_top(before: dict[int, int], after: dict[int, int], n: int = 3) -> list[str]:
    """The processes that used the most of the foreign CPU, as "comm[pid] cpu-s"."""
    deltas = sorted(((t - before.get(pid, 0), pid) for pid, t in after.items()), reverse=True)
    out: list[str] = []
    for ticks, pid in deltas[:n]:
        if ticks / CLK_TCK < 0.01:
            break
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            comm = "?"
        out.append(f"{comm}[{pid}] {ticks / CLK_TCK:.2f}")
    return out


def foreign_cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return round(max(0, ticks) / CLK_TCK, 2)


def wait_for_quiet(deadline_s: float, window_s: float = 0.5, max_share: float = 0.05) -> float:
    """Wait (bounded) until other processes use < max_share of a core; return seconds waited."""
    start = time.monotonic()
    while True:
        before = foreign_cpu_ticks()
        time.sleep(window_s)
        if foreign_cpu_seconds(before, foreign_cpu_ticks()) < max_share * window_s:
            break
        if time.monotonic() - start >= deadline_s:
            break
    return round(time.monotonic() - start - window_s, 1)


def time_wait_count(ports: set[int]) -> int:
    try:
        out = subprocess.run(
            ["ss", "-Htan", "state", "time-wait"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    n = 0
    for line in out.splitlines():
        for col in line.split():
            if ":" in col:
                port = col.rsplit(":", 1)[1]
                if port.isdigit() and int(port) in ports:
                    n += 1
                    break
    return n


def drain_time_wait(ports: set[int], deadline_s: float) -> int:
    """Wait (bounded) until few TIME_WAIT sockets on our ports are left; return the count seen
    first, a measure of how many connections the previous run opened and closed."""
    first = time_wait_count(ports)
    count = first
    deadline = time.monotonic() + deadline_s
    while count > TIME_WAIT_LOW and time.monotonic() < deadline:
        time.sleep(1)
        count = time_wait_count(ports)
    time.sleep(0.5)
    return first


class RssSampler:
    """Samples VmRSS of a process tree while the load runs (peak is also in VmHWM)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        total = 0
        for p in pid_tree(self.pid):
            total += proc_status_kb(p, "VmRSS") or 0
        self.peak_kb = max(self.peak_kb, total)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.sample()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()
            self.sample()
