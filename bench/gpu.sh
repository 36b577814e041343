#!/usr/bin/env bash
# MFU of kubetrain on one GPU: llama-1b and the llama-7b width at 8 layers, bf16, torch.compile off and on,
# with tokens/s, peak device memory and the async checkpoint's stall (device -> pinned host copy, per GB).
#
#   bench/gpu.sh [WORKDIR]
#
# For every (model, compile) pair it writes an LLMTrainingJob manifest, runs it exactly as a user would
# (`kubetrain run job.yaml --nproc $NPROC`), and prints the median "mfu" and "tokensPerSecond" of the
# step events in <output>/events.jsonl after $WARMUP steps. MFU is kubetrain's own: tokens/s x
# model_cost().flops_per_token / (datasheet dense bf16 peak of the GPU x processes). The FLOP count is
# 6N (N: the matmul parameters, the output layer included, the embedding lookup not) + 12·L·d·S for
# attention (PaLM's appendix B); 989 TFLOP/s for an H100/H200 (dense bf16).
#
# Peak memory: torch.cuda.max_memory_allocated of the process (results.json "peakDeviceMemoryBytes").
# Checkpoint stall: asynchronous saves every $CKPT_EVERY steps inside the measured window; the "checkpoint"
# events' blockedSeconds (what the training loop waited: staging the state into pinned host buffers, which
# are allocated in the background after the first step) per GB of this process's state ("bytes"). The final
# save is synchronous and is left out. Those steps are slower by the stall; the median step is not.
#
# Parallelism: the manifests ask for `parallelism: fsdp` (FSDP2), but kubetrain only shards when there
# is more than one process: choose_parallelism() returns "single" for a world of 1, so with the default
# NPROC=1 the model runs unsharded (fp32 master weights, torch.autocast bf16) -- the table prints the
# layout the trainer actually used (from the "start" event). Run with NPROC=2 (or more GPUs) for FSDP2.
#
# Data: no network is needed. DATA=synthetic (default) writes ~6 MB of pseudo-text (~1.3M tokens) and prepares it with
# `kubetrain prepare --train-tokenizer 8000`; DATA=corpus uses corpus://shakespeare (cached or
# downloadable). The vocabulary is pinned to the published 32000 (model.config.vocab_size) so the output
# layer costs what it does in the real models, whatever the tokenizer's size.
#
# Note: kubetrain always commits a final checkpoint (checkpoint.everySteps 0 only disables the periodic
# ones); that is ~13 GB for llama-1b and ~23 GB for the 7b-width model, so each run's checkpoints/ is
# deleted once its events are read. Startup, the step-0 evaluation, compilation and the final save are
# outside the measured steps.
#
# Knobs (environment): MODELS="llama-1b llama-7b-8l" COMPILE="false true" SEQ=4096 MICRO=2 GLOBAL=4
#   STEPS=30 WARMUP=10 CKPT_EVERY=15 NPROC=1 DATA=synthetic KUBETRAIN="<python> -m kubetrain_cli" PYTHON=<python>
#   ALLOW_CPU=1 (smoke-test the script without a GPU, e.g. MODELS=tiny SEQ=64 STEPS=3 WARMUP=1)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
KUBETRAIN=${KUBETRAIN:-"$PYTHON -m kubetrain_cli"}
MODELS=${MODELS:-"llama-1b llama-7b-8l"}
COMPILE=${COMPILE:-"false true"}
SEQ=${SEQ:-4096}
MICRO=${MICRO:-2}
GLOBAL=${GLOBAL:-4}
CKPT_EVERY=${CKPT_EVERY:-15}
STEPS=${STEPS:-30}
WARMUP=${WARMUP:-10}
NPROC=${NPROC:-1}
DATA=${DATA:-synthetic}
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/kubetrain-bench-gpu-XXXXXX")}
mkdir -p "$WORK/runs"
WORK=$(cd "$WORK" && pwd)
MAX_STEPS=$((STEPS + WARMUP))

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  if [[ -z "${ALLOW_CPU:-}" ]]; then
    echo "gpu.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); set ALLOW_CPU=1 to" \
         "smoke-test the script on CPU" >&2
    exit 1
  fi
  echo "gpu.sh: no GPU -- ALLOW_CPU=1: smoke test only, numbers are meaningless" >&2
fi
"$PYTHON" - <<'EOF'
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
else:
    print(f"device: CPU only; torch {torch.__version__}")
EOF
echo "work dir: $WORK; seq $SEQ, micro-batch $MICRO, global batch $GLOBAL, $WARMUP warmup + $STEPS measured steps," \
     "$NPROC process(es)"

# ---- data: prepared shards + tokenizer, made once per work dir --------------------------------------------
if [[ ! -f "$WORK/data/train/index.json" ]]; then
  if [[ "$DATA" == corpus ]]; then
    INPUT="corpus://shakespeare"
  else
    INPUT="$WORK/text"
    mkdir -p "$INPUT"
    "$PYTHON" - "$INPUT" <<'EOF'
import random, sys
from pathlib import Path
# Zipf-distributed made-up words in sentences and paragraphs: enough structure for a BPE, no download.
rng = random.Random(0)
letters = "etaoinshrdlcumwfgypbvkjxqz"
weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
           1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
