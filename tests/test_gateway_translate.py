"""sd-gateway's translation rules (A1111 fields to the pipeline's inputs), without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from client.api import GenerationError
from python_backend.request import InvalidInput
from services.gateway import translate
from services.gateway.app import _error_for
from services.gateway.cli import _credentials
from services.gateway.models import Img2ImgRequest, Txt2ImgRequest

CHECKPOINT = translate.Checkpoint("tiny-sd", "0123456789")  # served by the model `pipeline`


@pytest.mark.parametrize(
    ("sampler", "scheduler", "expected", "warned"),
    [
        ("Euler a", "automatic", ("Euler a", "Automatic"), False),
        ("euler_a", None, ("Euler a", "Automatic"), False),  # our own name, as an alias
        ("DPM++ 2M Karras", None, ("DPM++ 2M Karras", "Karras"), False),  # legacy combined name
        ("DPM++ 2M", "Karras", ("DPM++ 2M Karras", "Karras"), False),  # label
        ("DPM++ 2M", "karras", ("DPM++ 2M Karras", "Karras"), False),  # name
        ("DDIM", "normal", ("DDIM", "Automatic"), True),  # SillyTavern's default schedule
        ("Euler a", "karras", ("Euler a", "Automatic"), True),  # no Karras variant here
        ("DPM++ SDE Karras", None, (None, "Automatic"), True),  # Dify's: not served, the default instead
        (None, "karras", (None, "Automatic"), False),
    ],
)
def test_sampler_names_in_every_a1111_spelling(sampler, scheduler, expected, warned):
    warnings: list[str] = []
    assert translate.resolve_sampler(sampler, scheduler, warnings) == expected
    assert bool(warnings) == warned


def test_checkpoint_matches_a1111_aliases():
    checkpoint = translate.Checkpoint("tiny-sd", "0123456789")
    for name in ("tiny-sd [0123456789]", "tiny-sd", "tiny-sd.safetensors", "0123456789"):
        assert checkpoint.matches(name), name
    assert not checkpoint.matches("v1-5-pruned.safetensors [abcdef0123]")


def test_override_settings_pick_the_checkpoint_of_one_request():
    other = translate.Checkpoint("other-sd", "abcdef0123", "other_pipeline")
    served = [CHECKPOINT, other]
    for name in ("other-sd [abcdef0123]", "other-sd.safetensors", "abcdef0123"):
        req = Txt2ImgRequest.model_validate({"override_settings": {"sd_model_checkpoint": name}})
        plan = translate.plan_generation(req, served, CHECKPOINT, {})
        assert plan.checkpoint == other and not plan.warnings, name
    # A1111 keeps the current model for a name it does not know; we say so.
    req = Txt2ImgRequest.model_validate({"override_settings": {"sd_model_checkpoint": "v1-5-pruned"}})
    plan = translate.plan_generation(req, served, other, {})
    assert plan.checkpoint == other
    assert plan.warnings == ["checkpoint 'v1-5-pruned' is not served here; used 'other-sd [abcdef0123]'"]
    assert translate.plan_generation(Txt2ImgRequest(), served, other, {}).checkpoint == other


def test_lenient_fields_and_plan():
    req = Txt2ImgRequest.model_validate(
        {
            "prompt": "a",
            "steps": 12.7,
            "seed": "",
            "batch_size": 2,
            "n_iter": 2,
            "url": "ignored",
            "cfg_scale": None,
        }
    )
    assert req.steps == 12 and req.seed == -1
    plan = translate.plan_generation(req, [CHECKPOINT], CHECKPOINT, {"CLIP_stop_at_last_layers": 2})
    first, second = plan.calls
    assert second.seed == first.seed + 2  # batch after batch, A1111's all_seeds[i] = seed + i
    assert (first.steps, first.num_images, first.clip_skip, first.guidance_scale) == (12, 2, 2, 7.0)
    assert first.enable_hr is None and first.denoising_strength is None  # no hires fields without enable_hr
    with pytest.raises(ValidationError):
        Txt2ImgRequest.model_validate({"steps": float("nan")})


def test_img2img_plan_and_field_errors():
    req = Img2ImgRequest.model_validate(
        {
            "init_images": ["data:image/png;base64,aGk="],
            "mask": "aGk=",
            "inpainting_fill": 2,
            "resize_mode": 1,
        }
    )
    [call] = translate.plan_generation(req, [CHECKPOINT], CHECKPOINT, {}).calls
    assert (call.image, call.mask, call.inpainting_fill, call.resize_mode) == (
        b"hi",
        b"hi",
        "latent_noise",
        "crop_and_resize",
    )
    assert (call.strength, call.mask_blur, call.inpaint_full_res) == (0.75, 4, True)
    for body, field in [
        ({"init_images": []}, "init_images"),
        ({"init_images": ["aGk="], "inpainting_fill": 4, "mask": "aGk="}, "inpainting_fill"),
        ({"init_images": ["aGk="], "override_settings": {"CLIP_stop_at_last_layers": "x"}}, "CLIP_stop"),
        ({"init_images": ["aGk="], "n_iter": 0}, "n_iter"),
    ]:
        with pytest.raises(InvalidInput, match=field):
            translate.plan_generation(Img2ImgRequest.model_validate(body), [CHECKPOINT], CHECKPOINT, {})


def test_unsupported_fields_are_warnings():
    req = Txt2ImgRequest.model_validate(
        {
            "restore_faces": True,
            "tiling": True,
            "styles": ["s"],
            "alwayson_scripts": {"ControlNet": {}, "ADetailer": {"args": [False]}},
        }
    )
    warnings = translate.plan_generation(req, [CHECKPOINT], CHECKPOINT, {}).warnings
    assert len(warnings) == 4  # ControlNet with no units is no warning: the gateway takes its units
    assert "ignored alwayson_scripts ['ADetailer']" in warnings[-1]


def test_api_auth_argument():
    assert _credentials("a:b,c:d:e") == [("a", "b"), ("c", "d:e")]
    with pytest.raises(Exception, match="USER:PASS") as raised:
        _credentials("nopassword")
    assert "nopassword" not in str(raised.value)  # an entry may be a password: never echoed


@pytest.mark.parametrize(
    ("message", "status", "http", "detail"),
    [
        (
            "num_inference_steps: must be in 1..999, got 0",
            "INVALID_ARGUMENT",
            422,
            "steps: must be in 1..999, got 0",
        ),
        (
            "num_images must be within [-2147483648, 2147483647], got 2147483648",
            "INVALID_ARGUMENT",
            422,
            "batch_size:",
        ),
        ("width: must be a multiple of 8", "INVALID_ARGUMENT", 422, "width: must be"),
        ("Exceeds maximum queue size", "UNAVAILABLE", 503, "Exceeds maximum queue size"),
        ("unavailable: shutting down", "UNAVAILABLE", 503, "unavailable: shutting down"),
        ("no answer in time", "DEADLINE_EXCEEDED", 504, "no answer"),
        ("generation failed (a bug: x)", "INTERNAL", 500, "generation failed"),
    ],
)
def test_triton_errors_as_http_statuses(message, status, http, detail):
    error = _error_for(GenerationError(message, status))
    assert error.status == http and error.detail.startswith(detail)


def test_controlnet_units_as_the_extensions_api_sends_them():
    import base64

    from services.gateway.translate import controlnet_units

    png = base64.b64encode(b"\x89PNG...").decode()
    warnings: list[str] = []
    scripts = {
        "ControlNet": {
            "args": [
                {"enabled": False, "image": png, "model": "depth"},  # disabled: left out
                {
                    "image": {"image": png, "mask": png},
                    "model": "canny [d14c016b]",
                    "control_mode": 2,
                    "resize_mode": 0,
                },
                {
                    "input_image": f"data:image/png;base64,{png}",
                    "model": "depth",
                    "module": "canny",
                    "weight": 0.4,
                    "control_mode": "My prompt is more important",
                    "pixel_perfect": True,
                    "low_vram": True,
                },
            ]
        }
    }
    first, second = controlnet_units(scripts, warnings)
    assert (first.model, first.control_mode, first.resize_mode, first.module) == (
        "canny",
        "ControlNet is more important",
        "Just Resize",
        "none",
    )
    assert first.image == second.image == b"\x89PNG..."
    assert (second.model, second.module, second.weight, second.pixel_perfect) == ("depth", "canny", 0.4, True)
    assert warnings == ["alwayson_scripts.ControlNet.args[1]: a unit's mask is not supported; ignored"]
    assert controlnet_units({"ADetailer": {"args": []}}, []) == ()
    for bad, field in (
        ({"controlnet": {"args": {}}}, "alwayson_scripts.ControlNet.args"),
        ({"controlnet": {"args": ["x"]}}, "alwayson_scripts.ControlNet.args[0]"),
        ({"controlnet": {"args": [{"model": "canny"}]}}, "alwayson_scripts.ControlNet.args[0].image"),
        (
            {"controlnet": {"args": [{"image": png, "control_mode": 5}]}},
            "alwayson_scripts.ControlNet.args[0].control_mode",
        ),
    ):
        with pytest.raises(InvalidInput) as refused:
            controlnet_units(bad, [])
        assert refused.value.field == field
