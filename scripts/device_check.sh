#!/usr/bin/env bash
# GPU check: one prepared script for a machine with a CUDA GPU, within 8 minutes.
#
#   scripts/device_check.sh [--out DIR] [--cifar DIR] [--python PY] [--budget SECONDS] [--cpu-dry-run]
#   make device-check ARGS="--cifar /data/cifar10"
#
# Steps (each under `timeout`, capped so that the whole run ends within --budget, default 480 s):
#   1. gpu_tests   python -m pytest -m gpu tests/   (lean layers and fast BatchNorm vs PyTorch's layers,
#                  bf16 for the objectives, TF32 handling, the attacks on CUDA)
#   2. step_cost   python -m benchmarks.step_cost --device cuda   (images/s, ratios to vanilla)
#   3. finetune    a short CIFAR-10 R2ET fine-tune (train.py fit) with RankingRobustness and
#                  PSEAnalysis on; synthetic 32 px data when no --cifar DIR is given
#   4. ddp         1-process vs all-GPU DDP throughput ratio (benchmarks/ddp_throughput.py);
#                  skipped with one GPU
# Results: DIR/results.json and DIR/results.md (one row per step: status, seconds, numbers), and
# each step's log and outputs under DIR/ (default DIR: device_check/<UTC time>).
# Exit status: 0 when every step passed or was skipped, 1 when one failed or ran out of time,
# 2 when there is no CUDA GPU (checked first, in seconds) or the arguments are wrong.
# --cpu-dry-run runs tiny versions of every step on the CPU (the ddp step with 1 vs 2 gloo
# processes) to test this script's plumbing without a GPU (tests/test_device_check.py).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=""
CIFAR=""
PY=${PYTHON:-python}
BUDGET=480
DRY=0

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "device_check: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 ]] || die "--out needs a folder"; OUT=$2; shift 2 ;;
        --cifar) [[ $# -ge 2 ]] || die "--cifar needs a folder"; CIFAR=$2; shift 2 ;;
        --python) [[ $# -ge 2 ]] || die "--python needs an interpreter"; PY=$2; shift 2 ;;
        --budget) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--budget needs whole seconds, got '${2:-}'"; BUDGET=$2; shift 2 ;;
        --cpu-dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (valid: --out DIR, --cifar DIR, --python PY, --budget SECONDS, --cpu-dry-run)" ;;
    esac
done
[[ -z "$CIFAR" || -d "$CIFAR" ]] || die "--cifar '$CIFAR' is not a folder"
command -v timeout >/dev/null || die "needs coreutils 'timeout'"
START=$(date +%s)
DEADLINE=$((START + BUDGET))

# ---- 0. a GPU, or stop now -------------------------------------------------------------------
if ! GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>&1); then
    die "could not import torch with '$PY': $GPUS"
fi
GPUS=${GPUS##*$'\n'}
if [[ $DRY -eq 0 && "$GPUS" -lt 1 ]]; then
    die "no CUDA GPU visible (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}'): this check needs a GPU; --cpu-dry-run tests the script on CPU"
fi
OUT=${OUT:-device_check/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT" || die "cannot create output folder '$OUT'"
OUT=$(cd "$OUT" && pwd)
STEPS="$OUT/steps.jsonl"
: > "$STEPS"
cd "$ROOT" || die "cannot enter $ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
if [[ $DRY -eq 1 ]]; then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    ACC=cpu; GPUS=1; MODE="CPU dry run"
else
    ACC=gpu; MODE="$GPUS GPU(s)"
fi
echo "device_check: $MODE, budget ${BUDGET}s, results in $OUT"

# run_step NAME LIMIT_S CMD...: runs CMD under timeout (capped by the deadline), logs to OUT/NAME.log,
# appends {"step", "status", "seconds", "exit", "limit_s"} to steps.jsonl.
FAILED=0
run_step() {
    local name=$1 limit=$2 left status code t0 took
    shift 2
    left=$((DEADLINE - $(date +%s) - 10))
    (( limit > left )) && limit=$left
    if (( limit < 5 )); then
        echo "{\"step\": \"$name\", \"status\": \"timeout\", \"seconds\": 0, \"exit\": null, \"note\": \"no time left in the ${BUDGET}s budget\"}" >> "$STEPS"
        echo "  $name: no time left"; FAILED=1; return 1
    fi
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    code=$?
    took=$(( $(date +%s) - t0 ))
    if [[ $code -eq 0 ]]; then status=ok
    elif [[ $code -eq 124 || $code -eq 137 ]]; then status=timeout; FAILED=1
    else status=failed; FAILED=1; fi
    echo "{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $took, \"exit\": $code, \"limit_s\": $limit}" >> "$STEPS"
    echo "  $name: $status (${took}s of ${limit}s; log $OUT/$name.log)"
    [[ $status == ok ]]
}
skip_step() {
    echo "{\"step\": \"$1\", \"status\": \"skipped\", \"seconds\": 0, \"exit\": null, \"note\": \"$2\"}" >> "$STEPS"
    echo "  $1: skipped ($2)"
}

# ---- 1. gpu-marked tests ---------------------------------------------------------------------
# (dry run: only the files that hold them, to save the collection of the whole suite; they skip on CPU)
if [[ $DRY -eq 1 ]]; then GPU_TESTS=(tests/test_gpu.py tests/test_gpu_layers.py); else GPU_TESTS=(tests/); fi
run_step gpu_tests 130 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}" --junitxml="$OUT/gpu_tests.xml"

# ---- 2. step cost on the device --------------------------------------------------------------
if [[ $DRY -eq 1 ]]; then
    run_step step_cost 90 "$PY" -m benchmarks.step_cost --device cpu --out "$OUT/step_cost.json" \
        --backbones resnet9 --objectives vanilla r2et --batch-size 2 --warmup 0 --repeats 1 --resnet9-width 4 --no-memory \
        --invocations 1
else
    # isolated layout (a fresh process per objective beside a fresh vanilla one): 8 processes fit the box
    run_step step_cost 130 "$PY" -m benchmarks.step_cost --device cuda --out "$OUT/step_cost.json" \
        --backbones resnet9 resnet18 --objectives vanilla r2et --invocations 2
fi

# ---- 3. short R2ET fine-tune with the evaluation callbacks ------------------------------------
if [[ $DRY -eq 1 ]]; then
    SIZE=16 WIDTH=4 STEPS_FT=2 BATCH=4 EVAL_N=4 EVAL_STEPS=1 TRAIN_N=8
else
    SIZE=32 WIDTH=64 STEPS_FT=60 BATCH=128 EVAL_N=128 EVAL_STEPS=10 TRAIN_N=7680
fi
if [[ -n "$CIFAR" ]]; then
    DATA="{class_path: datamodules.CIFAR10DataModule, init_args: {data_dir: '$CIFAR', batch_size: $BATCH, num_workers: 4, val_fraction: 0.1}}"
else
    DATA="{class_path: datamodules.SyntheticDataModule, init_args: {num_classes: 10, image_size: $SIZE, pattern_size: 4, train_size: $TRAIN_N, val_size: $((BATCH * 2)), test_size: $BATCH, batch_size: $BATCH}}"
fi
cat > "$OUT/finetune.yaml" <<YAML
seed_everything: 0
trainer:
  accelerator: $ACC
  devices: 1
  max_steps: $STEPS_FT
  max_epochs: 1
  limit_val_batches: 2
  inference_mode: false
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: '$OUT/finetune'
  logger: [{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: '$OUT/finetune', name: csv}}]
  callbacks:
    - {class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: '$OUT/finetune/checkpoints'}}
    - class_path: callbacks.RankingRobustness
      init_args: {num_samples: $EVAL_N, batch_size: $EVAL_N, log_images: false,
                  protocol: {attacks: [er], eps: [0.0313725], steps: $EVAL_STEPS, noise: true,
                             thickness_samples: 2, thickness_points: 2}}
    - class_path: callbacks.PSEAnalysis
      init_args: {num_samples: $EVAL_N, batch_size: $EVAL_N, settings: {eps: 0.0313725, steps: $EVAL_STEPS, group_size: 8},
                  log_table: false, log_chart: false}
