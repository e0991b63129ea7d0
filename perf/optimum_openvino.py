"""Contestant (e) of perf.compare: optimum-intel's OVStableDiffusionPipeline (OpenVINO), what FastSD CPU runs.

optimum-intel pins what this project cannot use (transformers < 5.6, numpy 2, nncf, its own diffusers), so
it runs in a virtualenv of its own, made here with the exact versions of REQUIREMENTS, in a worker process
(perf/optimum_openvino_worker.py, run with that venv's python) that this process talks to over JSON lines.
See perf/README.md, "(e) optimum-intel".
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from python_backend.ov_sessions import INFERENCE_PRECISION, IR_PRECISION
from services.serve import default_cache_dir

# The venv's pinned set: optimum-intel 2.2.0 (the newest; it needs transformers >= 4.51, < 5.6, optimum
# 2.3, nncf >= 3.3, openvino >= 2026.0) and what pip resolves with it, the main packages pinned. torch 2.13.0
# is the CPU build pip takes from the local wheels folder here (on PyPI alone it would be the CUDA build).
# diffusers 0.39.0 is the newest pip pairs with huggingface_hub < 1.22 (optimum-intel's cap).
REQUIREMENTS = (
    "openvino==2026.4.1",
    "openvino-tokenizers==2026.4.1.0",
    "optimum==2.3.0",
    "nncf==3.4.0",  # imported by optimum-intel's OpenVINO modules whatever the model: not optional in 2.2.0
    "transformers==5.5.4",
    "diffusers==0.39.0",
    "huggingface_hub==1.21.0",
    "tokenizers==0.22.2",
    "safetensors==0.8.0",
    "torch==2.13.0",
    "numpy==2.4.6",
    "scipy==1.17.1",
    # optimum-intel reads a list of calibration prompts (int8-hybrid) through datasets' Dataset; 5.0.1 is the
    # newest pip pairs with huggingface_hub 1.21.
    "datasets==5.0.1",
)
# Installed without its dependencies: optimum-intel 2.2.0 requires torchvision, and PyPI's torchvision is
# built against CUDA torch; with CPU torch it is importable but broken ("operator torchvision::nms does not
# exist"), which makes transformers fail to import AutoProcessor, so optimum.intel itself. Only
# optimum-intel's vision-language models use torchvision; without it transformers treats it as absent.
NO_DEPS = ("optimum-intel==2.2.0",)
WORKER = Path(__file__).with_name("optimum_openvino_worker.py")
# perf.compare's --precision (build-engines') → OpenVINO's INFERENCE_PRECISION_HINT: the one ours compiles
# with (int8-hybrid's FakeQuantize'd ops run int8 whatever the hint, the others f32, or bf16 for
# int8-hybrid-bf16: the same quantized IR).
PRECISIONS = INFERENCE_PRECISION
INT8_HYBRID = "int8-hybrid"  # IR_PRECISION's: both int8-hybrid precisions serve this IR
READY_TIMEOUT_S = 3600.0  # export and compile: ≈1 min on the tiny checkpoint, several on the full-size one
CALL_TIMEOUT_S = 1800.0


class OpenVinoError(RuntimeError):
    """The venv could not be made or the worker failed: the contestant is skipped with this message."""


def requirement_text() -> str:
    """What the venv is made from; also its marker file's content (a venv made from other text is redone)."""
    return "".join(f"{r}\n" for r in REQUIREMENTS) + "".join(f"{r} --no-deps\n" for r in NO_DEPS)


def venv_dir() -> Path:
    return default_cache_dir() / "perf" / "optimum-intel-venv"


def export_cache_dir() -> Path:
    """The worker's exported IR (one folder per checkpoint path and time), OpenVINO's model cache, its log."""
    return default_cache_dir() / "perf" / "optimum-intel"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_ready(venv: Path | None = None) -> bool:
    """Whether the venv exists, made from this REQUIREMENTS."""
    marker = (venv or venv_dir()) / "requirements.txt"
    return marker.is_file() and marker.read_text() == requirement_text()


