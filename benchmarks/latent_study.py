"""Chapter 15 measured: the KL weight of the VAE against latent EDM's FID, and latent against pixel EDM at equal time.

For each KL weight β (default 1e-6, 1e-3 and 1: too weak, between, too strong; chapter 15 explains the choice) the
study trains the VAE of `edm_lit.latent` on the Fashion-MNIST training set and records on the test set the
reconstruction MSE per pixel, the KL per image and the σ_data and shape (RMS skewness and excess kurtosis per
coordinate) of latents drawn from q(z | x), and the domain FID of the reconstructions of n training images (the
autoencoder's own limit). It then encodes the training set (one draw of q(z | x) per image), trains latent EDM (the
latents' own σ_data in the preconditioning, the loss and the sampler's σ range) for --minutes of wall-clock time,
draws n images with Heun's sampler (seeds 0..n-1), decodes them and scores them with the domain FID and KID of
chapter 10 against n test images. The pixel EDM of the book (ddpmpp-fashion-mnist, 32 channels, 32x32) is trained for
the same time, so the record compares training throughput, sampling time and FID too. The real-vs-real floor: the
same n training images against the n test images. A timed run first times a few steps on a copy of the network and
then trains for the number of steps that fits the budget; the record keeps the steps and the measured time.

Every stage (a VAE, a latent model, the pixel model) is added to the record when it finishes, and the record is read
back at start: an interrupted study continues where it stopped (the VAE weights are kept in --workdir). With the
defaults it takes about 2 h on 2 CPU cores: 3 VAEs of about 8 min, 4 diffusion models of 20 min, minutes of
sampling and scoring. Ten images
of every stage (reconstructions or samples) go to a small safetensors file beside --out. `--plot PNG` draws the
trade-off into PNG and the images into PNG's name + _samples.png, from those two files.

    OMP_NUM_THREADS=2 python benchmarks/latent_study.py --out book/results/latent/latent_study.json
    python benchmarks/latent_study.py --out book/results/latent/latent_study.json \\
        --plot book/results/latent/latent_study.png
    python benchmarks/latent_study.py --vae-steps 20 --minutes 0.05 --n 16 --steps 4 --source embedded \\
        --out /tmp/l/study.json --workdir /tmp/l   # a quick check of the whole pipeline
"""
import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from study_records import read_record, write_record

PROBE_STEPS = 6  # steps timed (after a first, untimed one) before a budgeted run
SHOWN = 10       # images kept per stage for the figure: one test image per class, or seeds 0..9


def settings_of(args) -> dict:
    """What a record's numbers depend on: a study continues only with the same settings."""
    keys = ('betas', 'vae_steps', 'vae_batch', 'vae_lr', 'vae_channels', 'latent_channels', 'latent_model_channels',
            'pixel_channels', 'minutes', 'batch', 'lr', 'lr_rampup', 'ema', 'precision', 'n', 'steps', 'seed',
            'source', 'train_images')
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in vars(args).items() if k in keys}


def pad32(x: torch.Tensor) -> torch.Tensor:
    """28x28 images padded to 32x32 with the background value -1, as `load_fashion_mnist(pad_to_32=True)`."""
    return x if x.shape[-1] == 32 else torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


class Scorer:
    """Domain features of n test images (the reference) and the floor: n training images against them."""

    def __init__(self, train, test, n: int, seed: int):
        from edm_lit import metrics
        self.metrics, self.phi = metrics, metrics.feature_network('domain', 'cpu')
        g = torch.Generator().manual_seed(seed)
        self.train_pick = train.images[torch.randperm(len(train), generator=g)[:n]]
        self.f_ref = self.features(test.images[torch.randperm(len(test), generator=g)[:n]])
        self.floor = self.score(self.train_pick)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        from edm_lit.features import to_uint8_values
        png = to_uint8_values(pad32(images).clamp(-1, 1)) / 127.5 - 1  # the 8-bit values a PNG would hold
        return self.metrics.extract_features(self.phi, png, 256, 'cpu')

    def score(self, images: torch.Tensor) -> dict:
        f = self.features(images)
        return dict(fid=self.metrics.fid_from_features(f, self.f_ref),
                    kid=self.metrics.kid_from_features(f, self.f_ref, generator=torch.Generator().manual_seed(0)))


