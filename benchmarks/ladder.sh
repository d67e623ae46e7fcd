#!/usr/bin/env bash
# Table 2's ablation ladder (configs A-F, chapter 9) at small scale on Fashion-MNIST: one class-conditional run per
# config with the same number of training images, each scored by the same deterministic sampler (Heun, 35 NFE) and
# `edm-lit eval` on RANGES disjoint seed ranges. Run from the repository root:
#
#     bash benchmarks/ladder.sh train        # every config not yet trained (resume after an interruption: again)
#     bash benchmarks/ladder.sh eval         # RANGES x N_EVAL images per config: FID/KID vs the test set + floor
#     bash benchmarks/ladder.sh record       # each run's command, hardware, images/s and loss log beside them
#
# The knobs (environment): BASE (vp or ve), CHANNELS, NIMG (training images per config), N_EVAL (images per seed
# range), RANGES (seed ranges per config). The defaults made book/results/ladder-vp: six runs of 100k images (about
# 95 minutes on two CPU cores) and 12 evals of 500 images (about 12 minutes). --config scales the paper's durations
# (the learning-rate ramp-up or warm-up, the EMA half-life) by NIMG / 200M; the batch is 64 for configs B-F and a
# quarter of it, 16, for config A (the paper: 512 and 128).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
EDM=${EDM:-.venv/bin/edm-lit}
BASE=${BASE:-vp}
CHANNELS=${CHANNELS:-16}
NIMG=${NIMG:-100k}
N_EVAL=${N_EVAL:-500}
RANGES=${RANGES:-2}
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
        model=$RUNS/export-$config  # the EMA weights alone (not kept in the book: 1-2 MB each)
        [ -e $model ] || $EDM export "$RUNS/$config" $model
        for k in $(seq 0 $((RANGES - 1))); do
            seeds=$((k * N_EVAL))-$(((k + 1) * N_EVAL - 1))
            [ -e $OUT/eval-$config-seeds-$seeds.json ] && continue
            $EDM eval $model --seeds $seeds --floor-reference fashion-train --batch 64 \
                --out $OUT/eval-$config-seeds-$seeds.json
        done
    done ;;
record)
    for config in A B C D E F; do
        batch=64; [ $config = A ] && batch=16
        train="edm-lit train --dataset fashion-mnist --preset ddpmpp-fashion-mnist --cond --config $config"
        train+=" --base $BASE --channels $CHANNELS --batch $batch --duration $NIMG --precision bf16 --device cpu"
        ${PY:-.venv/bin/python} benchmarks/run_record.py "$RUNS/$config" $OUT/runs/$config --note "${NOTE:-}" \
            --command "OMP_NUM_THREADS=$OMP_NUM_THREADS BASE=$BASE NIMG=$NIMG bash benchmarks/ladder.sh train" \
            --command "$train"
    done ;;
*)
    echo "usage: bash benchmarks/ladder.sh train|eval|record" >&2; exit 2 ;;
esac
