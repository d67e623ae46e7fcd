"""`edm-lit phema` and `train --phema`: post-hoc EMA (chapter 14) on real runs (plain module, not generated).

    edm-lit train ... --phema 0.05 0.10 --phema-every 500   # snapshots in RUN/phema-0.050/ and RUN/phema-0.100/
    edm-lit phema RUN OUTDIR --sigma-rel 0.07               # the average of width 0.07 at the latest snapshot

While a run trains with --phema, it keeps power-function averages of the network (`edm_lit.phema.PowerEMA`, one per
width sigma_rel) and stores each every --phema-every steps (and at the end) as a checkpoint in RUN/phema-<sigma_rel>/,
which `sample` and `eval` read like any other. After training, `phema` fits the snapshots' profiles to the profile of
the width asked for (least squares, chapter 14) and writes their combination as OUTDIR/training-state-<step>.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .. import checkpoints
from ..phema import PowerEMA, UNIFORM_SIGMA_REL, solve_phema, std_to_exp
from .args import number

__all__ = ['PhemaTracker', 'check_phema_flags', 'sigma_rel', 'cmd_phema', 'add_phema_parser']

SNAPSHOTS = 'phema-{:.3f}'  # RUN/phema-0.050/training-state-<step>.*
sigma_rel = number(float, lambda v: 0 < v <= UNIFORM_SIGMA_REL,
                   f'a relative EMA width sigma_rel in (0, {UNIFORM_SIGMA_REL:.4f}] (1/sqrt(12): the uniform average)')


def check_phema_flags(sigma_rels, every, checkpoint_every) -> dict | None:
    """The run's post-hoc EMA record {sigma_rels, every}, or None; a resumed run must find snapshots at its step."""
    if sigma_rels is None:
        if every is not None: raise ValueError(f'--phema-every {every} needs --phema SIGMA_REL ...')
        return None
    if len({f'{s:.3f}' for s in sigma_rels}) != len(sigma_rels):
        raise ValueError(f'--phema {" ".join(map(str, sigma_rels))}: widths must differ in their first three decimals '
                         f'(each gets the folder phema-<sigma_rel with 3 decimals>)')
    every = every or checkpoint_every
    if every is None: raise ValueError('--phema needs --phema-every STEPS when checkpoints are written only at the end')
    if checkpoint_every is not None and checkpoint_every % every:
        raise ValueError(f'--phema-every {every} must divide --checkpoint-every {checkpoint_every}: a resumed run '
                         f'restarts its averages from the snapshots at its checkpoint')
    return dict(sigma_rels=[float(s) for s in sigma_rels], every=int(every))


class PhemaTracker:
    """`training_loop`'s callback: after every step update the power-function averages of `net`'s parameters;
    every `every` steps and at `total_steps` write them (rank 0) with `net`'s buffers as checkpoints."""

    def __init__(self, net, run_dir, spec: dict, start_step: int, total_steps: int, meta: dict, batch_size: int):
        self.net, self.run_dir, self.every, self.total = net, Path(run_dir), spec['every'], total_steps
        self.meta, self.batch = meta, batch_size
        params = dict(net.named_parameters())
        self.ema = PowerEMA(params, spec['sigma_rels'], t=start_step)
        if start_step:  # resume: the averages at the checkpoint's step are the snapshots written at that step
            for s, average in zip(self.ema.sigma_rels, self.ema.averages):
                path = self.run_dir / SNAPSHOTS.format(s) / f'training-state-{start_step:08d}.json'
                if not path.is_file():
                    raise ValueError(f'resuming at step {start_step} needs the post-hoc EMA snapshot {path}; it is '
                                     f'missing')
                tensors, _ = checkpoints.load_checkpoint(path)
                for k in average: average[k].copy_(tensors[f'ema.{k}'])
        self.write = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def __call__(self, step: int) -> None:
        self.ema.update(dict(self.net.named_parameters()))
        if self.write and (step % self.every == 0 or step == self.total): self.save(step)

    def save(self, step: int) -> None:
        buffers = {k: v for k, v in self.net.state_dict().items()}
        for s, g, average in zip(self.ema.sigma_rels, self.ema.gammas, self.ema.averages):
            tensors = {f'ema.{k}': (average[k] if k in average else v).detach().to('cpu', copy=True).contiguous()
                       for k, v in buffers.items()}
            record = dict(self.meta, nimg=step * self.batch, phema=dict(sigma_rel=s, gamma=g, every=self.every))
            checkpoints.save_checkpoint(self.run_dir / SNAPSHOTS.format(s), step, tensors, record)


