r"""The `edm-lit` command line: train | sample | info (plain module, not generated).

    edm-lit train --dataset fashion-mnist --resolution 16 --preset ddpmpp-small --batch 16 --steps 300 \
        --lr 2e-3 --lr-rampup 0 --ema 2k --outdir runs/fm   # CPU: ~2 min (OMP_NUM_THREADS=1 on a busy machine)
    edm-lit sample runs/fm --seeds 0-63 --outdir runs/fm/samples
    edm-lit info runs/fm
    torchrun --nproc_per_node=8 -m edm_lit.cli train ...      # one process per GPU (DDP)

Training is `edm_lit.train.training_loop` (chapter 9) around the EDM preconditioning (chapter 5) of a U-Net preset
(chapter 7), the EDM loss (chapter 6) and, optionally, the non-leaky augmentation (chapter 8); sampling is the EDM
sampler, Algorithm 2 (chapter 4), with one seed per image. Bad values exit with status 2 (argument errors) or 1
(everything else: missing data or checkpoints, corrupt files, a diverged loss), always with a message naming them.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import fields
from functools import partial
from pathlib import Path

import torch

from . import checkpoints, datasets, train

__all__ = ['main', 'build_parser', 'build_net', 'generate', 'save_grid', 'parse_count', 'parse_seeds']

SAMPLERS = {'heun': dict(S_churn=0.0), 'churn': dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)}
_SUFFIX = {'': 1, 'k': 10**3, 'M': 10**6, 'G': 10**9}


def parse_count(text: str) -> int:
    """'200M' -> 200000000, '0.5M' -> 500000, '64' -> 64: a whole number of images, >= 0."""
    m = re.fullmatch(r'(\d+(?:\.\d*)?|\.\d+)([kMG]?)', text.strip())
    value = float(m[1]) * _SUFFIX[m[2]] if m else -1
    if not m or value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f'expected a count of images like 5000, 10k or 0.5M, got {text!r}')
    return int(value)


def _number(kind, ok, what):
    def parse(text):
        try: value = kind(text)
        except ValueError: value = None
        if value is None or not ok(value): raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}')
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, 'a positive integer')
nonneg_int = _number(int, lambda v: v >= 0, 'an integer >= 0')
positive_float = _number(float, lambda v: v > 0 and v != float('inf'), 'a positive number')
probability = _number(float, lambda v: 0 <= v <= 1, 'a probability in [0, 1]')


def parse_seeds(text: str) -> list[int]:
    """'0-63' -> [0, ..., 63]; '1,5,10-12' -> [1, 5, 10, 11, 12] (as the official generate.py --seeds)."""
    seeds = []
    for part in text.split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+))?\s*', part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise argparse.ArgumentTypeError(f'expected seeds like 0-63 or 1,5,10-12, got {text!r}')
        seeds += list(range(int(m[1]), int(m[2] or m[1]) + 1))
    return seeds


def build_net(model: dict) -> torch.nn.Module:
    """The EDM-preconditioned U-Net described by a checkpoint's `model` record (preset name + overrides)."""
    from .networks import make_network
    from .precond import EDMPrecond
    return EDMPrecond(make_network(model['preset'], **model['overrides']), label_dim=model['overrides']['label_dim'])


def generate(net, seeds, sampler='heun', num_steps=18, class_labels=None, batch=64, **sampler_kwargs):
    """Images (uint8, N x C x H x W) from the EDM sampler, Alg. 2; image i depends only on seeds[i] (and its label)."""
    from .solvers import SOLVERS
    from .stochastic import StackedRandomGenerator, edm_sampler
    if sampler in SOLVERS and any(v is not None for v in sampler_kwargs.values()):
        raise ValueError(f'S_churn / S_min / S_max / S_noise apply to heun and churn only, not to {sampler!r}')
    sample_fn = SOLVERS[sampler] if sampler in SOLVERS else partial(edm_sampler, **{**SAMPLERS[sampler], **sampler_kwargs})
    p = next(net.parameters())
    shape = (net.model.in_channels, net.model.img_resolution, net.model.img_resolution)
    out = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        rnd = StackedRandomGenerator(p.device, chunk)
        labels = None if class_labels is None else class_labels[start:start + batch].to(p.device)
        with torch.no_grad():
            x = sample_fn(net, rnd.randn([len(chunk), *shape]), labels, randn_like=rnd.randn_like, num_steps=num_steps)
        out.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, path, nrow: int | None = None) -> Path:
    """Tile uint8 images (N, C, H, W) into one PNG."""
    from torchvision.utils import make_grid
    from PIL import Image
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(images, nrow=nrow, padding=0).permute(1, 2, 0).numpy()
    Image.fromarray(grid[..., 0] if images.shape[1] == 1 else grid).save(path)
    return Path(path)


