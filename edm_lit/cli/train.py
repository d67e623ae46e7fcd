r"""`edm-lit train`: train a model, or resume one, from the command line (plain module, not generated).

    edm-lit train --dataset fashion-mnist --resolution 16 --preset ddpmpp-small --batch 16 --steps 300 \
        --lr 2e-3 --lr-rampup 0 --ema 2k --outdir runs/fm   # CPU: ~2 min (OMP_NUM_THREADS=1 on a busy machine)
    torchrun --nproc_per_node=8 -m edm_lit.cli train ...      # one process per GPU (DDP)

`edm_lit.train.training_loop` (chapter 9) around a preconditioning (chapter 5; EDM unless --precond vp|ve) of a U-Net
preset (chapter 7), a loss (chapter 6; EDM unless --loss vp|ve) and, optionally, the non-leaky augmentation
(chapter 8) and post-hoc EMA snapshots (chapter 14, --phema).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from .. import checkpoints, datasets, runs, validators
from .. import train as training
from .args import (channel_mult, device, learning_rate, nonneg_int, parse_count, positive_int, positive_or_none,
                   probability, ratio_or_none, resolution)
from .sample import build_net, generate, save_grid

__all__ = ['CONFIG_FIELDS', 'cmd_train', 'add_train_parser']

_TYPES = {'int': (int,), 'float': (int, float), 'str': (str,), 'bool': (bool,), 'None': (type(None),)}
CONFIG_FIELDS = {f.name: (sum((_TYPES.get(t.strip(), (object,)) for t in f.type.split('|')), ()), False, None)
                 for f in fields(training.TrainConfig)}  # a resumed checkpoint's config, typed as TrainConfig


_UNSET = object()  # a flag not given (its value may be None: --ema-rampup none, --grad-clip none)
# --config's starting layout per preset: the CIFAR-10 presets hold EDM's layout (2,2,2), already redistributed;
# configs A and B use Song et al.'s (1,2,2,2), which config C redistributes. Other presets start from their own.
_BASELINE_MULT = {'ddpmpp-cifar10': (1, 2, 2, 2), 'ncsnpp-cifar10': (1, 2, 2, 2)}


def _base(args) -> str:
    """--base, else the preset's column: NCSN++ (Fourier embedding) is VE's network, the others VP's."""
    from ..networks import PRESETS
    fourier = PRESETS.get(args.preset, {}).get('embedding_type') == 'fourier'
    return args.base or ('ve' if fourier else 'vp')


def _ladder(args, pixels: int | None = None) -> dict | None:
    """The settings of --config (Table 2, chapter 9) for this run's length, or None. The durations are scaled to the
    length given when the run starts; a resumed run keeps them."""
    if args.config is None: return None
    from ..networks import PRESET_CLASSES
    if args.preset in PRESET_CLASSES:
        raise ValueError(f'--config {args.config} needs a SongUNet preset (DDPM++ or NCSN++, as Table 2), not '
                         f'--preset {args.preset}')
    base = _base(args)
    batch = args.batch or training.ladder_settings(args.config, base)['train']['batch_size']
    total = args.steps * batch if args.steps is not None else args.duration or training.PAPER_NIMG
    return training.ladder_settings(args.config, base, total, pixels)


