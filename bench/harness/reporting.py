"""What the bench prints and writes: per-run lines, the markdown table, the JSON results."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from harness.common import (
    GOAL_DRAIN_S,
    GOAL_RSS_MB,
    GOAL_UPSTREAM_PER_1000,
    NOISY_SHARE,
    QUEUE_DRAIN_DEADLINE_S,
)
from harness.machine import RssSampler
from harness.processes import pid_tree, proc_status_kb
from harness.targets import Target
from harness.workloads import Benchmark, Drain, WrkRun


def fmt_rps(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.2f} ms"


def cpu_note(busy: dict[str, float]) -> str:
    return "/".join(f"{v:.0f}%" for _k, v in sorted(busy.items()))


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def summarize(runs: list[WrkRun], label: str) -> dict[str, Any]:
    mine = [r for r in runs if r.target == label]
    if not mine:
        return {}
    return {
        "median_rps": round(statistics.median(r.rps for r in mine), 1),
        "median_p99_us": statistics.median(r.p99_us for r in mine),
        "median_p50_us": statistics.median(r.p50_us for r in mine),
        "rps_per_round": [round(r.rps, 1) for r in mine],
        "p99_us_per_round": [r.p99_us for r in mine],
        "errors_total": sum(r.errors for r in mine),
        "requests_total": sum(r.requests for r in mine),
        "upstream_requests_total": sum(r.upstream_requests for r in mine),
        "upstream_new_connections_total": sum(r.upstream_connections for r in mine),
        "bytes_per_response": round(
            sum(r.bytes for r in mine) / max(1, sum(r.requests for r in mine)), 1
        ),
    }


def _median_or_none(values: Sequence[float | None]) -> float | None:
    """Median where None (no ack, or no drain before the deadline) counts as worst."""
    med = statistics.median(float("inf") if v is None else v for v in values)
    return None if med == float("inf") else round(med, 2)


def summarize_drains(drains: Sequence[Drain]) -> dict[str, Any]:
    """Durable ingest, over the measured rounds: upstream requests per 1,000 acknowledged
    events and drain times. A goal holds only if it holds in every round."""
    per = [d.per_1000 for d in drains]
    took = [d.drain_s for d in drains]
    acked = sum(d.acked for d in drains)
    upstream = sum(d.upstream_requests for d in drains)
    return {
        "upstream_per_1000": {
            "per_round": [None if v is None else round(v, 2) for v in per],
            "median": _median_or_none(per),
            "pooled": round(1000.0 * upstream / acked, 2) if acked else None,
            "upstream_requests_total": upstream,
            "acked_total": acked,
            "goal_max": GOAL_UPSTREAM_PER_1000,
            "pass": all(v is not None and v <= GOAL_UPSTREAM_PER_1000 for v in per),
        },
        "drain_s": {
            "per_round": took,
            "median": _median_or_none(took),
            "rows_at_end_per_round": [d.rows_at_end for d in drains],
            "deadline_s": QUEUE_DRAIN_DEADLINE_S,
            "goal_max": GOAL_DRAIN_S,
            "pass": all(v is not None and v <= GOAL_DRAIN_S for v in took),
        },
        "dead_letters": max((d.dead_letters for d in drains), default=0),
    }


def drain_rows(summary: dict[str, Any], shape: str) -> list[str]:
    """The two extra table lines of a durable ingest benchmark (one per request shape)."""

    def num(v: float | None, unit: str = "") -> str:
        return f"> {QUEUE_DRAIN_DEADLINE_S:g}{unit}" if v is None else f"{v:g}{unit}"

    per = summary["upstream_per_1000"]
    took = summary["drain_s"]
    per_rounds = " / ".join("n/a" if v is None else f"{v:.2f}" for v in per["per_round"])
    took_rounds = " / ".join(num(v) for v in took["per_round"])
    per_median = "n/a" if per["median"] is None else f"{per['median']:.2f}"
    return [
        f"| durable ingest ({shape}): upstream requests per 1,000 acked events (wrk start to "
        f"queue empty) | {per_median} (rounds {per_rounds}) | | | | | | "
        f"| <= {GOAL_UPSTREAM_PER_1000:g} every round {mark(per['pass'])} |",
        f"| durable ingest ({shape}): drain time, end of load to empty queue "
        f"| {num(took['median'], ' s')} "
        f"(rounds {took_rounds}) | | | | | | "
        f"| <= {GOAL_DRAIN_S:g} s every round {mark(took['pass'])} |",
    ]


# --------------------------------------------------------------------------------------------
# One line per run


def drain_note(run: WrkRun, indent: str) -> str:
    """The durable run's second line: acks, upstream requests, drain time and CPU."""
    d = run.drain
    if d is None:
        return ""
    per = "n/a" if d.per_1000 is None else f"{d.per_1000:.2f}"
    took = f"{d.drain_s:g} s" if d.drain_s is not None else f"> {QUEUE_DRAIN_DEADLINE_S:g} s"
    return (
        f"\n{indent}acked {d.acked:,}  upstream {d.upstream_requests} req until drained "
        f"= {per} per 1,000 acked  drain {took} ({d.rows_at_end:,} rows at end, "
        f"{d.polls} polls)  drain cpu user/sys {d.user_s:g}/{d.sys_s:g} s"
        + (f"  dead letters {d.dead_letters}" if d.dead_letters else "")
        + (f"  queue rows before {run.queue_rows_before}" if run.queue_rows_before else "")
    )