def _model_record(args, data, label_dim: int) -> dict:
    """What `build_net` needs to rebuild the network: the preset and the overrides the data set implies."""
    from .augment import AugmentPipe
    augment_dim = AugmentPipe(p=args.augment).label_dim if args.augment else 0  # 9 with the paper's settings
    overrides = dict(img_resolution=data.images.shape[-1], in_channels=data.images.shape[1],
                     out_channels=data.images.shape[1], label_dim=label_dim, augment_dim=augment_dim)
    if args.dropout is not None: overrides['dropout'] = args.dropout
    return dict(preset=args.preset, overrides=overrides)


def _train_config(args, saved: dict) -> train.TrainConfig:
    """TrainConfig from the flags given, else the resumed checkpoint's values, else the paper's defaults."""
    given = dict(batch_size=args.batch, batch_gpu=args.batch_gpu, lr=args.lr, lr_rampup_nimg=args.lr_rampup,
                 ema_halflife_nimg=args.ema, seed=args.seed, precision=args.precision, log_every=args.log_every,
                 checkpoint_every=args.checkpoint_every, grid_every=args.grid_every, keep=args.keep)
    given.update(compile=args.compile, channels_last=args.channels_last)
    values = {f.name: saved[f.name] for f in fields(train.TrainConfig) if f.name in saved}
    values.update({k: v for k, v in given.items() if v is not None})
    batch = values.get('batch_size', train.TrainConfig.batch_size)
    if args.steps is not None: values['total_nimg'] = args.steps * batch
    elif args.duration is not None: values['total_nimg'] = args.duration
    return train.TrainConfig(**values)


def cmd_train(args) -> int:
    """Train (or resume) a model; checkpoints, metrics.jsonl and sample grids go to --outdir."""
    saved, resume = {}, None
    if args.resume:
        fixed = [f'--{k}' for k in ('dataset', 'data', 'resolution', 'transform', 'preset', 'cond', 'augment',
                                    'dropout') if getattr(args, k) is not None]
        if fixed: raise ValueError(f'{", ".join(fixed)} cannot change when resuming: the checkpoint fixes them')
        resume = checkpoints.find_latest(args.resume)
        saved = checkpoints.read_meta(resume)
        outdir = Path(args.outdir or resume.parent)
    else:
        if args.outdir is None or args.dataset is None or args.preset is None:
            raise ValueError('a new run needs --dataset, --preset and --outdir (or --resume a checkpoint)')
        outdir = Path(args.outdir)
        if checkpoints.list_checkpoints(outdir):
            raise ValueError(f'{outdir} already holds checkpoints; continue with --resume {outdir} or pick a new '
                             f'--outdir')
    config = _train_config(args, saved.get('config', {}))
    d = saved.get('data') or dict(dataset=args.dataset, path=args.data and str(Path(args.data).resolve()),
                                  resolution=args.resolution, transform=args.transform, cond=bool(args.cond),
                                  augment=args.augment or 0.0)
    data = datasets.load_dataset(d['dataset'], d['path'], d['resolution'], d['transform'])
    label_dim = datasets.NUM_CLASSES[d['dataset']] if d['cond'] else 0
    if d['cond'] and not label_dim: raise ValueError(f"--cond needs class labels; dataset {d['dataset']!r} has none")
    model = saved.get('model') or _model_record(args, data, label_dim)
    torch.manual_seed(train.derive_seed(config.seed, train.STREAM_INIT))  # the initial weights
    net = build_net(model)
    augment_pipe = None
    if d['augment']:
        from .augment import AugmentPipe
        augment_pipe = AugmentPipe(p=d['augment'])
    from .loss import EDMLoss

    def grid_fn(ema, path):  # 8 x 8 images on a GPU, 4 x 4 on a CPU (35 NFE each)
        n = 64 if next(ema.parameters()).is_cuda else 16
        labels = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
        save_grid(generate(ema, list(range(n)), class_labels=labels), path)
    meta = dict(model=model, data=dict(d, source=data.source, num_images=len(data)))
    t0 = time.time()
    train.training_loop(net, EDMLoss(), data, config, outdir, meta=meta, label_dim=label_dim, device=args.device,
                        augment_pipe=augment_pipe, resume=resume, grid_fn=grid_fn, progress=not args.quiet)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f'reached step {config.total_steps} ({config.total_steps * config.batch_size} images) after '
              f'{time.time() - t0:.1f} s; latest checkpoint: {checkpoints.find_latest(outdir)}')
    return 0


