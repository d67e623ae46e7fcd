"""`edm-lit convert`: an official EDM snapshot as our safetensors + JSON checkpoint (plain module, not generated).

    edm-lit convert edm-cifar10-32x32-cond-vp.pkl runs/cifar10-cond-vp   # then sample, info, eval as our own
    edm-lit sample runs/cifar10-cond-vp --seeds 0-63 --outdir out

The snapshot (`network-snapshot-*.pkl` of NVlabs/edm, or a published `edm-*.pkl` / `baseline-*.pkl`) is read by
`edm_lit.official` without running anything from it; its network is rebuilt with our classes, its EMA weights loaded
strictly, and written as OUTDIR/training-state-00000000.{safetensors,json} with `--weights ema` only.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import checkpoints, official

__all__ = ['checkpoint_meta', 'cmd_convert', 'add_convert_parser']


def checkpoint_meta(snapshot: official.Snapshot) -> dict:
    """The JSON half of a converted checkpoint: our `model` record, the snapshot's data set and its provenance."""
    kimg = snapshot.info['kimg']
    return dict(model=snapshot.model, data=dict(source='official EDM snapshot',
                                                dataset_kwargs=snapshot.info['dataset_kwargs']),
                config=dict(official=snapshot.info), step=0, nimg=1000 * kimg if kimg else 0, world_size=1,
                torch=torch.__version__)


def cmd_convert(args) -> int:
    """Convert an official EDM snapshot (a pickle, read without running it) into our checkpoint format."""
    source, outdir = Path(args.snapshot), Path(args.outdir)
    if not source.is_file(): raise ValueError(f'snapshot not found: {source}')
    if outdir.exists() and not outdir.is_dir(): raise ValueError(f'OUTDIR {outdir} exists and is not a directory')
    if checkpoints.list_checkpoints(outdir):
        raise ValueError(f'{outdir} already holds checkpoints; pick a new OUTDIR')
    snapshot = official.read_official(source)
    net = official.build_official(snapshot, source)  # every name and shape checked before anything is written
    meta = checkpoint_meta(snapshot)
    try: checkpoints.check_model_record(meta['model'], f'{source}: model')  # what `load_checkpoint` checks
    except ValueError as e:
        raise official.OfficialPickleError(f'{e}; edm-lit could not load such a checkpoint, so nothing was '
                                           f'written') from None
    path = checkpoints.save_checkpoint(outdir, 0, checkpoints.module_tensors('ema', net), meta)
    print(f'{source.name}: {snapshot.info["class_name"]} around {type(net.model).__name__} '
          f'({sum(p.numel() for p in net.parameters()):,} parameters) -> {path}')
    return 0


def add_convert_parser(sub):
    """Add the `convert` subcommand to the subparsers `sub`; return its parser."""
    p = sub.add_parser('convert', help='convert an official EDM snapshot (.pkl) into a checkpoint, safely',
                       description=cmd_convert.__doc__ + ' ' + __doc__.split('\n\n')[2])
    p.add_argument('snapshot', metavar='SNAPSHOT.pkl', help='an official EDM network snapshot')
    p.add_argument('outdir', metavar='OUTDIR', help='where the checkpoint goes (created; must hold no checkpoint)')
    p.set_defaults(func=cmd_convert)
    return p
