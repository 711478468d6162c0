#!/usr/bin/env bash
# Build wheels of raftmq's dependencies on the host into deploy/wheels, so
# that deploy/Dockerfile installs them with `pip --no-index` and the image
# build needs no network access (on machines where a build container cannot
# reach the package index).
#
# The wheels must match the image's Python, so this checks that the host
# Python is 3.11, the version of both python:3.11-slim and Debian bookworm.
#
# Usage: deploy/build-wheels.sh      (PYTHON selects the interpreter, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
wheel_dir=deploy/wheels
log() {
    echo "build-wheels: $*" >&2
}

version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $version != 3.11 ]]; then
    log "error: $python is Python $version but the image runs Python 3.11; set PYTHON to a 3.11 interpreter"
    exit 1
fi

started=$SECONDS
mkdir -p "$wheel_dir"
# The image builds raftmq itself from the copied source, so only its
# dependencies and its build backend (both read from pyproject.toml) go
# here. pip needs setuptools in the folder to build raftmq with --no-index.
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
"$python" -c '
import tomllib

with open("pyproject.toml", "rb") as pyproject:
    project = tomllib.load(pyproject)
print("\n".join(project["build-system"]["requires"] + project["project"]["dependencies"]))
' >"$requirements"
log "building wheels of $(wc -l <"$requirements") requirements of pyproject.toml into $wheel_dir"
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheel_dir" \
    --requirement "$requirements"
log "$(ls "$wheel_dir" | wc -l) wheels in $wheel_dir after $((SECONDS - started)) s"
