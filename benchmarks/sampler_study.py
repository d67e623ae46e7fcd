"""The paper's sampler study (its Fig. 2 and 4) on a real network: domain FID against NFE for each sampler.

Loads a checkpoint (EMA weights), draws n images per (sampler, steps) setting with one seed per image (seeds
start..start+n-1, labels seed % 10 for a conditional model) and scores them with `edm_lit.metrics` (chapter 10):
domain FID and KID against n Fashion-MNIST test images, beside the real-vs-real floor at the same n (n training
images against the same n test images). Samplers: Euler and Heun on the EDM discretization (chapter 3); Algorithm 2
with a grid of gamma = S_churn / N and S_noise (chapter 4); iPNDM, DPM-Solver++(2M) and UniPC (chapter 11); and the VP and VE
columns of the ablation sampler (their time steps, schedules and scalings, Heun) on this EDM-trained network.

The results file is written after every setting and read back at start: an interrupted study continues where it
stopped (settings up to 35 NFE come first, so a study cut short still has every family), and `--only` adds
settings to an existing file. `--plot PNG` draws FID against NFE from the file.

    OMP_NUM_THREADS=2 python benchmarks/sampler_study.py book/results/fashion_edm/model \\
        --n 1000 --out book/results/fashion_edm/sampler_study.json
    python benchmarks/sampler_study.py --plot book/results/fashion_edm/sampler_study.png \\
        --out book/results/fashion_edm/sampler_study.json
    python benchmarks/sampler_study.py MODEL --n 16 --only heun-4 --out /tmp/s.json   # a quick check
"""
import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

from study_records import read_record, write_record

CHURN = dict(S_min=0.05, S_max=50.0)  # the official ImageNet-64 window; S_churn and S_noise vary


def settings() -> list[dict]:
    """Every (sampler, steps) setting of the study: name, family, sampler parameters, num_steps and NFE."""
    out = []
    add = lambda name, family, steps, nfe, **kw: out.append(dict(name=f'{name}-{steps}', family=family,
                                                                 num_steps=steps, nfe=nfe, params=kw))
    # the order of a study cut short: Heun first (the reference), then Euler, the VP/VE columns, multistep, churn
    for n in (4, 6, 9, 13, 18, 25): add('heun', 'Heun, Alg. 1 (EDM)', n, 2 * n - 1, kind='edm', S_churn=0.0)
    for n in (8, 16, 32, 64): add('euler', 'Euler (EDM)', n, n, kind='ablation', solver='euler')
    for base, scaling in (('vp', 'vp'), ('ve', 'none')):
        for n in (9, 18, 40):
            add(f'{base}-heun', f'{base.upper()} time steps, schedule and scaling (Heun)', n, 2 * n - 1,
                kind='ablation', solver='heun', discretization=base, schedule=base, scaling=scaling)
    for solver, label in (('ipndm', 'iPNDM'), ('dpmpp_2m', 'DPM-Solver++(2M)'), ('unipc', 'UniPC')):
        for n in (5, 8, 12, 18, 25): add(solver, label, n, n, kind='multistep', solver=solver)
    # gamma_i = min(S_churn / N, sqrt(2) - 1): S_churn is given as a multiple of N, so gamma is the same at every N
    for gamma, noise, steps in ((0.1, 1.003, (9, 18, 40)), (0.4, 1.003, (9, 18, 40)), (0.4, 1.0, (18,))):
        for n in steps:
            add(f'churn-g{gamma:g}-noise{noise:g}', f'Alg. 2, γ = S_churn/N = {gamma:g}, S_noise {noise:g}', n,
                2 * n - 1, kind='edm', S_churn=round(gamma * n, 6), S_noise=noise, **CHURN)
    return out


def sampler_fn(params: dict):
    """The sampler of a setting, as fn(net, latents, class_labels, randn_like=..., num_steps=...)."""
    from edm_lit.solvers import multistep_sampler
    from edm_lit.stochastic import ablation_sampler, edm_sampler
    kw = {k: v for k, v in params.items() if k != 'kind'}
    return partial({'edm': edm_sampler, 'ablation': ablation_sampler, 'multistep': multistep_sampler}[params['kind']],
                   **kw)


def generate(net, fn, seeds, num_steps: int, label_dim: int, batch: int) -> torch.Tensor:
    """Images in [-1, 1] (quantized to 8 bits as PNGs would be), one seed each, labels seed % label_dim."""
    from edm_lit.stochastic import StackedRandomGenerator
    out = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        rnd = StackedRandomGenerator('cpu', chunk)
        labels = torch.eye(label_dim)[torch.tensor(chunk) % label_dim] if label_dim else None
        with torch.no_grad():
            x = fn(net, rnd.randn([len(chunk), net.model.in_channels, net.model.img_resolution,
                                   net.model.img_resolution]), labels, randn_like=rnd.randn_like, num_steps=num_steps)
        if not torch.isfinite(x).all(): raise ValueError(f'non-finite images from seeds {chunk[0]}..{chunk[-1]}')
        out.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8))
    return torch.cat(out).float() / 127.5 - 1


def reference_features(n: int, seed: int = 0):
    """Domain features of n test images (the reference) and of n training images (the floor's other set)."""
    from edm_lit import metrics
    from edm_lit.data import load_fashion_mnist
    phi = metrics.feature_network('domain', 'cpu')
    g = torch.Generator().manual_seed(seed)
    sets = []
    for train in (False, True):
        data = load_fashion_mnist(train=train, pad_to_32=True)
        if len(data) < n: raise ValueError(f'n={n}: Fashion-MNIST ({data.source}) has only {len(data)} images')
        pick = data.images[torch.randperm(len(data), generator=g)[:n]]
        sets.append(metrics.extract_features(phi, pick, 256, 'cpu'))
    return phi, sets[0], sets[1], data.source