model:
  backbone: resnet9
  backbone_kwargs: {width: $WIDTH}
  num_classes: 10
  activation: softplus
  softplus_beta: 2.0
  objective: r2et
  k: 16
  adaptive: true
  weight: 0.1
  optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01, momentum: 0.9}}
data: $DATA
YAML
run_step finetune 110 "$PY" train.py fit -c "$OUT/finetune.yaml"

# ---- 4. DDP throughput: 1 process vs all GPUs -------------------------------------------------
if [[ $DRY -eq 1 ]]; then
    ALL=2; DDP_SIZE=16; DDP_WIDTH=4; DDP_BATCH=4; DDP_STEPS=4; WARM=1
else
    ALL=$GPUS; DDP_SIZE=32; DDP_WIDTH=64; DDP_BATCH=128; DDP_STEPS=25; WARM=5
fi
ddp_config() {  # ddp_config PROCESSES -> path of the config
    local n=$1 path="$OUT/ddp_$1.yaml" strategy=auto
    (( n > 1 )) && strategy=ddp
    cat > "$path" <<YAML
seed_everything: 0
trainer:
  accelerator: $ACC
  devices: $n
  strategy: $strategy
  max_steps: $DDP_STEPS
  limit_val_batches: 0
  inference_mode: false
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_checkpointing: false
  logger: false
  default_root_dir: '$OUT/ddp_$n'
  callbacks: [{class_path: benchmarks.ddp_throughput.StepTimer, init_args: {out: '$OUT/ddp_$n.json', warmup: $WARM}}]
model: {backbone: resnet9, backbone_kwargs: {width: $DDP_WIDTH}, num_classes: 10, activation: softplus, objective: r2et, k: 16}
data:
  class_path: datamodules.SyntheticDataModule
  init_args: {num_classes: 10, image_size: $DDP_SIZE, pattern_size: 4, train_size: $((DDP_BATCH * n * (DDP_STEPS + 1))),
              val_size: $DDP_BATCH, test_size: $DDP_BATCH, batch_size: $DDP_BATCH}
YAML
    echo "$path"
}
if (( ALL > 1 )); then
    run_step ddp_1 60 "$PY" train.py fit -c "$(ddp_config 1)" &&
        run_step "ddp_$ALL" 80 "$PY" train.py fit -c "$(ddp_config "$ALL")"
