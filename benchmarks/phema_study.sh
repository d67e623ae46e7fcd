#!/usr/bin/env bash
# Post-hoc EMA (chapter 14) on a real run: a small Fashion-MNIST model trained with --phema 0.05 0.10, the average
# of many other widths rebuilt from its snapshots after training, each scored on the same seeds. Run from the
# repository root:
#
#     bash benchmarks/phema_study.sh train   # 16 channels, STEPS steps of 64 images, snapshots every 50 steps
#     bash benchmarks/phema_study.sh eval    # `edm-lit phema` + `edm-lit eval` per width, and the run's own EMA
#     bash benchmarks/phema_study.sh plot    # FID against sigma_rel -> book/results/phema/phema_study.png
#     bash benchmarks/phema_study.sh record  # run.json (command, hardware, images/s) and metrics.jsonl beside them
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
EDM=${EDM:-.venv/bin/edm-lit}
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/phema-study}
OUT=${OUT:-book/results/phema}
STEPS=${STEPS:-2500}
N_EVAL=${N_EVAL:-1000}
WIDTHS=${WIDTHS:-"0.02 0.03 0.05 0.07 0.10 0.15 0.20 0.25"}

case "${1:-}" in
train)
    if compgen -G "$RUN/training-state-*.json" > /dev/null; then $EDM train --resume "$RUN" --steps $STEPS --quiet
    else
        $EDM train --dataset fashion-mnist --preset ddpmpp-fashion-mnist --cond --label-dropout 0.1 --dropout 0 \
            --channels 16 --batch 64 --lr 2e-3 --lr-rampup 20k --ema 50k --steps $STEPS --precision bf16 \
            --phema 0.05 0.10 --phema-every 50 --checkpoint-every 250 --keep 1 --log-every 50 --device cpu --quiet \
            --outdir "$RUN"
    fi ;;
eval)
    mkdir -p $OUT
    seeds=0-$((N_EVAL - 1))
    [ -e $OUT/ema.json ] || $EDM eval "$RUN" --seeds $seeds --floor-reference fashion-train --batch 64 \
        --out $OUT/ema.json
    for s in $WIDTHS; do
        [ -e $OUT/sigma-$s.json ] && continue
        rm -rf "$RUN-rebuilt/$s"
        $EDM phema "$RUN" "$RUN-rebuilt/$s" --sigma-rel $s
        $EDM eval "$RUN-rebuilt/$s" --seeds $seeds --floor-reference fashion-train --batch 64 --out $OUT/sigma-$s.json
    done ;;
plot)
    $PY - "$OUT" "$RUN" <<'PLOT'
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from edm_lit.phema import exp_to_std
out, run = Path(sys.argv[1]), Path(sys.argv[2])
rows = sorted((float(p.stem.split('-')[1]), json.loads(p.read_text())) for p in out.glob('sigma-*.json'))
ema = json.loads((out / 'ema.json').read_text())
import math
# the run's EMA: half-life min(50k, r n) with r = 0.05 is r n throughout while n <= 1M images (STEPS <= 15,625 of
# 64): a power profile with gamma + 1 = ln 2 / r (chapter 14)
r = json.loads(sorted(run.glob('training-state-*.json'))[-1].read_text())['config']['ema_rampup_ratio']
ema_sigma = exp_to_std(math.log(2) / r - 1)
fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=150)
ax.plot([s for s, _ in rows], [x['fid'] for _, x in rows], 'o-', label='post-hoc EMA, rebuilt from 0.05 and 0.10')
ax.plot([ema_sigma], [ema['fid']], 's', color='C3', label=f"the run's own EMA (ramp-up, sigma_rel = {ema_sigma:.3f})")
ax.axhline(ema['floor_fid'], color='k', ls=':', label=f"real-vs-real floor (n = {ema['n']})")
ax.set(xscale='log', xlabel='sigma_rel (EMA length / training length)', ylabel=f"domain FID (n = {ema['n']})")
ax.legend(fontsize=7)
ax.grid(alpha=0.3, which='both')
fig.tight_layout()
fig.savefig(out / 'phema_study.png')
print(f'wrote {out / "phema_study.png"}')
PLOT
    ;;
record)
    $PY benchmarks/run_record.py "$RUN" $OUT --command "OMP_NUM_THREADS=$OMP_NUM_THREADS bash benchmarks/phema_study.sh train" \
        --command "bash benchmarks/phema_study.sh eval" --command "bash benchmarks/phema_study.sh plot" \
        --note "${NOTE:-}" ;;
*)
    echo "usage: bash benchmarks/phema_study.sh train|eval|plot|record" >&2; exit 2 ;;
esac
