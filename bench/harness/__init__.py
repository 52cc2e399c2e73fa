"""The bench harness behind ``bench/run.py`` (the method: bench/README.md).

- ``common``: paths, the bench's names, goals and deadlines, :class:`BenchError`;
- ``processes``: starting and stopping every process, /proc probes, a port, one HTTP request;
- ``fixtures``: the track event, the bundle, the settings JSON, config templates;
- ``targets``: the upstream nginx, the reference nginx, segproxy and segproxy-sqlite, started
  as a :class:`~harness.targets.Lineup`, and their one-request sanity checks;
- ``workloads``: the benchmarks, one wrk run, the durable queue's drain measurement;
- ``machine``: CPU per core and per process, disk flushes, TIME_WAIT, RSS sampling;
- ``rounds``: warm-ups and ABBA rounds, each run measured with what the machine did around it;
- ``reporting``: the per-run lines, the markdown table, RSS and noise summaries;
- ``session``: one session start to end, and the JSON results.
"""