def _load_net(path, weights: str, device):
    json_path = checkpoints.find_latest(path)
    tensors, meta = checkpoints.load_checkpoint(json_path)
    net = build_net(meta['model'])
    checkpoints.load_module(net, tensors, weights, json_path)
    return net.eval().requires_grad_(False).to(device), meta


def cmd_sample(args) -> int:
    """Write one PNG per seed and a grid, from a checkpoint's EMA (or raw) weights."""
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    net, meta = _load_net(args.checkpoint, args.weights, device)
    label_dim = meta['model']['overrides']['label_dim']
    labels = None
    if args.class_label is not None and not label_dim:
        raise ValueError(f'--class {args.class_label} given, but the model in {args.checkpoint} is unconditional')
    if label_dim:
        classes = torch.tensor([args.class_label] * len(args.seeds)) if args.class_label is not None \
            else torch.tensor(args.seeds) % label_dim
        if classes.max() >= label_dim: raise ValueError(f'--class {args.class_label} is not in 0..{label_dim - 1}')
        labels = torch.eye(label_dim)[classes]
    kwargs = {k: getattr(args, k) for k in ('S_churn', 'S_min', 'S_max', 'S_noise') if getattr(args, k) is not None}
    images = generate(net, args.seeds, args.sampler, args.steps, labels, args.batch, **kwargs)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    for seed, image in zip(args.seeds, images): save_grid(image[None], out / f'{seed:06d}.png', nrow=1)
    save_grid(images, out / 'grid.png')
    print(f'wrote {len(images)} PNG file(s) and grid.png to {out}')
    return 0


def cmd_info(args) -> int:
    """Print a checkpoint's configuration and parameter count."""
    net, meta = _load_net(args.checkpoint, 'ema', 'cpu')
    summary = dict(checkpoint=str(checkpoints.find_latest(args.checkpoint)), step=meta['step'], nimg=meta['nimg'],
                   parameters=sum(p.numel() for p in net.parameters()), model=meta['model'], data=meta['data'],
                   config=meta['config'], world_size=meta['world_size'], torch=meta['torch'])
    print(json.dumps(summary, indent=1))
    return 0


