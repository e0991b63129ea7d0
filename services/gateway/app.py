"""The FastAPI app: A1111's /sdapi/v1 routes, each forwarded to Triton with StableDiffusionClient.

Routes are sync functions: FastAPI runs them in its threadpool, so requests arriving together reach Triton
together and meet in the UNet's dynamic batcher. Each request has a client (a gRPC channel, and its stream)
to itself, taken from a pool of idle ones so that a request does not pay for a new channel: nothing is
shared between threads but that pool, the options, the checkpoint list and the current checkpoint, which a
lock guards.

Checkpoints are the pipeline models Triton hosts (one per checkpoint: `pipeline`, `NAME_pipeline`, ...). As
in A1111, POST /options switches the current one for every later request, and a request's
`override_settings.sd_model_checkpoint` picks one for itself.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import secrets
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError

from client.api import CONTROL_MODEL, GenerationError, GenerationResult, StableDiffusionClient
from client.infotext import PNG_KEY
from python_backend import control_images
from python_backend.request import InvalidInput
from python_backend.shapes import PIPELINE
from services.gateway import translate
from services.gateway.models import (
    ERROR_RESPONSES,
    GenerationResponse,
    Img2ImgRequest,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    Txt2ImgRequest,
)
from services.gateway.progress import Jobs

log = logging.getLogger("sd-gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class GatewayConfig:
    triton_url: str = "127.0.0.1:8001"
    model_name: str = PIPELINE  # the default checkpoint's pipeline model (if absent: the first Triton lists)
    credentials: Sequence[tuple[str, str]] = ()  # --api-auth; empty: no auth
    cors_allow_origins: Sequence[str] = ()
    max_body_bytes: int = 50 * 2**20
    timeout_s: float | None = None  # per generation; None: as long as it takes
    retries: int = 1  # a request Triton refused as UNAVAILABLE (overloaded) is retried this often


class ApiError(Exception):
    """An error answered with A1111's body: {error, detail, body, errors}."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def a1111_error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # A1111's api_middleware.handle_exception body.
    body = {"error": error, "detail": detail, "body": "", "errors": detail}
    return JSONResponse(body, status_code=status, headers=headers)


def _error_for(exc: GenerationError) -> ApiError:
    """Triton's answer as an HTTP status: INVALID_ARGUMENT 422 naming the A1111 field, UNAVAILABLE 503."""
    if exc.is_invalid_argument:
        field, sep, problem = exc.message.partition(": ")
        name = field.split()[0] if field else field
        if sep and name in translate.A1111_FIELDS:
            detail = f"{translate.A1111_FIELDS[name]}: {problem}"
        elif not sep and exc.message.split(" ", 1)[0] in translate.A1111_FIELDS:  # the client's own checks
            first, rest = exc.message.split(" ", 1)
            detail = f"{translate.A1111_FIELDS[first]}: {rest}"
        else:
            detail = exc.message
        return ApiError(422, "InvalidInput", detail)
    if exc.is_retryable:
        return ApiError(503, "ServiceUnavailable", exc.message)
    if exc.status == "DEADLINE_EXCEEDED":
        return ApiError(504, "Timeout", exc.message)
    return ApiError(500, "GenerationError", exc.message)