def _model_record(args, data, label_dim: int, ladder: dict | None, augment: float) -> dict:
    """What `build_net` needs to rebuild the network: the preset and the overrides the data set (and --config)
    implies; flags given override --config."""
    from ..augment import AugmentPipe
    from ..networks import PRESETS
    augment_dim = AugmentPipe(p=augment).label_dim if augment else 0  # 9 with the paper's settings
    overrides = dict(img_resolution=data.images.shape[-1], in_channels=data.images.shape[1],
                     out_channels=data.images.shape[1], label_dim=label_dim, augment_dim=augment_dim)
    if ladder is not None:
        overrides.update(ladder['arch'], dropout=ladder['dropout'])
        mult = _BASELINE_MULT.get(args.preset) or PRESETS[args.preset].get('channel_mult', (1, 2, 2, 2))
        if ladder['redistribute']: mult = training.redistribute_capacity(mult)
        overrides['channel_mult'] = list(mult)
    if args.channel_mult is not None: overrides['channel_mult'] = args.channel_mult
    if args.dropout is not None: overrides['dropout'] = args.dropout
    if args.label_dropout is not None:
        if not label_dim: raise ValueError(f'--label-dropout {args.label_dropout} needs --cond (class labels to drop)')
        overrides['label_dropout'] = args.label_dropout
    if args.channels is not None: overrides['model_channels'] = args.channels
    model = dict(preset=args.preset, overrides=overrides)
    precond = args.precond or (ladder['precond'] if ladder else None)
    if precond not in (None, 'edm'): model['precond'] = precond  # Table 1 column (chapter 5); default EDM
    return model


def _train_config(args, saved: dict, ladder: dict | None = None) -> training.TrainConfig:
    """TrainConfig from the flags given, else the resumed checkpoint's values (or --config's), else the paper's
    defaults."""
    given = dict(batch_size=args.batch, batch_gpu=args.batch_gpu, lr=args.lr, lr_rampup_nimg=args.lr_rampup,
                 ema_halflife_nimg=args.ema, seed=args.seed, precision=args.precision, log_every=args.log_every,
                 checkpoint_every=args.checkpoint_every, grid_every=args.grid_every, keep=args.keep)
    given.update(compile=args.compile, channels_last=args.channels_last, xflip=args.xflip)
    validators.check_fields(saved, CONFIG_FIELDS, f'checkpoint {args.resume}: config')
    values = {f.name: saved[f.name] for f in fields(training.TrainConfig) if f.name in saved}
    if ladder is not None: values.update(ladder['train'])
    values.update({k: v for k, v in given.items() if v is not None})
    if args.ema_rampup is not _UNSET: values['ema_rampup_ratio'] = args.ema_rampup
    if args.grad_clip is not _UNSET: values['grad_clip'] = args.grad_clip
    batch = values.get('batch_size', training.TrainConfig.batch_size)
    if args.steps is not None: values['total_nimg'] = args.steps * batch
    elif args.duration is not None: values['total_nimg'] = args.duration
    return training.TrainConfig(**values)


def _check_same_data(d: dict, data, fingerprint: str, allow: bool) -> None:
    """On resume: the training images must be those the run started with (`fingerprint`), unless `allow`."""
    if d.get('fingerprint') in (None, fingerprint): return  # None: a checkpoint written before fingerprints
    message = (f"the training images in {d['path'] or d['dataset']} changed since the run started (fingerprint "
               f"{d['fingerprint'][:19]}..., now {fingerprint[:19]}...; {d.get('num_images')} images then, "
               f"{len(data)} now)")
    if not allow: raise ValueError(f'{message}: the run would not be the run it claims to be; pass '
                                   f'--allow-data-change to continue on the new images anyway')
    warnings.warn(f'{message}; continuing on the new images (--allow-data-change)', runs.RunWarning)


def _check_outdir(outdir: Path, d: dict) -> None:
    """The run folder must not lie inside the image folder trained on: the run's own files would become training
    images (and the data set's fingerprint would change under the run, which could never be resumed)."""
    if d.get('dataset') != 'folder' or not d.get('path'): return
    data, out = Path(d['path']).resolve(), outdir.resolve()
    if out == data or data in out.parents:
        raise ValueError(f'--outdir {outdir} lies inside the image folder {d["path"]} that the run trains on; its '
                         f'checkpoints and metrics would become training images: pick an --outdir outside it')


