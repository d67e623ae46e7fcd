"""Chapter 13 on the real model: classifier-free guidance and autoguidance swept over the guidance weight w.

Loads a class-conditional checkpoint trained with label dropout (EMA weights) and, for every setting (method, w),
draws n images per class (seeds start..start+10n-1, label seed % 10, Heun with N steps) from the guided denoiser
D_w = D_0 + w (D_1 - D_0) of `edm_lit.guidance.Guided`: D_0 is the same network without a label (classifier-free
guidance, "cfg") or a weaker checkpoint of the same task with the label (autoguidance, "auto", one curve per --guide).
w = 1 is the unguided model, the same for every method, and is drawn once ("none-w1").

Each setting is scored with the shipped Fashion-MNIST classifier (chapter 10): its accuracy on the requested class
(control), the domain FID of each class's n images against that class's 1,000 test images (the mean over the ten
classes is the headline: quality and diversity within a class), and the domain FID of all 10n images against the
10,000 test images. Floors at the same n: n training images of each class against the class's test images.

The results file is written after every setting and read back at start: an interrupted sweep continues where it
stopped. `--plot PNG` draws both measures against w from the file.

    OMP_NUM_THREADS=2 python benchmarks/guidance_sweep.py book/results/fashion_edm/model \\
        --guide book/results/fashion_edm/guide --out book/results/fashion_edm/guidance_sweep.json
    python benchmarks/guidance_sweep.py --out book/results/fashion_edm/guidance_sweep.json \\
        --plot book/results/fashion_edm/guidance_sweep.png
    python benchmarks/guidance_sweep.py MODEL --n-per-class 4 --weights 2 --out /tmp/g.json   # a quick check
"""
import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from study_records import read_record, write_record

CLASSES = 10


def settings(weights, guides) -> list[dict]:
    """'none-w1' once if 1 is among the weights, then cfg-w<w> and auto-<guide>-w<w> for every other w."""
    out = [dict(name='none-w1', method='none', guide=None, w=1.0)] if 1 in weights else []
    for w in (w for w in weights if w != 1):
        out += [dict(name=f'cfg-w{w:g}', method='cfg', guide=None, w=float(w))]
        out += [dict(name=f'auto-{g}-w{w:g}', method='auto', guide=g, w=float(w)) for g in guides]
    return out


def guide_label(net, meta) -> str:
    """A short name for a guide: its size and training step, e.g. '0.44M-s1000'."""
    return f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M-s{meta['step']}"


def class_sets(n: int, seed: int = 0):
    """Per class: its test images (all of them, the reference) and n of its training images (the floor's set)."""
    from edm_lit.data import load_fashion_mnist
    train, test = (load_fashion_mnist(split, pad_to_32=True) for split in (True, False))
    g = torch.Generator().manual_seed(seed)
    ref = [test.images[test.labels == c] for c in range(CLASSES)]
    floor = []
    for c in range(CLASSES):
        pool = train.images[train.labels == c]
        if len(pool) < n: raise SystemExit(f'--n-per-class {n}: class {c} has only {len(pool)} training images')
        floor.append(pool[torch.randperm(len(pool), generator=g)[:n]])
    return ref, floor, train.source


def scores(f_gen: list, f_ref: list) -> dict:
    """Per-class FID (each class's images against its reference) and its mean, and the FID of all against all."""
    from edm_lit import metrics
    per_class = [metrics.fid_from_features(a, b) for a, b in zip(f_gen, f_ref)]
    return dict(class_fid=sum(per_class) / len(per_class), class_fids=per_class,
                fid_all=metrics.fid_from_features(torch.cat(f_gen), torch.cat(f_ref)))


