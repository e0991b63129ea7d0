"""Find a runnable `perf_analyzer`.

The `tritonclient==2.51.0` wheel installs a working binary next to the interpreter, but it links
`libb64.so.0d` and `libcudart.so.12`, which a machine without the Triton SDK lacks. The nvidia-pytriton
wheel ships both under mangled names (`libb64-<hash>.so.0d`, ...) in `nvidia_pytriton.libs/`; symlinks
with the plain names in a cache folder, put on LD_LIBRARY_PATH, satisfy the loader (it then runs on a
machine without a GPU too).
In the NGC SDK container perf_analyzer is on PATH with its libraries: pass it explicitly there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.serve import default_cache_dir

# Library names the wheel's binary asks for -> the nvidia-pytriton files that provide them.
WHEEL_LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


class PerfAnalyzerNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class PerfAnalyzerCommand:
    executable: Path
    env: Mapping[str, str] | None = None  # None: inherit our environment unchanged


def find_perf_analyzer(explicit: str | None = None, cache_dir: Path | None = None) -> PerfAnalyzerCommand:
    """`explicit` (a path, or a name looked up on PATH) as is; else the tritonclient wheel's binary with
    its libraries prepared; else a `perf_analyzer` on PATH."""
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise PerfAnalyzerNotFound(f"--perf-analyzer {explicit}: not an executable file nor on PATH")
        return PerfAnalyzerCommand(Path(found))
    wheel_binary = Path(sys.executable).parent / "perf_analyzer"
    if wheel_binary.is_file():
        libs = _pytriton_libs()
        if libs is None:  # the loader may still find the libraries elsewhere; it says so if not
            return PerfAnalyzerCommand(wheel_binary)
        lib_dir = prepare_libraries(libs, cache_dir or default_cache_dir())
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib_dir), env.get("LD_LIBRARY_PATH")]))
        return PerfAnalyzerCommand(wheel_binary, env)
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return PerfAnalyzerCommand(Path(on_path))
    raise PerfAnalyzerNotFound(
        "no perf_analyzer: pip install 'tritonclient[grpc,http]==2.51.0' (its wheel carries the binary), "
        "run inside the Triton SDK container, or pass --perf-analyzer PATH"
    )


def _pytriton_libs() -> Path | None:
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = Path(next(iter(spec.submodule_search_locations))).parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


def prepare_libraries(libs: Path, cache_dir: Path) -> Path:
    """A folder of symlinks named as perf_analyzer asks, to the files in `libs`.

    One folder per `libs` location, so that two environments never point each other's links away. Each
    link is made under a temporary name and renamed into place: a concurrent run sees the old link or the
    new one, never none.
    """
    folder = cache_dir / "perf_analyzer-lib" / hashlib.sha256(str(libs.resolve()).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for name, pattern in WHEEL_LIBRARIES.items():
        matches = sorted(libs.glob(pattern))
        if not matches:
            raise PerfAnalyzerNotFound(f"{libs} has no {pattern} to stand in for {name}")
        target, link = matches[-1], folder / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        staging = folder / f".{name}.{os.getpid()}"
        staging.unlink(missing_ok=True)
        staging.symlink_to(target)
        staging.replace(link)
    return folder
