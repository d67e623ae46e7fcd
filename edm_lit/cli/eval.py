"""`edm-lit eval`: FID and KID of a checkpoint's samples or of a folder of images (plain module, not generated).

    edm-lit eval runs/fm --n 5000 --out runs/fm/eval.json   # generate seeds 0-4999 (Heun, 35 NFE), then FID/KID
    edm-lit eval runs/fm/samples                              # the PNGs `edm-lit sample` wrote (not its grid.png)
    edm-lit eval runs/fm --seeds 0-999 --sampler churn --json # the JSON record on stdout instead of the line
    edm-lit eval runs/fm --n 10000 --floor-reference fashion-train  # all 10,000 test images; floor: train vs test

`edm_lit.metrics.evaluate` (chapter 10) against a reference set (default fashion-test), with the real-vs-real floor
at the same n. Prints one line; --out FILE also writes the JSON record, --json prints it instead of the line.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from .. import checkpoints, metrics
from ..data import load_fashion_mnist
from ..datasets import load_image_folder
from ..features import inception_path
from .args import format_seeds, parse_seeds, positive_int, nonneg_int
from .sample import (CHURN_ARGS, GENERATION_DEFAULTS, add_generation_arguments, check_outdir, churn_kwargs,
                     class_labels, generate, guided_net, load_net, nfe, write_pngs)

__all__ = ['SAMPLE_GRID', 'EVAL_KEYS', 'check_out', 'load_samples', 'summary_line', 'cmd_eval', 'add_eval_parser']

SAMPLE_GRID = 'grid.png'  # `edm-lit sample` writes it beside the samples: a picture of them, not one of them
EVAL_KEYS = ('fid', 'kid', 'floor_fid', 'floor_kid', 'n', 'input', 'kind')  # every eval record has them
_GENERATION_FLAGS = ('seeds', 'sampler', 'steps', 'weights', *CHURN_ARGS, 'guidance', 'guide', 'save_images')


def load_samples(folder) -> tuple[torch.Tensor, list[str]]:
    """(images in [-1, 1], names left out): every image under `folder` but a top-level grid.png (`edm-lit sample`)."""
    excluded = [SAMPLE_GRID] if (Path(folder) / SAMPLE_GRID).is_file() else []
    return load_image_folder(folder, exclude=excluded).images, excluded


def _reference(name: str, source: str) -> tuple[torch.Tensor, dict]:
    """The reference images: 'fashion-test' / 'fashion-train' (padded to 32x32, from `source`) or an image folder."""
    if name in metrics.REFERENCES:
        data = load_fashion_mnist(metrics.REFERENCES[name], source=source, pad_to_32=True)
        return data.images, dict(reference=name, reference_source=data.source, reference_images=len(data))
    if not Path(name).is_dir():
        raise ValueError(f'--reference {name!r} is neither one of {sorted(metrics.REFERENCES)} nor an image folder')
    images, _ = load_samples(name)
    return images, dict(reference=name, reference_source='folder', reference_images=len(images))


def _check_shape(shape, features: str, what) -> None:
    """Fail before any work if images of `shape` (C, H, W) do not suit the feature network."""
    need = metrics.FEATURE_NETS[features]
    if shape[0] not in need['channels'] or (need['size'] and tuple(shape[1:]) != tuple(need['size'])):
        size = f"{need['size'][0]}x{need['size'][1]} " if need['size'] else ''
        raise ValueError(f'{what} holds {shape[0]}x{shape[1]}x{shape[2]} (CxHxW) images; {features} features need '
                         f'{size}images with {" or ".join(map(str, need["channels"]))} channel(s)'
                         f'{"; try --features inception" if features == "domain" else ""}')


def _generate(args, n_max: int, device) -> tuple[torch.Tensor, dict]:
    """Images in [-1, 1] from the checkpoint, one per seed (default seeds 0..n-1), and the settings that made them."""
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in GENERATION_DEFAULTS.items()}
    seeds = args.seeds or list(range(args.n or n_max))
    if not 2 <= len(seeds) <= n_max:
        floor = ('the floor uses 2n reference images; --floor-reference fashion-train lifts n to the whole '
                 'reference set' if args.floor_reference is None else 'n reference and n floor-reference images')
        raise ValueError(f'n={len(seeds)} images: need 2 <= n <= {n_max} ({floor})')
    net, meta = load_net(args.input, settings['weights'], device)
    _check_shape((net.model.in_channels, net.model.img_resolution, net.model.img_resolution), args.features,
                 f'the model in {args.input}')
    label_dim = meta['model']['overrides']['label_dim']
    kwargs = churn_kwargs(args)
    net = guided_net(net, meta, args, device)
    images = generate(net, seeds, settings['sampler'], settings['steps'], class_labels(label_dim, seeds),
                      args.batch, **kwargs)
    if args.save_images: write_pngs(images, seeds, args.save_images)
    record = dict(checkpoint=str(checkpoints.find_latest(args.input)), step=meta['step'], nimg=meta.get('nimg'),
                  **settings, nfe=nfe(settings['sampler'], settings['steps']), **kwargs, seeds=format_seeds(seeds),
                  class_labels=f'seed % {label_dim}' if label_dim else None,
                  saved_images=args.save_images and str(args.save_images), guidance=args.guidance,
                  network_evaluations=nfe(settings['sampler'], settings['steps']) * (1 if args.guidance in (None, 1)
                                                                                      else 2),
                  guide=args.guide and str(checkpoints.find_latest(args.guide)))
    return images.float() / 127.5 - 1, record


def check_out(out) -> None:
    """--out may name a new file or a previous eval record (replaced), nothing else: not a checkpoint's file, not a
    file inside a run folder under a checkpoint's name, not any other existing file."""
    if out is None: return
    path = Path(out)
    if re.fullmatch(r'training-state-[0-9]+\.(json|safetensors)', path.name):
        raise ValueError(f'--out {out} is a checkpoint file name; write the eval record elsewhere (e.g. eval.json)')
    if not path.exists(): return
    if path.is_dir(): raise ValueError(f'--out {out} is a folder; it must name a file (e.g. {path / "eval.json"})')
    try: old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError): old = None
    if not (isinstance(old, dict) and all(k in old for k in EVAL_KEYS)):
        raise ValueError(f'--out {out} exists and is not an earlier eval record: refusing to overwrite it; pick '
                         f'another name')


