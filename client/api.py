"""Python client for the `pipeline` model: text or image to images (img2img, inpainting) over Triton's gRPC or
HTTP protocol."""

from __future__ import annotations

import io
import json
import operator
import queue
import random
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from client.infotext import INPAINTING_FILL_LABELS, controlnet_params, format_infotext, save_png
from python_backend.control import UNIT_FIELDS
from python_backend.request import BINARY_INPUTS, REQUEST_INPUTS, GenerationRequest
from python_backend.shapes import LORA_LIBRARY, PIPELINE, stream_model

# Options of the hires fix, each refused without `enable_hr` (the server would ignore it).
HIRES_OPTIONS = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "denoising_strength")

# img2img's initial image or an inpainting mask: file contents (PNG/JPEG/WebP), a path to such a file, or a
# PIL image.
ImageInput = bytes | str | Path | Image.Image

CONTROL_MODEL = "pipeline_control"  # stops a running generation early (interrupt / skip)
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
INVALID_ARGUMENT_STATUSES = frozenset({"INVALID_ARGUMENT", "400"})
# Overloaded, stopping, or an engine being restarted: worth retrying (HTTP 503 is Triton's UNAVAILABLE).
RETRYABLE_STATUSES = frozenset({"UNAVAILABLE", "503"})
# The pipeline's answer when a request's timeout passed while generating (Triton 2.51 has no
# DEADLINE_EXCEEDED code, so it answers CANCELLED with this prefix).
SERVER_TIMEOUT_PREFIX = "timeout:"
STREAM_ERROR_WAIT_S = 2.0  # for the callback's error after a stream broke before its request went out


class GenerationError(Exception):
    """A failed request. `status` is the gRPC status name (e.g. "INVALID_ARGUMENT", "UNAVAILABLE") or the
    HTTP status code (e.g. "400"); None when the server answered with something this client can't read."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @property
    def is_invalid_argument(self) -> bool:
        return self.status in INVALID_ARGUMENT_STATUSES

    @property
    def is_retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES


def error_from_exception(exc: Exception, url: str, protocol: str) -> GenerationError:
    """Our error for what tritonclient raised: its own exception, or (HTTP) a bare socket error."""
    if isinstance(exc, InferenceServerException):
        status = (exc.status() or "").removeprefix("StatusCode.") or None
        message = exc.message() or str(exc)
    elif isinstance(exc, TimeoutError):
        status, message = "DEADLINE_EXCEEDED", f"no answer in time: {exc}"
    else:
        status, message = "UNAVAILABLE", str(exc)
    if message.startswith(SERVER_TIMEOUT_PREFIX):
        status = "DEADLINE_EXCEEDED"
    elif status == "UNAVAILABLE" and not message.startswith("unavailable:"):  # not the pipeline's own
        message = f"cannot reach the Triton server at {url} over {protocol}: {message}"
    return GenerationError(message, status)


def image_bytes(image: ImageInput) -> bytes:
    """The file bytes to send for `image`: bytes as they are, a path's contents, a PIL image as PNG."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless, and the server decodes any mode Pillow writes
        return buffer.getvalue()
    return Path(image).read_bytes()


def _tensor(name: str, value: Any, dtype: type[np.generic]) -> np.ndarray:
    if name in BINARY_INPUTS:
        return np.array([value], dtype=np.object_)  # file bytes go as they are, never through str()
    if dtype is np.object_:
        return np.array([str(value).encode("utf-8")], dtype=np.object_)
    if dtype is np.bool_ and not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {value!r}")  # numpy would make "false" True
    if issubclass(dtype, np.integer):
        value = operator.index(value)  # refuse floats rather than truncate them
        limits = np.iinfo(dtype)
        if not limits.min <= value <= limits.max:
            raise GenerationError(
                f"{name} must be within [{limits.min}, {limits.max}], got {value}", "INVALID_ARGUMENT"
            )
    return np.array([value], dtype=dtype)


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet unit of a request (python_backend.control.ControlUnit: the server's defaults and
    checks); None leaves a field to the server's default. `model`: a build-engines --controlnet NAME."""

    model: str
    image: ImageInput
    weight: float | None = None
    guidance_start: float | None = None
    guidance_end: float | None = None
    control_mode: str | None = (
        None  # "Balanced", "My prompt is more important", "ControlNet is more important"
    )
    resize_mode: str | None = None  # "Just Resize", "Crop and Resize", "Resize and Fill"
    module: str | None = None  # the preprocessor: "none" (the image is a control map), "canny", ...
    processor_res: int | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool | None = None

    def inputs(self, index: int) -> list[tuple[str, np.ndarray]]:
        """The unit's pipeline inputs, `controlnet_{index}_{field}`."""
        arrays = []
        for field, dtype in UNIT_FIELDS.items():
            value = getattr(self, field)
            if value is None:
                continue
            name = f"controlnet_{index}_{field}"
            if field == "image":
                arrays.append((name, np.array([image_bytes(value)], dtype=np.object_)))
            else:
                arrays.append((name, _tensor(name, value, dtype)))
        return arrays


