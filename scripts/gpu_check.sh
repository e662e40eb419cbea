#!/usr/bin/env bash
# `make gpu-check`: one prepared check for a bare CUDA machine (README "GPU check").
#
#   bash scripts/gpu_check.sh [--dry-run] [--install-only]
#
# 1. install what the image lacks from wheels/*/ (`make gpu-wheels`), offline, then this repo (-e, no deps)
# 2. the gpu-marked tests (`pytest -m gpu`)
# 3. benchmarks/gpu_bench.py: LoRA 1B flash vs SDPA, QLoRA 8B peak memory, DDP vs FSDP
# Results go to $OUT when set (the device machine's folder), else gpu-check-out/.
# --dry-run (or GPU_CHECK_DRY_RUN=1), on a CPU machine: the install step only lists what it would
# install, the tests are only collected, the benchmarks run at toy size on CPU.
# The steps run one after the other whatever the previous one gave; the exit status is non-zero when one failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=${GPU_CHECK_DRY_RUN:-0}
INSTALL_ONLY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --install-only) INSTALL_ONLY=1 ;;
    *) echo "usage: $0 [--dry-run] [--install-only]" >&2; exit 2 ;;
  esac
done
case $DRY in 1 | true | yes) DRY=1 ;; *) DRY=0 ;; esac
OUT_DIR=${OUT:-gpu-check-out}
mkdir -p "$OUT_DIR"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
# sft_ray importable from this checkout even if the editable install below cannot be made (Ray's workers inherit it).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Time limits per step (seconds): the whole check stays under 8 minutes on an H200.
TESTS_LIMIT=${GPU_CHECK_TESTS_S:-170}
BENCH_LIMIT=${GPU_CHECK_BENCH_S:-270}
failed=()
started=$SECONDS
step() { echo; echo "=== [$((SECONDS - started))s] $*"; }

step "0. machine -> $OUT_DIR/env.txt (python: $PY, dry run: $DRY)"
{
  date -u
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; else echo "nvidia-smi: none"; fi
  "$PY" -c 'import sys; print("python", sys.version.split()[0])'
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|tokenizers|peft|trl|datasets|ray|bitsandbytes|pyarrow|numpy|huggingface.hub|flash.attn|kernels) '
} 2>&1 | tee "$OUT_DIR/env.txt"

step "1. install from wheels/*/ -> $OUT_DIR/install.log"
{
  # What to install: every carried wheel, and every package the project and its gpu tests need.
  # A package already installed at a version that meets pyproject.toml (or at the carried version) is skipped.
  "$PY" - "$DRY" > "$OUT_DIR/install.plan" <<'EOF'
import glob, os, sys
from importlib.metadata import PackageNotFoundError, version
try:
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # Python 3.10, or no packaging installed: pip's own copies
    from pip._vendor import tomli as tomllib
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

dry = sys.argv[1] == "1"
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = {canonicalize_name(r.name): r.specifier for r in map(Requirement, project["dependencies"])}
for name in ("pytest", "pytest-timeout", "hypothesis", "moto", "boto3"):  # what the gpu tests import
    specs.setdefault(name, None)
wheels = {}
for path in sorted(glob.glob("wheels/*/*.whl")):
    name, ver, _, _ = parse_wheel_filename(os.path.basename(path))
    wheels[name] = (str(ver), path)
rows, todo, missing = [], [], []
for name in sorted(set(specs) | set(wheels)):
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    spec, (carried, path) = specs.get(name), wheels.get(name, (None, None))
    if have and (have == carried or (spec is not None and have in spec) or (carried is None and not spec)):
        action = "installed already"
    elif carried and (spec is None or carried in spec):
        action = "would install" if dry else "install"
        todo.append(path)
    elif have:
        action = f"installed, but {name}{spec} is needed and no wheel meets it"
        missing.append(name)
    else:
        action = "MISSING: not installed, no wheel"
        missing.append(name)
    rows.append(f"{name:34} {have or '-':>14} {carried or '-':>14}  {action}  {path or ''}")
print(f"{'package':34} {'installed':>14} {'wheel':>14}  action")
print("\n".join(rows))
print(f"wheels found: {len(wheels)} under wheels/*/; to install: {len(todo)}; missing: {', '.join(missing) or 'none'}")
print("TODO " + " ".join(todo))
EOF
  plan_rc=$?
  grep -v '^TODO ' "$OUT_DIR/install.plan"
  todo=$(grep '^TODO ' "$OUT_DIR/install.plan" | cut -c6-)
  rm -f "$OUT_DIR/install.plan"
  if [ $plan_rc != 0 ]; then
    echo "install plan failed"
    exit 1
  fi
  if [ "$DRY" = 1 ]; then
    echo "dry run: nothing installed"
    "$PY" -I -c 'import sft_ray' 2>/dev/null && echo "sft_ray: installed" || echo "sft_ray: would run pip install --no-deps -e ."
    exit 0
  fi
  rc=0
  if [ -n "$todo" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check $todo || rc=1
  fi
  # -I: neither the working directory nor PYTHONPATH counts, only an installed sft_ray (of this checkout).
  if ! "$PY" -I -c 'import sft_ray, os, sys; sys.exit(os.path.dirname(sft_ray.__path__[0]) != os.getcwd())' 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check -e . || rc=1
  fi
  echo "pip check (conflicts with the image's own packages are listed, not fixed):"
  "$PY" -m pip check 2>&1 | head -30
  exit $rc
} 2>&1 | tee "$OUT_DIR/install.log"
[ "${PIPESTATUS[0]}" = 0 ] || failed+=(install)
[ "$INSTALL_ONLY" = 1 ] && { echo "install only: done in $((SECONDS - started))s"; [ ${#failed[@]} = 0 ]; exit; }

if [ "$DRY" = 1 ]; then
  step "2. gpu tests, collected only -> $OUT_DIR/tests.log"
  "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider 2>&1 | tee "$OUT_DIR/tests.log"
  [ "${PIPESTATUS[0]}" = 0 ] || failed+=(tests)
  echo "gpu tests: $(grep -c '::' "$OUT_DIR/tests.log")"
else
  step "2. gpu tests (at most ${TESTS_LIMIT}s) -> $OUT_DIR/tests.log"
  timeout -k 10 "$TESTS_LIMIT" "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors -rfEs \
    2>&1 | tee "$OUT_DIR/tests.log"
  [ "${PIPESTATUS[0]}" = 0 ] || failed+=(tests)
fi

step "3. benchmarks (at most ${BENCH_LIMIT}s) -> $OUT_DIR/bench.log, $OUT_DIR/results.json"
bench_args=(--out "$OUT_DIR")
[ "$DRY" = 1 ] && bench_args+=(--dry-run)
PYTHONUNBUFFERED=1 timeout -k 10 "$BENCH_LIMIT" "$PY" benchmarks/gpu_bench.py "${bench_args[@]}" 2>&1 | tee "$OUT_DIR/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || failed+=(benchmarks)

step "done in $((SECONDS - started))s; failed steps: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
