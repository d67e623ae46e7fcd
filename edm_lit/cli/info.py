"""`edm-lit info`: a checkpoint's configuration and parameter count as JSON (plain module, not generated).

    edm-lit info runs/fm          # the latest checkpoint of a run directory
    edm-lit info runs/fm/training-state-00005000.json
"""
from __future__ import annotations

import json

from .. import checkpoints
from .sample import load_net

__all__ = ['cmd_info', 'add_info_parser']


def cmd_info(args) -> int:
    """Print a checkpoint's configuration and parameter count (null for what a model without training state lacks)."""
    net, meta = load_net(args.checkpoint, 'ema', 'cpu')
    summary = dict(checkpoint=str(checkpoints.find_latest(args.checkpoint)), step=meta['step'],
                   parameters=sum(p.numel() for p in net.parameters()), model=meta['model'],
                   **{k: meta.get(k) for k in ('nimg', 'run_id', 'data', 'config', 'world_size', 'torch')})
    print(json.dumps(summary, indent=1))
    return 0


def add_info_parser(sub):
    p = sub.add_parser('info', help="print a checkpoint's config and parameter count", description=cmd_info.__doc__)
    p.add_argument('checkpoint', help='a checkpoint file or a run directory (its latest checkpoint)')
    p.set_defaults(func=cmd_info)
    return p
