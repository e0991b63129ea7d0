#!/usr/bin/env bash
# build-engines-cached [BUILD_ENGINES_OPTIONS...]: the engine initContainer of deploy/k8s.
#
# Builds the model repository into a cache shared by all pods, in one folder per cache key, and links it
# where the server container looks. TensorRT plans only load on the GPU model and TensorRT release they were
# built with, so the key is both: e.g. nvidia-h100-80gb-hbm3-trt10.8.0 (ONNX models are portable: "onnx").
# A mixed GPU fleet thus gets one folder per GPU type, each built by the first pod of that type.
#
#   $SD_ENGINE_CACHE/<key>/repo              the model repository (build-engines --output)
#   $SD_ENGINE_CACHE/<key>/complete          what it was built from; equal to this run's: nothing to do
#   $SD_ENGINE_CACHE/<key>/tensorrt-timing.cache
#
# Environment: SD_ENGINE_TARGET (tensorrt|onnx), SD_CHECKPOINT (diffusers folder), SD_ENGINE_CACHE (the
# cache volume), SD_MODEL_REPOSITORY (the link to create, on a volume the server container shares).
set -euo pipefail

say() { echo "build-engines-cached: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

target=${SD_ENGINE_TARGET:-}
checkpoint=${SD_CHECKPOINT:?SD_CHECKPOINT must name the checkpoint folder}
cache=${SD_ENGINE_CACHE:?SD_ENGINE_CACHE must name the engine cache folder}
link=${SD_MODEL_REPOSITORY:?SD_MODEL_REPOSITORY must name the link to the model repository}

# One Python call for what only the installed package knows: the TensorRT Triton's backend will load (as
# sd-serve's engine check finds it) and a digest of the code that build-engines writes into the repository.
facts=$(
    python3 - <<'EOF'
import hashlib
from pathlib import Path

import build_engines
from build_engines.tensorrt_engine import runtime_tensorrt_version

root = Path(build_engines.__file__).resolve().parents[1]
digest = hashlib.sha256()
for folder in ("build_engines", "python_backend", "model_repository"):
    for path in sorted((root / folder).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
print(runtime_tensorrt_version() or "-", digest.hexdigest())
EOF
)
read -r tensorrt code_digest <<<"$facts"

case $target in
tensorrt)
    command -v nvidia-smi >/dev/null || die "nvidia-smi is not on PATH: --target tensorrt needs a GPU in this container (resources: nvidia.com/gpu)"
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1) || die "nvidia-smi failed"
    gpu=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9.' '-' | sed 's/^-*//; s/-*$//')
    [[ -n $gpu ]] || die "nvidia-smi lists no GPU: --target tensorrt needs one"
    [[ $tensorrt != - ]] || die "no libnvinfer.so.<version> found: run this in the serving image, which has TensorRT"
    key=$gpu-trt$tensorrt
    ;;
onnx) key=onnx ;;
*) die "SD_ENGINE_TARGET must be tensorrt or onnx, got '$target'" ;;
esac

dir=$cache/$key
mkdir -p "$dir"
stamp="target=$target
checkpoint=$checkpoint
options=$*
code=$code_digest"

# Pods of one GPU type starting together: one builds, the others wait for it and then find it done.
exec 9>"$dir/.lock"
if ! flock --nonblock 9; then
    say "another pod is building $key; waiting for it"
    flock 9
fi

if [[ -f $dir/complete && $(<"$dir/complete") == "$stamp" ]]; then
    say "engines for $key are up to date in $dir/repo"
else
    say "building engines for $key into $dir/repo"
    extra=()
    [[ $target == tensorrt ]] && extra=(--timing-cache "$dir/tensorrt-timing.cache")
    # An interrupted build resumes: build-engines keeps every export and plan whose sidecar still matches.
    build-engines --checkpoint "$checkpoint" --output "$dir/repo" --target "$target" "${extra[@]}" "$@"
    printf '%s\n' "$stamp" >"$dir/complete.tmp"
    mv "$dir/complete.tmp" "$dir/complete"
fi
ln -sfn "$dir/repo" "$link"
say "$link -> $dir/repo"