words = ["".join(rng.choices(letters, weights, k=rng.randint(1, 9))) for _ in range(20000)]
zipf = [1.0 / (i + 1) for i in range(len(words))]
out = Path(sys.argv[1])
for d in range(240):
    paras = []
    for _ in range(rng.randint(60, 100)):
        sents = []
        for _ in range(rng.randint(2, 6)):
            w = rng.choices(words, zipf, k=rng.randint(5, 18))
            sents.append(" ".join(w).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
        paras.append(" ".join(sents))
    (out / f"doc-{d:04d}.txt").write_text("\n\n".join(paras) + "\n")
EOF
  fi
  # shellcheck disable=SC2086  # KUBETRAIN may be a command with arguments
  $KUBETRAIN prepare --input "$INPUT" --train-tokenizer 8000 --validation-split 0.1 --output "$WORK/data"
fi

# ---- one manifest + run per (model, compile) --------------------------------------------------------------
model_block() {  # the spec.model section for a model name of this script
  case "$1" in
    llama-1b)    printf '    preset: llama-1b\n    config: {vocab_size: 32000}\n' ;;
    llama-7b-8l) printf '    preset: llama-7b\n    config: {vocab_size: 32000, num_hidden_layers: 8}\n' ;;
    tiny)        printf '    preset: tiny\n' ;;  # smoke tests only
    *) echo "gpu.sh: unknown model $1 (llama-1b, llama-7b-8l, tiny)" >&2; return 1 ;;
  esac
}

RESULTS="$WORK/results.tsv"
: > "$RESULTS"
for model in $MODELS; do
  for compile in $COMPILE; do
    name="gpu-$model-compile-$compile"
    manifest="$WORK/$name.yaml"
    out="$WORK/runs/$name"
    rm -rf "$out"  # a fresh output dir: an old checkpoint there would be resumed instead
    cat > "$manifest" <<EOF
apiVersion: kubetrain.io/v1alpha1
kind: LLMTrainingJob
metadata:
  name: $name
spec:
  model:
$(model_block "$model")
  tokenizer:
    path: $WORK/data/tokenizer
  data:
    train: $WORK/data/train
    validation: $WORK/data/validation
    seqLength: $SEQ
  training:
    maxSteps: $MAX_STEPS
    globalBatchSize: $GLOBAL
    microBatchSize: $MICRO
    optimizer: {lr: 0.0003, weightDecay: 0.1}
    schedule: {warmupSteps: $(( MAX_STEPS / 4 )), decay: cosine}
    gradClip: 1.0
    precision: bf16
    parallelism: fsdp
    compile: $compile
    evalEvery: 0
    evalBatches: 1
    seed: 1234
  checkpoint:
    everySteps: $CKPT_EVERY
    keep: 1
    exportHF: false
  metrics:
    port: 0
EOF
    echo
    echo "== $name: $KUBETRAIN run $manifest --output $out --nproc $NPROC"
    start=$SECONDS
    # shellcheck disable=SC2086
    if $KUBETRAIN run "$manifest" --output "$out" --nproc "$NPROC"; then
      status=ok
    else
      status="failed($?)"
      tail -n 20 "$out/train.log" 2>/dev/null || true
    fi
    rm -rf "$out/checkpoints"
    "$PYTHON" - "$out/events.jsonl" "$WARMUP" "$model" "$compile" "$status" "$((SECONDS - start))" \
        >> "$RESULTS" <<'EOF'
import json, statistics, sys
from pathlib import Path
path, warmup, model, compile_, status, secs = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
events = [json.loads(l) for l in Path(path).read_text().splitlines()] if Path(path).exists() else []
start = next((e for e in events if e["type"] == "start"), {})
steps = [e for e in events if e["type"] == "step"][warmup:]
done = next((e for e in events if e["type"] == "done"), {})
mfu = statistics.median(e["mfu"] for e in steps) if steps else float("nan")
tps = statistics.median(e["tokensPerSecond"] for e in steps) if steps else float("nan")
peak = done.get("peakDeviceMemoryBytes")
saves = [e for e in events if e["type"] == "checkpoint" and e["step"] != done.get("steps")]  # async ones
stall = statistics.median(e["blockedSeconds"] / (e["bytes"] / 1e9) for e in saves) if saves else float("nan")
print("\t".join([model, compile_, str(start.get("parallelism", "-")), str(start.get("dtype", "-")),
                 str(start.get("parameters", "-")), f"{tps:.0f}", f"{mfu:.4f}",
                 f"{peak / 2**30:.1f}" if peak else "-", f"{stall:.3f}", str(len(saves)), str(len(steps)), status,
                 secs]))
EOF
    tail -n 1 "$RESULTS"
  done
done

echo
"$PYTHON" - "$RESULTS" <<'EOF'
import sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
print(f"| {'model':<12} | {'compile':<7} | {'layout':<6} | {'dtype':<14} | {'params':>7} | {'tokens/s':>9} | "
      f"{'MFU':>6} | {'peak GiB':>8} | {'stall s/GB':>10} | {'saves':>5} | {'steps':>5} | {'status':<10} | {'run s':>5} |")
print("|" + "|".join("-" * w for w in (14, 9, 8, 16, 9, 11, 8, 10, 12, 7, 7, 12, 7)) + "|")
for model, comp, layout, dtype, params, tps, mfu, peak, stall, saves, n, status, secs in rows:
    p = f"{int(params) / 1e9:.2f}B" if params.isdigit() else params
    m = f"{float(mfu):.1%}" if mfu != "nan" else "-"
    print(f"| {model:<12} | {comp:<7} | {layout:<6} | {dtype:<14} | {p:>7} | {tps:>9} | {m:>6} | {peak:>8} | "
          f"{stall:>10} | {saves:>5} | {n:>5} | {status:<10} | {secs:>5} |")
EOF
echo "raw rows: $RESULTS"