def run(args) -> int:
    from edm_lit import metrics
    from edm_lit.cli.sample import generate, load_net
    from edm_lit.features import load_classifier
    from edm_lit.guidance import Guided
    out = Path(args.out)
    record = read_record(out, 'guidance-sweep', 'n_per_class')
    net, meta = load_net(args.checkpoint, 'ema', 'cpu')
    over = meta['model']['overrides']
    if over.get('label_dim') != CLASSES or not over.get('label_dropout'):
        raise SystemExit(f'{args.checkpoint}: need a 10-class model trained with label dropout (classifier-free '
                         f'guidance needs its unconditional denoiser)')
    guides = {}
    for path in args.guide or ():
        guide, guide_meta = load_net(path, 'ema', 'cpu')
        if guide_meta['model']['overrides'].get('label_dim') != CLASSES:
            raise SystemExit(f'--guide {path}: not a 10-class model of the same task')
        guides[guide_label(guide, guide_meta)] = (guide, str(path))
    todo = settings(args.weights, list(guides))
    keep = dict(checkpoint=str(args.checkpoint), n_per_class=args.n_per_class, seed_start=args.seed_start,
                num_steps=args.steps)
    if record is not None and any(record[k] != v for k, v in keep.items()):
        raise SystemExit(f'{out} holds a sweep of {({k: record[k] for k in keep})}: give the same checkpoint, '
                         f'--n-per-class, --seed-start and --steps, or another --out')
    clf = load_classifier()
    ref, floor_sets, source = class_sets(args.n_per_class)
    f_ref = [metrics.extract_features(clf.features, x, 256, 'cpu') for x in ref]
    if record is None:
        floor = scores([metrics.extract_features(clf.features, x, 256, 'cpu') for x in floor_sets], f_ref)
        record = dict(command=' '.join(['python', *sys.argv]), **keep, step=meta['step'], nimg=meta.get('nimg'),
                      sampler='heun', nfe=2 * args.steps - 1, data_source=source,
                      hardware=f'{platform.machine()}, {os.cpu_count()} cores, no GPU',
                      omp_num_threads=os.environ.get('OMP_NUM_THREADS'), torch=torch.__version__, guides={},
                      floor_class_fid=floor['class_fid'], floor_class_fids=floor['class_fids'],
                      floor_fid_all=floor['fid_all'], results=[])
        print(f"floor ({args.n_per_class} training images per class vs its test images): class FID "
              f"{floor['class_fid']:.3f}, all {floor['fid_all']:.3f}", flush=True)
    record['guides'].update({k: v[1] for k, v in guides.items()})
    done = {r['name'] for r in record['results']}
    seeds = list(range(args.seed_start, args.seed_start + CLASSES * args.n_per_class))
    labels = torch.tensor(seeds) % CLASSES
    for s in todo:
        if s['name'] in done: continue
        t0, w = time.time(), s['w']
        guide = guides[s['guide']][0] if s['method'] == 'auto' else None
        images = generate(Guided(net, w, guide), seeds, 'heun', args.steps, torch.eye(CLASSES)[labels], args.batch)
        images = images.float() / 127.5 - 1
        f = metrics.extract_features(clf.features, images, 256, 'cpu')
        with torch.no_grad(): hit = (clf.head(f.float()).argmax(1) == labels).double()
        r = dict(s, network_evaluations=(2 * args.steps - 1) * (1 if w == 1 else 2), accuracy=hit.mean().item(),
                 class_accuracy=[hit[labels == c].mean().item() for c in range(CLASSES)],
                 **scores([f[labels == c] for c in range(CLASSES)], f_ref), seconds=round(time.time() - t0, 1))
        record['results'].append(r)
        write_record(out, record)  # after every setting: an interrupted sweep keeps what it measured
        print(f"{s['name']:<22} accuracy {r['accuracy']:.3f}  class FID {r['class_fid']:8.3f}  FID all "
              f"{r['fid_all']:8.3f}  ({r['seconds']:.0f} s)", flush=True)
    return 0


def plot(args) -> int:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    record = read_record(Path(args.out), 'guidance-sweep', 'n_per_class')
    if record is None: raise SystemExit(f'{args.out} not found: run the sweep first')
    base = [r for r in record['results'] if r['method'] == 'none']
    curves = {}
    for r in record['results']:
        if r['method'] != 'none':
            label = 'classifier-free' if r['method'] == 'cfg' else f"autoguidance (guide {r['guide']})"
            curves.setdefault(label, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.2), dpi=150)
    for label, rows in curves.items():
        rows = sorted(base + rows, key=lambda r: r['w'])
        for ax, key in zip(axes, ('class_fid', 'accuracy')):
            ax.plot([r['w'] for r in rows], [r[key] for r in rows], 'o-', ms=4, label=label)
    axes[0].axhline(record['floor_class_fid'], color='k', ls=':', label='real-vs-real floor')
    axes[0].set(xlabel='guidance weight w', ylabel=f"per-class domain FID (n = {record['n_per_class']})",
                yscale='log')
    axes[1].set(xlabel='guidance weight w', ylabel='classifier accuracy on the requested class')
    axes[0].legend(fontsize=7)
    for ax in axes: ax.grid(alpha=0.3, which='both')
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f'wrote {args.plot}')
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n')[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', nargs='?', help='a checkpoint file or run directory (not needed with --plot)')
    p.add_argument('--guide', nargs='+', metavar='CHECKPOINT', help='weaker checkpoints for autoguidance')
    p.add_argument('--weights', type=float, nargs='+', default=[1, 1.5, 2, 3, 5, 8], metavar='W',
                   help='guidance weights (default 1 1.5 2 3 5 8)')
    p.add_argument('--n-per-class', type=int, default=100, help='images per class and setting (default 100)')
    p.add_argument('--steps', type=int, default=18, help='Heun steps N (default 18: 35 NFE)')
    p.add_argument('--seed-start', type=int, default=0, help='first seed (default 0)')
    p.add_argument('--batch', type=int, default=32, help='images per sampler call (default 32)')
    p.add_argument('--out', required=True, help='the results JSON (read back and extended)')
    p.add_argument('--plot', metavar='PNG', help='draw the curves from --out instead of measuring')
    args = p.parse_args(argv)
    if args.plot: return plot(args)
    if args.checkpoint is None: p.error('a checkpoint is needed (or --plot)')
    if args.n_per_class < 2 or args.batch < 1 or args.seed_start < 0 or args.steps < 1:
        p.error(f'--n-per-class must be >= 2, --batch >= 1, --seed-start >= 0, --steps >= 1; got '
                f'{args.n_per_class}, {args.batch}, {args.seed_start}, {args.steps}')
    bad = [w for w in args.weights if not (math.isfinite(w) and w >= 0)]
    if bad: p.error(f'--weights must be finite numbers >= 0; got {bad}')
    from edm_lit.checkpoints import CheckpointError
    try: return run(args)
    except CheckpointError as e: raise SystemExit(f'{Path(__file__).name}: {e}') from None  # a message, not a traceback


if __name__ == '__main__':
    sys.exit(main())
