#!/usr/bin/env bash
# Table 2's ablation ladder (configs A-F, chapter 9) at small scale on Fashion-MNIST: one class-conditional run per
# config with the same number of training images, each scored by the same deterministic sampler (Heun, 35 NFE) and
# `edm-lit eval` on three disjoint seed ranges. Run from the repository root:
#
#     bash benchmarks/ladder.sh train        # every config not yet trained (resume after an interruption: again)
#     bash benchmarks/ladder.sh eval         # 3 x N_EVAL images per config, FID/KID against the test set + floor
#
# The knobs (environment): BASE (vp or ve), CHANNELS, NIMG (training images per config), N_EVAL (images per seed
# range). The defaults made book/results/ladder-vp: six runs of 100k images and 18 evals of 1,000 images fit in
# about 100 minutes on two CPU cores. --config scales the paper's durations (the learning-rate ramp-up or warm-up,
# the EMA half-life) by NIMG / 200M; the batch is 64 for configs B-F and a quarter of it, 16, for config A (the
# paper: 512 and 128).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
EDM=${EDM:-.venv/bin/edm-lit}
BASE=${BASE:-vp}
CHANNELS=${CHANNELS:-16}
NIMG=${NIMG:-100k}
N_EVAL=${N_EVAL:-1000}
RUNS=${RUNS:-runs/ladder-$BASE}
OUT=${OUT:-book/results/ladder-$BASE}

case "${1:-}" in
train)
    for config in A B C D E F; do
        run=$RUNS/$config
        batch=64; [ $config = A ] && batch=16
        if compgen -G "$run/training-state-*.json" > /dev/null; then  # a checkpoint to resume from
            $EDM train --resume "$run" --duration $NIMG --quiet
        else
            $EDM train --dataset fashion-mnist --preset ddpmpp-fashion-mnist --cond --config $config --base $BASE \
                --channels $CHANNELS --batch $batch --duration $NIMG --precision bf16 --log-every 50 \
                --checkpoint-every 500 --keep 1 --device cpu --quiet --outdir "$run"
        fi
    done ;;
eval)
    mkdir -p $OUT
    for config in A B C D E F; do
        [ -e $OUT/$config ] || $EDM export "$RUNS/$config" $OUT/$config
        for k in 0 1 2; do
            seeds=$((k * N_EVAL))-$(((k + 1) * N_EVAL - 1))
            [ -e $OUT/eval-$config-seeds-$seeds.json ] && continue
            $EDM eval $OUT/$config --seeds $seeds --floor-reference fashion-train --batch 64 \
                --out $OUT/eval-$config-seeds-$seeds.json
        done
    done ;;
*)
    echo "usage: bash benchmarks/ladder.sh train|eval" >&2; exit 2 ;;
esac
