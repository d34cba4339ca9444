#!/usr/bin/env bash
# minidiffit's entry point: `bash reproduce.sh <command>`; `bash reproduce.sh help` lists the commands.
set -euo pipefail
CALLER_PWD=$PWD  # relative paths the user passes (--data_dir=..., DATA_DIR, --ref=, --weights=) are theirs
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=${MINIDIFFIT_VENV:-.venv}
PY="$VENV/bin/python"

usage() {
  cat <<'USAGE'
usage: bash reproduce.sh <command> [args]

commands:
  setup        create .venv (if missing) and install minidiffit with its dev extra
  test         unit tests, then every notebook and its solutions under nbval in FAST mode
  fashion      [--data_dir=DIR]  the laptop tier: both DiffiT pipelines on Fashion-MNIST, grids and FIDs (<= 30 min on 2 CPU cores)
  ablations    [--data_dir=DIR] [--iters=N] [--seeds=K] [--variants=a,b]  DiffiT's ablations on Fashion-MNIST (CPU: ~90 min)
  nfe          after fashion: FID against network evaluations for every sampler of both models (~25 min on 2 CPU cores)
  cifar10      [--data_dir=DIR] [--key=value ...] CUDA: paper recipe, 50k samples, FID; no CUDA: CPU tier (--minutes=30)
  imagenet256  DATA_DIR [--ref=ADM_REF.npz] [--key=value ...] | --weights FILE   prepare, train, sample, FID; no CUDA: FAST toy run
  help         this message
USAGE
}

# Idempotent: a second run only checks that the package imports.
setup() {
  if [[ ! -x "$PY" ]]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
  fi
  if "$PY" -c "import minidiffit, torch, einops, scipy, nbval, diffusers, safetensors" 2>/dev/null; then
    echo "== $VENV is ready"
    return
  fi
  echo "== installing minidiffit[dev] into $VENV (torch is large: the first time takes minutes)"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet -e '.[dev]'
}

run_tests() {
  setup
  echo "== unit tests"
  "$PY" -m pytest -q tests
  echo "== notebooks and solutions (nbval, FAST mode)"
  MINIDIFFIT_FAST=1 "$PY" -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
    --nbval-cell-timeout=300 notebooks/
}