def scores(f_gen, f_ref, seed: int = 0) -> dict:
    from edm_lit import metrics
    g = torch.Generator().manual_seed(seed)
    return dict(fid=metrics.fid_from_features(f_gen, f_ref), kid=metrics.kid_from_features(f_gen, f_ref, generator=g))


def run(args) -> int:
    from edm_lit.cli.sample import load_net
    from edm_lit import metrics
    out = Path(args.out)
    record = read_record(out, 'sampler-study', 'n')
    todo = [s for s in settings() if (not args.only or s['name'] in args.only) and s['nfe'] <= args.max_nfe]
    todo.sort(key=lambda s: s['nfe'] > 35)  # stable: every family up to 35 NFE first, then the long settings
    unknown = set(args.only or ()) - {s['name'] for s in settings()}
    if unknown: raise SystemExit(f'--only: unknown settings {sorted(unknown)}; known: {[s["name"] for s in settings()]}')
    if record is not None and (record['n'], record['seed_start'], record['checkpoint']) != \
            (args.n, args.seed_start, str(args.checkpoint)):
        raise SystemExit(f'{out} holds a study of n={record["n"]}, seeds from {record["seed_start"]}, '
                         f'{record["checkpoint"]}: give the same --n, --seed-start and checkpoint, or another --out')
    net, meta = load_net(args.checkpoint, 'ema', 'cpu')
    label_dim = meta['model']['overrides'].get('label_dim', 0)
    phi, f_ref, f_floor, source = reference_features(args.n)
    if record is None:
        floor = scores(f_floor, f_ref)
        record = dict(command=' '.join(['python', *sys.argv]), checkpoint=str(args.checkpoint), step=meta['step'],
                      nimg=meta.get('nimg'), n=args.n, seed_start=args.seed_start, data_source=source,
                      hardware=f'{platform.machine()}, {os.cpu_count()} cores, no GPU',
                      omp_num_threads=os.environ.get('OMP_NUM_THREADS'), torch=torch.__version__,
                      floor_fid=floor['fid'], floor_kid=floor['kid'], results=[])
        print(f'floor (n={args.n} training vs test images): FID {floor["fid"]:.3f}  KID {floor["kid"]:.5f}', flush=True)
    done = {r['name'] for r in record['results']}
    seeds = list(range(args.seed_start, args.seed_start + args.n))
    for s in todo:
        if s['name'] in done: continue
        t0 = time.time()
        images = generate(net, sampler_fn(s['params']), seeds, s['num_steps'], label_dim, args.batch)
        f_gen = metrics.extract_features(phi, images, 256, 'cpu')
        r = dict(s, **scores(f_gen, f_ref), seconds=round(time.time() - t0, 1))
        record['results'].append(r)
        write_record(out, record)  # after every setting: an interrupted study keeps what it measured
        print(f'{s["name"]:<24} NFE {s["nfe"]:>3}  FID {r["fid"]:8.3f}  KID {r["kid"]:.5f}  ({r["seconds"]:.0f} s)',
              flush=True)
    return 0


def plot(args) -> int:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    record = read_record(Path(args.out), 'sampler-study', 'n')
    if record is None: raise SystemExit(f'{args.out} not found: run the study first')
    families = {}
    for r in record['results']: families.setdefault(r['family'], []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=150)
    for family, rows in families.items():
        rows = sorted(rows, key=lambda r: r['nfe'])
        ax.plot([r['nfe'] for r in rows], [r['fid'] for r in rows], 'o-', ms=4, label=family)
    ax.axhline(record['floor_fid'], color='k', ls=':', label=f'real-vs-real floor ({record["floor_fid"]:.2f})')
    ax.set(xscale='log', yscale='log', xlabel='NFE (network evaluations per image)',
           ylabel=f'domain FID (n = {record["n"]})')
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which='both')
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f'wrote {args.plot}')
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n')[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', nargs='?', help='a checkpoint file or run directory (not needed with --plot)')
    p.add_argument('--n', type=int, default=1000, help='images per setting, and reference images (default 1000)')
    p.add_argument('--seed-start', type=int, default=0, help='first seed (default 0)')
    p.add_argument('--batch', type=int, default=250, help='images per sampler call (default 250)')
    p.add_argument('--only', nargs='+', metavar='NAME', help='only these settings (e.g. heun-18 euler-32)')
    p.add_argument('--max-nfe', type=int, default=10**9, metavar='NFE',
                   help='leave the settings above NFE for a later run (default: none left out)')
    p.add_argument('--out', required=True, help='the results JSON (read back and extended)')
    p.add_argument('--plot', metavar='PNG', help='draw FID against NFE from --out instead of measuring')
    args = p.parse_args(argv)
    if args.plot: return plot(args)
    if args.checkpoint is None: p.error('a checkpoint is needed (or --plot)')
    if args.n < 2 or args.batch < 1 or args.seed_start < 0:
        p.error(f'--n must be >= 2, --batch >= 1, --seed-start >= 0; got {args.n}, {args.batch}, {args.seed_start}')
    from edm_lit.checkpoints import CheckpointError
    try: return run(args)
    except CheckpointError as e: raise SystemExit(f'{Path(__file__).name}: {e}') from None  # a message, not a traceback


if __name__ == '__main__':
    sys.exit(main())
