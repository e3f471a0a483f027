#!/usr/bin/env bash
# GPU check for a lent H200, one call, under 9 minutes, ending in ONE JSON line (the summary):
# (0) the embedded default (SmolLM2-135M shape, builtin dialogues, its config) as `precision: auto` /
# `dtype: auto` resolve on the GPU (bf16), end to end through `lorafit train`, with random weights
# (the real ones are not reachable from the device) and its peak against `lorafit plan`;
# (1) the three-way comparison of benchmarks/train_speed.py in bf16 on
# the BLOOM-560m and Llama-0.5B shapes: the 2023 recipe, TRL's SFTTrainer (with use_liger_kernel
# on the Llama shape when liger-kernel is there) and lorafit, plus lorafit at equal work, and at equal
# work with train.compile (triton) beside the recipe; (2) a
# bloomz-7b1-shaped model with random weights, int8 and nf4, recipe / TRL / lorafit, peak memory
# vs `lorafit plan`'s prediction and vs 24 GB.
#
# Here (with internet), once:   benchmarks/gpu_check.sh --fetch
#   downloads the wheels the device image lacks (bitsandbytes, pydantic, trl, datasets,
#   liger-kernel) into .whl/ (git-ignored), and copies the embedded default's config and
#   tokenizer (a few MB, no weights) to .whl/smollm2-135m/.
# On the device (no internet):  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   Budget: ~1 min for part 0, ~2 min for part 1 (small models, 1 warm-up + 4 x 512 tokens per system; ~1.5 more
#   for the compiled run, its warm-up compiling), ~1-2 min to
#   write the random 7B checkpoint, then 2 runs of 3 systems (int8/nf4), each 1 warm-up + 3 x 512
#   tokens. Logs land in $OUT (or /tmp/gpu_check); SKIP_SMALL=1 skips part 1.
#   With two or more GPUs it also runs train.fsdp and nf4 + train.fsdp on GPUs 0 and 1
#   (benchmarks/fsdp_memory.py --gpu: each GPU's peak against `lorafit plan --nproc 2`); with one
#   GPU that part is skipped and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5)

