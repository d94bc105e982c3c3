#!/usr/bin/env bash
# One device call that does what only a GPU can (issues 11 and 13), sized for a 15-minute lease:
#
#   here:   python benchmarks/device_pack.py pack --prepared prepared        # .devpack/ + .whl/, once
#   device: run(command="bash benchmarks/device_session.sh", carry=[".devpack", ".whl"], timeout_s=590)
#   here:   bash benchmarks/device_session.sh --collect /work/.device/<files_at>   # weights → runs/gpu/
#
# In ~9 minutes on the GPU, side by side:
#   0. runs tests/test_cuda.py (alone on the GPU, ~25 s);
#   1. trains the mask StyleGAN at 512² and two translators at the shippable size (ngf 32, 7 downs:
#      ≤ 22 MiB fp16) on whole 512² slices of the TRAIN patients: "texture" (decoder noise, resize-conv,
#      2-scale D + feature matching, low-pass L1 50) and "crops" (the same preset first on 128² crops of
#      the slices and of the LIDC nodule crops, DS_CROP_SHARE of the time (0.6), then on whole slices), DS_MINUTES each
#      (DS_SECOND=paper trains the paper's configuration instead: measured 2026-11-26, it keeps the grid;
#      DS_SECOND=lung-texture runs the crops schedule with the lung-texture preset: at GPU scale (third
#      session, 6.5 min alone) the best nodule windows yet, 83.2, but whole slices 361.5: flat soft tissue);
#   2. with DS_SUITE=1, meanwhile the whole suite (modules needing SimpleITK, which cannot travel,
#      fail to collect and are reported);
#   3. after training: benchmarks/throughput.py (paper-size then shipped networks, no compile, with a
#      host-side profile of the end-to-end pass; then compile at batch 64 if time is left);
#   4. writes to $OUT: session.log, results.tgz (recipes, metrics, previews, test reports, throughput
#      JSON) and weights.tar.part-* (fp16 TSGAN folders, split under the 16 MiB per-file limit).
# Held-out KID is measured back here (the TF-Inception weights cannot travel):
#   python benchmarks/heldout_realism.py --weights pretrained runs/gpu/texture runs/gpu/crops ...
#
# A short follow-up call (translators only, shipped masks, test_cuda only, schedule from a known step time):
#   DS_MASKS=shipped DS_THROUGHPUT=0 DS_MINUTES=3.4 DS_DEADLINE=270 bash ...   (the 2026-11-26 second call)
# More training per device minute (the 2026-11-26 second session did this by hand): the first call with
# DS_TEXTURE=0 trains only the second translator, alone on the GPU; a second call on the warm machine
# continues what the first exported, on whole slices (the first call's runs stay on the machine's disk):
#   DS_MASKS=shipped DS_TEXTURE=0 DS_THROUGHPUT=0 DS_MINUTES=7.5 DS_DEADLINE=560 bash ...
#   DS_MASKS=shipped DS_TEXTURE=0 DS_THROUGHPUT=0 DS_CONTINUE=/tmp/ds DS_WORK=/tmp/ds2 DS_MINUTES=3 DS_DEADLINE=260 bash ...
# The third session's findings, for the next one: lung-texture wins the nodule windows and loses the whole
# slices, whose soft tissue had 2.6 min of whole-slice training; give it the slices' share and a second call:
#   DS_MASKS=shipped DS_TEXTURE=0 DS_SECOND=lung-texture DS_CROP_SHARE=0.3 DS_THROUGHPUT=0 DS_MINUTES=7 DS_DEADLINE=530 bash ...
#   DS_MASKS=shipped DS_TEXTURE=0 DS_SECOND=lung-texture DS_THROUGHPUT=0 DS_CONTINUE=/tmp/ds DS_WORK=/tmp/ds2 DS_MINUTES=2.5 DS_DEADLINE=230 bash ...
# and, if a few minutes are left, the end-to-end throughput rows in a call of their own (they have never
# come back: see benchmarks/README "Third device session"):
#   python benchmarks/throughput.py --models paper,shipped --batches 64 --n 256 --place-workers 0,auto --out $OUT/t.json
# GPU weights do not outlive a session (runs/ is ignored; every session starts from a fresh checkout), so
# the three sessions so far each started from scratch. Keep a session's best translator as a tracked
# candidate (fp16, ~16 MiB at ngf 32 resize-conv; the shipped mask generator by link) and the next lent
# session continues it (every run's first stage from it, lr 1e-4) instead of starting over:
#   here:   bash benchmarks/device_session.sh --keep runs/gpuN/lung-texture benchmarks/candidates/lung-texture
#           (+ its README.md: recipe, device minutes, held-out row; commit), then device_pack.py pack again:
#           the crops shrink to what the candidate leaves of the 64 MiB
#   device: DS_INIT=benchmarks/candidates/lung-texture DS_MASKS=shipped DS_TEXTURE=0 DS_SECOND=lung-texture ... bash ...
# Dry run on the CPU (tiny budget; checks the plumbing, not the models):
#   DS_DEVICE=cpu DS_MINUTES=0.3 DS_DEADLINE=400 OUT=/tmp/ds-out bash benchmarks/device_session.sh
set -uo pipefail

