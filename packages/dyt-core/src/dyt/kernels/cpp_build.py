"""Building C++ CPU extensions the way the ``cpu`` backend does, for any package's kernels.

One build per CPU capability, with the flags of the instruction set torch itself dispatches to
(AVX-512, AVX2 or the portable default), so ATen's ``Vectorized`` in the extension matches torch's
own kernels. torch.utils.cpp_extension caches the build in ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) under a lock file of its own; that file outlives a build that was
killed, and every later process would wait on it forever. So builds here take a kernel lock
first, ``dyt-build.flock`` in the build folder (released when its holder dies, however it dies),
on which concurrent processes (ranks) wait for one build instead of compiling at once, and,
holding it, remove a leftover of torch's once it is old enough not to be a live build's. The
build's name carries a digest of what makes it (source, flags, the torch it is built against):
cpp_extension keeps one folder per name and rebuilds in it whenever those change, so two
environments (two venvs, two checkouts) sharing the cache would otherwise rebuild it in turn,
~20-30 s each time.

A build that finished leaves a stamp beside its library (:data:`BUILT_STAMP`: the library's path,
size and modification time, and what the build is made of). A later process whose build matches the
stamp imports the library itself (:func:`load_built`): cpp_extension's load writes a ninja file,
runs ninja and imports setuptools and hipify first, for a library that is already there (~0.7 s of a
process that loads the kernels and DeepSpeed's op, measured alone on the 2-core box; a launch's
time did not show it: docs/performance.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}

log = logging.getLogger(__name__)


class CpuKernelBuildError(RuntimeError):
    """C++ kernels could not be built or loaded (no compiler, no ninja, a failed build)."""


@functools.cache
def capability() -> str:
    """The instruction set kernels are built for: torch's own CPU dispatch level (which also
    honours ``ATEN_CPU_CAPABILITY``), or the portable default for any other."""
    level = torch.backends.cpu.get_cpu_capability()
    return level if level in CAPABILITY_FLAGS else "DEFAULT"


def put_ninja_wheel_on_path() -> None:
    """Where no ``ninja`` is on PATH, add the folder of the ninja wheel's binary (a dyt-core
    dependency): pip puts it beside the interpreter's scripts, which are off PATH when a venv's python
    runs without the venv being activated, and cpp_extension looks for ``ninja`` on PATH only."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR:
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def build_flags(level: str) -> list[str]:
    """The compiler flags of a build for ``level``. -fopenmp: ATen's parallel_for is inline OpenMP in
    the headers; without it the kernels run on one thread. The extension then shares torch's libgomp
    (same soname, loaded first)."""
    return ["-O3", "-std=c++17", "-fopenmp", *CAPABILITY_FLAGS[level]]


STALE_BUILD_LOCK_S = 300.0
"""Age at which torch's ``lock`` file in a build folder counts as a killed build's: a build of
these files takes ~30 s on 2 cores, and a load of a built one well under a second."""


def clear_stale_build_lock(baton: Path) -> None:
    """Wait while torch's ``lock`` file ``baton`` is younger than :data:`STALE_BUILD_LOCK_S` (a build
    by code that does not take :func:`held_build_folder`'s lock, e.g. a checkout from before
    2026-12-06 sharing the cache, may hold it), then remove it if it is still there."""
    said = False
    while True:
        try:
            age = time.time() - baton.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= STALE_BUILD_LOCK_S:
            log.warning("removing %s, left by a build that was killed %.0f s ago (later builds would wait on it "
                        "forever)", baton, age)
            baton.unlink(missing_ok=True)
            return
        if not said:
            log.warning("waiting for %s: another process is building there, or one was killed while it did (the "
                        "file is then removed once %.0f s old)", baton, STALE_BUILD_LOCK_S)
            said = True
        time.sleep(0.5)


