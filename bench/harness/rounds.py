"""The rounds: a warm-up per target, then N rounds in ABBA order, each run measured with what
the machine did around it (bench/README.md, "Rounds" and "Durable ingest")."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.common import CLK_TCK, DURABLE, QUEUE_DRAIN_DEADLINE_S, BenchError
from harness.machine import (
    RssSampler,
    cpu_busy,
    cpu_times,
    disk_counters,
    drain_time_wait,
    foreign_cpu_seconds,
    foreign_cpu_ticks,
    foreign_top,
    tree_cpu_ticks,
    wait_for_quiet,
)
from harness.processes import tail
from harness.reporting import noisy_line, run_line, warmup_line
from harness.targets import Lineup, Target
from harness.workloads import Benchmark, Drain, WrkRun, run_wrk, upstream_counters, wait_queue_empty


@dataclass
class _Before:
    """The counters read just before wrk starts, in this order."""

    cpu: dict[str, tuple[int, int]]
    disk: tuple[int, int]
    foreign: dict[int, int]
    others: list[Target]
    others_ticks: dict[str, int]
    up_conns: int
    up_reqs: int
    user: int
    sys: int


@dataclass
class Runner:
    """Runs the benchmarks against a lineup and keeps every measured run."""

    lineup: Lineup
    samplers: dict[str, RssSampler]
    load_core: int
    connections: int
    raw_dir: Path
    settle: float
    drain_deadline: float
    retries: int
    noisy_cpu_s: float
    runs: list[WrkRun] = field(default_factory=list)

    @property
    def width(self) -> int:
        return max(len(t.label) for t in (self.lineup.reference, *self.lineup.targets))

    @property
    def indent(self) -> str:
        return " " * (len("  round 1 ") + self.width + 1)

    def durable_idle(self) -> int:
        """Rows left in the durable proxy's queue once it is empty (or the deadline passed):
        no run may overlap the drain of a previous one (its forwarder shares the core)."""
        durable = self.lineup.durable
        if durable is None or durable.config is None:
            return 0
        drained, _polls, stats, _first = wait_queue_empty(
            durable.config, time.monotonic(), QUEUE_DRAIN_DEADLINE_S
        )
        if drained is None:
            print(
                f"  warning: {DURABLE}'s queue still holds {stats['rows']} rows after "
                f"{QUEUE_DRAIN_DEADLINE_S:g}s; the next run overlaps its drain"
            )
        return int(stats["rows"])

    def measure(self, bench: Benchmark, t: Target, round_no: int, secs: float) -> WrkRun:
        """One wrk run against ``t``, after the machine settled, with its counters."""
        tw = drain_time_wait(self.lineup.ports, self.drain_deadline)
        rows_before = self.durable_idle()
        quiet = wait_for_quiet(self.settle) if self.settle > 0 else 0.0
        if t.proc.poll() is not None:
            raise BenchError(f"{t.label} died (exit {t.proc.returncode}):\n{tail(t.log)}")
        sampler = self.samplers.get(t.label)
        before = self._before(t)
        with sampler.running() if sampler is not None else contextlib.nullcontext():
            run = run_wrk(
                bench,
                t,
                core=self.load_core,
                duration=secs,
                connections=self.connections,
                round_no=round_no,
                raw_dir=self.raw_dir,
            )
            ended = time.monotonic()
            user1, sys1, up_conns1, up_reqs1 = self._after(t, run, before)
            if t is self.lineup.durable and t.config is not None:
                run.drain = self._drain(t.config, t, run, ended, before.up_reqs, (user1, sys1))
        run.target_user_s = round((user1 - before.user) / CLK_TCK, 2)
        run.target_sys_s = round((sys1 - before.sys) / CLK_TCK, 2)
        # Minus the stub_status request itself.
        run.upstream_requests = up_reqs1 - before.up_reqs - 1
        run.upstream_connections = up_conns1 - before.up_conns - 1
        if sampler is not None:
            run.rss_kb_after = sampler.sample()
        run.time_wait_before = tw
        run.queue_rows_before = rows_before
        run.waited_for_quiet_s = quiet
        if t.proc.poll() is not None:
            raise BenchError(
                f"{t.label} died under load (exit {t.proc.returncode}):\n{tail(t.log)}"
            )
        return run

    def _before(self, t: Target) -> _Before:
        """Every counter the run is measured against, read just before wrk starts."""
        cpu = cpu_times()
        disk = disk_counters()
        foreign = foreign_cpu_ticks()
        others = [x for x in (self.lineup.reference, *self.lineup.targets) if x is not t]
        others_ticks = {x.label: sum(tree_cpu_ticks(x.proc.pid)) for x in others}
        up_conns, up_reqs = upstream_counters(self.lineup.upstream.port)
        user, system = tree_cpu_ticks(t.proc.pid)
        return _Before(cpu, disk, foreign, others, others_ticks, up_conns, up_reqs, user, system)

    def _after(self, t: Target, run: WrkRun, before: _Before) -> tuple[int, int, int, int]:
        """Fill in what the machine did during the run; returns the target's (user, sys)
        ticks and the upstream's (connections, requests), read last."""
        run.cpu_busy_pct = cpu_busy(before.cpu, cpu_times())
        disk_after = disk_counters()
        run.disk_writes = disk_after[0] - before.disk[0]
        run.disk_flushes = disk_after[1] - before.disk[1]
        foreign_after = foreign_cpu_ticks()
        run.foreign_cpu_s = foreign_cpu_seconds(before.foreign, foreign_after)
        run.foreign_top = foreign_top(before.foreign, foreign_after)
        run.bystanders_cpu_s = {
            x.label: round(
                (sum(tree_cpu_ticks(x.proc.pid)) - before.others_ticks[x.label]) / CLK_TCK, 2
            )
            for x in before.others
        }
        user1, sys1 = tree_cpu_ticks(t.proc.pid)
        up_conns1, up_reqs1 = upstream_counters(self.lineup.upstream.port)
        return user1, sys1, up_conns1, up_reqs1

    def _drain(
        self,
        config: Path,
        t: Target,
        run: WrkRun,
        ended: float,
        up_reqs0: int,
        cpu1: tuple[int, int],
    ) -> Drain:
        """The durable run's drain: from wrk's end until its queue is empty."""
        drain_s, polls, stats, rows_at_end = wait_queue_empty(config, ended, QUEUE_DRAIN_DEADLINE_S)
        _conns2, up_reqs2 = upstream_counters(self.lineup.upstream.port)
        user2, sys2 = tree_cpu_ticks(t.proc.pid)
        return Drain(
            # wrk's status errors are answers >= 400: all else it counted was a 2xx.
            acked=run.requests - run.errors_status,
            rows_at_end=rows_at_end,
            drain_s=drain_s,
            polls=polls,
            # Minus the two stub_status requests read after the first.
            upstream_requests=up_reqs2 - up_reqs0 - 2,
            dead_letters=int(stats.get("dead", 0)),
            user_s=round((user2 - cpu1[0]) / CLK_TCK, 2),
            sys_s=round((sys2 - cpu1[1]) / CLK_TCK, 2),
        )

    def run_benchmark(self, bench: Benchmark, rounds: int, duration: float, warmup: float) -> None:
        """Warm-ups (not kept), then the rounds: odd ones start with the target, even ones
        with the reference (ABBA)."""
        print(f"\n== {bench.title}")
        mine_t = bench.target
        reference = self.lineup.reference
        for t in (mine_t, reference):
            w = self.measure(bench, t, 0, warmup)
            print(warmup_line(w, t.label, self.width, self.indent))
        for r in range(1, rounds + 1):
            order = (mine_t, reference) if r % 2 else (reference, mine_t)
            for t in order:
                run = self._quietest(bench, t, r, duration)
                self.runs.append(run)
                print(run_line(run, t.label, r, self.width, self.indent, self.noisy_cpu_s))

    def _quietest(self, bench: Benchmark, t: Target, r: int, duration: float) -> WrkRun:
        """On a shared machine, redo a run that others disturbed; keep the quietest."""
        run = latest = self.measure(bench, t, r, duration)
        tries = 0
        while latest.foreign_cpu_s > self.noisy_cpu_s and tries < self.retries:
            tries += 1
            print(noisy_line(latest, t.label, r, self.width, tries, self.retries))
            latest = self.measure(bench, t, r, duration)
            latest.attempts = tries + 1
            if latest.foreign_cpu_s < run.foreign_cpu_s:
                run = latest
        return run
