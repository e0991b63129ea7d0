#!/usr/bin/env bash
# make demo: checkpoint → model repository → Triton → one PNG. Expects the venv's bin on PATH.
set -euo pipefail
OUT=${OUT:-out}
HTTP_PORT=${HTTP_PORT:-8000} GRPC_PORT=${GRPC_PORT:-8001} METRICS_PORT=${METRICS_PORT:-8002}

if [[ -z "${CHECKPOINT:-}" ]]; then
  CHECKPOINT="$OUT/tiny-sd"
  [[ -f "$CHECKPOINT/model_index.json" ]] || sd-tiny-checkpoint "$CHECKPOINT"
fi
build-engines --checkpoint "$CHECKPOINT" --output "$OUT/repository"

sd-serve --model-repository "$OUT/repository" \
  --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
until grep -q "sd-serve: ready" "$OUT/server.log"; do
  if ! kill -0 $server 2>/dev/null; then
    echo "demo: the server did not start; its log:" >&2
    tail -n 40 "$OUT/server.log" >&2
    exit 1
  fi
  sleep 1
done

sd-client generate "$PROMPT" --steps "${STEPS:-20}" --seed 42 --url "127.0.0.1:$GRPC_PORT" --out "$OUT/images"