def _check_total(args, config, saved: dict) -> None:
    """On resume: --steps / --duration must not end the run before the step it resumes from."""
    step = saved.get('step')
    if step is None or config.total_steps >= step: return
    if args.steps is not None: given = f'--steps {args.steps}'
    else: given = f'--duration {config.total_nimg} images ({config.total_steps} steps of {config.batch_size})'
    raise ValueError(f'{given} is below the resumed step {step} ({step * config.batch_size} images): the run '
                     f'would not train; give more --steps (or --duration) than the checkpoint has')


def _train(args, saved: dict, resume, outdir: Path, config, d: dict, phema: dict | None, ladder: dict | None) -> None:
    """cmd_train once the run folder's lock is held: claim the folder (again: no other run can now write into it),
    load, train."""
    runs.claim_run_dir(outdir, resume)
    data = datasets.load_dataset(d['dataset'], d['path'], d['resolution'], d['transform'])
    fingerprint = datasets.fingerprint(data)
    if resume: _check_same_data(d, data, fingerprint, args.allow_data_change)
    label_dim = datasets.NUM_CLASSES[d['dataset']] if d['cond'] else 0
    if d['cond'] and not label_dim: raise ValueError(f"--cond needs class labels; dataset {d['dataset']!r} has none")
    if ladder is not None:  # now that the image size is known: config A's loss normalization (per pixel for VP)
        ladder = _ladder(args, data.images[0].numel())
        config = _train_config(args, {}, ladder)
    model = saved.get('model') or _model_record(args, data, label_dim, ladder, d['augment'])
    torch.manual_seed(training.derive_seed(config.seed, training.STREAM_INIT))  # the initial weights
    net = build_net(model)
    augment_pipe = None
    if d['augment']:
        from ..augment import AugmentPipe
        augment_pipe = AugmentPipe(p=d['augment'])
    from ..loss import EDMLoss, VELoss, VPLoss
    loss = saved.get('loss') or args.loss or (ladder and ladder['loss']) or 'edm'  # Table 1 column (chapter 6)

    def grid_fn(ema, path):  # 8 x 8 images on a GPU, 4 x 4 on a CPU (35 NFE each)
        n = 64 if next(ema.parameters()).is_cuda else 16
        labels = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
        save_grid(generate(ema, list(range(n)), class_labels=labels), path)
    meta = dict(model=model, data=dict(d, source=data.source, num_images=len(data), fingerprint=fingerprint), loss=loss)
    if saved.get('ladder') or ladder:  # Table 2's config, its base and the factor its durations were scaled by
        meta['ladder'] = saved.get('ladder') or dict(config=args.config, base=_base(args), scale=ladder['scale'])
    callback = None
    if phema is not None:  # post-hoc EMA (chapter 14): power-function averages and their snapshots
        from .phema import PhemaTracker
        meta['phema'] = phema
        callback = PhemaTracker(net, outdir, phema, saved.get('step', 0), config.total_steps, meta,
                                config.batch_size)
    t0 = time.time()
    loss_fn = {'edm': EDMLoss, 'vp': VPLoss, 've': VELoss}[loss]()
    training.training_loop(net, loss_fn, data, config, outdir, meta=meta, label_dim=label_dim, device=args.device,
                           augment_pipe=augment_pipe, resume=resume, grid_fn=grid_fn, progress=not args.quiet,
                           callback=callback)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f'reached step {config.total_steps} ({config.total_steps * config.batch_size} images) after '
              f'{time.time() - t0:.1f} s; latest checkpoint: {checkpoints.find_latest(outdir)}')


