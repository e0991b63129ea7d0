"""sd-gateway: serve AUTOMATIC1111's /sdapi/v1 API in front of a Triton server running the pipeline."""

from __future__ import annotations

import argparse
import logging
import sys

from services.gateway.app import GatewayConfig, create_app


def _credentials(text: str) -> list[tuple[str, str]]:
    """A1111's --api-auth: USER:PASS[,USER:PASS...] (so a password holds no comma)."""
    pairs = []
    for entry in text.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user:
            # The entry itself is left out of the message: it may hold a password.
            raise argparse.ArgumentTypeError("expected USER:PASS[,USER:PASS...]")
        pairs.append((user, password))
    return pairs


def _positive_mb(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sd-gateway", description=__doc__)
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton's gRPC HOST:PORT")
    p.add_argument(
        "--model-name",
        default="pipeline",
        help="the default checkpoint's pipeline model in Triton (if Triton has none of that name: the first "
        "it lists); POST /sdapi/v1/options switches checkpoints",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860, help="A1111's port by default")
    p.add_argument("--api-auth", type=_credentials, default=[], metavar="USER:PASS[,USER:PASS...]")
    p.add_argument("--cors-allow-origins", default="", metavar="ORIGINS", help="comma-separated")
    p.add_argument("--max-body-mb", type=_positive_mb, default=50.0, help="larger bodies answer 413")
    p.add_argument("--timeout", type=float, default=None, help="seconds per generation (default: none)")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import uvicorn  # after parsing: --help answers without the server's imports

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = GatewayConfig(
        triton_url=args.triton_url,
        model_name=args.model_name,
        credentials=args.api_auth,
        cors_allow_origins=[o.strip() for o in args.cors_allow_origins.split(",") if o.strip()],
        max_body_bytes=int(args.max_body_mb * 2**20),
        timeout_s=args.timeout,
    )
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
