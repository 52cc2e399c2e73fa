"""What every part of the harness shares: paths, the bench's names and goals, its error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results" / "latest.json"

WRITE_KEY = "segBenchWriteKey0x7f3a9c2e5d1b8a"
SCRIPT_PATH = f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js"
INGEST_PATH = "/v1/t"
BROWSER_ACCEPT_ENCODING = "gzip, br"
TARGET_CORE = 0
LOAD_CORE = 1

# Goals, printed next to the ratios (informational).
GOAL_PASSTHROUGH_RATIO = 0.5
# Durable ingest (issue 13): the ratio and the proxy's median p99 at 50 connections, for each
# request shape.
GOAL_DURABLE_RATIO = 0.7
GOAL_DURABLE_P99_MS = 5.0
GOAL_SCRIPT_RATIO = 0.8
GOAL_RSS_MB = 60.0
# Durable ingest: upstream requests per 1,000 acknowledged events, and seconds from the end of
# the load until the queue is empty (both must hold in every measured round).
GOAL_UPSTREAM_PER_1000 = 20.0
GOAL_DRAIN_S = 10.0

# Labels of the targets (also in file names and the JSON).
SEGPROXY = "segproxy"
DURABLE = "segproxy-sqlite"

# Request shapes of the ingest POST (bench/README.md, "Request shapes"): today's 4 headers, and
# the head Chromium sends with analytics-next's POST (bench/fixtures/chromium-post-track.txt).
SHAPES = ("4-header", "browser")

# How long to wait for the durable proxy's queue to empty (after a run, and before the next).
QUEUE_DRAIN_DEADLINE_S = 60.0
QUEUE_POLL_S = 0.05

# A run during which other processes used more than this share of one core is "noisy".
NOISY_SHARE = 0.05

CLK_TCK = os.sysconf("SC_CLK_TCK")

# TIME_WAIT sockets on our ports tolerated before the next run starts.
TIME_WAIT_LOW = 200


class BenchError(RuntimeError):
    """The harness could not do what it was asked (a process did not start, wrk failed...)."""


def venv_python() -> str:
    python = REPO / ".venv" / "bin" / "python"
    return str(python) if python.exists() else sys.executable


def version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text and done.returncode in (0, 1) else ""