def cmd_train(args) -> int:
    """Train (or resume) a model; checkpoints, metrics.jsonl and sample grids go to --outdir (one run's folder)."""
    saved, resume = {}, None
    if args.resume:
        fixed = [f'--{k.replace("_", "-")}' for k in ('dataset', 'data', 'resolution', 'transform', 'preset', 'cond',
                                                      'augment', 'dropout', 'label_dropout', 'channels', 'phema',
                                                      'phema_every', 'precond', 'loss', 'config', 'base',
                                                      'channel_mult')
                 if getattr(args, k) is not None]
        if fixed: raise ValueError(f'{", ".join(fixed)} cannot change when resuming: the checkpoint fixes them')
        resume = checkpoints.find_latest(args.resume)
        saved = checkpoints.read_training_meta(resume)
        validators.check_fields(saved, dict(model=(dict, True, None), data=(dict, True, None)), f'checkpoint {resume}')
        validators.check_fields(saved['data'], validators.DATA_FIELDS, f'checkpoint {resume}: data')
        outdir = Path(args.outdir or resume.parent)
    else:
        if args.allow_data_change: raise ValueError('--allow-data-change applies only with --resume')
        if args.base is not None and args.config is None:
            raise ValueError(f'--base {args.base} applies only with --config A..F (Table 2)')
        if args.outdir is None or args.dataset is None or args.preset is None:
            raise ValueError('a new run needs --dataset, --preset and --outdir (or --resume a checkpoint)')
        outdir = Path(args.outdir)
    runs.claim_run_dir(outdir, resume)  # before anything is loaded or written: the folder must be this run's
    ladder = None if resume else _ladder(args)
    augment = args.augment if args.augment is not None else (ladder['augment'] if ladder else 0.0)
    d = saved.get('data') or dict(dataset=args.dataset, path=args.data and str(Path(args.data).resolve()),
                                  resolution=args.resolution, transform=args.transform, cond=bool(args.cond),
                                  augment=augment)
    _check_outdir(outdir, d)
    config = _train_config(args, saved.get('config', {}), ladder)
    _check_total(args, config, saved)
    from .phema import check_phema_flags
    phema = saved.get('phema') if resume else check_phema_flags(args.phema, args.phema_every, config.checkpoint_every)
    # one run at a time in a folder (rank 0 holds the lock; under torchrun the other ranks write nothing there)
    lock = runs.run_lock(outdir) if int(os.environ.get('RANK', '0')) == 0 else contextlib.nullcontext()
    with lock:
        _train(args, saved, resume, outdir, config, d, phema, ladder)
    return 0


