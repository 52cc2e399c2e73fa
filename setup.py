"""The build step of ``pip install .`` and ``pip wheel .``: the compiled request path.

Everything about the package itself (name, dependencies, entry point) is in pyproject.toml;
this file only adds the mypyc extensions of the modules in ``segproxy.native.COMPILED`` (the one
list; ``scripts/build_native.py`` compiles the same modules in place for the editable install).

The build compiles when it can and otherwise gives plain Python, with a warning saying why:

- ``SEGPROXY_NATIVE=0`` at build time: plain Python, on purpose;
- ``SEGPROXY_NATIVE=1`` at build time: compiled or the build fails (the Dockerfile uses it: an
  image should not be slower than its recipe promises without anyone noticing);
- unset: compiled where a C compiler and Python's C headers exist, plain Python otherwise.

An editable install (``pip install -e .``) compiles nothing here: scripts/setup.sh runs
scripts/build_native.py, which builds in the source tree beside a manifest it checks.

A compiled wheel carries ``segproxy/native.json``, the digest of the sources it was built from,
written only once every extension is built: segproxy runs the build only if it is whole
(see src/segproxy/native.py).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MYPY_CONFIG = ROOT / "pyproject.toml"


def native_module() -> ModuleType:
    """src/segproxy/native.py, loaded by path: importing the package would run its select()."""
    path = ROOT / "src" / "segproxy" / "native.py"
    spec = importlib.util.spec_from_file_location("_segproxy_native", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def warn(message: str) -> None:
    # pip shows a build's stderr only with -v, or when the build fails: keep it to one line
    # so that it stands out in a verbose log and in `docker build`'s output.
    print(f"segproxy: {message}", file=sys.stderr, flush=True)


def why_not_compiled() -> str | None:
    """Why this machine cannot compile the request path, or None if it can."""
    # $CC first: setuptools compiles with it when it is set
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        return f"no Python C headers ({include}/Python.h; Debian: python3-dev)"
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc (part of mypy) is not installed"
    return None


def compile_in_parallel() -> None:
    """Compile the C files of one extension on every core.

    mypyc writes one C file per module into a single shared library, and setuptools compiles
    an extension's files one after another; gcc is most of the build's time.
    """
    import distutils.ccompiler  # setuptools' own copy, once setuptools is imported

    def compile_all(
        self: Any,
        sources: list[str],
        output_dir: str | None = None,
        macros: Any = None,
        include_dirs: Any = None,
        debug: int = 0,
        extra_preargs: Any = None,
        extra_postargs: Any = None,
        depends: Any = None,
    ) -> list[str]:
        macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs
        )
        cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

        def one(obj: str) -> None:
            src, ext = build[obj]
            self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(one, objects))
        return list(objects)

    # (typed loosely: setuptools' private helpers above take what the public method is given)
    distutils.ccompiler.CCompiler.compile = compile_all  # type: ignore[method-assign, assignment]


def mypyc_extensions(files: list[str], group: str) -> list[Extension]:
    """The extensions of ``files`` (paths of modules in a package), type-checked by mypy with
    the project's own settings (strict) first: mypyc compiles what mypy accepts."""
    from mypyc.build import mypycify

    compile_in_parallel()
    args = [f"--config-file={MYPY_CONFIG}", *files]
    extensions: list[Extension] = mypycify(args, group_name=group, opt_level="3", multi_file=True)
    return extensions


class BuildNative(build_ext):  # type: ignore[misc]  # (untyped before setuptools 69)
    """build_ext that falls back to plain Python when compiling fails (unless required), and
    writes the manifest once every extension is built."""

    def run(self) -> None:
        if not self.extensions:
            super().run()
            return
        native = native_module()
        try:
            super().run()
        except Exception as exc:  # a compiler error, a missing linker: the build goes on
            if os.environ.get("SEGPROXY_NATIVE") == "1":
                raise
            self.remove_outputs()
            warn(f"building plain Python: compiling the request path failed: {exc}")
            return
        package = Path(self.get_ext_fullpath("segproxy.app")).parent
        digest = native.source_digest()
        (package / "native.json").write_text(json.dumps({"digest": digest}) + "\n")

    def remove_outputs(self) -> None:
        for path in self.get_outputs():
            Path(path).unlink(missing_ok=True)
        self.extensions: list[Extension] = []


# The commands that build the package. pip also runs this file for metadata only (egg_info,
# dist_info), and an editable install (editable_wheel) is compiled by scripts/build_native.py:
# mypyc (a minute of CPU) runs only for a real build.
BUILDS = {"bdist_wheel", "build", "build_ext", "install"}


def extensions() -> list[Extension]:
    """The request path's extensions, or none (plain Python) with the reason as a warning."""
    if not BUILDS & set(sys.argv):
        return []
    wanted = os.environ.get("SEGPROXY_NATIVE", "")
    if wanted == "0":
        warn("building plain Python: SEGPROXY_NATIVE=0")
        return []
    reason = why_not_compiled()
    if reason is None:
        native = native_module()
        files = [f"src/segproxy/{name}" for name in native.COMPILED]
        try:
            return mypyc_extensions(files, native.GROUP)
        except (Exception, SystemExit) as exc:  # mypy's errors end in SystemExit
            reason = f"mypyc could not compile it ({exc})"
    if wanted == "1":
        raise SystemExit(f"segproxy: SEGPROXY_NATIVE=1 but cannot compile: {reason}")
    warn(f"building plain Python (same behaviour, slower): {reason}")
    return []


if __name__ == "__main__":
    os.chdir(ROOT)  # mypyc names modules by their paths: src/segproxy/app.py is segproxy.app
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildNative})