def _stop(client: StableDiffusionClient, call_id: str, action: str) -> bool:
    """Ask pipeline_control to stop the call; whether it was running. A failure is logged, not raised:
    an interrupt must never fail the generation it targets, and A1111 answers interrupt with {} always."""
    try:
        return client.stop(call_id, action)
    except GenerationError as exc:
        log.warning("could not %s generation %s: %s", action, call_id, exc.message)
        return False


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class BodyLimit:
    """Answers 413 for a body over `limit` bytes before anything parses it (Content-Length, or counted while
    it streams in), so a huge upload never reaches JSON or base64 decoding."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:  # read it all (at most `limit`) here, then replay it to the app
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        mb = self.limit / 2**20
        response = a1111_error(413, "PayloadTooLarge", f"request body over --max-body-mb ({mb:g} MB)")
        await response(scope, receive, send)


class BasicAuth:
    """HTTP Basic on every route (/docs too), as A1111's --api-auth: 401 with WWW-Authenticate otherwise.

    Every configured pair is compared, each in constant time, so the answer's timing tells nothing about
    which user or how much of a password matched. Credentials are never logged."""

    def __init__(self, app: ASGIApp, credentials: Sequence[tuple[str, str]]) -> None:
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials]

    def _allowed(self, header: bytes | None) -> bool:
        if not header or not header[:6].lower() == b"basic ":
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        allowed = False
        for u, p in self.credentials:
            allowed |= secrets.compare_digest(user, u) & secrets.compare_digest(password, p) & bool(sep)
        return allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS":  # CORS preflights carry no auth
            if not self._allowed(dict(scope.get("headers") or []).get(b"authorization")):
                response = JSONResponse(
                    {"detail": "Incorrect username or password"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Basic"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class _State:
    config: GatewayConfig
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Options a client set with POST /options (A1111 keeps every key; so do we, for GET to echo).
    options: dict[str, Any] = field(
        default_factory=lambda: {
            "CLIP_stop_at_last_layers": 1,
            "samples_format": "png",  # the only format we write
            "sd_vae": "Automatic",
            "live_previews_enable": True,  # /progress's current_image ...
            "show_progress_every_n_steps": 10,  # ... every this many steps (A1111's defaults)
        }
    )
    # The checkpoints Triton hosts, asked of it once (POST refresh-checkpoints asks again).
    served: list[translate.Checkpoint] | None = None
    current: str | None = None  # the pipeline model POST /options chose; None: the default
    jobs: Jobs = field(default_factory=Jobs)
    idle: dict[str, list[StableDiffusionClient]] = field(default_factory=dict)  # clients by model, unused

    MAX_IDLE = 16  # per model: more requests than this at once pay for their own channels

    @contextmanager
    def client(self, model: str) -> Iterator[StableDiffusionClient]:
        """A client for `model` to this request alone; back to the pool after, unless its call failed (its
        channel may be what failed)."""
        with self.lock:
            pooled = self.idle.get(model)
            client = pooled.pop() if pooled else None
        if client is None:
            c = self.config
            client = StableDiffusionClient(
                c.triton_url, "grpc", model, timeout_s=c.timeout_s, retries=c.retries
            )
        try:
            yield client
        except BaseException:
            client.close()
            raise
        with self.lock:
            pooled = self.idle.setdefault(model, [])
            if len(pooled) < self.MAX_IDLE:
                pooled.append(client)
                return
        client.close()

    def checkpoints(self, refresh: bool = False) -> tuple[list[translate.Checkpoint], translate.Checkpoint]:
        """The checkpoints Triton hosts, and the current one: POST /options's choice, else --model-name's,
        else the first (a choice Triton no longer hosts falls back likewise)."""
        with self.lock:
            served, current = self.served, self.current
        if served is None or refresh:
            served = self._ask_triton()
            with self.lock:
                self.served = served
        chosen = (c for name in (current, self.config.model_name) for c in served if c.pipeline == name)
        return served, next(chosen, served[0])

    def loras(self, refresh: bool) -> list[dict[str, Any]]:
        try:
            with self.client(self.config.model_name) as client:
                return client.loras(refresh)
        except GenerationError as exc:
            raise _error_for(exc) from exc

    def _ask_triton(self) -> list[translate.Checkpoint]:
        """One per pipeline model Triton has loaded (their configs name the checkpoint)."""
        try:
            with self.client(self.config.model_name) as client:
                pipelines = client.pipelines()
        except GenerationError as exc:
            raise _error_for(exc) from exc
        if not pipelines:
            raise ApiError(
                503,
                "ServiceUnavailable",
                f"the Triton server at {self.config.triton_url} has no pipeline model",
            )
        return [translate.Checkpoint.from_parameter(pipeline, found) for pipeline, found in pipelines.items()]


def create_app(config: GatewayConfig) -> FastAPI:
    state = _State(config)
    app = FastAPI(
        title="sd-gateway",
        description="AUTOMATIC1111's /sdapi/v1 API, served by a Stable Diffusion pipeline on Triton.",
        version="1.0",
        # A body without Content-Type is parsed as JSON, as FastAPI did in A1111's day: Dify posts that way.
        strict_content_type=False,
        responses=ERROR_RESPONSES,
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return a1111_error(exc.status, exc.error, exc.detail)

    @app.exception_handler(InvalidInput)
    async def _bad_field(request: Request, exc: InvalidInput) -> JSONResponse:
        return a1111_error(422, "InvalidInput", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 body, as A1111 keeps it, minus the input echo (it may be megabytes of base64).
        errors = [{k: v for k, v in e.items() if k not in ("input", "ctx", "url")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return a1111_error(500, type(exc).__name__, str(exc))

    def generate(req: Txt2ImgRequest) -> GenerationResponse:
        served, current = state.checkpoints()
        with state.lock:
            defaults = dict(state.options)
        plan = translate.plan_generation(req, served, current, defaults)
        every = _int_or(defaults.get("show_progress_every_n_steps"), 10)
        preview_every = max(0, every) if defaults.get("live_previews_enable", True) else 0
        kind = "scripts_img2img" if isinstance(req, Img2ImgRequest) else "scripts_txt2img"
        results: list[GenerationResult] = []
        try:
            # Through the streaming model: its progress reports drive /progress, and a call sent with a
            # job id can be interrupted with its images kept.
            with (
                state.jobs.track(kind, len(plan.calls)) as job,
                state.client(plan.checkpoint.pipeline) as client,
            ):
                on_progress = state.jobs.on_progress(job, functools.partial(_stop, client))
                for job_no, call in enumerate(plan.calls):
                    call_id = state.jobs.begin_call(job, job_no)
                    if call_id is None:  # interrupted: A1111 makes no more images
                        break
                    results.append(client.run(call, on_progress, preview_every, job_id=call_id))
        except GenerationError as exc:
            raise _error_for(exc) from exc
        infotexts = [text for r in results for text in r.infotexts()]
        images = [image for r in results for image in r.images]
        clip_skip = plan.calls[0].clip_skip or 1
        info = translate.build_info(req, plan, results, infotexts, clip_skip)
        encoded = [translate.encode_png(i, t) for i, t in zip(images, infotexts, strict=True)]
        parameters = req.model_dump()
        if isinstance(req, Img2ImgRequest) and not req.include_init_images:
            parameters.update(init_images=None, mask=None)  # as A1111: not megabytes of echo
        return GenerationResponse(
            images=encoded if req.send_images is not False else [],
            parameters=parameters,
            info=json.dumps(info, ensure_ascii=False),
        )

    @app.post("/sdapi/v1/txt2img", response_model=GenerationResponse)
    def txt2img(req: Txt2ImgRequest = Body(...)) -> GenerationResponse:  # noqa: B008 (FastAPI's idiom)
        """Text to image (with `enable_hr`: the hires fix)."""
        return generate(req)

    @app.post("/sdapi/v1/img2img", response_model=GenerationResponse)
    def img2img(req: Img2ImgRequest = Body(...)) -> GenerationResponse:  # noqa: B008
        """Image to image; with `mask`, inpainting (white = repaint)."""
        return generate(req)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        """The running generation (the oldest, when several run): A1111's progress, with a preview of its
        latents every `show_progress_every_n_steps` steps. Idle: progress 0 and job_count 0."""
        return state.jobs.progress(skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict[str, Any]:
        """Stop every running generation after its current step; each request still answers, with the
        images its latents had reached (A1111's interrupt). Later n_iter batches are not made."""
        _stop_running("interrupt")
        return {}

    @app.post("/sdapi/v1/skip")
    def skip() -> None:
        """Stop the current batch of every running generation after its step (its images are kept, as
        partly denoised ones); the requests go on with their next n_iter batch."""
        _stop_running("skip")

    def _stop_running(action: str) -> None:
        sends = state.jobs.stop_all(action)
        if not sends:
            return
        with state.client(CONTROL_MODEL) as client:  # stop() calls pipeline_control whatever the model
            for call_id, what in sends:
                _stop(client, call_id, what)  # not found yet: asked again at the call's next progress

    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        """The options clients read: sd_model_checkpoint (the current one), CLIP_stop_at_last_layers, ..."""
        _, checkpoint = state.checkpoints()
        with state.lock:
            return {
                **state.options,
                "sd_model_checkpoint": checkpoint.title,
                "sd_checkpoint_hash": checkpoint.model_hash or None,
            }

    @app.post("/sdapi/v1/options")
    def set_options(options: dict[str, Any] = Body(...)) -> None:  # noqa: B008
        """Takes any options dict (a client may post back all it read). sd_model_checkpoint (a title, name,
        file name or hash of one sd-models lists) becomes the current checkpoint for every later request;
        CLIP_stop_at_last_layers becomes the default clip skip."""
        wanted = options.get("sd_model_checkpoint")
        chosen = None
        if wanted is not None:
            served, _ = state.checkpoints()
            chosen = translate.find_checkpoint(served, str(wanted))
            if chosen is None:
                titles = ", ".join(repr(c.title) for c in served)
                raise ApiError(
                    422,
                    "RuntimeError",
                    f"sd_model_checkpoint: model {wanted!r} not found; this server has {titles}",
                )
        skip = options.get("CLIP_stop_at_last_layers")
        if skip is not None and (isinstance(skip, bool) or not isinstance(skip, int | float) or skip < 1):
            problem = f"expected an integer >= 1, got {skip!r}"
            raise ApiError(422, "InvalidInput", f"CLIP_stop_at_last_layers: {problem}")
        with state.lock:
            state.options.update({k: v for k, v in options.items() if k not in ("sd_model_checkpoint",)})
            if skip is not None:
                state.options["CLIP_stop_at_last_layers"] = int(skip)
            if chosen is not None:
                state.current = chosen.pipeline
        return None

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        """The checkpoints the server hosts: one per pipeline model."""
        served, _ = state.checkpoints()
        return [c.listing() for c in served]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        """Asks Triton again which checkpoints it serves."""
        state.checkpoints(refresh=True)

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        return translate.a1111_samplers()

    @app.get("/sdapi/v1/schedulers")
    def schedulers_() -> list[dict[str, Any]]:
        """The schedule types that change what runs here (Karras picks the samplers' Karras variants)."""
        return [
            {"name": name, "label": label, "aliases": None, "default_rho": rho, "need_inner_model": False}
            for name, label, rho in (("automatic", "Automatic", -1.0), ("karras", "Karras", 7.0))
        ]

    @app.get("/sdapi/v1/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        """The hires fix's image upscaler (the latent one is under latent-upscale-modes)."""
        return [{"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name in translate.LATENT_UPSCALE_MODES]

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        """The VAE the current checkpoint was built with, if not its own (a VAE is chosen at build time)."""
        _, current = state.checkpoints()
        return [{"model_name": current.vae, "filename": current.vae}] if current.vae else []

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        """The LoRA files prompts can name with <lora:NAME:MULT> (sd-serve --lora-dir)."""
        return state.loras(refresh=False)

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras() -> None:
        """Scans the server's LoRA folder again (prompts naming a new file find it without this)."""
        state.loras(refresh=True)

    @app.get("/controlnet/model_list")
    def controlnet_models() -> dict[str, Any]:
        """The current checkpoint's ControlNets (build-engines --controlnet), as sd-webui-controlnet lists
        its models."""
        _, current = state.checkpoints()
        return {"model_list": list(current.controlnets)}

    @app.get("/controlnet/module_list")
    def controlnet_modules(alias_names: bool = False) -> dict[str, Any]:
        """The preprocessors the server runs (those needing no model weights), as the extension lists them."""
        return control_images.module_list(alias_names)

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        """The current checkpoint's textual inversions (build-engines --embeddings), as A1111 lists them."""
        _, current = state.checkpoints()
        unknown = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}  # training details
        loaded = {
            name: {**unknown, "shape": e.get("shape"), "vectors": e.get("vectors")}
            for name, e in current.embeddings.items()
        }
        return {"loaded": loaded, "skipped": {}}

    @app.get("/sdapi/v1/hypernetworks")
    def hypernetworks() -> list[dict[str, Any]]:
        return []

    @app.get("/sdapi/v1/face-restorers")
    def face_restorers() -> list[dict[str, Any]]:
        return []

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles() -> list[dict[str, Any]]:
        return []

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        """A few of A1111's flags (never --api-auth's value: A1111 would list the credentials)."""
        return {"api": True, "nowebui": True, "api_auth": None, "listen": False}

    @app.post("/sdapi/v1/png-info", response_model=PNGInfoResponse)
    def png_info(req: PNGInfoRequest = Body(...)) -> PNGInfoResponse:  # noqa: B008
        """The infotext (`parameters` chunk) of an image, and its other text chunks."""
        if not req.image.strip():
            return PNGInfoResponse(info="", items={}, parameters={})
        data = translate.decode_image(req.image, "image")
        try:
            with Image.open(io.BytesIO(data)) as image:
                items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidInput("image", f"not an image: {exc}") from None
        text = items.pop(PNG_KEY, None)
        return PNGInfoResponse(info=text or "", items=items, parameters=translate.infotext_items(text, items))

    # add_middleware puts each one outside the ones before it: a request meets BodyLimit (nothing has read
    # the body yet), then CORS (so a 401 carries its headers), then BasicAuth.
    if config.credentials:
        app.add_middleware(BasicAuth, credentials=list(config.credentials))
    if config.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_allow_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=True,
        )
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    return app
