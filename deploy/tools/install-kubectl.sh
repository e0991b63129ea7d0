#!/usr/bin/env bash
# install-kubectl.sh TARGET: puts at TARGET a kubectl whose built-in kustomize renders deploy/k8s (v5, so
# kubectl 1.27 or later). The one on PATH when it is recent enough (linked), else the binary of Debian 13's
# kubectl package (1.32, what its kubernetes-client installs), fetched with apt-get into a private apt state
# and unpacked: nothing is installed system-wide. Debian 12's own kubernetes-client is 1.20, with kustomize
# v2, which predates the kustomization fields used here.
set -euo pipefail

target=$1
min_minor=27
suite=trixie

client_minor() { # the minor version "kubectl version --client" reports, e.g. 32
    "$1" version --client -o json 2>/dev/null |
        python3 -c 'import json, re, sys; print(re.sub(r"\D.*", "", json.load(sys.stdin)["clientVersion"]["minor"]))'
}

mkdir -p "$(dirname "$target")"
if on_path=$(command -v kubectl) && minor=$(client_minor "$on_path") && ((minor >= min_minor)); then
    ln -sfn "$on_path" "$target"
    echo "install-kubectl: using $on_path (1.$minor)"
    exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "install-kubectl: error: no kubectl 1.$min_minor+ on PATH and no apt-get to fetch Debian's;" \
        "install kubectl 1.$min_minor or later (Debian 13: apt-get install kubernetes-client) and run make again" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/root"
: >"$work/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
    >"$work/sources.list"
# A private package list and status: the host's apt sources and installed packages play no part.
apt=(apt-get -qq -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$work/lists" -o "Dir::State::status=$work/status" -o "Dir::Cache=$work/cache"
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
"${apt[@]}" update
(cd "$work" && "${apt[@]}" download kubectl)
dpkg-deb -x "$work"/kubectl_*.deb "$work/root"
install -m 0755 "$work/root/usr/bin/kubectl" "$target"
echo "install-kubectl: installed Debian $suite's kubectl $("$target" version --client -o json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])') at $target"