if {f.name for f in fields(ControlNetUnit)} != set(UNIT_FIELDS):
    raise ImportError("ControlNetUnit must have one field per unit input (control.UNIT_FIELDS)")


@dataclass(frozen=True)
class GenerateOptions:
    """One generation request, as `StableDiffusionClient.generate` takes it: the pipeline's input table
    (python_backend.request.REQUEST_INPUTS) with the client's names. None leaves an input to the server's
    default. A new pipeline input is added here (and in the server's table); generate(), build_inputs() and
    sd-gateway take it from here."""

    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    num_images: int | None = None
    image: ImageInput | None = None
    strength: float | None = None
    resize_mode: str | None = None
    mask: ImageInput | None = None
    mask_blur: int | None = None
    inpainting_fill: str | None = None
    inpaint_full_res: bool | None = None
    inpaint_full_res_padding: int | None = None
    subseed: int | None = None
    subseed_strength: float | None = None
    enable_hr: bool | None = None
    hr_scale: float | None = None
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = None
    denoising_strength: float | None = None
    clip_skip: int | None = None
    controlnets: tuple[ControlNetUnit, ...] = ()  # sent as inputs controlnet_{i}_{field}


# The client names that differ from the pipeline's input names.
_INPUT_NAMES = {"steps": "num_inference_steps"}
# Fails at import when the server's table and GenerateOptions drift apart.
_NOT_INPUTS = {"controlnets"}  # options sent as several inputs each
if {_INPUT_NAMES.get(f.name, f.name) for f in fields(GenerateOptions)} - _NOT_INPUTS != set(REQUEST_INPUTS):
    raise ImportError("GenerateOptions must have one field per pipeline input (request.REQUEST_INPUTS)")


def build_inputs(prompt: str, **options: Any) -> list[tuple[str, np.ndarray]]:
    """`build_request_inputs` for GenerateOptions(prompt, **options)."""
    return build_request_inputs(GenerateOptions(prompt, **options))


