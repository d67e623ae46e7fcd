"""Checks of values a user can get wrong, in one place (plain module, not generated).

Each check returns the value it accepts or raises `ValueError` naming the value and what was expected. Used by the
command line (`edm_lit.cli`), the checkpoint loader (`edm_lit.checkpoints`: the schema of a checkpoint's JSON record),
the image-folder reader (`edm_lit.datasets`), the class labels of the preconditioning (chapter 5) and the argument
checks the chapters' functions share (a choice among names, a positive constant, a non-negative σ, an integer order).
"""
from __future__ import annotations

import math
import re

import torch

__all__ = ['MAX_SEED', 'MAX_SEEDS', 'MAX_PIXELS', 'MAX_RESOLUTION', 'MAX_LR', 'check_choice', 'check_positive',
           'check_nonnegative', 'check_int', 'check_seed_ranges', 'check_device',
           'check_pixels', 'check_finite', 'nonfinite_rows', 'class_label_rows', 'check_fields', 'json_value',
           'RECORD_FIELDS', 'MODEL_FIELDS', 'OVERRIDE_FIELDS', 'DATA_FIELDS', 'TRAINING_FIELDS']

MAX_SEED = 2 ** 32 - 1      # generate.py seeds each image with seed % 2**32: larger seeds repeat smaller ones
MAX_SEEDS = 1_000_000       # images per command (one per seed): more is a typo such as 0-999999999999
MAX_PIXELS = 8192 * 8192    # per image file: more is a decompression bomb, not training data
MAX_RESOLUTION = 4096       # of a model's images
MAX_LR = 1.0                # Adam's learning rate (the paper's: 10e-4)


def check_choice(what: str, value, choices) -> None:
    """Raise naming the unknown `value` of `what` and the valid `choices` (a schedule, a solver, a discretization)."""
    if value not in choices: raise ValueError(f'unknown {what} {value!r}; expected one of {tuple(choices)}')


def check_positive(name: str, value) -> float:
    """`value` as a float, after checking that it is a number > 0 (σ_data, P_std, β_d, ...: the constants of
    Table 1 are all positive)."""
    value = float(value)
    if not value > 0: raise ValueError(f'{name} must be > 0, got {value}')
    return value


def check_nonnegative(name: str, value: torch.Tensor) -> None:
    """Raise naming `name` when the tensor `value` has a negative (or NaN) entry (a time t, a noise level σ)."""
    if not bool((value >= 0).all()):
        raise ValueError(f'{name} must be >= 0, got a minimum of {float(value.min()):.6g}')


def check_int(name: str, value, lo: int, hi: int) -> int:
    """`value` if it is an integer (not a bool) with lo <= value <= hi; else raise naming `name` (a solver order)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f'{name} must be an integer in [{lo}, {hi}], got {value!r}')
    return value


def check_seed_ranges(ranges: list[tuple[int, int]], text: str) -> list[tuple[int, int]]:
    """Inclusive ranges of seeds, one image each: every seed <= 2**32 - 1, at most MAX_SEEDS in all; `text` was given.

    Checked before a list of seeds is built, so that '0-999999999999' is a message, not a MemoryError."""
    count = sum(b - a + 1 for a, b in ranges)
    if count > MAX_SEEDS:
        raise ValueError(f'{text!r} names {count:,} seeds (one image each); at most {MAX_SEEDS:,} at once')
    top = max(b for _, b in ranges)
    if top > MAX_SEED:
        raise ValueError(f'seed {top} in {text!r} is above {MAX_SEED} = 2**32 - 1: the sampler seeds each image with '
                         f'seed % 2**32 (as the official generate.py), so it would repeat seed {top % 2 ** 32}')
    return ranges


def check_device(text: str) -> torch.device:
    """A torch device that exists on this machine: cpu, cuda, cuda:N (N < the number of GPUs) or mps."""
    try: device = torch.device(text)
    except (RuntimeError, ValueError): device = None
    if device is None or device.type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f'unknown device {text!r}: expected cpu, cuda, cuda:N or mps')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {text!r}: CUDA is not available on this machine')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f'device {text!r}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 ...')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f'device {text!r}: MPS is not available on this machine')
    return device


def check_pixels(path, width: int, height: int) -> None:
    """Refuse an image file of more than MAX_PIXELS pixels (read from its header, before decoding it)."""
    if width * height > MAX_PIXELS:
        raise ValueError(f'{path} is {width}x{height} = {width * height:,} pixels, more than the limit of '
                         f'{MAX_PIXELS:,} (8192x8192) per image: a decompression bomb or not training data')


def check_finite(what: str, tensors: dict) -> None:
    """Raise naming `what` and the first offending names unless every floating-point tensor of `tensors` is finite."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad: raise ValueError(f'{what} hold NaN or infinite values (in {", ".join(bad[:3])}{" ..." * bool(bad[3:])})')


def nonfinite_rows(batch: torch.Tensor) -> list[int]:
    """The indices i for which batch[i] holds a NaN or infinite value (an image the sampler ruined)."""
    return (~torch.isfinite(batch.reshape(len(batch), -1)).all(dim=1)).nonzero().flatten().tolist()