def _train_parser(sub, presets):
    p = sub.add_parser('train', help='train a model (or resume one)', description=cmd_train.__doc__,
                       epilog='example (CPU, ~2 minutes): edm-lit train --dataset fashion-mnist --resolution 16 '
                              '--preset ddpmpp-small --batch 16 --steps 300 --lr 2e-3 --lr-rampup 0 --ema 2k '
                              '--outdir runs/fm')
    a = p.add_argument
    a('--dataset', choices=datasets.DATASETS, help='the training images')
    a('--data', metavar='PATH', help='image folder (dataset folder), or download root (fashion-mnist, cifar10)')
    a('--resolution', type=positive_int, help='image size (folder: any, with --transform; fashion-mnist and cifar10: '
                                               '32 or an average-pooled 16, 8, ...)')
    a('--transform', choices=datasets.TRANSFORMS, help='for dataset folder: how to bring images to --resolution')
    a('--preset', choices=presets, help='network preset (chapter 7)')
    a('--cond', action='store_true', default=None, help='class-conditional (fashion-mnist, cifar10)')
    a('--augment', type=probability, metavar='P', help='non-leaky augmentation probability (paper: 0.12)')
    a('--dropout', type=probability, metavar='P', help="dropout probability (default: the preset's)")
    a('--batch', type=positive_int, help='total batch size (default 512)')
    a('--batch-gpu', type=positive_int, help='limit per process and accumulation round')
    d = p.add_mutually_exclusive_group()
    d.add_argument('--duration', type=parse_count, metavar='NIMG', help='training images, e.g. 200M (default)')
    d.add_argument('--steps', type=positive_int, help='optimizer steps (instead of --duration)')
    a('--lr', type=positive_float, help='Adam learning rate (default 10e-4)')
    a('--lr-rampup', type=parse_count, metavar='NIMG', help='learning-rate ramp-up in images (default 10M; 0: none)')
    a('--ema', type=parse_count, metavar='NIMG', help='EMA half-life in images (default 0.5M)')
    a('--seed', type=nonneg_int, help='random seed (default 0)')
    a('--outdir', help='run directory (default with --resume: the checkpoint\'s)')
    a('--resume', metavar='CHECKPOINT', help='a checkpoint file or a run directory (its latest checkpoint)')
    a('--precision', choices=train.PRECISIONS, help='fp32 (TF32 off, default) or bf16 autocast')
    a('--compile', action=argparse.BooleanOptionalAction, help='torch.compile the network')
    a('--channels-last', action=argparse.BooleanOptionalAction, help='channels_last memory layout')
    a('--checkpoint-every', type=positive_int, metavar='STEPS', help='checkpoint interval (default 5000)')
    a('--grid-every', type=positive_int, metavar='STEPS', help='sample-grid interval (default: never)')
    a('--log-every', type=positive_int, metavar='STEPS', help='metrics interval (default 100)')
    a('--keep', type=nonneg_int, help='checkpoints kept (default 2; 0 keeps all)')
    a('--device', help='cpu, cuda, cuda:1 ... (default: cuda if available; torchrun: one GPU per process)')
    a('--quiet', action='store_true', help='no progress bar')
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `edm-lit` with its three sub-commands."""
    from .networks import PRESETS
    parser = argparse.ArgumentParser(prog='edm-lit', description='Train EDM diffusion models, sample from them and '
                                     'inspect their checkpoints (edm_lit, chapter 9).', epilog=__doc__.split('\n\n')[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    _train_parser(sub, sorted(PRESETS))
    p = sub.add_parser('sample', help='generate images from a checkpoint', description=cmd_sample.__doc__)
    p.add_argument('checkpoint', help='a checkpoint file or a run directory (its latest checkpoint)')
    p.add_argument('--outdir', required=True)
    p.add_argument('--seeds', type=parse_seeds, default=parse_seeds('0-63'), help='e.g. 0-63 (default) or 1,5,10-12')
    p.add_argument('--sampler', choices=sorted(SAMPLERS) + ['dpmpp_2m', 'ipndm', 'ipndm_v', 'unipc'], default='heun',
                   help='heun: deterministic Alg. 1; churn: stochastic Alg. 2 (S_churn 40, S_min 0.05, S_max 50, '
                        'S_noise 1.003 unless given); dpmpp_2m, ipndm, ipndm_v, unipc: the multistep solvers of '
                        'chapter 11 (NFE = steps)')
    p.add_argument('--steps', type=positive_int, default=18, help='num_steps N (default 18: 35 NFE)')
    p.add_argument('--batch', type=positive_int, default=64)
    p.add_argument('--class', dest='class_label', type=nonneg_int, help='class of all images (default: seed % classes)')
    p.add_argument('--weights', choices=('ema', 'net'), default='ema', help='EMA (default) or raw weights')
    for name in ('S_churn', 'S_min', 'S_max', 'S_noise'):
        p.add_argument(f'--{name.replace("_", "-")}', dest=name, type=_number(float, lambda v: v >= 0, 'a number >= 0'))
    p.add_argument('--device')
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser('info', help="print a checkpoint's config and parameter count", description=cmd_info.__doc__)
    p.add_argument('checkpoint', help='a checkpoint file or a run directory (its latest checkpoint)')
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    """Entry point of the `edm-lit` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try: return args.func(args)
    except (ValueError, OSError, train.TrainingDiverged) as e:  # DataError, CheckpointError are ValueErrors
        print(f'edm-lit {args.command}: error: {e}', file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    sys.exit(main())
