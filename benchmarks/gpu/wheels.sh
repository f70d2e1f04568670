#!/usr/bin/env bash
# Download the wheels an offline GPU machine (JAX, no Keras/Optuna/MLflow) needs to run tinyopt, at the
# versions installed in this checkout's .venv, into .whl/ (see benchmarks/gpu/README.md for the recipe).
#
#   benchmarks/gpu/wheels.sh [--python-version 3.12] [--dest .whl]
#
# The set is computed by deps.py from the installed metadata: tinyopt's dependencies for a JAX-only
# machine and everything they need that device-packages.txt (the machine's image) lacks.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
python_version=3.12  # the GPU machine's python3
dest=$repo/.whl
while (($#)); do
  case $1 in
    --python-version) python_version=$2; shift 2 ;;
    --dest) dest=$2; shift 2 ;;
    *) echo "usage: $0 [--python-version X.Y] [--dest DIR]" >&2; exit 2 ;;
  esac
done

pins=$("$python" "$repo/benchmarks/gpu/deps.py" pins)
rm -rf "$dest"  # two versions of one package would stop the install there
mkdir -p "$dest"
# pip matches each manylinux tag exactly: name the ones these packages publish.
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# shellcheck disable=SC2086  # one argument per pin
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp "${platforms[@]}" --dest "$dest" $pins
count=$(find "$dest" -type f -name '*.whl' | wc -l)
bytes=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "$count wheels for Python $python_version in $dest: $(awk -v b="$bytes" 'BEGIN { printf "%.1f MB", b / 1e6 }')"