if [[ "${1:-}" == "--fetch" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${WHEELS[@]}"
    python3 - <<'EOF'
import shutil
from pathlib import Path
from lorafit.builtin import resolve_model
src, out = Path(resolve_model("builtin:smollm2-135m-instruct")), Path(".whl/smollm2-135m")
out.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.suffix != ".safetensors":
        shutil.copy2(f, out / f.name)
EOF
    du -sh .whl
    exit 0
fi

OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"

# (0) the embedded default as a GPU user runs it: auto precision (bf16), the default config
if [[ -d .whl/smollm2-135m ]]; then
    set +e
    timeout 100 python3 - <<'EOF' 2>&1 | tee "$OUT/default.txt"
import json, shutil, subprocess, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
folder = "/tmp/smollm2-random"
shutil.copytree(".whl/smollm2-135m", folder, dirs_exist_ok=True)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16).save_pretrained(folder)
base = ["--set", f"model.name_or_path={folder}"]
out = "/tmp/gpu_check_default"
train = subprocess.run([sys.executable, "-m", "lorafit", "train", *base, "--set", f"output_dir={out}",
                        "--overwrite", "--log-format", "plain"], capture_output=True, text=True)
plan = subprocess.run([sys.executable, "-m", "lorafit", "plan", *base, "--json"], capture_output=True, text=True)
summary = {"exit": train.returncode, "error": train.stderr.strip().splitlines()[-1:] if train.returncode else []}
if train.returncode == 0:
    result = json.load(open(f"{out}/result.json"))
    peaks = [json.loads(l).get("peak_memory_gib", 0) for l in open(f"{out}/metrics.jsonl") if '"loss"' in l]
    summary.update(precision=result["run"]["precision"], steps=result["steps"],
                   eval_loss=[result["first_eval_loss"], result["final_eval_loss"]],
                   max_memory_allocated_gib=max(peaks), elapsed_s=result["elapsed_s"])
if plan.returncode == 0:
    summary["plan_allocated_peak_gib"] = round(json.loads(plan.stdout)["allocated_peak_bytes"] / 2**30, 3)
print("DEFAULT " + json.dumps(summary))
EOF
    set -e
else
    echo 'DEFAULT {"skipped": "no .whl/smollm2-135m (run --fetch here first)"}' | tee "$OUT/default.txt"
fi

# (1) three-way comparison, bf16, the CPU benchmark's shapes (Liger where it patches the model: Llama)
if [[ "${SKIP_SMALL:-0}" != "1" ]]; then
    LIGER=()
    python3 -c "import liger_kernel" 2> /dev/null && LIGER=(--trl-liger)
    set +e
    timeout 80 python3 benchmarks/train_speed.py --shapes bloom-560m --precision bf16 --steps 4 2>&1 \
        | tee "$OUT/three-way-bloom.txt"
    timeout 80 python3 benchmarks/train_speed.py --shapes llama-0.5b --precision bf16 --steps 4 "${LIGER[@]}" 2>&1 \
        | tee "$OUT/three-way-llama.txt"
    # train.compile on the GPU (triton kernels): lorafit at equal work compiled, beside the recipe
    timeout 150 python3 benchmarks/train_speed.py --shapes llama-0.5b --precision bf16 --steps 8 \
        --systems recipe,lorafit-equal --compile 2>&1 | tee "$OUT/compiled-llama.txt"
    set -e
    grep -h "^\[" "$OUT"/three-way-*.txt | grep -E "x$|tokens/s" | tee -a "$OUT/summary.txt" || true
fi

MODEL_DIR=/tmp/bloomz-7b1-random
SEQ_LEN=512
for QUANT in int8 nf4; do
    # lorafit's own prediction for this run (the planner's CLI; absent planner -> "n/a")
    CFG="$OUT/plan-$QUANT.yaml"
    printf 'model:\n  name_or_path: %s\n  quantization: %s\n  dtype: bfloat16\ntrain:\n  seq_len: %s\n  batch_size: 1\n  grad_accum: 1\n  precision: bf16\n' \
        "$MODEL_DIR" "$QUANT" "$SEQ_LEN" > "$CFG"
    set +e
    timeout 110 python3 benchmarks/train_speed.py --shapes bloomz-7b1 --quant "$QUANT" --model-dir "$MODEL_DIR" \
        --systems recipe,trl,lorafit --seq-len "$SEQ_LEN" --steps 3 --warmup 1 --samples 60 --precision bf16 2>&1 \
        | tee "$OUT/speed-$QUANT.txt"
    PLAN_JSON=$(timeout 120 python3 -m lorafit plan "$CFG" --json 2> "$OUT/plan-$QUANT.err")
    set -e
    echo "$PLAN_JSON" > "$OUT/plan-$QUANT.json"
    python3 - "$QUANT" "$OUT/speed-$QUANT.txt" "$OUT/plan-$QUANT.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
quant, speed_path, plan_path = sys.argv[1:4]
lines = [ln for ln in open(speed_path) if ln.startswith("{")]
if not lines:
    print(f"{quant}: benchmark failed (see speed-{quant}.txt)")
    sys.exit(0)
run = json.loads(lines[-1])
try:
    plan = json.loads(open(plan_path).read())
    # max_memory_allocated is compared with the planner's allocator-level figure when it gives one
    predicted = plan.get("allocated_peak_bytes") or plan.get("peak_bytes")
    print(f"{quant}: plan peak_bytes {plan.get('peak_bytes', 0) / 2**30:.2f} GiB (with CUDA context), "
          f"allocated {plan.get('allocated_peak_bytes', 0) / 2**30:.2f} GiB")
except (ValueError, OSError, AttributeError):
    predicted = None
peak = run.get("lorafit_peak_bytes")
train_peak = run.get("lorafit_train_peak_bytes") or peak
gib = 2 ** 30
nan = float("nan")
pred = f"{predicted / gib:.2f} GiB (measured/predicted {peak / predicted:.2f})" if predicted and peak else "n/a"
print(f"{quant}: lorafit peak {peak / gib:.2f} GiB (training phase {train_peak / gib:.2f}) vs plan {pred}; "
      f"under 24 GB: {peak < 24e9}; training-phase memory vs recipe {run.get('train_memory_ratio', nan):.2f}x, "
      f"vs TRL {run.get('trl_train_memory_ratio', nan):.2f}x; whole-process memory ratio {run['memory_ratio']:.2f}x, "
      f"speed ratio {run['speed_ratio']:.2f}x, lorafit MFU {run['mfu']:.1%}; "
      f"vs TRL: memory {run.get('trl_memory_ratio', nan):.2f}x, speed {run.get('trl_speed_ratio', nan):.2f}x")
EOF
done
GPUS=$(nvidia-smi -L | wc -l)
if [[ "$GPUS" -ge 2 ]]; then
    set +e
    CUDA_VISIBLE_DEVICES=0,1 timeout 540 python3 benchmarks/fsdp_memory.py --gpu 2>&1 | tee "$OUT/fsdp.txt"
    set -e
    if ! grep -E '^\| (none|nf4) |worst error' "$OUT/fsdp.txt" >> "$OUT/summary.txt"; then
        echo "fsdp: benchmark failed (see fsdp.txt)" >> "$OUT/summary.txt"
    fi
else
    echo "fsdp: skipped ($GPUS GPU; train.fsdp and nf4 + train.fsdp need 2)" >> "$OUT/summary.txt"
fi
cat "$OUT/summary.txt"
# the one JSON line: every part's figures (or why one is missing)
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def last_json(name, prefix=""):
    path = out / name
    if not path.exists():
        return None
    lines = [l[len(prefix):] for l in path.read_text().splitlines() if l.startswith(prefix + "{")]
    return json.loads(lines[-1]) if lines else {"failed": f"see {name}"}
summary = {"gpu": (out / "gpu.txt").read_text().splitlines()[1:2],
           "default_bf16": last_json("default.txt", "DEFAULT "),
           "three_way": {k: last_json(f"three-way-{k}.txt") for k in ("bloom", "llama")},
           "compiled_llama": last_json("compiled-llama.txt"),
           "bloomz_7b1": {q: last_json(f"speed-{q}.txt") for q in ("int8", "nf4")},
           "plans": {q: last_json(f"plan-{q}.json") for q in ("int8", "nf4")},
           "fsdp": (out / "fsdp.txt").read_text()[-2000:] if (out / "fsdp.txt").exists() else "skipped: 1 GPU"}
print(json.dumps(summary))
EOF