def warmup_line(w: WrkRun, label: str, width: int, indent: str) -> str:
    return f"  warm-up {label:<{width}} {fmt_rps(w.rps):>9} req/s  errors {w.errors}" + drain_note(
        w, indent
    )


def noisy_line(latest: WrkRun, label: str, r: int, width: int, tries: int, retries: int) -> str:
    return (
        f"  round {r} {label:<{width}} {fmt_rps(latest.rps):>9} req/s  noisy: "
        f"others {latest.foreign_cpu_s:.2f} cpu-s "
        f"({', '.join(latest.foreign_top)}); retry {tries}/{retries}"
    )


def run_line(run: WrkRun, label: str, r: int, width: int, indent: str, noisy_cpu_s: float) -> str:
    """A measured run: req/s and latency, then what the machine did meanwhile."""
    extra = "".join(f"  [{x}]" for x in (run.non_2xx_line, run.socket_errors_line) if x)
    rss_note = f"  rss {run.rss_kb_after / 1024:.1f} MB" if run.rss_kb_after else ""
    busy = {k: v for k, v in run.bystanders_cpu_s.items() if v >= 0.05}
    if busy:
        rss_note += "  idle targets used " + ", ".join(f"{k} {v:g}" for k, v in busy.items())
        rss_note += " cpu-s"
    if run.foreign_cpu_s > noisy_cpu_s and run.foreign_top:
        rss_note += f"  others: {', '.join(run.foreign_top)}"
    return (
        f"  round {r} {label:<{width}} {fmt_rps(run.rps):>9} req/s  "
        f"p50 {fmt_ms(run.p50_us)}  p99 {fmt_ms(run.p99_us)}  "
        f"errors {run.errors}  {run.bytes / max(1, run.requests):.0f} B/resp{extra}\n"
        f"{indent}cpu0/cpu1 {cpu_note(run.cpu_busy_pct)}  "
        f"{label} user/sys {run.target_user_s:g}/{run.target_sys_s:g} s  "
        f"upstream {run.upstream_requests} req {run.upstream_connections} new conns  "
        f"others {run.foreign_cpu_s:.2f} cpu-s (waited {run.waited_for_quiet_s:g}s)  "
        f"time-wait {run.time_wait_before}  "
        f"disk writes/flushes {run.disk_writes}/{run.disk_flushes}{rss_note}"
        + (f"  (attempt {run.attempts})" if run.attempts > 1 else "")
        + drain_note(run, indent)
    )


# --------------------------------------------------------------------------------------------
# After the rounds: RSS, the table, the warning about noisy runs


def rss_report(
    targets: Sequence[Target],
    samplers: dict[str, RssSampler],
    used: set[str],
    rss_idle_kb: dict[str, int],
) -> dict[str, dict[str, Any]]:
    """RSS after the load, per segproxy process that was measured."""
    rss_by: dict[str, dict[str, Any]] = {}
    for t in targets:
        sampler = samplers.get(t.label)
        if sampler is None or t.label not in used:
            continue
        pids = pid_tree(t.proc.pid)
        last_kb = sampler.sample()
        hwm_kb = sum(proc_status_kb(p, "VmHWM") or 0 for p in pids)
        peak_kb = max(sampler.peak_kb, hwm_kb)
        rss_by[t.label] = {
            "pids": pids,
            "idle_before_load_mb": round(rss_idle_kb[t.label] / 1024, 1),
            "peak_mb": round(peak_kb / 1024, 1),
            "last_mb": round(last_kb / 1024, 1),
            "goal_mb": GOAL_RSS_MB,
            "pass": peak_kb / 1024 < GOAL_RSS_MB,
        }
    return rss_by