def save_vae(vae, path: Path, beta: float) -> None:
    """Weights as safetensors, config as JSON beside them (the house's checkpoint convention)."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, f'{path}.safetensors')
    Path(f'{path}.json').write_text(json.dumps(dict(config=vae.config, beta=beta)) + '\n')


def load_vae(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from edm_lit.latent import VAE
    try:
        vae = VAE(**json.loads(Path(f'{path}.json').read_text())['config'])
        vae.load_state_dict(load_file(f'{path}.safetensors'))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise SystemExit(f'cannot load the VAE {path}.safetensors/.json ({e}): give the --workdir of the run that '
                         f'trained it, or another --out') from None
    return vae.eval().requires_grad_(False)


def timed_training(net, loss_fn, data, args) -> tuple:
    """Train `net` for about args.minutes of wall-clock time with the book's loop (chapter 9); (EMA, facts)."""
    from edm_lit.train import TrainConfig, training_loop
    config = lambda steps: TrainConfig(batch_size=args.batch, total_nimg=steps * args.batch, lr=args.lr,
                                       lr_rampup_nimg=args.lr_rampup, ema_halflife_nimg=args.ema,
                                       log_every=max(1, steps // 50), checkpoint_every=None,
                                       precision=args.precision, seed=args.seed)
    stamps = []
    training_loop(copy.deepcopy(net), loss_fn, data, config(PROBE_STEPS + 1), device='cpu', progress=False,
                  callback=lambda step: stamps.append(time.perf_counter()))
    per_step = (stamps[-1] - stamps[0]) / PROBE_STEPS
    steps = max(1, round(args.minutes * 60 / per_step))
    t0 = time.perf_counter()
    ema, history = training_loop(net, loss_fn, data, config(steps), device='cpu', progress=False)
    seconds = time.perf_counter() - t0
    return ema, dict(params=sum(p.numel() for p in net.parameters()), steps=steps, nimg=steps * args.batch,
                     train_seconds=round(seconds, 1), train_images_per_s=round(steps * args.batch / seconds, 1),
                     final_loss=history[-1]['loss'])


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, round(time.perf_counter() - t0, 2)


def vae_stage(args, beta, train, test, scorer, shown):
    from edm_lit import latent
    vae, seconds = timed(latent.train_vae, train.images, beta, args.vae_steps, args.vae_batch, args.vae_lr,
                         args.seed, args.latent_channels, args.vae_channels)
    save_vae(vae, args.workdir / f'vae-beta{beta:g}', beta)
    recon = latent.decode(vae, latent.encode(vae, scorer.train_pick)).clamp(-1, 1)
    s = scorer.score(recon)
    r = dict(beta=beta, **latent.measure_vae(vae, test.images, args.seed),
             gaussian_floor=latent.gaussian_floor(len(test)), recon_fid=s['fid'], recon_kid=s['kid'],
             train_seconds=seconds, train_images_per_s=round(args.vae_steps * args.vae_batch / seconds, 1))
    return r, latent.decode(vae, latent.encode(vae, shown)).clamp(-1, 1)


def latent_stage(args, beta, train, test, scorer, shown):
    from edm_lit import latent
    from edm_lit.data import ImageSet
    vae = load_vae(args.workdir / f'vae-beta{beta:g}')
    z = latent.encode(vae, train.images, sample=True, generator=torch.Generator().manual_seed(args.seed))
    sigma_data = latent.latent_sigma_data(z)
    torch.manual_seed(args.seed)
    net = latent.latent_denoiser(sigma_data, args.latent_channels, model_channels=args.latent_model_channels)
    ema, facts = timed_training(net, latent.latent_loss(sigma_data), ImageSet(z, train.labels, 'latents'), args)
    images, seconds = timed(latent.sample_latent_images, ema, vae, range(args.n), args.steps, args.sample_batch)
    return dict(beta=beta, sigma_data=sigma_data, **facts, **scorer.score(images), sample_seconds=seconds), images


def pixel_stage(args, beta, train, test, scorer, shown):
    from edm_lit.data import ImageSet
    from edm_lit.loss import EDMLoss
    from edm_lit.networks import make_network
    from edm_lit.precond import EDMPrecond
    from edm_lit.samplers import heun_sampler
    from sampler_study import generate
    torch.manual_seed(args.seed)
    net = EDMPrecond(make_network('ddpmpp-fashion-mnist', model_channels=args.pixel_channels, augment_dim=0,
                                  dropout=0.0))
    ema, facts = timed_training(net, EDMLoss(), ImageSet(pad32(train.images), train.labels, train.source), args)
    images, seconds = timed(generate, ema, heun_sampler, list(range(args.n)), args.steps, 0, args.sample_batch)
    return dict(sigma_data=ema.sigma_data, **facts, **scorer.score(images), sample_seconds=seconds), images


STAGES = {'vae': vae_stage, 'latent': latent_stage, 'pixel': pixel_stage}


def save_images(path: Path, name: str, images: torch.Tensor) -> None:
    """Add SHOWN images (8-bit, 28x28: pixel samples lose their padding) to the safetensors file of the figure."""
    from safetensors.torch import load_file, save_file
    from edm_lit.features import to_uint8_values
    stored = load_file(str(path)) if path.exists() else {}
    images = images[:SHOWN, :, 2:30, 2:30] if images.shape[-1] == 32 else images[:SHOWN]
    stored[name] = to_uint8_values(images.clamp(-1, 1)).to(torch.uint8).contiguous()
    tmp = path.with_suffix('.tmp')
    save_file(stored, str(tmp))
    tmp.replace(path)


def images_path(out: Path) -> Path:
    return out.with_name(out.stem + '_images.safetensors')


def run(args) -> int:
    from edm_lit.data import DataError, load_fashion_mnist
    out = Path(args.out)
    record, settings = read_record(out, 'latent-study', 'settings'), settings_of(args)
    if record is not None and record['settings'] != settings:
        diff = {k: record['settings'].get(k) for k in settings if record['settings'].get(k) != settings[k]}
        raise SystemExit(f'{out} holds a study with other settings {diff}: give the same ones, or another --out')
    try:
        train = load_fashion_mnist(True, source=args.source, limit=args.train_images)
        test = load_fashion_mnist(False, source=args.source)
    except DataError as e:
        raise SystemExit(f'{Path(__file__).name}: {e}') from None
    if args.n > min(len(train), len(test)) or args.vae_batch > len(train):
        raise SystemExit(f'--n {args.n} and --vae-batch {args.vae_batch}: the {train.source} data hold {len(train)} '
                         f'training and {len(test)} test images; neither may exceed them')
    args.workdir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(train, test, args.n, args.seed)
    shown = test.images[torch.stack([torch.nonzero(test.labels == c)[0, 0] for c in range(SHOWN)])]
    if record is None:
        record = dict(command=' '.join(['python', *sys.argv]), settings=settings, data_source=train.source,
                      train_images=len(train), test_images=len(test),
                      hardware=f'{platform.machine()}, {os.cpu_count()} cores, no GPU',
                      omp_num_threads=os.environ.get('OMP_NUM_THREADS'), torch=torch.__version__,
                      floor_fid=scorer.floor['fid'], floor_kid=scorer.floor['kid'], results=[])
        save_images(images_path(out), 'test', shown)
        write_record(out, record)
        print(f"floor (n={args.n} training vs test images): FID {record['floor_fid']:.3f}", flush=True)
    todo = [('vae', b) for b in args.betas] + [('latent', b) for b in args.betas] + [('pixel', None)]
    for stage, beta in todo:
        name = stage if beta is None else f'{stage}-beta{beta:g}'
        if name in {r['name'] for r in record['results']}: continue
        t0 = time.time()
        r, images = STAGES[stage](args, beta, train, test, scorer, shown)
        record['results'].append(dict(name=name, stage=stage, **r, seconds=round(time.time() - t0, 1)))
        save_images(images_path(out), name, images)
        write_record(out, record)  # after every stage: an interrupted study keeps what it measured
        score = f"recon FID {r['recon_fid']:.2f}, KL {r['kl']:.0f}, MSE {r['reconstruction_mse']:.4f}" \
            if stage == 'vae' else f"FID {r['fid']:.2f}, {r['train_images_per_s']:.0f} img/s"
        print(f"{name:<20} {score}, sigma_data {r['sigma_data']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    return 0


def plot(args) -> int:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from safetensors.torch import load_file
    out = Path(args.out)
    record = read_record(out, 'latent-study', 'settings')
    if record is None: raise SystemExit(f'{out} not found: run the study first')
    by = {r['name']: r for r in record['results']}
    vaes = [by[f'vae-beta{b:g}'] for b in record['settings']['betas'] if f'vae-beta{b:g}' in by]
    lats = [by[f'latent-beta{b:g}'] for b in record['settings']['betas'] if f'latent-beta{b:g}' in by]
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8), dpi=150)
    ax = axes[0]
    ax.loglog([r['beta'] for r in vaes], [r['reconstruction_mse'] for r in vaes], 'o-', label='MSE per pixel')
    dims = record['settings']['latent_channels'] * 49  # 7x7 latents
    ax.loglog([r['beta'] for r in vaes], [r['kl'] / dims for r in vaes], 's--', label='KL per latent (nats)')
    ax.set(xlabel='KL weight β', title='autoencoder')
    ax = axes[1]
    ax.semilogx([r['beta'] for r in vaes], [r['sigma_data'] for r in vaes], 'o-', label='σ_data')
    ax.semilogx([r['beta'] for r in vaes], [r['excess_kurtosis'] for r in vaes], 's--', label='RMS excess kurtosis')
    ax.set(xlabel='KL weight β', title='latents')
    ax = axes[2]
    ax.loglog([r['beta'] for r in lats], [r['fid'] for r in lats], 'o-', label='latent EDM')
    ax.loglog([r['beta'] for r in vaes], [r['recon_fid'] for r in vaes], 's--', label='reconstructions')
    if 'pixel' in by: ax.axhline(by['pixel']['fid'], color='C2', label='pixel EDM')
    ax.axhline(record['floor_fid'], color='k', ls=':', label='real vs real')
    ax.set(xlabel='KL weight β', title=f"domain FID, n = {record['settings']['n']}")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which='both')
    fig.tight_layout()
    fig.savefig(args.plot)
    stored = load_file(str(images_path(out))) if images_path(out).exists() else {}
    rows = [(k, lab) for k, lab in [('test', 'test images')] +
            [(f'vae-beta{b:g}', f'decoded, β = {b:g}') for b in record['settings']['betas']] +
            [(f'latent-beta{b:g}', f'latent EDM, β = {b:g}') for b in record['settings']['betas']] +
            [('pixel', 'pixel EDM')] if k in stored]
    fig, axes = plt.subplots(len(rows), SHOWN, figsize=(7.5, 0.62 * len(rows)), dpi=150, squeeze=False)
    for i, (key, label) in enumerate(rows):
        for j in range(SHOWN):
            axes[i, j].imshow(stored[key][j, 0], cmap='gray', vmin=0, vmax=255)
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(label, fontsize=10, rotation=0, ha='right', va='center')
    fig.subplots_adjust(left=0.27, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.08)
    samples_png = Path(args.plot).with_name(Path(args.plot).stem + '_samples.png')
    fig.savefig(samples_png)
    print(f'wrote {args.plot} and {samples_png}')
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n')[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='the results JSON (read back and extended)')
    p.add_argument('--workdir', type=Path, default=Path('runs/latent_study'),
                   help='where the VAE weights are kept between stages (default runs/latent_study)')
    p.add_argument('--plot', metavar='PNG', help='draw the trade-off (and PNG_samples.png) from --out, no measuring')
    p.add_argument('--betas', type=float, nargs='+', default=[1e-6, 1e-3, 1.0], help='KL weights (default 1e-6 1e-3 1)')
    p.add_argument('--vae-steps', type=int, default=5000, help='VAE training steps (default 5000)')
    p.add_argument('--vae-batch', type=int, default=128, help='VAE batch size (default 128)')
    p.add_argument('--vae-lr', type=float, default=1e-3, help='VAE learning rate, cosine-decayed (default 1e-3)')
    p.add_argument('--vae-channels', type=int, nargs=2, default=[32, 64], metavar=('C1', 'C2'),
                   help='VAE channels at 14x14 and 7x7 (default 32 64)')
    p.add_argument('--latent-channels', type=int, default=4, help='latent channels at 7x7 (default 4)')
    p.add_argument('--latent-model-channels', type=int, default=96, help='latent U-Net channels (default 96)')
    p.add_argument('--pixel-channels', type=int, default=32, help='pixel U-Net channels (default 32)')
    p.add_argument('--minutes', type=float, default=20.0, help='training time of each diffusion model (default 20)')
    p.add_argument('--batch', type=int, default=64, help='diffusion batch size (default 64)')
    p.add_argument('--lr', type=float, default=2e-3, help='diffusion learning rate (default 2e-3)')
    p.add_argument('--lr-rampup', type=int, default=20_000, help='lr ramp-up in images (default 20000)')
    p.add_argument('--ema', type=int, default=50_000, help='EMA half-life in images (default 50000)')
    p.add_argument('--precision', choices=('fp32', 'bf16'), default='bf16', help='diffusion training (default bf16)')
    p.add_argument('--n', type=int, default=1000, help='images sampled per model, and reference images (default 1000)')
    p.add_argument('--steps', type=int, default=18, help='Heun steps N (default 18: 35 NFE)')
    p.add_argument('--sample-batch', type=int, default=250, help='images per sampler call (default 250)')
    p.add_argument('--seed', type=int, default=0, help='seed of every stage (default 0)')
    p.add_argument('--source', default='auto', choices=('auto', 'debian', 'torchvision', 'embedded'),
                   help='Fashion-MNIST source (default auto: Debian package, else embedded subset)')
    p.add_argument('--train-images', type=int, help='use only the first N training images (default all)')
    args = p.parse_args(argv)
    if args.plot: return plot(args)
    bad = [b for b in args.betas if not (math.isfinite(b) and b > 0)]
    if bad: p.error(f'--betas must be finite numbers > 0; got {bad}')
    if len(set(args.betas)) != len(args.betas): p.error(f'--betas must differ from each other; got {args.betas}')
    positive = dict(vae_steps=args.vae_steps, vae_batch=args.vae_batch, vae_lr=args.vae_lr, batch=args.batch,
                    lr=args.lr, steps=args.steps, sample_batch=args.sample_batch, latent_channels=args.latent_channels,
                    latent_model_channels=args.latent_model_channels, pixel_channels=args.pixel_channels,
                    minutes=args.minutes, vae_channels=min(args.vae_channels))
    if args.train_images is not None: positive['train_images'] = args.train_images
    bad = {k: v for k, v in positive.items() if not (math.isfinite(v) and v > 0)}
    if bad: p.error('these must be > 0: ' + ', '.join(f"--{k.replace('_', '-')} {v}" for k, v in bad.items()))
    if args.n < 2 or args.seed < 0 or args.lr_rampup < 0 or args.ema <= 0:
        p.error(f'--n must be >= 2, --seed and --lr-rampup >= 0, --ema > 0; got {args.n}, {args.seed}, '
                f'{args.lr_rampup}, {args.ema}')
    return run(args)


if __name__ == '__main__':
    sys.exit(main())