# Paths the user typed are relative to where they ran the command, not to the repository: make them absolute.
# Prints one argument per line (bash 3 has no mapfile -d); --out= stays relative to the repository (runs/...).
absolute_args() {
  local a key val
  for a in "$@"; do
    case "$a" in
      --data_dir=*|--ref=*|--weights=*|--ckpt=*)
        key=${a%%=*} val=${a#*=}
        [[ -n "$val" && "$val" != /* ]] && val="$CALLER_PWD/$val"
        printf '%s\n' "$key=$val" ;;
      *) printf '%s\n' "$a" ;;
    esac
  done
}

# The value of --key= in the arguments (the last one wins, as the config parser does), or $2 when absent.
arg_value() {
  local key=$1 value=$2 a
  shift 2
  for a in "$@"; do [[ "$a" == --$key=* ]] && value=${a#--$key=}; done
  printf '%s' "$value"
}

cuda_count() {
  "$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
}

# CIFAR-10 (DiffiT App. I.1 with EDM's recipe). Every stage resumes or is skipped when done.
# --key=value arguments override minidiffit.train's settings (--iters=, --minutes=, --data_dir=, --out=, ...);
# all of them are checked before the first stage starts.
run_cifar10() {
  setup
  local args=() a
  while IFS= read -r a; do args+=("$a"); done < <(absolute_args "$@")
  local ngpu data_dir
  ngpu=$(cuda_count)
  data_dir=$(arg_value data_dir "" ${args[@]+"${args[@]}"})
  if [[ "$ngpu" -gt 0 ]]; then
    local defaults=(--preset=cifar10 --data=cifar10 --out=runs/cifar10 --iters=200000 --batch=512)
    local launch=("$PY" -m)
    [[ "$ngpu" -gt 1 ]] && launch=("$VENV/bin/torchrun" --standalone --nproc_per_node="$ngpu" -m)
  else
    # Choice: CPU-tier settings (batch 32, short lr warm-up, no augmentation) so that a half-hour run
    # learns something; the EDM schedule (10 Mimg warm-up) would keep the lr near zero all along.
    local defaults=(--preset=small --data=cifar10 --out=runs/cifar10_cpu --minutes=30 --batch=32 --warmup_kimg=0.5
      --augment_p=0 --ckpt_every=200 --log_every=10 --grid=16)
    local launch=("$PY" -m)
  fi
  local train_args=("${defaults[@]}" ${args[@]+"${args[@]}"})
  "$PY" -m minidiffit train check "${train_args[@]}" >/dev/null  # every key checked before any work
  local out preset
  out=$(arg_value out "" "${train_args[@]}")
  preset=$(arg_value preset "" "${train_args[@]}")
  if [[ "$ngpu" -gt 0 ]]; then
    echo "== CUDA, $ngpu GPU(s): preset $preset, EDM recipe -> $out"
    "${launch[@]}" minidiffit.train "${train_args[@]}"
    echo "== 50k samples, 18 Heun steps (35 network evaluations), EMA weights -> $out/samples"
    "${launch[@]}" minidiffit.tools.sample --ckpt=$out/ckpt.pt --num_samples=50000 --steps=18 --batch=500 --out=$out/samples
    local ref=runs/fid_refs/cifar10_train.npz tag="cifar10 ckpt=$out/ckpt.pt samples=50000 nfe=35"
    if [[ ! -f $ref ]]; then
      mkdir -p "$(dirname $ref)"
      "$PY" -m minidiffit fid ref --data=cifar10 ${data_dir:+--data_dir="$data_dir"} --out=$ref
    fi
    mkdir -p results
    if grep -qsF "$tag" results/cifar10.txt && [[ results/cifar10.txt -nt $out/ckpt.pt ]]; then
      echo "== FID already in results/cifar10.txt"
    else
      "$PY" -m minidiffit fid --samples=$out/samples --ref=$ref --results=results/cifar10.txt --tag="$tag"
    fi
    tail -n 1 results/cifar10.txt
  else
    echo "== no CUDA: CPU tier, preset $preset for a bounded time (--minutes=, default 30) -> $out"
    "$PY" -m minidiffit train "${train_args[@]}"
    if [[ -f $out/samples.png && $out/samples.png -nt $out/ckpt.pt ]]; then
      echo "== $out/samples.png is up to date"
    else
      echo "== 64 samples, 18 Heun steps (35 network evaluations), EMA weights -> $out/samples.png"
      "$PY" -m minidiffit sample --ckpt=$out/ckpt.pt --num_samples=64 --steps=18 --batch=64 --out=$out/samples.png --overwrite=true
    fi
  fi
}

# ImageNet-256 with the latent DiffiT (DiffiT Sec. 4, App. I.2; minidiffit/tools/latent_task.py). Stages resume
# or are skipped when done: prepare -> $out/latents (VAE latents, both flips), train -> $out/ckpt.pt (XL/2,
# lr 3e-4, batch 256, EMA 0.9999), sample -> $out/samples_50k.npz (50k class-balanced images, guidance,
# 250 steps; arr_0 uint8 NHWC, arr_1 labels), FID/precision/recall vs ADM's reference batch -> one line in
# results/imagenet256.txt. `imagenet256 --weights FILE`: sample and evaluate a released checkpoint only.
# Options: --ref=ADM_REF.npz, --weights=FILE; other --key=value go to minidiffit.train (--iters=, --minutes=).
# No CUDA: prints what it would run, then runs a FAST-sized version of every stage on synthetic images.
ADM_REF_URL=https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz

run_imagenet256() {
  setup
  local data_dir="" weights="" ref=runs/fid_refs/VIRTUAL_imagenet256_labeled.npz args=() a
  local given=()
  while IFS= read -r a; do given+=("$a"); done < <(absolute_args "$@")
  set -- ${given[@]+"${given[@]}"}
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --weights) weights=${2:?--weights needs a file}; shift 2 ;;
      --weights=*) weights=${1#--weights=}; shift ;;
      --ref) ref=${2:?--ref needs a file}; shift 2 ;;
      --ref=*) ref=${1#--ref=}; shift ;;
      --*=*) args+=("$1"); shift ;;
      -*) echo "reproduce.sh imagenet256: unknown option '$1' (use --key=value)" >&2; exit 2 ;;
      *) data_dir=$1; [[ "$data_dir" != /* ]] && data_dir="$CALLER_PWD/$data_dir"; shift ;;
    esac
  done
  [[ -n "$weights" && "$weights" != /* ]] && weights="$CALLER_PWD/$weights"
  [[ "$ref" != /* && "$ref" != runs/* ]] && ref="$CALLER_PWD/$ref"
  # Every training key is checked now, before the prepare stage (hours of VAE encoding on a GPU box).
  "$PY" -m minidiffit train check --task=latent --out=runs/imagenet256 ${args[@]+"${args[@]}"} >/dev/null
  local ngpu
  ngpu=$(cuda_count)
  if [[ "$ngpu" -gt 0 ]]; then
    if [[ -z "$data_dir" && -z "$weights" ]]; then
      echo "reproduce.sh imagenet256: pass DATA_DIR (ImageNet's train folder, one subfolder per class) or --weights FILE" >&2
      exit 2
    fi
    imagenet256_stages run "$ngpu" "$data_dir" "$weights" "$ref" ${args[@]+"${args[@]}"}
  else
    echo "== no CUDA. With GPUs this command would run (N = number of GPUs):"
    imagenet256_stages print N "${data_dir:-DATA_DIR}" "$weights" "$ref" ${args[@]+"${args[@]}"}
    echo "== now a FAST-sized version of every stage on synthetic images (tiny model, tiny random VAE, CPU)"
    imagenet256_fast ${args[@]+"${args[@]}"}
  fi
}

# mode "run" executes the stages (skipping finished ones), "print" only shows the commands.
imagenet256_stages() {
  local mode=$1 ngpu=$2 data_dir=$3 weights=$4 ref=$5
  shift 5
  local out=runs/imagenet256 launch=("$PY" -m)
  [[ "$mode" == print || "$ngpu" -gt 1 ]] && launch=("$VENV/bin/torchrun" --standalone --nproc_per_node="$ngpu" -m)
  step() { if [[ "$mode" == print ]]; then printf ' %q' "$@"; echo; else "$@"; fi; }
  local samples source
  if [[ -n "$weights" ]]; then
    out=runs/imagenet256_released
    samples=$out/samples_50k.npz source=(--weights="$weights")
  else
    samples=$out/samples_50k.npz source=(--ckpt=$out/ckpt.pt)
    if [[ "$mode" == run ]] && grep -qs '"complete": true' $out/latents/manifest.json; then
      echo "== $out/latents: all images already encoded"
    else
      [[ "$mode" == run ]] && echo "== prepare: ADM center crop to 256, SD VAE (sd-vae-ft-ema) latents, both flips -> $out/latents"
      step "${launch[@]}" minidiffit.tools.imagenet prepare --data_dir="$data_dir" --out=$out/latents --image_size=256
    fi
    [[ "$mode" == run ]] && echo "== train: XL/2, lr 3e-4, batch 256, EMA 0.9999, bf16 + compile (resumes $out/ckpt.pt)"
    step "${launch[@]}" minidiffit.train --task=latent --preset=XL/2 --data_dir=$out/latents --out=$out "$@"
  fi
  if [[ "$mode" == run && -f $samples && ( -n "$weights" || $samples -nt $out/ckpt.pt ) ]]; then
    echo "== $samples exists; delete it to sample again"
  else
    [[ "$mode" == run ]] && echo "== sample: 50k images (image i: seed i, class i % 1000), guidance, 250 steps x 2 evaluations -> $samples"
    [[ "$mode" == run ]] && mkdir -p $out
    step "${launch[@]}" minidiffit.tools.sample "${source[@]}" --num_samples=50000 --steps=250 --batch=64 --out=$samples --overwrite=true
  fi
  if [[ "$mode" == run && ! -f "$ref" ]]; then
    echo "reproduce.sh imagenet256: ADM's reference batch $ref is missing. Download it (1.5 GB) with" >&2
    echo "  mkdir -p $(dirname "$ref") && curl -L -o $ref $ADM_REF_URL" >&2
    echo "or pass --ref=PATH. The samples are in $samples." >&2
    exit 2
  fi
  local tag="imagenet256 ${source[*]} samples=50000 steps=250 nfe=500 (guidance doubles the batch)"
  [[ "$mode" == run ]] && mkdir -p results && echo "== FID, precision, recall vs ADM's reference batch $ref"
  step "$PY" -m minidiffit fid --samples=$samples --ref="$ref" --results=results/imagenet256.txt --tag="$tag"
  [[ "$mode" == run ]] && tail -n 1 results/imagenet256.txt
  return 0
}

# The same stages at toy size: 40 synthetic 64 px images in 10 classes, the tiny preset, the tiny random VAE,
# a few training steps (then a resume), 20 samples, and a "FID" from a tiny random network (NOT a real FID).
# Like the real stages, each is skipped when its output is there and newer than its input.
imagenet256_fast() {
  local out=runs/imagenet256_fast
  export MINIDIFFIT_FAST=1
  [[ -d $out/images ]] || "$PY" -m minidiffit imagenet synthetic --out=$out/images --num_classes=10 --per_class=4 --size=64
  "$PY" -m minidiffit imagenet prepare --data_dir=$out/images --out=$out/latents --image_size=64 --vae=tiny \
    --batch=20 --shard_size=16 --num_workers=0
  local train=("$PY" -m minidiffit train --task=latent --preset=tiny --data_dir=$out/latents --out=$out/run --batch=8
    --lr=1e-3 --ema_halflife_kimg=0.05 --ckpt_every=10 --log_every=10 --grid=4 --sample_steps=10 --compile=false)
  "${train[@]}" --iters=10 "$@"
  echo "== resume the run for 10 more steps"
  "${train[@]}" --iters=20 "$@"
  fresh() { [[ -f $1 && $1 -nt $2 ]]; }  # output $1 exists and is newer than input $2
  if fresh $out/samples.npz $out/run/ckpt.pt; then echo "== $out/samples.npz is up to date"; else
    echo "== sample 20 images (25 steps, guidance) -> $out/samples.npz"
    "$PY" -m minidiffit sample --ckpt=$out/run/ckpt.pt --num_samples=20 --steps=25 --batch=10 --out=$out/samples.npz --overwrite=true
  fi
  if fresh $out/samples_weights.npz $out/run/ckpt.pt; then echo "== $out/samples_weights.npz is up to date"; else
    echo "== the released-weights path: export the EMA as safetensors, sample it with --weights"
    "$PY" -m minidiffit export --ckpt=$out/run/ckpt.pt --out=$out/tiny.safetensors
    MINIDIFFIT_VAE=tiny "$PY" -m minidiffit sample --weights=$out/tiny.safetensors --num_samples=20 --steps=25 --batch=10 \
      --out=$out/samples_weights.npz --overwrite=true
  fi
  [[ -f $out/ref.npz ]] || "$PY" -m minidiffit imagenet reference --data_dir=$out/images --out=$out/ref.npz --image_size=64
  local s
  for s in samples samples_weights; do
    if fresh $out/results_$s.txt $out/$s.npz; then echo "== $out/results_$s.txt is up to date"; else
      "$PY" -m minidiffit fid --samples=$out/$s.npz --ref=$out/ref.npz --network=tiny-random \
        --results=$out/results_$s.txt --tag="FAST CPU pipeline check ($s), NOT a real FID"
    fi
  done
  echo "== FAST pipeline done: every stage ran; $out/results_*.txt (tiny random features, NOT a real FID)"
}

# The laptop tier (DESIGN.md 2b): Fashion-MNIST, both models through the package's real code paths, every stage
# resumable and skipped when done, then FIDs with the real Inception network against the test set beside the
# real-vs-real floor at the same sample count, appended to results/fashion.txt. --data_dir= is torchvision's
# Fashion-MNIST root (downloaded into ~/.cache/minidiffit without it). MINIDIFFIT_FAST=1: a few steps of each.
run_fashion() {
  setup
  local args=() a
  while IFS= read -r a; do args+=("$a"); done < <(absolute_args "$@")
  for a in ${args[@]+"${args[@]}"}; do
    [[ "$a" == --data_dir=* ]] || { echo "reproduce.sh fashion: unknown option '$a' (it takes --data_dir=DIR only)" >&2; exit 2; }
  done
  local data=(--data=fashion_mnist) data_dir
  data_dir=$(arg_value data_dir "" ${args[@]+"${args[@]}"})
  [[ -n "$data_dir" ]] && data+=(--data_dir="$data_dir")
  local out=runs/fashion edm_min=10.5 ae_min=2 lat_min=6.5 num=500 net=() t0=$SECONDS
  local edm_len=() ae_len=() lat_len=() prep=() lat_steps=250 where="CPU (2 cores assumed)"
  if [[ "${MINIDIFFIT_FAST:-0}" == 1 ]]; then
    out=runs/fashion_fast num=20 net=(--network=tiny-random) lat_steps=5 where="FAST pipeline check, NOT real FIDs"
    edm_len=(--iters=2 --batch=8) ae_len=(--iters=3 --batch=16) lat_len=(--iters=2 --batch=8) prep=(--num=64)
    echo "== FAST: every stage for a few steps -> $out"
  elif [[ $(cuda_count) -gt 0 ]]; then
    edm_min=60 ae_min=10 lat_min=60 num=10000 where="CUDA, longer budgets and $num samples"
    echo "== CUDA: the same stages with longer budgets ($edm_min + $ae_min + $lat_min min) and $num samples per FID"
  else
    echo "== no CUDA: CPU budgets $edm_min + $ae_min + $lat_min min of training, FIDs on $num samples (about 30 min)"
  fi
  [[ ${#edm_len[@]} -gt 0 ]] || edm_len=(--minutes=$edm_min --iters=1000000 --batch=64)
  [[ ${#ae_len[@]} -gt 0 ]] || ae_len=(--minutes=$ae_min)
  [[ ${#lat_len[@]} -gt 0 ]] || lat_len=(--minutes=$lat_min --iters=1000000 --batch=128)
  fresh() { [[ -f $1 && $1 -nt $2 ]]; }  # output $1 exists and is newer than input $2

  echo "== 1/6 image space: DiffiT U-Net (preset fashion, 1 channel, TMSA), EDM recipe -> $out/edm"
  # Choice: laptop settings: batch 64, lr 1e-3 after a 0.5 kimg warm-up, no augmentation, EDM's EMA ramp.
  "$PY" -m minidiffit train --preset=fashion "${data[@]}" --out=$out/edm "${edm_len[@]}" --lr=1e-3 --warmup_kimg=0.5 \
    --augment_p=0 --ckpt_every=200 --log_every=20 --grid=0
  if fresh $out/edm/samples.png $out/edm/ckpt.pt; then echo "== $out/edm/samples.png is up to date"; else
    "$PY" -m minidiffit sample --ckpt=$out/edm/ckpt.pt --num_samples=100 --nrow=10 --out=$out/edm/samples.png --overwrite=true
  fi

  echo "== 2/6 latent space: a small autoencoder (32x32x1 -> 8x8x4), its scale measured as 1/std -> $out/ae"
  "$PY" -m minidiffit autoencoder "${data[@]}" --out=$out/ae "${ae_len[@]}"
  echo "== 3/6 prepare: its latents of the training set, both flips, shards + manifest -> $out/latents"
  "$PY" -m minidiffit imagenet prepare "${data[@]}" --out=$out/latents --vae=$out/ae/ckpt.pt --num_workers=0 \
    --batch=256 ${prep[@]+"${prep[@]}"}
  echo "== 4/6 latent DiffiT (preset fashion), class labels with dropout 0.1, ADM diffusion, learned variance -> $out/latent"
  # Choice: EDM's EMA ramp (half-life at most 5% of the images seen) instead of DiT's 0.9999, which would keep the
  # EMA at its initial weights through a run of a few thousand steps.
  "$PY" -m minidiffit train --task=latent --preset=fashion --data_dir=$out/latents --out=$out/latent "${lat_len[@]}" \
    --lr=1e-3 --ema_halflife_kimg=500 --ema_rampup=0.05 --ckpt_every=200 --log_every=20 --grid=0
  if fresh $out/latent/samples.png $out/latent/ckpt.pt; then echo "== $out/latent grids are up to date"; else
    # column c holds class c; the sweep uses the same seeds (same noise, same classes) at guidance 1 and 4
    "$PY" -m minidiffit sample --ckpt=$out/latent/ckpt.pt --num_samples=100 --nrow=10 --steps=$lat_steps --out=$out/latent/samples.png --overwrite=true
    for g in 1 4; do
      "$PY" -m minidiffit sample --ckpt=$out/latent/ckpt.pt --num_samples=30 --nrow=10 --steps=$lat_steps --guidance=$g \
        --out=$out/latent/guidance_$g.png --overwrite=true
    done
  fi

  echo "== 5/6 samples for FID: $num per model"
  fresh $out/edm/samples_$num.npz $out/edm/ckpt.pt ||
    "$PY" -m minidiffit sample --ckpt=$out/edm/ckpt.pt --num_samples=$num --batch=100 --out=$out/edm/samples_$num.npz --overwrite=true
  fresh $out/latent/samples_$num.npz $out/latent/ckpt.pt ||
    "$PY" -m minidiffit sample --ckpt=$out/latent/ckpt.pt --num_samples=$num --batch=100 --steps=$lat_steps \
      --out=$out/latent/samples_$num.npz --overwrite=true

  echo "== 6/6 FID with the Inception network vs $num test images, beside the real-vs-real floor (train vs test)"
  mkdir -p $out/fid results
  local split
  for split in train test; do
    [[ -f $out/fid/${split}_$num.npz ]] || "$PY" -m minidiffit fid ref "${data[@]}" --split=$split --num=$num \
      --out=$out/fid/${split}_$num.npz ${net[@]+"${net[@]}"}
  done
  local results=results/fashion.txt
  [[ "${MINIDIFFIT_FAST:-0}" == 1 ]] && results=$out/results.txt
  fid_once() {  # tag samples: one line in $results per samples file, again only when the samples are newer
    local stamp=$out/fid/.scored_$(basename "$(dirname "$2")")_$(basename "$2")  # touched once their line is written
    if fresh $stamp $2 && grep -qsF -- "$1" $results; then echo "== already in $results: $1"; return; fi
    "$PY" -m minidiffit fid --samples=$2 --ref=$out/fid/test_$num.npz --results=$results --tag="$1" ${net[@]+"${net[@]}"}
    touch $stamp
  }
  fid_once "fashion floor: Fashion-MNIST train vs test, N=$num [$where]" $out/fid/train_$num.npz
  fid_once "fashion image-space DiffiT, $out/edm, Heun 18 steps (35 NFE), N=$num [$where]" $out/edm/samples_$num.npz
  fid_once "fashion latent DiffiT, $out/latent, $lat_steps ancestral steps, guidance default, N=$num [$where]" $out/latent/samples_$num.npz
  echo "== done in $(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s: grids $out/edm/samples.png, $out/latent/samples.png, $out/latent/guidance_{1,4}.png; FIDs in $results"
  tail -n 3 $results
}

# The paper's ablations (time in the bias / MLP / a separate token / adaLN, windows 2-4-8, a diffusers U-Net peer).
run_ablations() {
  setup
  local args=() a
  while IFS= read -r a; do args+=("$a"); done < <(absolute_args "$@")
  for a in ${args[@]+"${args[@]}"}; do
    case "$a" in --data_dir=*|--iters=*|--seeds=*|--variants=*) ;;
      *) echo "reproduce.sh ablations: unknown option '$a' (it takes --data_dir, --iters, --seeds, --variants)" >&2; exit 2 ;;
    esac
  done
  if [[ "${MINIDIFFIT_FAST:-0}" == 1 ]]; then
    echo "== FAST: two variants for 2 steps, N = 16, tiny random FID network (NOT real FIDs) -> runs/ablations_fast"
    args=(--variants=tmsa,bias ${args[@]+"${args[@]}"} --iters=2 --batch=8 --num=16 --network=tiny-random
          --out=runs/ablations_fast --results=runs/ablations_fast/results)
  elif [[ $(cuda_count) -eq 0 ]]; then
    echo "== no CUDA: every variant for 800 steps of batch 64 on the CPU (about 90 min on 2 cores); --iters= to change"
  fi
  "$PY" experiments/ablations.py ${args[@]+"${args[@]}"}
}

# FID vs network evaluations on the laptop tier's runs: samplers and step counts in experiments/fid_vs_nfe.py.
run_nfe() {
  setup
  [[ $# -eq 0 ]] || { echo "reproduce.sh nfe: takes no options (it reads runs/fashion)" >&2; exit 2; }
  if [[ "${MINIDIFFIT_FAST:-0}" == 1 ]]; then
    echo "== FAST: two samplers per model on runs/fashion_fast, N = 20, tiny random FID network (NOT real FIDs)"
    "$PY" experiments/fid_vs_nfe.py --smoke
  else
    "$PY" experiments/fid_vs_nfe.py
  fi
}

main() {
  local cmd=${1:-help}
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    setup) setup "$@" ;;
    test) run_tests "$@" ;;
    fashion) run_fashion "$@" ;;
    nfe) run_nfe "$@" ;;
    ablations) run_ablations "$@" ;;
    cifar10) run_cifar10 "$@" ;;
    imagenet256) run_imagenet256 "$@" ;;
    help|-h|--help) usage ;;
    *) echo "reproduce.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