def add_train_parser(sub, presets):
    p = sub.add_parser('train', help='train a model (or resume one)', description=cmd_train.__doc__,
                       epilog='example (CPU, ~2 minutes): edm-lit train --dataset fashion-mnist --resolution 16 '
                              '--preset ddpmpp-small --batch 16 --steps 300 --lr 2e-3 --lr-rampup 0 --ema 2k '
                              '--outdir runs/fm')
    a = p.add_argument
    a('--dataset', choices=datasets.DATASETS, help='the training images')
    a('--data', metavar='PATH', help='image folder (dataset folder), or download root (fashion-mnist, cifar10)')
    a('--resolution', type=resolution, help='image size (folder: any, with --transform; fashion-mnist and cifar10: '
                                               '32 or an average-pooled 16, 8, ...)')
    a('--transform', choices=datasets.TRANSFORMS, help='for dataset folder: how to bring images to --resolution')
    a('--preset', choices=presets, help='network preset (chapter 7)')
    a('--cond', action='store_true', default=None, help='class-conditional (fashion-mnist, cifar10)')
    a('--augment', type=probability, metavar='P', help='non-leaky augmentation probability (paper: 0.12)')
    a('--dropout', type=probability, metavar='P', help="dropout probability (default: the preset's)")
    a('--label-dropout', type=probability, metavar='P', help='with --cond: probability of training a sample without '
                                                            'its label (classifier-free guidance; default 0)')
    a('--channels', type=positive_int, metavar='N', help="base channel count, model_channels (default: the preset's)")
    a('--precond', choices=('edm', 'vp', 've'), help='preconditioning, a Table 1 column (chapter 5; default edm)')
    a('--loss', choices=('edm', 'vp', 've'), help='p_train and lambda(sigma), a Table 1 column (chapter 6; default '
                                                  'edm)')
    a('--config', choices=training.LADDER, help="Table 2's config (chapter 9): A = Song et al.'s baseline ... F = EDM; "
      'sets the loop, network, preconditioning, loss and augmentation of that rung, its durations scaled to the run '
      '(flags given override it)')
    a('--base', choices=('vp', 've'), help="with --config: the VP (DDPM++) or VE (NCSN++) column (default: the "
                                           "preset's, vp for DDPM++ presets)")
    a('--channel-mult', type=channel_mult, metavar='M,M,..', help="channels per resolution level relative to "
      "--channels, e.g. 1,2,2 (default: the preset's; config C removes its lowest level)")
    a('--batch', type=positive_int, help='total batch size (default 512)')
    a('--batch-gpu', type=positive_int, help='limit per process and accumulation round')
    d = p.add_mutually_exclusive_group()
    d.add_argument('--duration', type=parse_count, metavar='NIMG', help='training images, e.g. 200M (default)')
    d.add_argument('--steps', type=positive_int, help='optimizer steps (instead of --duration)')
    a('--lr', type=learning_rate, help='Adam learning rate, at most 1 (default 10e-4)')
    a('--lr-rampup', type=parse_count, metavar='NIMG', help='learning-rate ramp-up in images (default 10M; 0: none)')
    a('--ema', type=parse_count, metavar='NIMG', help='EMA half-life in images (default 0.5M)')
    a('--ema-rampup', type=ratio_or_none, default=_UNSET, metavar='RATIO',
      help="the EMA half-life is at most RATIO x the images seen (default 0.05, the official loop's; none: off)")
    a('--grad-clip', type=positive_or_none, default=_UNSET, metavar='NORM',
      help="clip the gradient's L2 norm (Song et al.: 1; default: none, as EDM; none: off)")
    a('--xflip', action=argparse.BooleanOptionalAction, help='mirror each training image with probability 1/2 '
                                                             '(dataset x-flips; default off)')
    a('--seed', type=nonneg_int, help='random seed (default 0)')
    a('--outdir', help='run directory (default with --resume: the checkpoint\'s)')
    a('--resume', metavar='CHECKPOINT', help='a checkpoint file or a run directory (its latest checkpoint)')
    a('--allow-data-change', action='store_true', help='with --resume: continue even if the training images changed '
                                                       'since the run started (their fingerprint differs)')
    a('--precision', choices=training.PRECISIONS, help='fp32 (TF32 off, default) or bf16 autocast')
    a('--compile', action=argparse.BooleanOptionalAction, help='torch.compile the network')
    a('--channels-last', action=argparse.BooleanOptionalAction, help='channels_last memory layout')
    a('--checkpoint-every', type=positive_int, metavar='STEPS', help='checkpoint interval (default 5000)')
    a('--grid-every', type=positive_int, metavar='STEPS', help='sample-grid interval (default: never)')
    a('--log-every', type=positive_int, metavar='STEPS', help='metrics interval (default 100)')
    a('--keep', type=nonneg_int, help='checkpoints kept (default 2; 0 keeps all)')
    from .phema import sigma_rel
    a('--phema', type=sigma_rel, nargs='+', metavar='SIGMA_REL', help='post-hoc EMA (chapter 14): track power-function '
      'averages of these widths (EDM2: 0.05 0.10) and store them in RUN/phema-<width>/; `edm-lit phema` rebuilds any '
      'width from them after training')
    a('--phema-every', type=positive_int, metavar='STEPS', help='snapshot interval of --phema (default: '
                                                                  '--checkpoint-every, which it must divide)')
    a('--device', type=device, help='cpu, cuda, cuda:1 ... (default: cuda if available; torchrun: one GPU per '
                                    'process)')
    a('--quiet', action='store_true', help='no progress bar')
    p.set_defaults(func=cmd_train)
    return p