def ensure_venv(venv: Path | None = None, python: str = sys.executable) -> Path:
    """The venv's python, made first (≈1.5–3 min, 1.6 GB) when the venv is missing or was made from another
    REQUIREMENTS. The marker file (the requirement text) is written last, so a venv whose making was
    interrupted is made again. Raises OpenVinoError with pip's last words when it fails (no registry...)."""
    venv = venv or venv_dir()
    if venv_ready(venv):
        print(f"perf.optimum_openvino: reusing {venv}")
        return venv_python(venv)
    if venv.exists():
        print(f"perf.optimum_openvino: {venv} was made from other requirements or not finished: removing it")
        shutil.rmtree(venv)
    print(f"perf.optimum_openvino: making {venv} (optimum-intel and OpenVINO, pinned; ≈2 min, 1.6 GB)")
    started = time.perf_counter()
    venv.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    try:
        _run([python, "-m", "venv", str(venv)])
        _run([*pip, *REQUIREMENTS])
        _run([*pip, "--no-deps", *NO_DEPS])
    except OpenVinoError:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    (venv / "requirements.txt").write_text(requirement_text())
    print(f"perf.optimum_openvino: made {venv} in {time.perf_counter() - started:.0f} s")
    return venv_python(venv)


def _run(command: Sequence[str]) -> None:
    print("perf.optimum_openvino: " + " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        words = [line for line in (done.stderr + done.stdout).splitlines() if "is ignored" not in line]
        tail = " | ".join(words[-6:])
        what = "pip install" if "pip" in command else " ".join(command[:3])
        raise OpenVinoError(f"{what} failed (exit code {done.returncode}): {tail}")


def calibration_args(precision: str, samples: int | None, cache: Path) -> list[str]:
    """The worker's arguments for an int8-hybrid pipeline: optimum-intel's hybrid quantization calibrated on
    `samples` UNet calls (None: build-engines' default) over the prompts our own calibration uses
    (build_engines/openvino_int8.py), written to a file in `cache`; none for another precision."""
    if IR_PRECISION[precision] != INT8_HYBRID:
        return []
    from build_engines import openvino_int8

    prompts = cache / "calibration-prompts.json"
    prompts.write_text(json.dumps(list(openvino_int8.PROMPTS)))
    samples = samples or openvino_int8.DEFAULT_SAMPLES
    return ["--int8-hybrid-samples", str(samples), "--calibration-prompts", str(prompts)]


class OpenVinoWorker:
    """The worker process with one compiled pipeline (size × size, `precision`; int8-hybrid: quantized on
    `calibration_samples`); stop it with close() (or use it as a context manager). Its stderr goes to
    `log`."""

    def __init__(
        self,
        python: Path,
        checkpoint: Path,
        size: int,
        precision: str,
        cache: Path,
        out_dir: Path,
        calibration_samples: int | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        cache.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out = out_dir / "image.npy"
        self.log_path = cache / "worker.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        command = [str(python), str(WORKER), "--checkpoint", str(checkpoint), "--cache", str(cache)]
        command += ["--size", str(size), "--precision", PRECISIONS[precision]]
        command += calibration_args(precision, calibration_samples, cache)
        print(f"perf.optimum_openvino: starting the worker (log: {self.log_path})", flush=True)
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=_env()
        )
        self.precision = precision
        self.info: dict[str, Any] = {}
        try:
            self.info = self._answer(READY_TIMEOUT_S)
        except OpenVinoError:
            self.close()
            raise

    def __enter__(self) -> OpenVinoWorker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def generate(self, prompt: str, seed: int, steps: int, guidance: float) -> np.ndarray:
        """The image, uint8 [1, H, W, 3]."""
        request = {"prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance, "out": str(self.out)}
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
        except OSError as e:
            raise OpenVinoError(f"the worker is gone ({e}); {self._log_tail()}") from None
        answer = self._answer(CALL_TIMEOUT_S)
        return np.load(answer["path"])

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        if not ready:
            raise OpenVinoError(f"no answer from the worker within {timeout_s:.0f} s; {self._log_tail()}")
        line = stdout.readline()
        if not line:
            code = self.process.wait()
            raise OpenVinoError(f"the worker exited ({code}); {self._log_tail()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise OpenVinoError(f"the worker failed: {answer['error']} (log: {self.log_path})")
        return answer

    def _log_tail(self) -> str:
        self._log.flush()
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return f"last lines of {self.log_path}: " + " | ".join(lines[-4:])

    def close(self) -> None:
        """End of stdin ends the worker; it is killed if it has not gone within 10 s."""
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self._log.close()

    def describe(self) -> str:
        """A line for the report: versions, the precision the UNet was compiled with and its threads."""
        i = self.info
        versions = ", ".join(f"{k} {v}" for k, v in i.get("versions", {}).items())
        exported = (
            f"exported by this run in {i['export_s']:.0f} s" if i.get("exported") else "of an earlier run"
        )
        if IR_PRECISION[self.precision] == INT8_HYBRID:
            made = f"by this run in {i['quantize_s']:.0f} s" if i.get("quantized") else "by an earlier run"
            exported += (
                f", quantized (optimum-intel's hybrid quantization) {made}: "
                f"{i.get('unet_fake_quantize')} FakeQuantize ops in its UNet"
            )
        return (
            f"its own venv ({versions}); INFERENCE_PRECISION_HINT {PRECISIONS[self.precision]}: "
            f"UNet compiled at {i.get('unet_precision')} (a hint the CPU lacks falls back to f32), "
            f"{i.get('threads', '?')} threads (OpenVINO's default: all cores); IR {exported} "
            f"({i.get('load_s')} s to load it, {i.get('compile_s')} s to reshape and compile), scheduler "
            f"{i.get('scheduler')}; each call includes a JSON line each way and a .npy file"
        )


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # nothing of this project's environment
    return env


def export(
    python: Path,
    checkpoint: Path,
    cache: Path,
    precision: str = "fp32",
    calibration_samples: int | None = None,
) -> dict[str, Any]:
    """The checkpoint's OpenVINO IR in `cache` (int8-hybrid: also quantized), made by a worker process of its
    own that exits after (its peak memory is gone before the other contestants load) unless an earlier run
    made it: the worker's answer (what it made now, and the seconds it took)."""
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "export.log"
    print(f"perf.optimum_openvino: exporting {checkpoint} unless done before (log: {log})", flush=True)
    command = [
        str(python),
        str(WORKER),
        "--checkpoint",
        str(checkpoint),
        "--cache",
        str(cache),
        "--export-only",
        *calibration_args(precision, calibration_samples, cache),
    ]
    with open(log, "w") as stderr:
        try:
            done = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=_env(), timeout=READY_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise OpenVinoError(f"the export took over {READY_TIMEOUT_S:.0f} s (log: {log})") from None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    answer = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
    if done.returncode != 0 or not answer.get("ready"):
        why = answer.get("error") or f"exit code {done.returncode}"
        raise OpenVinoError(f"the export failed: {why}; last lines of {log}: " + " | ".join(lines[-4:]))
    print(f"perf.optimum_openvino: the IR to serve: {answer['ir']}")
    return answer


def start(
    checkpoint: Path,
    size: int,
    precision: str,
    out_dir: Path,
    cache: Path | None = None,
    calibration_samples: int | None = None,
) -> OpenVinoWorker:
    """The venv (made if needed), the IR (exported, and for int8-hybrid quantized, if needed) and a started
    worker for the checkpoint; raises OpenVinoError."""
    python = ensure_venv()
    cache = cache or export_cache_dir()
    made = export(python, checkpoint, cache, precision, calibration_samples)
    worker = OpenVinoWorker(python, checkpoint, size, precision, cache, out_dir, calibration_samples)
    # What the export process made now: the worker found it made.
    for made_now, seconds in (("exported", "export_s"), ("quantized", "quantize_s")):
        if made.get(made_now):
            worker.info[made_now], worker.info[seconds] = True, made[seconds]
    return worker
