#!/usr/bin/env bash
# The book's real model, end to end: train on 2 CPU cores, export the EMA weights, score them, study the samplers.
# Every step is a command of the edm-lit CLI or a committed benchmark script; the outputs land in
# book/results/fashion_edm/ (small: the EMA checkpoint, JSON records, PNGs). Run from the repository root:
#
#     bash benchmarks/fashion_edm.sh train    # ~1.5 h on 2 cores (resume after an interruption: run it again)
#     bash benchmarks/fashion_edm.sh export   # EMA weights + metrics + the run record into book/results/fashion_edm
#     bash benchmarks/fashion_edm.sh eval     # 3 x 10,000 samples, FID/KID against the test set (~31 min each)
#     bash benchmarks/fashion_edm.sh study    # FID against NFE for every sampler, n = 1,000 (~1.5 h; resumable)
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
EDM=${EDM:-.venv/bin/edm-lit}
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/fashion-edm}
OUT=book/results/fashion_edm
STEPS=6250

case "${1:-}" in
train)
    if [ -e "$RUN/metrics.jsonl" ]; then
        $EDM train --resume "$RUN" --steps $STEPS --quiet
    else
        $EDM train --dataset fashion-mnist --preset ddpmpp-fashion-mnist --channels 32 --cond --label-dropout 0.1 \
            --dropout 0 --batch 64 --steps $STEPS --lr 2e-3 --lr-rampup 20k --ema 50k --precision bf16 \
            --checkpoint-every 500 --keep 0 --grid-every 1250 --log-every 50 --device cpu --quiet --outdir "$RUN"
    fi ;;
export)
    mkdir -p $OUT
    $EDM export "$RUN" $OUT/model
    cp "$RUN/metrics.jsonl" $OUT/metrics.jsonl
    $PY benchmarks/fashion_edm_record.py "$RUN" $OUT ;;
eval)
    for seeds in 0-9999 10000-19999 20000-29999; do
        [ -e $OUT/eval-seeds-$seeds.json ] && continue
        $EDM eval $OUT/model --seeds $seeds --floor-reference fashion-train --batch 32 \
            --out $OUT/eval-seeds-$seeds.json
    done ;;
study)
    $PY benchmarks/sampler_study.py $OUT/model --n 1000 --batch 32 --out $OUT/sampler_study.json
    $PY benchmarks/sampler_study.py --out $OUT/sampler_study.json --plot $OUT/sampler_study.png ;;
*)
    echo "usage: bash benchmarks/fashion_edm.sh train|export|eval|study" >&2; exit 2 ;;
esac
