#!/usr/bin/env bash
# The book's real model, end to end: train on 2 CPU cores, export the EMA weights, score them, study the samplers
# and guidance. Every step is a command of the edm-lit CLI or a committed benchmark script; the outputs land in
# book/results/fashion_edm/ (small: EMA checkpoints, JSON records, PNGs). Run from the repository root:
#
#     bash benchmarks/fashion_edm.sh train     # ~1.5 h on 2 cores (resume after an interruption: run it again)
#     bash benchmarks/fashion_edm.sh export    # EMA weights + metrics + the run record into book/results/fashion_edm
#     bash benchmarks/fashion_edm.sh eval      # 3 x 10,000 samples, FID/KID against the test set (~31 min each)
#     bash benchmarks/fashion_edm.sh study     # FID against NFE for every sampler, n = 500 (~50 min; resumable)
#     bash benchmarks/fashion_edm.sh guides    # two weaker models for autoguidance (~10 min)
#     bash benchmarks/fashion_edm.sh guidance  # pick the guide, then CFG and autoguidance against w (~25 min)
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
EDM=${EDM:-.venv/bin/edm-lit}
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/fashion-edm}
GUIDE_RUN=${GUIDE_RUN:-runs/fashion-guide-16ch}
OUT=book/results/fashion_edm
STEPS=6250
RECIPE="--dataset fashion-mnist --preset ddpmpp-fashion-mnist --cond --label-dropout 0.1 --dropout 0 --batch 64
        --lr 2e-3 --lr-rampup 20k --ema 50k --log-every 50 --device cpu --quiet"

case "${1:-}" in
train)
    if compgen -G "$RUN/training-state-*.json" > /dev/null; then  # a checkpoint to resume from
        $EDM train --resume "$RUN" --steps $STEPS --quiet
    else
        $EDM train $RECIPE --channels 32 --steps $STEPS --precision bf16 --checkpoint-every 500 --keep 0 \
            --grid-every 1250 --outdir "$RUN"
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
    $PY benchmarks/sampler_study.py $OUT/model --n 500 --batch 32 --out $OUT/sampler_study.json
    $PY benchmarks/sampler_study.py --out $OUT/sampler_study.json --plot $OUT/sampler_study.png ;;
guides)
    # autoguidance's weaker model of the same task: the run's own snapshot at step 1,000 (64,000 images), and a
    # 16-channel model (a quarter of the parameters) trained by the same recipe for 1,000 steps
    [ -e runs/guide-s1000 ] || $EDM export "$RUN/training-state-00001000.json" runs/guide-s1000
    if compgen -G "$GUIDE_RUN/training-state-*.json" > /dev/null; then $EDM train --resume "$GUIDE_RUN" --steps 1000 --quiet
    else $EDM train $RECIPE --channels 16 --steps 1000 --checkpoint-every 250 --outdir "$GUIDE_RUN"; fi
    [ -e runs/guide-16ch ] || $EDM export "$GUIDE_RUN" runs/guide-16ch ;;
guidance)
    # the guide: the one with the lower per-class FID at w = 2 (n = 20 per class); then the sweep, n = 30 per class
    $PY benchmarks/guidance_sweep.py $OUT/model --guide runs/guide-s1000 runs/guide-16ch --weights 2 \
        --n-per-class 20 --out $OUT/guide_choice.json
    GUIDE=$($PY -c "import json, sys; r = json.load(open(sys.argv[1])); a = [x for x in r['results'] if x['guide']]
print(r['guides'][min(a, key=lambda x: x['class_fid'])['guide']])" $OUT/guide_choice.json)
    [ -e $OUT/guide ] || $EDM export "$GUIDE" $OUT/guide
    $PY benchmarks/guidance_sweep.py $OUT/model --guide $OUT/guide --weights 1 2 3 5 8 --n-per-class 30 \
        --out $OUT/guidance_sweep.json
    $PY benchmarks/guidance_sweep.py --out $OUT/guidance_sweep.json --plot $OUT/guidance_sweep.png ;;
*)
    echo "usage: bash benchmarks/fashion_edm.sh train|export|eval|study|guides|guidance" >&2; exit 2 ;;
esac