def build_request_inputs(request: GenerateOptions) -> list[tuple[str, np.ndarray]]:
    """The request's tensors by input name. Arguments left None are not sent: the server applies its defaults.

    An integer outside its tensor's range, `strength` / `resize_mode` / `mask` without an `image`, a mask
    option without a `mask`, `subseed` without `subseed_strength` or a hires option without `enable_hr` (the
    server would ignore them), or `enable_hr` with an `image` raises GenerationError (status
    INVALID_ARGUMENT) like the server; a non-bool `inpaint_full_res` or `enable_hr` raises TypeError. A path
    `image` or `mask` is read here.
    """
    image, mask, seed, subseed = request.image, request.mask, request.seed, request.subseed
    strength, resize_mode, subseed_strength = request.strength, request.resize_mode, request.subseed_strength
    mask_blur, inpainting_fill = request.mask_blur, request.inpainting_fill
    inpaint_full_res, inpaint_full_res_padding = request.inpaint_full_res, request.inpaint_full_res_padding
    enable_hr, hr_scale, hr_upscaler = request.enable_hr, request.hr_scale, request.hr_upscaler
    hr_second_pass_steps, denoising_strength = request.hr_second_pass_steps, request.denoising_strength
    if image is None:
        for name, value in (("strength", strength), ("resize_mode", resize_mode)):
            if value is not None:
                raise GenerationError(f"{name} needs an image (img2img)", "INVALID_ARGUMENT")
        if mask is not None:
            raise GenerationError("mask needs an image to inpaint", "INVALID_ARGUMENT")
    if mask is None:
        for name, value in (
            ("mask_blur", mask_blur),
            ("inpainting_fill", inpainting_fill),
            ("inpaint_full_res", inpaint_full_res),
            ("inpaint_full_res_padding", inpaint_full_res_padding),
        ):
            if value is not None:
                raise GenerationError(f"{name} needs a mask (inpainting)", "INVALID_ARGUMENT")
    if subseed is not None and subseed_strength is None:
        raise GenerationError("subseed needs subseed_strength (variation seeds)", "INVALID_ARGUMENT")
    if enable_hr and image is not None:
        raise GenerationError("enable_hr is for text to image; send no image with it", "INVALID_ARGUMENT")
    if not enable_hr:
        hires = (hr_scale, hr_upscaler, hr_second_pass_steps, denoising_strength)
        for name, value in zip(HIRES_OPTIONS, hires, strict=True):
            if value is not None:
                raise GenerationError(f"{name} needs enable_hr (hires fix)", "INVALID_ARGUMENT")
    # Random seeds are drawn here rather than by the server, so that a server with a response cache never
    # answers a "random" request with an earlier image, and the request sent names its seed.
    if seed is None or seed == -1:
        seed = secrets.randbelow(2**32)
    if subseed_strength is not None and (subseed is None or subseed == -1):
        subseed = secrets.randbelow(2**32)
    values = {
        _INPUT_NAMES.get(f.name, f.name): getattr(request, f.name)
        for f in fields(GenerateOptions)
        if f.name not in _NOT_INPUTS
    }
    values.update(
        seed=seed,
        subseed=subseed,
        image=None if image is None else image_bytes(image),
        mask=None if mask is None else image_bytes(mask),
    )
    # Names, dtypes and order are the server's own table of pipeline inputs.
    arrays = [
        (name, _tensor(name, values[name], dtype))
        for name, dtype in REQUEST_INPUTS.items()
        if values[name] is not None
    ]
    return arrays + [a for i, unit in enumerate(request.controlnets) for a in unit.inputs(i)]


def triton_inputs(triton: ModuleType, arrays: list[tuple[str, np.ndarray]]) -> list[Any]:
    """`InferInput`s of `triton` (tritonclient.grpc or tritonclient.http) holding `arrays`."""
    inputs = []
    for name, array in arrays:
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _format_float(value: float | None) -> str | None:
    # The server reads FP32 inputs: guidance scale 7.3 comes back as 7.300000190734863.
    return None if value is None else str(float(f"{value:.6g}"))


def _sampler_params(label: str | None) -> dict[str, Any]:
    """A1111 (1.9 on) writes the Karras schedule apart: "Sampler: DPM++ 2M, Schedule type: Karras"."""
    if label and label.endswith(" Karras"):
        return {"Sampler": label.removesuffix(" Karras"), "Schedule type": "Karras"}
    return {"Sampler": label}


def _hash_list(hashes: Mapping[str, str] | None) -> str | None:
    """A1111's "Lora hashes" and "TI hashes": the LoRAs or embeddings a prompt used, `name: hash, ...`
    (quoted when written)."""
    return ", ".join(f"{name}: {digest}" for name, digest in hashes.items()) if hashes else None


def _inpainting_params(info: Mapping[str, Any]) -> dict[str, Any]:
    """A1111's infotext params for inpainting, in its order; none when `info` is not from a masked request."""
    if "inpainting_fill" not in info:
        return {}
    only_masked = bool(info.get("inpaint_full_res"))
    fill = info["inpainting_fill"]
    return {
        "Mask blur": info.get("mask_blur"),
        # A1111 writes the area and padding only for "Only masked"; readers default to "Whole picture".
        "Inpaint area": "Only masked" if only_masked else None,
        "Masked area padding": info.get("inpaint_full_res_padding") if only_masked else None,
        # A1111 leaves out its default "original"; written anyway, it reads back the same everywhere.
        "Masked content": INPAINTING_FILL_LABELS.get(fill, fill),
    }


def _hires_params(info: Mapping[str, Any]) -> dict[str, Any]:
    """A1111's infotext params for the hires fix, in its order; none for a request without it."""
    if "hr_scale" not in info:
        return {}
    return {
        "Hires upscale": f"{info['hr_scale']:.6g}",  # as A1111 writes it: 2, not 2.0
        "Hires steps": info.get("hr_second_pass_steps") or None,  # A1111 leaves out 0 (= Steps)
        "Hires upscaler": info.get("hr_upscaler"),
    }