def summary_line(r: dict) -> str:
    """'FID 327.2 (floor 19.43)  KID 118.5 (floor -2.282)  n=500, domain features, vs fashion-test'."""
    floor = f", floor: {r['floor_reference']} vs it" if r.get('floor_reference') else ''
    return (f"FID {r['fid']:.4g} (floor {r['floor_fid']:.4g})  KID {r['kid']:.4g} (floor {r['floor_kid']:.4g})  "
            f"n={r['n']}, {r['feature_net']} features, vs {r['reference']}{floor}")


def _is_image_folder(args) -> bool:
    """True for a folder of images, False for a checkpoint or run directory; ValueError if it is neither."""
    path = Path(args.input)
    if not path.exists() and not checkpoints.checkpoint_paths(path)[1].is_file():
        raise ValueError(f'{path} not found: expected a checkpoint, a run directory or a folder of images')
    if not path.is_dir() or checkpoints.list_checkpoints(path): return False
    given = [f'--{k.replace("_", "-")}' for k in _GENERATION_FLAGS if getattr(args, k) is not None]
    if given: raise ValueError(f'{", ".join(given)}: for a checkpoint only, but {path} is a folder of images')
    return True


def _read_folder(folder, features: str) -> tuple[torch.Tensor, dict]:
    """The images of a folder (without the grid of `edm-lit sample`) and what was read."""
    images, excluded = load_samples(folder)
    _check_shape(images.shape[1:], features, f'image folder {folder}')
    return images, dict(folder=str(folder), num_images=len(images), excluded=excluded)