@contextlib.contextmanager
def held_build_folder(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s build to this process: an exclusive ``flock`` (the kernel drops it when the
    holder dies, however it dies). Every build here holds it around torch's own ``lock`` file, so,
    holding it, such a file is a killed build's or one of code that does not take it
    (:func:`clear_stale_build_lock`). Where the file system has no ``flock`` (some NFS mounts) the
    build goes on without it, as before, with a warning."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "dyt-build.flock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            log.warning("building in %s without a lock of its own (%s): a lock file a killed build left there "
                        "stays, and later builds wait on it", folder, error.strerror or error)
            yield
            return
        try:
            clear_stale_build_lock(folder / "lock")
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def shared_build_folder(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s kernel lock shared: any number of loads at once, none while a build
    (:func:`held_build_folder`, exclusive) may be rewriting the library. The lock file is opened
    read-only, so a user who may read the cache but not write it waits for a build too; where it is
    missing (no build here took it) or the file system has no ``flock`` (some NFS mounts), loads go on
    without it."""
    try:
        handle = open(folder / "dyt-build.flock")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def torch_identity() -> tuple[str, str]:
    """The torch a build is for: its version and the folder it is installed in (another venv's torch
    is another build, even at the same version)."""
    return torch.__version__, str(Path(torch.__file__).resolve().parent)


BUILT_STAMP = "dyt-built.json"
"""The stamp :func:`record_built` leaves in a build folder once a load through cpp_extension worked."""


def record_built(folder: Path, module, made_of: str) -> None:
    """Stamp ``folder`` with the library ``module`` was imported from and ``made_of`` (what the build
    is made of: a digest of its sources, flags and torch), holding the folder's kernel lock after a
    load through cpp_extension, so that later processes may import that library directly."""
    library = Path(module.__file__)
    stat = library.stat()
    where = library.relative_to(folder) if library.is_relative_to(folder) else library  # the cache may move
    stamp = {"module": module.__name__, "library": str(where), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "made_of": made_of}
    partial = folder / f".{BUILT_STAMP}.{os.getpid()}"
    try:
        partial.write_text(json.dumps(stamp))
        os.replace(partial, folder / BUILT_STAMP)
    except OSError as error:  # the module is loaded all the same; later loads go through cpp_extension
        log.info("could not stamp the build in %s (%s)", folder, error.strerror or error)
        partial.unlink(missing_ok=True)


def load_built(folder: Path, made_of: str):
    """The module of the build stamped in ``folder`` (:func:`record_built`), imported without
    cpp_extension; None where there is no stamp, it is for another ``made_of``, the library is not the
    one stamped (rebuilt, touched or gone), torch's ``lock`` file is there (the full load clears a
    killed build's, :func:`held_build_folder`), or anything else fails: the stamp only saves time, and
    the caller's load through cpp_extension, which builds whatever is missing, reports real errors.
    Code that builds here without the kernel lock (DeepSpeed loading its op by itself, a checkout from
    before 2026-12-06) is kept out only by the ``lock`` check; a relink it starts between that check
    and the import is not."""
    try:
        stamp_file = folder / BUILT_STAMP
        if not stamp_file.is_file():
            return None
        with shared_build_folder(folder):
            if (folder / "lock").exists():
                return None
            stamp = json.loads(stamp_file.read_text())
            library = folder / stamp["library"]
            stat = library.stat()
            if stamp["made_of"] != made_of or (stat.st_size, stat.st_mtime_ns) != (stamp["size"], stamp["mtime_ns"]):
                return None
            spec = importlib.util.spec_from_file_location(stamp["module"], library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    except Exception as error:  # noqa: BLE001 - a cache: any failure means the full load
        log.info("loading the build in %s through cpp_extension (its stamp did not serve: %s)", folder, error)
        return None


class CpuExtension:
    """One C++ file built at first use in a process, then kept; a failed build is kept too (no
    second attempt) and announced once with a RuntimeWarning that says what runs instead."""

    def __init__(self, name: str, source: Path, what: str, unavailable: str, instead: str) -> None:
        """``what`` names the kernels in errors; a failed build warns "<unavailable>: <why>. <instead>"."""
        self.name, self.source, self.what = name, source, what
        self.unavailable, self.instead = unavailable, instead
        self.built: dict[str, object] = {}  # capability -> the module, or the CpuKernelBuildError it raised
        self._lock = threading.Lock()

    def build(self, level: str):
        """Build (or load from torch's cache) ``<name>_<level>``; CpuKernelBuildError with a one-line
        reason when it cannot."""
        cflags = build_flags(level)
        name = self.build_name(level, cflags)
        folder = self.build_folder(name)
        built = load_built(folder, made_of=name)  # the name carries the digest of what the build is made of
        if built is not None:
            return built
        from torch.utils import cpp_extension

        put_ninja_wheel_on_path()
        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError as error:
            raise CpuKernelBuildError(f"building its {self.what} needs ninja ({error})") from error
        log.info("building or loading %s for %s (a first build takes ~20-30 s on 2 cores)", self.what, level)
        try:
            with held_build_folder(folder):  # an unwritable TORCH_EXTENSIONS_DIR: a build error as any
                module = cpp_extension.load(
                    name=name,
                    sources=[str(self.source)],
                    extra_cflags=cflags,
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(folder),
                    verbose=False,
                )
                record_built(folder, module, made_of=name)
                return module
        except Exception as error:  # compiler missing or failing: cpp_extension raises several types
            lines = str(error).strip().splitlines()
            raise CpuKernelBuildError(
                f"building its {self.what} failed ({lines[-1] if lines else type(error).__name__})"
            ) from error

    def build_name(self, level: str, cflags: list[str]) -> str:
        """``<name>_<level>_<digest>``: the digest of the source, the flags and the torch (its
        version and where it is installed) the build is for."""
        made_of = hashlib.sha256(self.source.read_bytes())
        for part in (*cflags, *torch_identity()):
            made_of.update(b"\0" + part.encode())
        return f"{self.name}_{level.lower()}_{made_of.hexdigest()[:10]}"

    @staticmethod
    def build_folder(name: str) -> Path:
        """Where torch.utils.cpp_extension builds and caches ``name``: ``TORCH_EXTENSIONS_DIR``, or its
        default with the Python and CUDA versions in it. cpp_extension's own rule
        (``_get_build_directory``), written out so that loading a built extension does not import
        cpp_extension (a test holds the two equal); the folder is made by the build."""
        root = os.environ.get("TORCH_EXTENSIONS_DIR")
        if root is None:
            from torch import _appdirs

            cuda = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
            python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
            root = os.path.join(os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions")),
                                f"{python}_{cuda}")
        return Path(root) / name

    def load(self):
        """The extension module; raises CpuKernelBuildError when it cannot be built."""
        level = capability()
        result = self.built.get(level)  # after the first call: no lock (the dict is only ever added to)
        if result is not None and not isinstance(result, CpuKernelBuildError):
            return result
        with self._lock:
            if level not in self.built:
                try:
                    self.built[level] = self.build(level)
                except CpuKernelBuildError as error:
                    self.built[level] = error
                    warnings.warn(f"{self.unavailable}: {error}. {self.instead}", RuntimeWarning, stacklevel=4)
            result = self.built[level]
        if isinstance(result, CpuKernelBuildError):
            raise result
        return result

    def build_error(self) -> str | None:
        """None when the extension is built (building it now if needed), else why it cannot be."""
        try:
            self.load()
        except CpuKernelBuildError as error:
            return str(error)
        return None
