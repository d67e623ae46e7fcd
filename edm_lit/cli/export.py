"""`edm-lit export`: a checkpoint's EMA (or raw) weights alone, as a small checkpoint (plain module, not generated).

    edm-lit export runs/fm book/results/fm-model            # the latest checkpoint's EMA weights, no training state
    edm-lit export runs/fm/training-state-00002500.json out --weights net

A training checkpoint holds the raw weights, the EMA weights, Adam's two moments and the random state: four times
the network. What sampling and evaluation need is one set of weights; `export` writes OUTDIR/training-state-<step>.
{safetensors,json} with the tensors of `--weights` stored under the name `ema.` (the name `sample` and `eval` load by
default), the model, data and config records of the source, and where it came from. It cannot be resumed.
"""
from __future__ import annotations

from pathlib import Path

from .. import checkpoints
from .sample import load_net

__all__ = ['cmd_export', 'add_export_parser']

_KEPT = ('model', 'data', 'config', 'nimg', 'run_id', 'world_size', 'torch')  # what sample / eval / info read


def cmd_export(args) -> int:
    """Write a checkpoint's EMA (or raw) weights alone as a small checkpoint that sample, eval and info read."""
    source = checkpoints.find_latest(args.checkpoint)
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir(): raise ValueError(f'OUTDIR {outdir} exists and is not a directory')
    if checkpoints.list_checkpoints(outdir):
        raise ValueError(f'{outdir} already holds checkpoints; pick a new OUTDIR')
    net, meta = load_net(source, args.weights, 'cpu')  # checked: record, shapes, finite weights
    record = {k: meta[k] for k in _KEPT if k in meta}
    record['exported_from'] = dict(checkpoint=str(source), weights=args.weights, step=meta['step'],
                                   record_sha256=meta.get('record_sha256'))
    path = checkpoints.save_checkpoint(outdir, meta['step'], checkpoints.module_tensors('ema', net), record)
    size = checkpoints.checkpoint_paths(path)[0].stat().st_size
    print(f'{source} ({args.weights} weights, {sum(p.numel() for p in net.parameters()):,} parameters) -> {path} '
          f'({size / 2**20:.1f} MiB)')
    return 0


def add_export_parser(sub):
    """Add the `export` subcommand to the subparsers `sub`; return its parser."""
    p = sub.add_parser('export', help="a checkpoint's weights alone (small; for sampling and evaluation)",
                       description=cmd_export.__doc__ + ' ' + __doc__.split('\n\n')[2])
    p.add_argument('checkpoint', help='a checkpoint file or a run directory (its latest checkpoint)')
    p.add_argument('outdir', metavar='OUTDIR', help='where the checkpoint goes (created; must hold no checkpoint)')
    p.add_argument('--weights', choices=('ema', 'net'), default='ema', help='EMA (default) or raw weights')
    p.set_defaults(func=cmd_export)
    return p