def cmd_eval(args) -> int:
    """FID and KID (chapter 10) of a checkpoint's samples or of a folder of images, with the real-vs-real floor."""
    t0 = time.time()
    check_out(args.out)
    check_outdir(args.save_images, '--save-images')
    if args.features == 'inception':  # fail before generating anything if the optional extra is missing
        try: inception_path()
        except ImportError as e: raise ValueError(str(e)) from None
    from_folder = _is_image_folder(args)
    ref, ref_record = _reference(args.reference, args.source)
    _check_shape(ref.shape[1:], args.features, f'reference {args.reference}')
    other, other_record = None, {}
    if args.floor_reference is not None:
        if args.floor_reference == args.reference:
            raise ValueError(f'--floor-reference {args.floor_reference} is the reference itself; leave it out to '
                             f'split the reference set, or name another set (e.g. fashion-train)')
        other, o = _reference(args.floor_reference, args.source)
        _check_shape(other.shape[1:], args.features, f'floor reference {args.floor_reference}')
        other_record = dict(floor_reference_source=o['reference_source'], floor_reference_images=o['reference_images'])
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    n_max = len(ref) // 2 if other is None else min(len(ref), len(other))
    images, record = _read_folder(args.input, args.features) if from_folder else _generate(args, n_max, device)
    result = metrics.evaluate(images, ref, args.features, args.n, args.seed, batch_size=args.batch, device=device,
                              floor_reference=other)
    if other is not None: result['floor_reference'] = args.floor_reference
    record = dict(result, **ref_record, **other_record, input=str(args.input),
                  kind='folder' if from_folder else 'checkpoint', **record, seconds=round(time.time() - t0, 1))
    text = json.dumps(record, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + '\n')
    print(text if args.json else summary_line(record))
    return 0


def add_eval_parser(sub):
    """Add the `eval` subcommand to the subparsers `sub`; return its parser."""
    p = sub.add_parser('eval', help="FID and KID of a checkpoint's samples or of a folder of images",
                       description=__doc__.split('\n\n')[2], epilog='examples:\n' + __doc__.split('\n\n')[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('input', metavar='CHECKPOINT_OR_FOLDER',
                   help='a checkpoint file or run directory (generate images), or a folder of images (evaluate them; '
                        f'a top-level {SAMPLE_GRID} is left out)')
    g = p.add_mutually_exclusive_group()
    g.add_argument('--n', type=positive_int, help='images compared with as many reference images (default: all the '
                                                  'folder holds; for a checkpoint, half the reference set: 5000 '
                                                  'images for fashion-test at 35 NFE each, all of it with '
                                                  '--floor-reference; seeds 0..n-1)')
    g.add_argument('--seeds', type=parse_seeds, help='checkpoint: the seeds of the images, one each, e.g. 0-999')
    p.add_argument('--reference', default='fashion-test', help="'fashion-test' (default), 'fashion-train' or an "
                                                               "image folder")
    p.add_argument('--floor-reference', metavar='SET', help="the floor's second set: n of its images against the n "
                   "reference images (e.g. fashion-train against fashion-test; then n can be the whole reference "
                   "set); default: the reference set split in two")
    p.add_argument('--source', default='auto', help='where Fashion-MNIST is read from: auto (default), debian, '
                                                     'torchvision, download or embedded')
    p.add_argument('--features', choices=sorted(metrics.FEATURE_NETS), default='domain',
                   help="domain: the shipped Fashion-MNIST classifier (default, 1x32x32 images); inception: "
                        "Inception-v3 (needs the 'fid' extra)")
    p.add_argument('--seed', type=nonneg_int, default=0, help='seed of the reference draw and the KID subsets '
                                                              '(default 0)')
    add_generation_arguments(p)
    p.set_defaults(**dict.fromkeys(GENERATION_DEFAULTS))  # None: not given (the defaults apply to a checkpoint)
    p.add_argument('--save-images', metavar='DIR', help='checkpoint: also write the images as `edm-lit sample` does')
    p.add_argument('--out', metavar='FILE', help='also write the JSON record (settings and results) to FILE: a new '
                                                  'file, or an earlier eval record (replaced); any other existing '
                                                  'file, or a checkpoint name, is refused')
    p.add_argument('--json', action='store_true', help='print the JSON record instead of the one-line summary')
    p.set_defaults(func=cmd_eval)
    return p