def _snapshots(run: Path) -> list[tuple[int, float, Path]]:
    """(step, sigma_rel, json path) of every post-hoc EMA snapshot of a run."""
    found = []
    for folder in sorted(run.glob('phema-*')):
        if not (folder.is_dir() and re.fullmatch(r'phema-[0-9.]+', folder.name)): continue
        for path in checkpoints.list_checkpoints(folder):
            meta = checkpoints.read_meta(path)
            if not isinstance(meta.get('phema'), dict) or 'sigma_rel' not in meta['phema']:
                raise ValueError(f'{path} is not a post-hoc EMA snapshot (no phema record)')
            found.append((int(meta['step']), float(meta['phema']['sigma_rel']), path))
    return found


def cmd_phema(args) -> int:
    """Rebuild the power-function average of width --sigma-rel at a snapshot step from the run's stored snapshots."""
    from ..official import network_from_record
    run, outdir = Path(args.run), Path(args.outdir)
    if not run.is_dir(): raise ValueError(f'RUN {run} is not a run folder')
    found = _snapshots(run)
    if not found: raise ValueError(f'{run} holds no post-hoc EMA snapshots (phema-*/): train with --phema')
    steps = sorted({t for t, _, _ in found})
    step = args.step if args.step is not None else steps[-1]
    if step not in steps: raise ValueError(f'--step {step}: no snapshot at that step; the run has {steps}')
    if outdir.exists() and not outdir.is_dir(): raise ValueError(f'OUTDIR {outdir} exists and is not a directory')
    if checkpoints.list_checkpoints(outdir): raise ValueError(f'{outdir} already holds checkpoints; pick a new OUTDIR')
    used = sorted((q for q in found if q[0] <= step), key=lambda q: (q[0], q[1]))
    x = solve_phema([float(t) for t, _, _ in used], [s for _, s, _ in used], float(step), args.sigma_rel)
    last_meta = checkpoints.read_meta(used[-1][2])
    params = {k for k, _ in network_from_record(last_meta['model'], device='meta').named_parameters()}
    out = None
    for xi, (_, _, path) in zip(x, used):
        tensors, _ = checkpoints.load_checkpoint(path)
        if out is None: out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in tensors.items()}
        for k, v in tensors.items():
            if k[len('ema.'):] in params: out[k] += float(xi) * v.double()
            else: out[k] = v  # buffers: the latest snapshot's
    tensors = {k: v.to(torch.float32) if v.dtype == torch.float64 else v for k, v in out.items()}
    record = {k: last_meta[k] for k in ('model', 'data', 'config', 'nimg', 'run_id', 'world_size', 'torch')
              if k in last_meta}
    record['phema'] = dict(sigma_rel=args.sigma_rel, gamma=std_to_exp(args.sigma_rel), step=step,
                           snapshots=[dict(step=t, sigma_rel=s, coefficient=float(c)) for (t, s, _), c in zip(used, x)])
    path = checkpoints.save_checkpoint(outdir, step, tensors, record)
    print(f'{run}: sigma_rel {args.sigma_rel} at step {step} from {len(used)} snapshots '
          f'(largest |coefficient| {max(abs(x)):.3f}) -> {path}')
    return 0


def add_phema_parser(sub):
    """Add the `phema` subcommand to the subparsers `sub`; return its parser."""
    p = sub.add_parser('phema', help='post-hoc EMA: the average of any width from a run trained with --phema',
                       description=cmd_phema.__doc__ + ' ' + __doc__.split('\n\n')[2])
    p.add_argument('run', metavar='RUN', help='a run folder trained with --phema (holds phema-<sigma_rel>/)')
    p.add_argument('outdir', metavar='OUTDIR', help='where the checkpoint goes (created; must hold no checkpoint)')
    p.add_argument('--sigma-rel', type=sigma_rel, required=True, help='the relative width of the average, e.g. 0.07')
    p.add_argument('--step', type=int, help='the snapshot step to rebuild at (default: the latest)')
    p.set_defaults(func=cmd_phema)
    return p