else
    skip_step ddp "one GPU: no multi-GPU throughput to compare"
fi

# ---- results ---------------------------------------------------------------------------------
"$PY" - "$OUT" "$DRY" "$ALL" <<'PYTHON'
import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, dry, world = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
try:
    import torch
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
except Exception as exc:  # keep the report anyway
    env = {"error": repr(exc)}
numbers = {}
xml = out / "gpu_tests.xml"
if xml.exists():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    numbers["gpu_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
if (out / "step_cost.json").exists():
    cost = json.loads((out / "step_cost.json").read_text())
    batch = json.loads((out / "step_cost_details.json").read_text())["settings"]["batch_size"]
    numbers["step_cost"] = {b: {o: {"images_per_s": round(1000.0 * batch / r["ms_per_step"], 1),
                                    "ratio_to_vanilla": r.get("ratio_to_vanilla")} for o, r in rows.items()}
                            for b, rows in cost.items()}
metrics = sorted((out / "finetune").glob("csv/version_*/metrics.csv"))
if metrics:
    last = {}
    for row in csv.DictReader(metrics[-1].open()):
        last.update({k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("epoch", "step")})
    keep = [k for k in last if k.startswith(("val/", "robustness/", "pse/")) or k == "train/loss_step"]
    numbers["finetune"] = {k: round(last[k], 4) for k in sorted(keep)}
if (out / "ddp_1.json").exists() and (out / f"ddp_{world}.json").exists():
    one, every = (json.loads((out / f"ddp_{n}.json").read_text()) for n in (1, world))
    numbers["ddp"] = {"processes": world, "images_per_s_1": one["images_per_s"],
                      "images_per_s_all": every["images_per_s"], "ratio": every["images_per_s"] / one["images_per_s"]}
passed = all(s["status"] in ("ok", "skipped") for s in steps)
result = {"passed": passed, "cpu_dry_run": dry, "environment": env, "steps": steps, "numbers": numbers}
(out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
lines = ["# Device check" + (" (CPU dry run: plumbing only, not GPU numbers)" if dry else ""), "",
         f"Environment: {json.dumps(env)}", "", "| step | status | seconds | note |", "|---|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s.get('note', '')} |" for s in steps]
if "gpu_tests" in numbers:
    lines += ["", "gpu tests: " + ", ".join(f"{k} {v}" for k, v in numbers["gpu_tests"].items())]
if "step_cost" in numbers:
    lines += ["", "| backbone | objective | images/s | time ratio to vanilla |", "|---|---|---|---|"]
    lines += [f"| {b} | {o} | {r['images_per_s']} | {r['ratio_to_vanilla']} |"
              for b, rows in numbers["step_cost"].items() for o, r in rows.items()]
if "finetune" in numbers:
    lines += ["", "| fine-tune metric (last logged) | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in numbers["finetune"].items()]
if "ddp" in numbers:
    d = numbers["ddp"]
    lines += ["", f"DDP throughput: {d['images_per_s_1']:.1f} images/s on 1 process, {d['images_per_s_all']:.1f} on "
                  f"{d['processes']}: ratio {d['ratio']:.2f} (ideal {d['processes']})"]
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYTHON
[[ $FAILED -eq 0 ]] || { echo "device_check: a step failed or ran out of time (see $OUT/results.md)" >&2; exit 1; }
echo "device_check: all steps passed ($(( $(date +%s) - START ))s); results in $OUT/results.md"
