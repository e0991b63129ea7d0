"""Put TensorRT's type stubs where mypy can read them, without installing `tensorrt` into the venv.

    python scripts/tensorrt_typings.py .venv/typings

The `tensorrt-stubs` wheel cannot be pip-installed here (it depends on `tensorrt`, whose install downloads
from NVIDIA's index), and installed with --no-deps it would make `import tensorrt` succeed as an empty
namespace package. So this downloads the wheel, extracts only `tensorrt/__init__.pyi` and
`tensorrt_bindings/*.pyi` into the target folder (mypy_path in pyproject.toml points there) and repairs
the two things mypy rejects as syntax errors. A repair that finds nothing fails, so a new stub version
gets looked at instead of silently checked differently. Re-running with the same version does nothing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "tensorrt-stubs"
VERSION = "10.13.0.35.1"
MARKER = ".tensorrt-stubs-version"
WANTED = re.compile(r"(tensorrt/__init__|tensorrt_bindings/[A-Za-z0-9_]+)\.pyi")

# (what, pattern, replacement): mechanical fixes for what mypy reports as syntax errors in the stubs.
REPAIRS = (
    # `def get_workspace_size(self, in: list[...], ...)`: `in` is a keyword (pybind11 kept the C++ name).
    ("a parameter named `in`", re.compile(r"(?<=[(,] )in(?=: )"), "in_"),
    # `add_scale_nd(..., power: Weights = None, channel_axis: int)`: no default after defaulted parameters.
    ("`channel_axis: int` without a default", re.compile(r"channel_axis: int\)"), "channel_axis: int = ...)"),
)


class TypingsError(Exception):
    pass


def install(target: Path, version: str = VERSION) -> bool:
    """Write the repaired stubs into `target`; False when the same version is already there."""
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == version:
        return False
    with tempfile.TemporaryDirectory(prefix="tensorrt-typings-") as tmp:
        wheel = _download(version, Path(tmp))
        stubs = _extract(wheel, Path(tmp) / "stubs")
        _repair(stubs)
        # Replace the folders whole so files of another version cannot linger; the marker goes last.
        target.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        for package in ("tensorrt", "tensorrt_bindings"):
            shutil.rmtree(target / package, ignore_errors=True)
            shutil.copytree(stubs / package, target / package)
    marker.write_text(version + "\n")
    return True


def _download(version: str, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += [f"{PACKAGE}=={version}", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise TypingsError(f"`{' '.join(command)}` failed:\n{result.stdout}{result.stderr}")
    wheels = sorted(folder.glob("tensorrt_stubs-*.whl"))
    if len(wheels) != 1:
        raise TypingsError(f"expected one {PACKAGE} wheel in {folder}, found {[w.name for w in wheels]}")
    return wheels[0]


def _extract(wheel: Path, folder: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if WANTED.fullmatch(name)]
        if "tensorrt/__init__.pyi" not in names or not any(n.startswith("tensorrt_bindings/") for n in names):
            raise TypingsError(
                f"{wheel.name} lacks tensorrt/__init__.pyi or tensorrt_bindings/*.pyi: {names}"
            )
        for name in names:
            archive.extract(name, folder)
    return folder


def _repair(folder: Path) -> None:
    files = sorted(folder.rglob("*.pyi"))
    texts = {path: path.read_text(encoding="utf-8") for path in files}
    for what, pattern, replacement in REPAIRS:
        total = 0
        for path, text in texts.items():
            texts[path], count = pattern.subn(replacement, text)
            total += count
        if total == 0:
            raise TypingsError(
                f"repair for {what} ({pattern.pattern!r}) matched nothing in {PACKAGE} stubs: the stubs "
                f"changed, check whether mypy still needs it and update {Path(__file__).name}"
            )
    for path, text in texts.items():
        path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("target", type=Path, help="folder for mypy_path, e.g. .venv/typings")
    parser.add_argument("--version", default=VERSION, help=f"{PACKAGE} version (default {VERSION})")
    args = parser.parse_args(argv)
    try:
        changed = install(args.target, args.version)
    except TypingsError as e:
        print(f"tensorrt_typings: error: {e}", file=sys.stderr)
        return 1
    state = "written to" if changed else "already in"
    print(f"tensorrt_typings: {PACKAGE} {args.version} {state} {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
