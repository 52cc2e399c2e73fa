"""Compile segproxy's request path with mypyc (see src/segproxy/native.py).

Usage: .venv/bin/python scripts/build_native.py [--force] [--require]

Does nothing if the build on disk matches the source. Otherwise compiles the modules listed in
``segproxy.native.COMPILED`` in a temporary directory, puts the extensions beside their
sources, and writes the manifest last (a build that stopped half way is never used). If the
build fails, the old one is removed and segproxy runs as plain Python; ``--require`` makes
that an error instead (the test command uses it: the suite runs what users run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

from segproxy import native  # noqa: E402

# Run in the work directory: the same extensions as a wheel's (setup.py, at the root, builds
# those), compiled beside the copy of the package.
SETUP = """
import sys
sys.path.insert(0, {root!r})
from setuptools import setup
from setup import mypyc_extensions

setup(
    name="segproxy-native",
    ext_modules=mypyc_extensions({files!r}, {group!r}),
    script_args=["build_ext", "--inplace", "--build-temp", "build"],
)
"""


def remove_build() -> None:
    native.MANIFEST.unlink(missing_ok=True)  # first: what remains is never taken for whole
    for f in native.built():
        f.unlink()


def build(work: Path) -> None:
    """Compile a copy of the package in ``work``, then move the extensions into src/."""
    shutil.copytree(SRC / "segproxy", work / "segproxy", ignore=shutil.ignore_patterns("*.so"))
    files = [f"segproxy/{name}" for name in native.COMPILED]
    script = SETUP.format(root=str(ROOT), files=files, group=native.GROUP)
    (work / "setup_native.py").write_text(script)
    env = dict(os.environ, MYPY_FORCE_COLOR="0")
    done = subprocess.run(
        [sys.executable, "setup_native.py"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"mypyc build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    shutil.copy2(work / f"{native.GROUP}__mypyc{native.SUFFIX}", SRC)
    for name in native.COMPILED:
        built = work / "segproxy" / (name.removesuffix(".py") + native.SUFFIX)
        shutil.copy2(built, native.extension_path(name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--require", action="store_true", help="fail if it cannot be built")
    args = parser.parse_args()
    digest = native.source_digest()
    if not args.force and native._matches() == "compiled":
        return 0
    remove_build()
    started = time.monotonic()
    print("native: compiling the request path with mypyc (half a minute or so)...", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="segproxy-native-") as tmp:
            build(Path(tmp))
    except (RuntimeError, OSError) as exc:
        remove_build()
        print(f"native: {exc}", file=sys.stderr)
        if args.require:
            return 1
        print("native: segproxy will run as plain Python (slower, same behaviour)", file=sys.stderr)
        return 0
    native.MANIFEST.write_text(json.dumps({"digest": digest}) + "\n")
    print(f"native: compiled {len(native.COMPILED)} modules in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
