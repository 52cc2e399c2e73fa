"""``segproxy check URL``: verify a deployed proxy (segproxy or any nginx, CloudFront,
Cloudflare one) the way a browser and Segment's SDKs use it, and name each mistake with its fix.

- ``probe``: the I/O (one HTTP exchange on a new connection, one TLS handshake);
- ``faults``: a check's :class:`~segproxy.check.faults.Verdict`, the fault ids, refusals read;
- ``judge``: pure, the answers of each check in, its verdict out;
- ``run``: the checks in a visitor's order, and the exit code;
- ``report``: the human report and the ``--json`` one.

docs/check.md describes every check, fault, fix, the JSON schema and the exit codes. None of
this runs in ``segproxy serve``: it is the operator's command, interpreted.
"""
