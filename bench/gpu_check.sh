#!/usr/bin/env bash
# The GPU check: environment, the GPU tests (pytest -m gpu), the GPU benchmark, a summary.
# Run from the repository root on a machine with a CUDA GPU:
#     OUT=gpu_out bash bench/gpu_check.sh
# Writes to $OUT (default ./gpu_check_out): gpu_check.log (everything printed), gpu_tests.xml (junit),
# bench_gpu.json, bench_gpu.md, summary.txt. Each section has its own hard timeout and runs whatever
# happened before it; the whole script stays under 8 minutes. Needs nothing beyond torch, numpy, pandas,
# scikit-learn, matplotlib, tqdm, safetensors and pytest (unidecode is not needed by the GPU tests).
set -u -o pipefail

OUT=${OUT:-gpu_check_out}
PYTHON=${PYTHON:-python}
TEST_TIMEOUT=${TEST_TIMEOUT:-180}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-220}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
declare -A STATUS
section() {  # section NAME TIMEOUT_S COMMAND...: run it under a hard timeout, record its exit status
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (timeout ${limit}s, at +$(( $(date +%s) - START ))s) ==="
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] || [ "$rc" -eq 137 ]; then
        STATUS[$name]="TIMED OUT after ${limit}s (rc $rc)"
    else
        STATUS[$name]="rc $rc"
    fi
    echo "=== $name: ${STATUS[$name]} ==="
}

main() {
section nvidia-smi 30 nvidia-smi

section environment 45 "$PYTHON" - <<'EOF'
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"capability {p.major}.{p.minor}")
    print("bf16 supported:", torch.cuda.is_bf16_supported())
for name in ("numpy", "pandas", "sklearn", "matplotlib", "tqdm", "safetensors", "pytest", "unidecode"):
    print(f"{name}:", "present" if importlib.util.find_spec(name) else "MISSING")
EOF

section gpu_tests "$TEST_TIMEOUT" "$PYTHON" -m pytest tests/test_gpu.py -m gpu -q -rfEs -p no:cacheprovider \
    -o addopts="" --junitxml="$OUT/gpu_tests.xml" --durations=10

section benchmark "$BENCH_TIMEOUT" "$PYTHON" bench/bench_gpu.py --json "$OUT/bench_gpu.json" \
    --markdown "$OUT/bench_gpu.md" --reps 3 --time-budget $(( BENCH_TIMEOUT - 50 ))

section summary 30 "$PYTHON" - "$OUT" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
lines = []
xml = out / "gpu_tests.xml"
if xml.exists():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    lines.append("GPU tests: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f", {suite.get('time')} s")
    for case in suite.iter("testcase"):
        for kind in ("failure", "error", "skipped"):
            bad = case.find(kind)
            if bad is not None:
                message = (bad.get("message") or "").splitlines()[0][:300] if bad.get("message") else ""
                lines.append(f"  {kind.upper()}: {case.get('name')}: {message}")
else:
    lines.append("GPU tests: no junit xml (the test run did not finish)")
md = out / "bench_gpu.md"
if md.exists():
    lines += ["", md.read_text()]
    result = json.loads((out / "bench_gpu.json").read_text())
    lines.append(f"benchmark elapsed: {result.get('elapsed_s')} s")
else:
    lines.append("benchmark: no results written")
text = "\n".join(lines)
(out / "summary.txt").write_text(text + "\n")
print(text)
EOF

echo
echo "=== sections ==="
for name in nvidia-smi environment gpu_tests benchmark summary; do
    echo "$name: ${STATUS[$name]:-not run}"
done
echo "total $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

main 2>&1 | tee -a "$OUT/gpu_check.log"