if [[ "${1:-}" == "--collect" ]]; then  # here, after the call: reassemble the weights folders
  src=${2:?usage: --collect FILES_AT [DEST]}; dest=${3:-runs/gpu}
  mkdir -p "$dest" && cat "$src"/weights.tar.part-* | tar -x -C "$dest" && tar -xzf "$src/results.tgz" -C "$dest"
  echo "weights in $dest: $(ls "$dest")"; exit
fi
if [[ "${1:-}" == "--keep" ]]; then  # here: a collected GPU translator → a tracked candidate the next lent session continues
  src=${2:?usage: --keep WEIGHTS_FOLDER benchmarks/candidates/NAME}; dest=${3:?usage: --keep WEIGHTS_FOLDER benchmarks/candidates/NAME}
  [[ -f "$src/translator.safetensors" && -f "$src/tsgan.json" ]] || { echo "--keep $src: not a weights folder (translator.safetensors, tsgan.json)" >&2; exit 2; }
  [[ "$dest" == benchmarks/candidates/* && "$dest" != */../* ]] || { echo "--keep $dest: candidates live in benchmarks/candidates/NAME" >&2; exit 2; }
  [[ ! -e "$dest" || -f "$dest/tsgan.json" ]] || { echo "--keep $dest: exists and is not a candidate; not replacing it" >&2; exit 2; }
  tmp=$dest.tmp-$$; rm -rf "$tmp"; mkdir -p "$tmp" || exit 1
  cp "$src"/translator.safetensors "$src"/translator.json "$src"/tsgan.json "$tmp"/ || exit 1
  for f in mask_generator.safetensors mask_generator.json; do  # the shipped masks by link (5 MiB less to carry), others by copy
    if cmp -s "$src/$f" "nodulesynth/pretrained/$f"; then ln -s "../../../nodulesynth/pretrained/$f" "$tmp/$f"; else cp "$src/$f" "$tmp/"; fi
  done
  rm -rf "$dest" && mv "$tmp" "$dest" && du -shL "$dest"/translator.safetensors
  echo "kept in $dest: write its README.md (recipe, device minutes, held-out row), commit it, repack (device_pack.py pack)"; exit
fi

T0=$(date +%s)
MIN=${DS_MINUTES:-4.5}          # training minutes per run (the three run at once)
DEADLINE=${DS_DEADLINE:-540}    # seconds after start by which everything is written to $OUT
DEV=${DS_DEVICE:-cuda}
OUT=${OUT:-device-out}
W=${DS_WORK:-/tmp/ds}           # runs stay on the machine's disk between calls; a second call needs another DS_WORK
MASKS=${DS_MASKS:-train}        # train | shipped (export the translators with the shipped mask generator)
SUITE=${DS_SUITE:-0}            # 1: the whole suite too (on the H200 it passed but for packages the image lacks)
THROUGHPUT=${DS_THROUGHPUT:-1}
SECOND=${DS_SECOND:-crops}      # the second translator: crops (texture on crops incl. LIDC, then whole slices) | paper
                                #   | lung-texture (the crops schedule with --preset lung-texture)
case "$SECOND" in crops|paper|lung-texture) ;; *) echo "DS_SECOND=$SECOND: use crops, paper or lung-texture" >&2; exit 2;; esac
SHARE=${DS_CROP_SHARE:-0.6}      # the crops schedule: this share of DS_MINUTES on crops, the rest on whole slices
awk "BEGIN{exit !($SHARE > 0 && $SHARE < 1)}" 2>/dev/null || { echo "DS_CROP_SHARE=$SHARE: a fraction strictly between 0 and 1" >&2; exit 2; }
TEXTURE=${DS_TEXTURE:-1}         # 0: train only the second translator, alone on the GPU (twice the steps per minute)
CONT=${DS_CONTINUE:-}           # an earlier call's DS_WORK on this machine: continue its exported translators on
                                #   whole slices (lr 1e-4, DS_MINUTES) instead of training from scratch
[[ -z "$CONT" || -d "$CONT" ]] || { echo "DS_CONTINUE=$CONT: no such folder on this machine (a fresh machine starts bare)" >&2; exit 2; }
[[ -z "$CONT" || "$CONT" != "$W" ]] || { echo "DS_CONTINUE=$CONT: give this call another DS_WORK" >&2; exit 2; }
INIT=${DS_INIT:-}               # a candidate an earlier lent session kept (benchmarks/candidates/NAME, tracked): every run's
                                #   first stage starts from its translator (lr 1e-4) instead of from scratch
[[ -z "$INIT" || -f "$INIT/translator.safetensors" ]] || { echo "DS_INIT=$INIT: no translator.safetensors there" >&2; exit 2; }
[[ -z "$INIT" || -z "$CONT" ]] || { echo "DS_INIT and DS_CONTINUE: a call starts from one of them" >&2; exit 2; }
FROM=(); [[ -n "$INIT" ]] && FROM=(--init-weights "$INIT" --lr 1e-4)
RUNS=(); (( TEXTURE )) && RUNS+=(texture); RUNS+=("$SECOND")
STEPSEC=${DS_STEP_SECONDS-$( (( TEXTURE )) && echo 0.1 || echo 0.06)}  # translator step time sizing the schedule
                                # (H200, two runs side by side: 0.074-0.108 s; one alone: a guess, --minutes stops it);
                                # '' calibrates instead, which a GPU shared by starting runs makes read ~300x high
mkdir -p "$OUT" "$W/results"
exec > >(tee -a "$OUT/session.log") 2>&1
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONDONTWRITEBYTECODE=1
PY=python3

say "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1 && [[ "$DEV" != cpu ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch, nodulesynth; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
if [[ -d .devpack ]]; then $PY benchmarks/device_pack.py unpack .devpack "$W/prepared" || exit 1; P=$W/prepared
else P=${DS_PREPARED:-prepared}; fi

# ---- 1. training, three runs side by side ------------------------------------------------------
SIZE=(--ngf 32 --ndf 64 --num-downs 7 --crop 0 --batch 8 --lr 2e-4)
[[ "$DEV" == cpu ]] && SIZE=(--ngf 8 --ndf 8 --num-downs 7 --crop 0 --batch 1 --lr 2e-4)
MASKRES=512; [[ "$DEV" == cpu ]] && MASKRES=32
common=(--prepared "$P" --minutes "$MIN" --device "$DEV" --threads 2 --calibration-steps 4 --checkpoint-every 400)
[[ -n "$STEPSEC" && "$DEV" != cpu ]] && SIZE+=(--step-seconds "$STEPSEC")

# ---- 0. the CUDA tests first, alone on the GPU (~25 s) -------------------------------------------
say "tests/test_cuda.py"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_boxes.py \
  --junitxml="$W/results/test_cuda.xml" 2>&1 | tail -25

say "training $MIN min per run (masks: $MASKS)"
pm=
if [[ "$MASKS" == train && -z "$CONT" ]]; then  # a continuing call reuses the earlier call's masks (below)
  $PY benchmarks/retrain.py "${common[@]}" --out "$W/masks" --stage masks --mask-res $MASKRES --workers 2 \
    > "$W/results/train_masks.log" 2>&1 & pm=$!
fi
declare -A PID=()
preset() { case $1 in paper|lung-texture) echo "$1";; *) echo texture;; esac; }  # crops: the texture preset
for r in "${RUNS[@]}"; do
  if [[ -n "$CONT" ]]; then  # a later call: the earlier call's exported translator, on whole slices
    init=$CONT/$r/translator/export
    [[ -f "$init/translator.safetensors" ]] || { say "no $init: $r not continued"; continue; }
    $PY benchmarks/retrain.py "${common[@]}" --out "$W/$r" --stage translator --preset "$(preset "$r")" "${SIZE[@]}" --lr 1e-4 \
      --init-weights "$init" --workers 4 > "$W/results/train_$r.log" 2>&1 & PID[$r]=$!
  elif [[ "$r" == texture || "$r" == paper ]]; then
    $PY benchmarks/retrain.py "${common[@]}" --out "$W/$r" --stage translator --preset "$(preset "$r")" "${SIZE[@]}" \
      "${FROM[@]}" --workers 4 > "$W/results/train_$r.log" 2>&1 & PID[$r]=$!
  else  # "crops": texture preset on 128² crops of the slices AND the LIDC nodule crops (713 patients of real
    # parenchyma, native spacing), then whole slices from there, so train and use see the same context
    m1=$(awk "BEGIN{print $MIN*$SHARE}"); m2=$(awk "BEGIN{print $MIN*(1-$SHARE)}")
    P1=(--crop 128 --spacing 0 --batch 32); [[ "$DEV" == cpu ]] && P1=(--crop 128 --spacing 0 --batch 1)
    [[ "$DEV" != cpu ]] && P1+=(--step-seconds 0.03)  # a guess (¼ of the pixels of a whole-slice batch); the time budget stops it
    ( $PY benchmarks/retrain.py "${common[@]}" --minutes "$m1" --out "$W/${r}1" --stage translator --preset "$(preset "$r")" \
        "${SIZE[@]}" "${P1[@]}" "${FROM[@]}" --workers 4 \
      && $PY benchmarks/retrain.py "${common[@]}" --minutes "$m2" --out "$W/$r" --stage translator --preset "$(preset "$r")" \
        "${SIZE[@]}" --lr 1e-4 --init-weights "$W/${r}1/translator/export" --workers 4 ) > "$W/results/train_$r.log" 2>&1 & PID[$r]=$!
  fi
done

# ---- 2. the whole suite while the GPU trains (DS_SUITE=1) -----------------------------------------
budget=$(( $(left) - 300 )); (( budget > 240 )) && budget=240
if (( SUITE && budget > 30 )); then
  say "whole suite (${budget}s at most)"
  NX=(); $PY -c "import xdist" 2>/dev/null && NX=(-n 4)
  timeout "$budget" $PY -m pytest -q -p no:cacheprovider "${NX[@]}" --continue-on-collection-errors tests \
    --junitxml="$W/results/test_suite.xml" > "$W/results/test_suite.log" 2>&1
  tail -15 "$W/results/test_suite.log"
fi

# ---- wait for training, export -------------------------------------------------------------------
# only runs that trained in THIS call are exported: a second call on the same machine finds the first
# call's run folders, which retrain.py refuses; their old weights must not come back as new ones
declare -A RC=([masks]=1)
[[ -n "$pm" ]] && { wait "$pm"; RC[masks]=$?; }
for r in "${RUNS[@]}"; do RC[$r]=1; [[ -n "${PID[$r]:-}" ]] && { wait "${PID[$r]}"; RC[$r]=$?; }; done
say "training done (exit status: masks ${RC[masks]}$(for r in "${RUNS[@]}"; do printf ', %s %s' "$r" "${RC[$r]}"; done))"
for r in masks "${RUNS[@]}"; do tail -3 "$W/results/train_$r.log" 2>/dev/null; done
M=$W/masks/masks
[[ -n "$CONT" && "$MASKS" == train ]] && { M=$CONT/masks/masks; RC[masks]=0; }
if [[ "${RC[masks]}" != 0 || ! -f "$M/export/mask_generator.safetensors" ]]; then  # no mask run or it failed: the shipped one
  M=$W/shipped_masks; mkdir -p "$M/export" && cp nodulesynth/pretrained/mask_generator.* "$M/export/"
  say "exporting with the shipped mask generator"
fi
for r in "${RUNS[@]}"; do
  [[ "${RC[$r]}" == 0 ]] || { say "not exporting $r: its training failed (results/train_$r.log)"; continue; }
  $PY benchmarks/retrain.py --prepared "$P" --out "$W/$r" --stage export --masks-run "$M" --device "$DEV" \
    >> "$W/results/train_$r.log" 2>&1 && [[ -d "$W/$r/weights" ]] && say "exported $r" || say "export $r failed"
done

# ---- 3. throughput ------------------------------------------------------------------------------
if [[ "$DEV" != cpu ]] && (( THROUGHPUT )); then
  t=$(( $(left) - 90 ))
  if (( t > 40 )); then
    say "throughput, no compile (${t}s at most)"  # the paper-size networks first: not measured yet
    timeout "$t" $PY benchmarks/throughput.py --no-compile --models paper,shipped --batches 32,128 --seconds 2 --n 256 \
      --out "$W/results/throughput.json" 2>&1 | tail -30
  fi
  t=$(( $(left) - 45 ))
  if (( t > 60 )); then
    say "throughput with torch.compile at batch 64 (${t}s at most)"
    timeout "$t" $PY benchmarks/throughput.py --models paper --batches 64 --seconds 2 --n 512 \
      --out "$W/results/throughput_compile.json" 2>&1 | tail -12
  fi
fi

# ---- 4. bring back -------------------------------------------------------------------------------
say "packing results"
for r in masks "${RUNS[@]}" $([[ $SECOND != paper && -z "$CONT" ]] && echo ${SECOND}1); do
  run=$W/$r/$([[ $r == masks ]] && echo masks || echo translator)
  mkdir -p "$W/results/$r"
  cp "$W/$r/recipe.json" "$W/results/$r/" 2>/dev/null
  cp "$run/metrics.csv" "$run/config.json" "$W/results/$r/" 2>/dev/null
  last=$(ls "$run"/samples/*.png 2>/dev/null | tail -1); [[ -n "$last" ]] && cp "$last" "$W/results/$r/"
done
tar -czf "$OUT/results.tgz" -C "$W" results
names=(); for r in "${RUNS[@]}"; do [[ "${RC[$r]}" == 0 && -d "$W/$r/weights" ]] && names+=("$r/weights"); done
if (( ${#names[@]} )); then  # archived as texture/, crops/ (or paper/, lung-texture/): the folders --collect hands to heldout_realism
  tar -cf - -C "$W" --transform 's,/weights,,' "${names[@]}" | split -b 15m -d - "$OUT/weights.tar.part-"
fi
ls -la "$OUT"
say "done (limit was ${DEADLINE}s)"
