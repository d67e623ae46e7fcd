"""A tiny, fast training setup for the tests of chapter 9: the real EDMPrecond and EDMLoss around a small MLP.

Imported by tests/test_train.py, and run as a script (also under torchrun) by the tests that need a separate process:
    python tests/train_tiny.py --outdir RUN --steps 12 [--resume RUN] [--stall-at K] [--nan-at K] [--kill-at POINT]
It prints one line `RANK r OF w WEIGHTS <sha256>` per process at the end: the SHA-256 of the trained weights.
`--kill-at POINT[:N]` kills the process (SIGKILL) the N-th time it reaches a point of a write (see `kill_points`):
a crash at a chosen place, deterministic, for the kill -9 tests.
"""
import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from edm_lit import checkpoints, runs, train
from edm_lit.data import ImageSet, load_fashion_mnist
from edm_lit.loss import EDMLoss
from edm_lit.precond import EDMPrecond

RES = 8  # the embedded Fashion-MNIST images, padded to 32x32 and averaged down to 8x8


class TinyMLP(torch.nn.Module):
    """An inner model F(x, noise_labels, class_labels=None, augment_labels=None) with dropout (a random draw)."""

    def __init__(self, channels=1, res=RES, hidden=128, label_dim=0, dropout=0.1):
        super().__init__()
        d = channels * res * res
        self.label = torch.nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.inp = torch.nn.Linear(d + 1, hidden)
        self.mid = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, hidden),
                                       torch.nn.SiLU())
        self.out = torch.nn.Linear(hidden, d)
        self.poisoned = False  # set by --nan-at: the output becomes NaN, and so does the loss

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        h = self.inp(torch.cat([x.flatten(1), noise_labels.reshape(-1, 1).to(x.dtype)], dim=1))
        if self.label is not None and class_labels is not None: h = h + self.label(class_labels)
        y = self.out(self.mid(h)).reshape(x.shape)
        return y * float('nan') if self.poisoned else y


def tiny_data(n=512) -> ImageSet:
    """The first n embedded Fashion-MNIST training images at 8x8 (mean of 4x4 blocks of the 32x32 padded image)."""
    full = load_fashion_mnist(train=True, source='embedded', pad_to_32=True, limit=n)
    return ImageSet(torch.nn.functional.avg_pool2d(full.images, 32 // RES), full.labels, 'embedded-8x8')


def tiny_net(seed=0, label_dim=0) -> EDMPrecond:
    torch.manual_seed(train.derive_seed(seed, train.STREAM_INIT))
    return EDMPrecond(TinyMLP(label_dim=label_dim), label_dim=label_dim)


def weights_sha(net) -> str:
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def tiny_config(steps, batch=16, **kwargs) -> train.TrainConfig:
    base = dict(batch_size=batch, total_nimg=steps * batch, lr=2e-3, lr_rampup_nimg=4 * batch,
                ema_halflife_nimg=8 * batch, log_every=2, checkpoint_every=4, keep=0)
    return train.TrainConfig(**{**base, **kwargs})


KILL_POINTS = ('step', 'tensors-tmp', 'tensors-replaced', 'json-tmp', 'json-replaced', 'prune-half', 'metrics-torn',
               'metrics-tmp', 'metrics-replaced')


def kill_points(spec: str):
    """Make this process SIGKILL itself the N-th time it reaches the point named by `spec` ('POINT' or 'POINT:N'):
    <kind>-tmp: a temporary file is whole but not yet renamed; <kind>-replaced: just renamed (kind: tensors, json,
    metrics); prune-half: a pruned checkpoint's JSON is gone but its tensors are not; metrics-torn: half a metrics
    line written; step: after the N-th training step. Returns the callback for the `step` point."""
    point, _, nth = spec.partition(':')
    assert point in KILL_POINTS, point
    seen = {}

    def reached(name):
        seen[name] = seen.get(name, 0) + 1
        if name == point and seen[name] == int(nth or 1): os.kill(os.getpid(), signal.SIGKILL)
    real_replace, real_unlink, real_append = os.replace, Path.unlink, runs.append_metrics

    def replace(src, dst):
        kind = 'json' if str(dst).endswith('.json') else 'tensors' if str(dst).endswith('.safetensors') else 'metrics'
        reached(f'{kind}-tmp')
        real_replace(src, dst)
        reached(f'{kind}-replaced')

    def unlink(self, missing_ok=False):
        real_unlink(self, missing_ok=missing_ok)
        if self.name.startswith('training-state-') and self.suffix == '.json': reached('prune-half')

    def append_metrics(run_dir, record, truncate_after=None):
        if record and point == 'metrics-torn' and seen.get(point, 0) + 1 == int(nth or 1):
            with open(Path(run_dir) / 'metrics.jsonl', 'a') as f:
                line = json.dumps(record)
                f.write(line[:len(line) // 2])
        if record: reached('metrics-torn')
        return real_append(run_dir, record, truncate_after)
    os.replace, Path.unlink, runs.append_metrics = replace, unlink, append_metrics
    return lambda step: reached('step')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--outdir', required=True)
    p.add_argument('--steps', type=int, default=12)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--batch-gpu', type=int, default=None)
    p.add_argument('--checkpoint-every', type=int, default=4)
    p.add_argument('--resume', default=None, help='a checkpoint or run directory')
    p.add_argument('--stall-at', type=int, default=None, help='sleep (to be killed) after this many steps')
    p.add_argument('--nan-at', type=int, default=None, help='make the network output NaN after this many steps')
    p.add_argument('--keep', type=int, default=0, help='checkpoints kept (0: all)')
    p.add_argument('--kill-at', default=None, help='POINT[:N]: SIGKILL at the N-th time a write reaches POINT')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    net = tiny_net()
    at_step = kill_points(args.kill_at) if args.kill_at else (lambda step: None)

    def callback(step):
        at_step(step)
        if step == args.stall_at:
            print(f'STALLED {step}', flush=True)
            time.sleep(600)
        if step == args.nan_at: net.model.poisoned = True

    config = tiny_config(args.steps, args.batch, batch_gpu=args.batch_gpu, checkpoint_every=args.checkpoint_every,
                         keep=args.keep)
    resume = checkpoints.find_latest(args.resume) if args.resume else None
    try:
        ema, _ = train.training_loop(net, EDMLoss(), tiny_data(), config, args.outdir, resume=resume,
                                     callback=callback, progress=False)
    except (train.TrainingDiverged, checkpoints.CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    finally: runs.release_lock(args.outdir)  # the folder's lock, taken by rank 0 in runs.start_run
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    print(f'RANK {rank} OF {world} WEIGHTS {weights_sha(net)} EMA {weights_sha(ema)}', flush=True)
    if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