def goal_text(bench: Benchmark) -> str:
    """The goal column: the ratio, and for durable ingest the proxy's p99 too."""
    text = f">= {bench.goal_ratio:.2f}x"
    if bench.goal_p99_ms is not None:
        text += f" and p99 <= {bench.goal_p99_ms:g} ms"
    return text


def goal_json(bench: Benchmark, ratio: float, p99_us: float) -> dict[str, Any]:
    """The goal and whether the medians meet it; "pass" needs every part."""
    ratio_ok = ratio >= bench.goal_ratio
    out: dict[str, Any] = {"goal_ratio": bench.goal_ratio, "ratio_pass": ratio_ok}
    if bench.goal_p99_ms is None:
        return out | {"pass": ratio_ok}
    p99_ok = p99_us <= bench.goal_p99_ms * 1000
    return out | {"goal_p99_ms": bench.goal_p99_ms, "p99_pass": p99_ok, "pass": ratio_ok and p99_ok}


def table(
    benches: Sequence[Benchmark],
    all_runs: Sequence[WrkRun],
    rss_by: dict[str, dict[str, Any]],
    label: str,
) -> tuple[list[str], dict[str, Any]]:
    """The markdown table of medians and ratios, and the same per benchmark for the JSON."""
    results: dict[str, Any] = {}
    lines = [
        f"| benchmark | {label} req/s | nginx req/s | ratio | {label} p99 | nginx p99 "
        f"| {label} errors | nginx errors | goal |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for bench in benches:
        runs_b = [r for r in all_runs if r.benchmark == bench.name]
        mine = summarize(runs_b, bench.target.label)
        ref = summarize(runs_b, "nginx")
        ratio = mine["median_rps"] / ref["median_rps"] if ref.get("median_rps") else 0.0
        results[bench.name] = {
            "title": bench.title,
            "target": bench.target.label,
            "shape": bench.shape or None,
            bench.target.label: mine,
            "nginx": ref,
            "ratio": round(ratio, 3),
            **goal_json(bench, ratio, mine["median_p99_us"]),
        }
        lines.append(
            f"| {bench.title} | {fmt_rps(mine['median_rps'])} | {fmt_rps(ref['median_rps'])} "
            f"| {ratio:.2f} | {fmt_ms(mine['median_p99_us'])} | {fmt_ms(ref['median_p99_us'])} "
            f"| {mine['errors_total']} | {ref['errors_total']} "
            f"| {goal_text(bench)} {mark(results[bench.name]['pass'])} |"
        )
        drains = [r.drain for r in runs_b if r.drain is not None]
        if drains:
            summary = summarize_drains(drains)
            results[bench.name]["drain"] = summary
            lines.extend(drain_rows(summary, bench.shape))
    for name, rss in rss_by.items():
        lines.append(
            f"| {name} RSS after load (peak / last) | {rss['peak_mb']:.1f} MB / "
            f"{rss['last_mb']:.1f} MB | | | | | | | < {GOAL_RSS_MB:.0f} MB {mark(rss['pass'])} |"
        )
    return lines, results


def noisy_warning(all_runs: Sequence[WrkRun], noisy_cpu_s: float) -> str | None:
    """The closing warning naming the runs others disturbed, if any."""
    noisy = [r for r in all_runs if r.foreign_cpu_s > noisy_cpu_s]
    if not noisy:
        return None
    return (
        f"\nwarning: during {len(noisy)} of {len(all_runs)} runs other processes on this "
        f"machine used > {noisy_cpu_s:.2f} cpu-s ({NOISY_SHARE:.0%} of a core): "
        + ", ".join(f"{r.benchmark}/{r.target}/r{r.round} {r.foreign_cpu_s:.2f}" for r in noisy)
        + "; rerun on a quiet machine if the ratios matter."
    )