def class_label_rows(class_labels: torch.Tensor, label_dim: int, batch: int | None = None) -> torch.Tensor:
    """Class labels as float32 rows (M, label_dim): integer classes of shape (N,) become one-hot rows; rows of
    length label_dim (one-hot, any dtype) stay as they are. M must be 1 or the batch size. Chapter 5."""
    labels = torch.as_tensor(class_labels)
    if not labels.is_floating_point() and labels.dtype != torch.bool and labels.ndim <= 1:
        classes = labels.reshape(-1).long()
        bad = classes[(classes < 0) | (classes >= label_dim)]
        if len(bad): raise ValueError(f'class label {int(bad[0])} is not in 0..{label_dim - 1}')
        labels = torch.nn.functional.one_hot(classes, label_dim)
    if labels.ndim < 1 or labels.shape[-1] != label_dim:
        raise ValueError(f'class labels of shape {tuple(labels.shape)} do not fit label_dim={label_dim}: expected '
                         f'integer classes of shape (N,) or rows of shape (N, {label_dim})')
    rows = labels.reshape(-1, label_dim).to(torch.float32)
    if batch is not None and len(rows) not in (1, batch):
        raise ValueError(f'{len(rows)} rows of class labels for a batch of {batch}: expected 1 or {batch}')
    return rows


# The JSON record of a checkpoint (see edm_lit.checkpoints). A field is (type(s), required, extra check or None).
_HEX64 = re.compile(r'^[0-9a-f]{64}$')
_SCALARS = (int, float, str, bool, type(None))


def _count(lo=0, hi=None): return lambda v: (lo is None or v >= lo) and (hi is None or v <= hi)


def json_value(v) -> bool:
    """A scalar, or a short list of scalars (channel_mult, attn_resolutions, resample_filter)."""
    return isinstance(v, _SCALARS) or (isinstance(v, list) and len(v) <= 16 and all(isinstance(x, _SCALARS) for x in v))


RECORD_FIELDS = {  # every checkpoint, trained or converted
    'format': (str, True, None), 'step': (int, True, _count()), 'tensors': (str, True, None),
    'tensors_bytes': (int, True, _count()), 'tensors_sha256': (str, True, _HEX64.match),
    'record_sha256': (str, False, _HEX64.match), 'run_id': (str, False, re.compile(r'^[0-9a-f]{32}$').match),
    'branched_from': (dict, False, None), 'nimg': (int, False, _count()), 'model': (dict, False, None),
    'data': (dict, False, None), 'config': (dict, False, None), 'world_size': (int, False, _count(1)),
    'torch': (str, False, None)}
MODEL_FIELDS = {  # what sample, info and eval build the network from (precond: a Table 1 column, EDM if absent)
    'preset': (str, True, None), 'overrides': (dict, True, None), 'precond': (str, False, None),
    'precond_kwargs': (dict, False, lambda v: all(map(json_value, v.values())))}
OVERRIDE_FIELDS = {
    'img_resolution': (int, True, _count(1, MAX_RESOLUTION)), 'in_channels': (int, True, _count(1, 64)),
    'out_channels': (int, False, _count(1, 128)), 'label_dim': (int, True, _count(0, 100_000)),
    'augment_dim': (int, False, _count(0, 64)), 'model_channels': (int, False, _count(1, 4096)),
    'num_blocks': (int, False, _count(1, 64)), 'dropout': ((int, float), False, _count(0, 1))}
DATA_FIELDS = {  # what a resumed run reloads its training images from
    'dataset': (str, True, None), 'path': ((str, type(None)), True, None), 'resolution': ((int, type(None)), True, None),
    'transform': ((str, type(None)), True, None), 'cond': (bool, True, None),
    'augment': ((int, float), True, _count(0, 1)), 'num_images': (int, False, _count(1)),
    'fingerprint': (str, False, None), 'source': (str, False, None)}
TRAINING_FIELDS = {  # what an exact resume needs besides the weights: absent from a converted model
    'config': (dict, True, None),
    'optimizer': (dict, True, lambda v: isinstance(v.get('param_groups'), list)
                  and isinstance(v.get('scalars'), dict)),
    'rng': (dict, True, lambda v: isinstance(v.get('torch_cpu'), str)),
    'nimg': (int, False, _count()), 'world_size': (int, False, _count(1))}


def check_fields(record, fields: dict, where: str, others=None) -> dict:
    """`record` if it is a dict whose `fields` have the right types and values (and whose other fields satisfy
    `others`, if given); else ValueError naming the field and its value."""
    if not isinstance(record, dict): raise ValueError(f'{where} is not a JSON object: {type(record).__name__}')
    if others is not None:
        for name, value in record.items():
            if name not in fields and not others(value):
                raise ValueError(f'{where}: field {name!r} has the bad value {value!r}')
    for name, (types, required, ok) in fields.items():
        if name not in record:
            if required: raise ValueError(f'{where} lacks the field {name!r}')
            continue
        value = record[name]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)) \
                or not isinstance(value, types) or (ok is not None and not ok(value)) \
                or isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f'{where}: field {name!r} has the bad value {value!r}')
    return record
