#!/usr/bin/env bash
# build-engines-cached [BUILD_ENGINES_OPTIONS...]: the engine initContainer of deploy/k8s.
#
# Builds the model repository into a cache shared by all pods and links it where the server container looks.
# TensorRT plans only load on the GPU model and TensorRT release they were built with, so the cache key is
# both: e.g. nvidia-h100-80gb-hbm3-trt10.8.0 (ONNX and OpenVINO models are portable: "onnx", "openvino"). A mixed GPU fleet thus gets
# one folder per GPU type, each built by the first pod of that type.
#
# Within a key, every build has its own folder, named by the sha256 of its stamp (target, checkpoint path,
# build-engines options, the image's code). It is built under a temporary name and renamed once complete, then
# never written again: the server containers of other pods load from it without a lock, so a pod of a new image
# (or of a Deployment with other options) builds beside it instead of rewriting what they serve.
#
#   $SD_ENGINE_CACHE/<key>/<sha256>/repo     the model repository (build-engines --output); never modified
#   $SD_ENGINE_CACHE/<key>/<sha256>/stamp    what it was built from (its sha256 is the folder's name)
#   $SD_ENGINE_CACHE/<key>/<sha256>/used     when a pod last linked it: a number from <key>/.sequence
#   $SD_ENGINE_CACHE/<key>/.build-<sha256>/  a build in progress (an interrupted one resumes there)
#   $SD_ENGINE_CACHE/<key>/tensorrt-timing.cache, .lock, .sequence
#
# A new build starts from a copy of the most recently used build's repository, so build-engines redoes only
# what its sidecars say has changed (a code change: the python models; other options: the affected engines).
# After a build, the builds of the key beyond the SD_ENGINE_CACHE_KEEP (default 2, at least 2) most recently
# used are removed: by default the new one and the one used before it, which the pods of the previous version
# serve while a rollout replaces them.
#
# Environment: SD_ENGINE_TARGET (tensorrt|openvino|onnx), SD_CHECKPOINT (diffusers folder), SD_ENGINE_CACHE (the
# cache volume), SD_MODEL_REPOSITORY (the link to create, on a volume the server container shares),
# SD_ENGINE_CACHE_KEEP (optional).
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
keep=${SD_ENGINE_CACHE_KEEP:-2}
[[ $keep =~ ^[0-9]+$ ]] && ((keep >= 2)) ||
    die "SD_ENGINE_CACHE_KEEP must be a number of builds, at least 2 (the new one and the one pods may still serve), got '$keep'"

# On most ReadWriteMany volumes Kubernetes does not apply the pod's fsGroup, so a fresh share owned by root
# with mode 755 is not writable by the pods' user: say so, rather than leave a bare "Permission denied".
unwritable() {
    local owner
    owner=$(stat -c 'owner uid %u gid %g, mode %a' -- "$1" 2>/dev/null) || owner="missing"
    die "cannot write to $1 ($owner) as uid $(id -u) with groups $(id -G | tr ' ' ',')." \
        "The engine cache volume must be writable by this user, and the pod's fsGroup does not make it" \
        "so on most ReadWriteMany volumes: Kubernetes applies fsGroup to a CSI volume only if its driver's" \
        "fsGroupPolicy is File (or, by default, to ReadWriteOnce volumes with an fsType), never to in-tree" \
        "nfs volumes. Give uid/gid 10001 write access in the StorageClass or on the share;" \
        "see deploy/README.md, 'Storage the volumes need'."
}
writable_folder() {
    mkdir -p -- "$1" 2>/dev/null || true
    [[ -d $1 && -w $1 && -x $1 ]] || unwritable "$1"
}
writable_folder "$cache"

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
onnx | openvino) key=$target ;;
*) die "SD_ENGINE_TARGET must be tensorrt, openvino or onnx, got '$target'" ;;
esac

dir=$cache/$key
writable_folder "$dir"
stamp="target=$target
checkpoint=$checkpoint
options=$*
code=$code_digest"
build=$(printf '%s\n' "$stamp" | sha256sum)
build=${build%% *}

# Pods of one GPU type starting together: one builds, the others wait for it and then find it done. Everything
# below, clean-up included, holds the lock.
{ exec 9>"$dir/.lock"; } 2>/dev/null || unwritable "$dir"
if ! flock --nonblock 9; then
    say "another pod is building or cleaning up $key; waiting for it"
    flock 9
fi

# The builds of this key, most recently used first, into the array `builds`.
list_builds() {
    local folder used
    mapfile -t builds < <(
        for folder in "$dir"/*/; do
            folder=${folder%/}
            [[ ${folder##*/} =~ ^[0-9a-f]{64}$ && -d $folder/repo ]] || continue
            used=0
            [[ -f $folder/used ]] && used=$(<"$folder/used")
            printf '%s %s\n' "$used" "${folder##*/}"
        done | sort -rn | sed 's/^[0-9]* //'
    )
}

remove() { # rename first, so that an interrupted removal never leaves a half build under a build's name
    mv -- "$1" "$dir/.remove-${1##*/}" && rm -rf -- "$dir/.remove-${1##*/}"
}

if [[ -d $dir/$build/repo ]]; then
    say "engines for $key are up to date in $dir/$build/repo"
else
    work=$dir/.build-$build
    if [[ -d $work ]]; then
        say "resuming the interrupted build in $work"
    else
        rm -rf -- "$work.copy"
        mkdir -- "$work.copy"
        list_builds
        if ((${#builds[@]})); then
            # A copy, never links: build-engines rewrites files in place, and the seed is being served.
            say "starting from a copy of $dir/${builds[0]}/repo"
            cp -R -- "$dir/${builds[0]}/repo" "$work.copy/repo"
        fi
        mv -- "$work.copy" "$work" # only a complete copy may look like a build to resume
    fi
    say "building engines for $key into $work/repo"
    extra=()
    [[ $target == tensorrt ]] && extra=(--timing-cache "$dir/tensorrt-timing.cache")
    # An interrupted build resumes: build-engines keeps every export and plan whose sidecar still matches.
    build-engines --checkpoint "$checkpoint" --output "$work/repo" --target "$target" "${extra[@]}" "$@"
    printf '%s\n' "$stamp" >"$work/stamp"
    [[ ! -e $dir/$build ]] || remove "$dir/$build" # a build folder that lost its repo (removed by hand)
    mv -- "$work" "$dir/$build"
    say "built $dir/$build"
fi

sequence=0
[[ -f $dir/.sequence ]] && sequence=$(<"$dir/.sequence")
sequence=$((sequence + 1))
printf '%s\n' "$sequence" >"$dir/.sequence"
printf '%s\n' "$sequence" >"$dir/$build/used"
ln -sfn "$dir/$build/repo" "$link"
say "$link -> $dir/$build/repo"

# Only after a build, while holding the lock: what other pods (old versions, other Deployments) left behind.
if [[ ${work:-} ]]; then
    list_builds
    for folder in "${builds[@]:keep}"; do
        say "removing $dir/$folder (not among the $keep most recently used builds)"
        remove "$dir/$folder"
    done
    for folder in "$dir"/.build-* "$dir"/.remove-*; do
        [[ -d $folder ]] || continue
        say "removing the abandoned $folder"
        rm -rf -- "$folder"
    done
fi
