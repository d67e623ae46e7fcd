r"""The `edm-lit` command line: train | sample | eval | info | export | convert | phema (plain module, not generated).

    edm-lit train --dataset fashion-mnist --resolution 16 --preset ddpmpp-small --batch 16 --steps 300 \
        --lr 2e-3 --lr-rampup 0 --ema 2k --outdir runs/fm   # CPU: ~2 min (OMP_NUM_THREADS=1 on a busy machine)
    edm-lit sample runs/fm --seeds 0-63 --outdir runs/fm/samples
    edm-lit eval runs/fm --n 5000 --out runs/fm/eval.json      # FID and KID with their real-vs-real floor
    edm-lit info runs/fm
    edm-lit export runs/fm models/fm                          # the EMA weights alone: small, for sample / eval
    edm-lit convert network-snapshot-200000.pkl runs/official   # an official EDM snapshot, nothing in it run
    edm-lit phema runs/fm models/fm-0.07 --sigma-rel 0.07     # post-hoc EMA of a run trained with --phema
    torchrun --nproc_per_node=8 -m edm_lit.cli train ...      # one process per GPU (DDP)

One module per sub-command (train.py, sample.py, eval.py, info.py, export.py, convert.py, phema.py) and the
argument types (args.py).
Training is `edm_lit.train.training_loop` (chapter 9); sampling is the EDM sampler, Algorithm 2 (chapter 4), with one
seed per image; evaluation is `edm_lit.metrics.evaluate` (chapter 10); conversion is `edm_lit.official`. Bad values
exit with status 2 (argument errors) or 1 (everything else: missing data or checkpoints, corrupt files, a diverged
loss), always with a message naming them.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from ..runs import RunWarning
from ..train import TrainingDiverged
from .convert import add_convert_parser
from .eval import add_eval_parser
from .export import add_export_parser
from .info import add_info_parser
from .phema import add_phema_parser
from .train import add_train_parser
# What edm_lit.cli held as one module stays importable from it (tests, benchmarks/train_speed.py):
from .args import nonneg_int, parse_count, parse_seeds, positive_float, positive_int, probability  # noqa: F401
from .sample import SAMPLERS, add_sample_parser, build_net, generate, save_grid  # noqa: F401

__all__ = ['main', 'build_parser', 'build_net', 'generate', 'save_grid', 'parse_count', 'parse_seeds']


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `edm-lit` with its sub-commands."""
    from ..networks import PRESETS
    parser = argparse.ArgumentParser(
        prog='edm-lit', description='Train EDM diffusion models, sample from them, evaluate them (FID, KID) and '
        'inspect\ntheir checkpoints (edm_lit, chapters 9 and 10).', epilog=__doc__.split('\n\n')[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    add_train_parser(sub, sorted(PRESETS))
    add_sample_parser(sub)
    add_eval_parser(sub)
    add_info_parser(sub)
    add_export_parser(sub)
    add_convert_parser(sub)
    add_phema_parser(sub)
    return parser


def main(argv=None) -> int:
    """Entry point of the `edm-lit` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # one line each, every time: a repaired run folder, a changed data set
        warnings.simplefilter('always', RunWarning)
        warnings.showwarning = lambda message, *_, **__: print(f'edm-lit {args.command}: warning: {message}',
                                                              file=sys.stderr)
        try: return args.func(args)
        except (ValueError, OSError, TrainingDiverged) as e:  # DataError, CheckpointError are ValueErrors
            print(f'edm-lit {args.command}: error: {e}', file=sys.stderr)
            return 1
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
