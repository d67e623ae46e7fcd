"""The record of the book's real model (benchmarks/fashion_edm.sh export): run.json, loss.png and progress.png.

    python benchmarks/fashion_edm_record.py runs/fashion-edm book/results/fashion_edm [--note TEXT]

run.json holds the commands, the hardware, the steps, the batch, the wall time of the training (the last line of
metrics.jsonl) and the images per second, read from the run folder's latest checkpoint and metrics; loss.png is the
loss curve; progress.png puts the run's sample grids (`--grid-every`) side by side.
"""
import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

COMMANDS = [
    'OMP_NUM_THREADS=2 edm-lit train --dataset fashion-mnist --preset ddpmpp-fashion-mnist --channels 32 --cond '
    '--label-dropout 0.1 --dropout 0 --batch 64 --steps 6250 --lr 2e-3 --lr-rampup 20k --ema 50k --precision bf16 '
    '--checkpoint-every 500 --keep 0 --grid-every 1250 --log-every 50 --device cpu --quiet --outdir runs/fashion-edm',
    'edm-lit export runs/fashion-edm book/results/fashion_edm/model',
]


def cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('run', type=Path)
    p.add_argument('out', type=Path)
    p.add_argument('--note', default='', help='anything the numbers alone do not say (e.g. pauses)')
    args = p.parse_args(argv)
    from edm_lit import checkpoints
    latest = checkpoints.find_latest(args.run)
    meta = checkpoints.read_meta(latest)
    log = [json.loads(s) for s in (args.run / 'metrics.jsonl').read_text().splitlines() if s.strip()]
    steps, batch = log[-1]['step'], meta['config']['batch_size']
    flags = ' '.join(f for f in ('avx512_bf16', 'amx_bf16') if f in Path('/proc/cpuinfo').read_text())
    record = dict(commands=COMMANDS, hardware=f'{os.cpu_count()}-core {cpu_name()} ({flags}), no GPU',
                  torch=torch.__version__, omp_num_threads=os.environ.get('OMP_NUM_THREADS'), steps=steps,
                  batch=batch, images=steps * batch, train_seconds=log[-1]['time'],
                  images_per_second=round(steps * batch / log[-1]['time'], 1), checkpoint=latest.name,
                  run_id=meta.get('run_id'), model=meta['model'], config=meta['config'],
                  data={k: meta['data'].get(k) for k in ('dataset', 'source', 'num_images', 'fingerprint', 'cond')},
                  note=args.note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'run.json').write_text(json.dumps(record, indent=1) + '\n')
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image
    nimg = np.array([r['nimg'] for r in log]) / 1e6
    loss = np.array([r['loss'] for r in log])
    fig, ax = plt.subplots(figsize=(7.5, 3.4), dpi=150)
    ax.plot(nimg, loss, '.', ms=3, alpha=0.5, label='mean loss of 50 steps')
    k = 9
    ax.plot(nimg[k // 2:len(loss) - k // 2], np.convolve(loss, np.ones(k) / k, mode='valid'), lw=2,
            label=f'mean over {k * 50} steps')
    ax.set(yscale='log', xlabel='training images seen (millions)', ylabel='EDM loss')
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3, which='both')
    fig.tight_layout()
    fig.savefig(args.out / 'loss.png')
    grids = sorted(args.run.glob('grid-*.png'))
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(1.6 * len(grids), 2.0), dpi=150)
        for ax, g in zip(np.atleast_1d(axes), grids):
            ax.imshow(np.asarray(Image.open(g)), cmap='gray', vmin=0, vmax=255)
            ax.set_title(f'{int(g.stem.split("-")[1]) * batch / 1e3:.0f}k images', fontsize=9)
            ax.set_xticks([]); ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(args.out / 'progress.png')
    print(f'{args.out / "run.json"}: {steps} steps x {batch} in {log[-1]["time"] / 3600:.2f} h '
          f'({record["images_per_second"]} images/s); loss.png{", progress.png" if grids else ""}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