@dataclass
class GenerationResult:
    images: list[Image.Image]
    info: dict[str, Any]  # the server's `info` JSON
    # The width x height the model generated at, where the images differ (inpainting "only masked" pastes
    # the generated crop back into the full-size image): A1111's `Size` records it; `--infotext` reads it.
    generation_size: tuple[int, int] | None = None

    def infotexts(self, extra: Mapping[str, Any] | None = None) -> list[str]:
        """A1111 infotext of each image, each with its own seed (and variation seed); `extra` params go at the
        end."""
        info = self.info
        subseeds = info.get("subseeds")  # only with a subseed_strength above 0, as A1111 writes them
        return [
            format_infotext(
                info.get("prompt", ""),
                info.get("negative_prompt"),
                {
                    "Steps": info.get("steps"),
                    **_sampler_params(info.get("sampler")),
                    "CFG scale": _format_float(info.get("guidance_scale")),
                    "Seed": info["seeds"][i],
                    "Size": self._size(image),
                    "Model hash": info.get("model_hash") or None,
                    "Model": info.get("model"),
                    "VAE hash": info.get("vae_hash") or None,
                    "VAE": info.get("vae") or None,
                    "Lora hashes": _hash_list(info.get("loras")),
                    "TI hashes": _hash_list(info.get("embeddings")),
                    "Variation seed": None if subseeds is None else subseeds[i],
                    "Variation seed strength": _format_float(info.get("subseed_strength")),
                    # img2img's strength or the hires fix's second pass one: A1111 writes either here.
                    "Denoising strength": _format_float(info.get("strength", info.get("denoising_strength"))),
                    "Clip skip": info.get("clip_skip"),  # the server reports it only when > 1, as A1111
                    **_inpainting_params(info),
                    **_hires_params(info),
                    **controlnet_params(info.get("controlnets", [])),
                    **(extra or {}),
                },
            )
            for i, image in enumerate(self.images)
        ]

    def _size(self, image: Image.Image) -> str:
        # A1111's Size is the generation size; for the hires fix the first pass's (its scale goes apart).
        info = self.info
        width, height = self.generation_size or (
            info.get("first_pass_width", info.get("width", image.width)),
            info.get("first_pass_height", info.get("height", image.height)),
        )
        return f"{width}x{height}"

    def save(self, out_dir: str | Path, prefix: str = "") -> list[Path]:
        """Write each image as `<prefix><NNNNN>-<seed>.png` with its infotext; return the paths.

        Numbered as `save_pngs` does: on from the highest number in `out_dir`, never overwriting.
        """
        seeds = (f"-{seed}" for seed in self.info["seeds"])
        return save_pngs(out_dir, zip(self.images, self.infotexts(), seeds, strict=True), prefix)


def save_pngs(
    out_dir: str | Path, pngs: Iterable[tuple[Image.Image, str, str]], prefix: str = ""
) -> list[Path]:
    """Write each (image, infotext, name suffix) as `<prefix><NNNNN><suffix>.png`; return the paths.

    As A1111 does, NNNNN continues after the highest number already in `out_dir` with this prefix.
    Files are created exclusively, so a name taken meanwhile (another client) moves on to the next number.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    number = next_sequence_number(out, prefix)
    paths = []
    for image, infotext, suffix in pngs:
        while True:
            path = out / f"{prefix}{number:05d}{suffix}.png"
            number += 1
            try:
                with path.open("xb") as file:
                    save_png(image, file, infotext)
            except FileExistsError:
                continue
            paths.append(path)
            break
    return paths


def next_sequence_number(out_dir: Path, prefix: str = "") -> int:
    """One past the highest `<prefix><number>` file name start in `out_dir`; 0 in a fresh directory."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    numbers = (int(m.group(1)) for p in out_dir.iterdir() if (m := pattern.match(p.name)))
    return max(numbers, default=-1) + 1


def decode_response(images: np.ndarray, info: bytes) -> GenerationResult:
    """The result from the `images` (UINT8 [N, H, W, 3]) and `info` (UTF-8 JSON) outputs."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise GenerationError(
            f"expected UINT8 images of shape [N, H, W, 3], got {images.dtype} {list(images.shape)}"
        )
    try:
        parsed = json.loads(info.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerationError(f"the info output is not UTF-8 JSON: {exc}") from exc
    if len(parsed.get("seeds", ())) != len(images):
        raise GenerationError(f"info lists seeds {parsed.get('seeds')} for {len(images)} images")
    return GenerationResult([Image.fromarray(image) for image in images], parsed)


def _json_parameter(model: str, config: Mapping[str, Any], name: str) -> Any:
    """A JSON parameter (string_value) of a model's config, as JSON."""
    text = config.get("parameters", {}).get(name, {}).get("string_value", "")
    if not text:
        raise GenerationError(f"the config of model {model!r} has no {name!r} parameter")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise GenerationError(f"the {name!r} parameter of model {model!r} is not JSON: {exc}") from exc


class StableDiffusionClient:
    """Talks to one pipeline model: `model_name` (a checkpoint built with `build-engines --prefix NAME` is
    `NAME_pipeline`), and its streaming twin `stream_model(model_name)` for progress.

    `timeout_s` bounds each generation (None: wait as long as it takes): the client stops waiting
    (DEADLINE_EXCEEDED) and the server, which is sent the same timeout, stops generating. `retries`
    repeats a generation the server refused as UNAVAILABLE (overloaded, stopping, an engine restarting)
    that many times, after 0.5, 1, 2, ... s (at most `MAX_BACKOFF_S`, with jitter).

    `round_robin` (gRPC): spread requests over every address `url` resolves to, e.g.
    `dns:///sd-triton-grpc.sd-triton.svc.cluster.local:8001` (the deployment's headless Service), instead
    of sending them all to the first one.
    """

    MAX_BACKOFF_S = 8.0

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        model_name: str = PIPELINE,
        timeout_s: float | None = None,
        retries: int = 0,
        round_robin: bool = False,
    ) -> None:
        if protocol not in DEFAULT_URLS:
            raise ValueError(f"protocol must be one of {sorted(DEFAULT_URLS)}, got {protocol!r}")
        if retries < 0:
            raise ValueError(f"retries must be at least 0, got {retries}")
        if round_robin and protocol != "grpc":
            raise ValueError("round_robin balances gRPC channels: use protocol='grpc'")
        self.url = url or DEFAULT_URLS[protocol]
        self.protocol = protocol
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.retries = retries
        # Imported per protocol: gRPC and HTTP each pull in their own stack (grpcio, gevent).
        with self._errors():
            if protocol == "grpc":
                import tritonclient.grpc as triton

                channel_args = None
                if round_robin:
                    channel_args = [
                        ("grpc.lb_policy_name", "round_robin"),
                        # channel_args replaces tritonclient's own: keep its limits (images are megabytes).
                        ("grpc.max_send_message_length", triton.MAX_GRPC_MESSAGE_SIZE),
                        ("grpc.max_receive_message_length", triton.MAX_GRPC_MESSAGE_SIZE),
                    ]
                self._client = triton.InferenceServerClient(self.url, channel_args=channel_args)
                self._call_kwargs: dict[str, Any] = {"client_timeout": timeout_s}
            else:
                import tritonclient.http as triton

                # tritonclient.http defaults to 60 s, shorter than a large batch may take.
                self._client = triton.InferenceServerClient(
                    self.url, connection_timeout=timeout_s or 60.0, network_timeout=timeout_s
                )
                self._call_kwargs = {}
        self._triton = triton

    def __enter__(self) -> StableDiffusionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (InferenceServerException, OSError) as exc:  # tritonclient.http lets socket errors through
            raise error_from_exception(exc, self.url, self.protocol) from exc

    def is_ready(self) -> bool:
        """Whether the server is up and the pipeline model loaded."""
        try:
            with self._errors():
                return bool(
                    self._client.is_server_ready(**self._call_kwargs)
                    and self._client.is_model_ready(self.model_name, **self._call_kwargs)
                )
        except GenerationError:
            return False

    def schedulers(self) -> list[dict[str, Any]]:
        """The model's schedulers: `{"name", "a1111"}` each, `"default": true` on the checkpoint's own."""
        return self._config_parameter("schedulers")

    def checkpoint(self) -> dict[str, str]:
        """The checkpoint the model serves: `{"model", "model_hash"}`, as its `info` output names them."""
        return self._config_parameter("checkpoint")

    def pipelines(self) -> dict[str, dict[str, str]]:
        """Every pipeline model the server has loaded, by name (in the server's order), with the checkpoint
        it serves as `checkpoint()` gives it. Pipeline models are the python-backend models whose config has
        the `checkpoint` parameter build-engines writes; their streaming twins (decoupled) are left out."""
        with self._errors():
            if self.protocol == "grpc":
                index = self._client.get_model_repository_index(as_json=True, **self._call_kwargs)
                models = index.get("models", [])
            else:
                models = self._client.get_model_repository_index()
        found = {}
        for model in models:
            if model.get("state") != "READY" or model["name"] in found:
                continue
            config = self._model_config(model["name"])
            decoupled = config.get("model_transaction_policy", {}).get("decoupled", False)
            if (
                config.get("backend") == "python"
                and "checkpoint" in config.get("parameters", {})
                and not decoupled
            ):
                found[model["name"]] = _json_parameter(model["name"], config, "checkpoint")
        return found

    def _model_config(self, model: str) -> dict[str, Any]:
        """A model's config as JSON: Triton's ModelConfig, with its protobuf field names."""
        with self._errors():
            if self.protocol == "grpc":
                return self._client.get_model_config(model, as_json=True, **self._call_kwargs)["config"]
            return self._client.get_model_config(model)

    def _config_parameter(self, name: str) -> Any:
        """A JSON parameter of the model's config."""
        return _json_parameter(self.model_name, self._model_config(self.model_name), name)

    def generate(
        self,
        prompt: str,
        *,
        on_progress: Callable[[dict[str, Any], bytes | None], None] | None = None,
        preview_every: int = 0,
        **options: Any,
    ) -> GenerationResult:
        """Images for `prompt`: `run(GenerateOptions(prompt, **options))`, one keyword per GenerateOptions
        field. Options left None take the server's defaults; seed None or -1 is random.

        With `image` it is img2img: the image is fitted to width x height by `resize_mode` ("just_resize",
        "crop_and_resize" or "resize_and_fill", or A1111's labels) and `strength` (0..1, A1111's denoising
        strength) of the steps redraw it.

        With a `mask` too it is inpainting: only the mask's white area is redrawn. `mask_blur` (pixels, 0..64,
        default 4) softens its edge; `inpainting_fill` ("fill", "original", "latent_noise", "latent_nothing",
        or A1111's labels; default "original") is what that area starts from; `inpaint_full_res` (A1111's
        "Inpaint area: Only masked") generates just the masked area plus `inpaint_full_res_padding` pixels
        (0..256, default 32) at width x height and pastes it back: the images then have the image's size.

        Variation seeds (A1111's): `subseed_strength` (0..1) moves each image's noise toward that of its
        variation seed, `subseed` + i for image i (None or -1: random).

        Hires fix (text to image only, `enable_hr`): a first pass at width x height is upscaled `hr_scale`
        times (default 2; sides rounded down to multiples of 8) by `hr_upscaler` ("Latent" or "Lanczos") and
        `denoising_strength` (default 0.7) of `hr_second_pass_steps` (default 0: `steps`) redraw it.
        """
        return self.run(GenerateOptions(prompt, **options), on_progress, preview_every)

    def run(
        self,
        request: GenerateOptions,
        on_progress: Callable[[dict[str, Any], bytes | None], None] | None = None,
        preview_every: int = 0,
        job_id: str | None = None,
    ) -> GenerationResult:
        """Images for `request` (see `generate` for what its options do); `on_progress` streams from
        streaming twin as in `generate`. `job_id` (letters, digits, '-', '_'; unique per request) lets
        `stop(job_id)` end the generation early with the images reached so far (info "interrupted")."""
        arrays = build_request_inputs(request)
        if job_id is not None:
            arrays.append(("job_id", np.array([job_id.encode()], dtype=np.object_)))
        if on_progress is None:
            inputs = triton_inputs(self._triton, arrays)
            outputs = [self._triton.InferRequestedOutput(name) for name in ("images", "info")]

            def call() -> Any:
                with self._errors():
                    return self._client.infer(
                        self.model_name, inputs, outputs=outputs, **self._call_kwargs, **self._timeout()
                    )
        else:
            preview = np.array([preview_every], dtype=np.int32)
            stream_inputs = triton_inputs(self._triton, [*arrays, ("preview_every", preview)])

            def call() -> Any:
                return self._stream(stream_inputs, on_progress)

        result = self._with_retries(call)
        images, info = result.as_numpy("images"), result.as_numpy("info")
        if images is None or info is None:
            raise GenerationError("the response lacks the images or info output")
        generated = decode_response(images, info.reshape(-1)[0])
        if request.mask is not None and request.inpaint_full_res:
            # The info reports the full-size images; a size left None is the server's default.
            generated.generation_size = (
                GenerationRequest.width if request.width is None else request.width,
                GenerationRequest.height if request.height is None else request.height,
            )
        return generated

    def stop(self, job_id: str, action: str = "interrupt") -> bool:
        """Ask the generation sent with `job_id` to stop after its current step and answer with the images
        its latents decode to (A1111's interrupt; "skip" stops it alike). False when no such generation is
        running: not started yet (waiting in the queue) or already done."""
        inputs = triton_inputs(
            self._triton,
            [
                ("job_id", np.array([job_id.encode()], dtype=np.object_)),
                ("action", np.array([action.encode()], dtype=np.object_)),
            ],
        )
        with self._errors():
            result = self._client.infer(CONTROL_MODEL, inputs, **self._call_kwargs)
        return bool(result.as_numpy("found")[0])

    def loras(self, refresh: bool = False) -> list[dict[str, Any]]:
        """The LoRA files prompts can name (`<lora:NAME:MULT>`), as A1111's GET /sdapi/v1/loras lists them:
        `{"name", "alias", "path", "metadata"}` each; `refresh` scans the server's LoRA folder again first.
        Empty for a server without a LoRA folder or whose repository predates LoRA support."""
        inputs = triton_inputs(self._triton, [("refresh", np.array([refresh]))])
        with self._errors():
            if not self._client.is_model_ready(LORA_LIBRARY, **self._call_kwargs):
                return []
            result = self._client.infer(LORA_LIBRARY, inputs, **self._call_kwargs)
        listing: list[dict[str, Any]] = json.loads(result.as_numpy("loras").reshape(-1)[0])
        return listing

    def _timeout(self) -> dict[str, int]:
        """Triton's per-request timeout (microseconds): it bounds the request's wait in the server's
        queue, and the pipeline stops generating once it has run that long."""
        return {} if self.timeout_s is None else {"timeout": max(1, round(self.timeout_s * 1e6))}

    def _with_retries(self, call: Callable[[], Any]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except GenerationError as exc:
                if not exc.is_retryable or attempt == self.retries:
                    raise
                backoff = min(self.MAX_BACKOFF_S, 0.5 * 2**attempt)
                time.sleep(backoff * random.uniform(0.8, 1.2))  # jitter: clients refused together spread
        raise AssertionError("unreachable")

    def _stream(self, inputs: list[Any], on_progress: Callable[[dict[str, Any], bytes | None], None]) -> Any:
        """Run the streaming twin over gRPC streaming: each progress response (and its preview PNG, if any)
        goes to `on_progress`; returns the final response. A timeout, or an exception from `on_progress`
        (Ctrl-C too), cancels the request on the server, which stops within a step."""
        if self.protocol != "grpc":
            raise GenerationError("progress streaming needs the grpc protocol", "INVALID_ARGUMENT")
        responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        finished = False
        with self._errors():
            # Triton's stream messages carry an error's text but not its code; with this header an error
            # ends the stream with its gRPC status instead (INVALID_ARGUMENT, UNAVAILABLE...), as unary
            # calls get it. Each stream here carries one request, so ending it loses nothing.
            self._client.start_stream(
                callback=lambda result, error: responses.put((result, error)),
                headers={"triton_grpc_error": "true"},
            )
            try:
                try:
                    self._client.async_stream_infer(stream_model(self.model_name), inputs, **self._timeout())
                except InferenceServerException:
                    # A stream that broke before the request went out (no server there, or it went away)
                    # says only "no longer in valid state"; why, with its status (UNAVAILABLE: worth a
                    # retry), comes through the callback.
                    finished = True
                    with suppress(queue.Empty):
                        _, error = responses.get(timeout=STREAM_ERROR_WAIT_S)
                        if error is not None:
                            raise error from None
                    raise
                while True:
                    try:
                        result, error = responses.get(timeout=self.timeout_s)
                    except queue.Empty:
                        raise GenerationError(
                            f"no answer in {self.timeout_s} s", "DEADLINE_EXCEEDED"
                        ) from None
                    if error is not None:
                        finished = True
                        raise error
                    if result.as_numpy("images") is not None:
                        finished = True
                        return result
                    [status] = result.as_numpy("progress")
                    preview = result.as_numpy("preview")
                    on_progress(json.loads(status), None if preview is None else bytes(preview[0]))
            finally:
                self._client.stop_stream(cancel_requests=not finished)
