"""Official EDM snapshots as our networks: the mapping of their classes and init_kwargs onto ours (plain module,
not generated).

`edm_lit.persistence` reads a snapshot (`network-snapshot-*.pkl`) as data without running anything from it; here its
network (`EDMPrecond`, `VPPrecond`, `VEPrecond` or `iDDPMPrecond` around `SongUNet` or `DhariwalUNet`) is rebuilt from
its `init_kwargs` with our classes (chapter 5's preconditionings around chapter 7's U-Nets) and its weights are loaded
strictly. Anything else raises `OfficialPickleError` naming what was found. See the book page "Sampling the paper's
own models" and `edm-lit convert`.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .networks import DhariwalUNet, SongUNet, make_network
from .persistence import ALLOWED, MODULE_RECORDS, OfficialPickleError, Persistent, describe, read_snapshot, refuse
from .precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond

__all__ = ['OfficialPickleError', 'ALLOWED', 'OFFICIAL_PRECONDS', 'PRECONDS', 'NETWORKS', 'Snapshot', 'model_record',
           'network_from_record', 'read_official', 'build_official', 'load_official_pickle']

OFFICIAL_PRECONDS = {  # official class -> (Table 1 column, its own parameters in the official order, default model)
    'VPPrecond': ('vp', ('beta_d', 'beta_min', 'M', 'epsilon_t'), 'SongUNet'),
    'VEPrecond': ('ve', ('sigma_min', 'sigma_max'), 'SongUNet'),
    'iDDPMPrecond': ('iddpm', ('C_1', 'C_2', 'M'), 'DhariwalUNet'),
    'EDMPrecond': ('edm', ('sigma_min', 'sigma_max', 'sigma_data'), 'DhariwalUNet'),
}
PRECONDS = {'edm': EDMPrecond, 'vp': VPPrecond, 've': VEPrecond, 'iddpm': iDDPMPrecond}  # record -> our class
NETWORKS = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}  # official model_type -> ours (the same kwargs)
_PRESET = {'SongUNet': 'ddpmpp-cifar10', 'DhariwalUNet': 'adm-imagenet64'}  # picks the class; overrides are complete


def _plain(value):
    """A JSON-ready copy of an init_kwargs value (lists for tuples, plain dicts); other objects by type name."""
    if isinstance(value, dict): return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)): return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else f'<{type(value).__name__}>'


def _init_kwargs(obj: Persistent, positional: tuple) -> dict:
    """The constructor arguments a persistent object recorded, positional ones named by the official signature."""
    args, kwargs = obj.state.get('_init_args', ()), obj.state.get('_init_kwargs')
    if not (isinstance(args, (tuple, list)) and isinstance(kwargs, dict) and len(args) <= len(positional)
            and all(isinstance(k, str) for k in kwargs)) or set(kwargs) & set(positional[:len(args)]):
        refuse(f'{obj.class_name} carries no usable init_args / init_kwargs ({describe(args)}, {describe(kwargs)})')
    return {**dict(zip(positional, args)), **kwargs}


def model_record(ema: Persistent) -> dict:
    """Our `model` record for an official network: U-Net preset + complete overrides, precond column + kwargs.

    The official `*Precond(img_resolution, img_channels, label_dim, use_fp16, <own>, model_type, **model_kwargs)`
    builds `model_type(img_resolution, in_channels=img_channels, out_channels=img_channels (2x for iDDPM),
    label_dim, **model_kwargs)`; our classes take the same names (Table 1; chapters 5 and 7).
    """
    if ema.class_name not in OFFICIAL_PRECONDS:
        refuse(f'unknown network class {ema.class_name!r}: expected one of {list(OFFICIAL_PRECONDS)}')
    column, own, default_model = OFFICIAL_PRECONDS[ema.class_name]
    kwargs = _init_kwargs(ema, ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', *own, 'model_type'))
    model_type = kwargs.pop('model_type', default_model)
    if not isinstance(model_type, str) or model_type not in NETWORKS:
        refuse(f'{ema.class_name} wraps model_type={model_type!r}: expected one of {list(NETWORKS)}')
    if type(kwargs.get('img_channels')) is not int or 'img_resolution' not in kwargs:
        refuse(f'{ema.class_name} init_kwargs lack img_resolution or an integer img_channels: {sorted(kwargs)}')
    channels = kwargs.pop('img_channels')
    precond_kwargs = {k: kwargs.pop(k) for k in ('use_fp16', *own) if k in kwargs}
    M = precond_kwargs.get('M', 1000)
    if column == 'iddpm' and not (type(M) is int and 1 <= M <= 100_000):  # the grid u has M + 1 values
        refuse(f'iDDPMPrecond M={M!r}: expected an integer in 1..100000 (the official M is 1000)')
    kwargs.update(in_channels=channels, out_channels=channels * (2 if column == 'iddpm' else 1),
                  label_dim=kwargs.get('label_dim', 0))
    params = inspect.signature(NETWORKS[model_type]).parameters
    if set(kwargs) - set(params):
        refuse(f'{model_type} has no parameter(s) {sorted(set(kwargs) - set(params))} (in the init_kwargs of '
               f'{ema.class_name})')
    overrides = {name: _plain(kwargs.get(name, p.default)) for name, p in params.items()}  # all: our defaults are
    preset = 'ncsnpp-cifar10' if overrides.get('embedding_type') == 'fourier' else _PRESET[model_type]  # official
    return dict(preset=preset, overrides=overrides, precond=column, precond_kwargs=_plain(precond_kwargs))


def network_from_record(model: dict, device=None) -> torch.nn.Module:
    """The preconditioned U-Net a checkpoint's `model` record describes: preset + overrides (chapter 7) inside the
    Table 1 column `precond` with `precond_kwargs` (EDM with its defaults when absent); `device='meta'` builds the
    U-Net as shapes only, without memory. Derived in chapter 5."""
    precond = model.get('precond', 'edm')
    if not isinstance(precond, str) or precond not in PRECONDS:
        raise ValueError(f'unknown precond {precond!r} in the model record; expected one of {sorted(PRECONDS)}')
    with torch.device(device) if device else contextlib.nullcontext():
        inner = make_network(model['preset'], **model['overrides'])
    return PRECONDS[precond](inner, label_dim=model['overrides']['label_dim'], **model.get('precond_kwargs', {}))


@dataclass(frozen=True)
class Snapshot:
    """What an official snapshot holds, as data: our `model` record, the network's tensors and its provenance."""
    model: dict
    tensors: dict
    info: dict


def _tensors(obj, prefix: str = '', out=None, seen=None) -> dict:
    """The state_dict of a persistent module tree: its `_parameters`, persistent `_buffers` and `_modules`."""
    out, seen, where = {} if out is None else out, set() if seen is None else seen, prefix or 'the network '
    if id(obj) in seen: refuse(f'the module tree loops back at {where}')
    seen.add(id(obj))
    skip = obj.state.get('_non_persistent_buffers_set') or set()
    if not isinstance(skip, (set, frozenset)): refuse(f'{where}_non_persistent_buffers_set is not a set', skip)
    for kind in ('_parameters', '_buffers', '_modules'):
        items = obj.state.get(kind, {})
        if not isinstance(items, dict): refuse(f'{where}{kind} is not a dict', items)
        for name, value in items.items():
            if value is None or (kind == '_buffers' and name in skip): continue
            if kind == '_modules' and isinstance(value, MODULE_RECORDS):
                _tensors(value, f'{prefix}{name}.', out, seen)
            elif kind != '_modules' and isinstance(value, torch.Tensor) and value.is_floating_point():
                out[f'{prefix}{name}'] = value
            else: refuse(f'{prefix}{name} is neither a float tensor nor a module', value)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''): h.update(block)
    return h.hexdigest()


def read_official(path) -> Snapshot:
    """Read an official snapshot as data (`read_snapshot`) and map its network onto our record (`model_record`)."""
    path = Path(path)
    data = read_snapshot(path)
    ema, kimg = data['ema'], re.fullmatch(r'network-snapshot-(\d+)\.pkl', path.name)
    try:
        model, tensors = model_record(ema), _tensors(ema)
        others = {k: dict(class_name=v.class_name, init_kwargs=_plain(v.state.get('_init_kwargs')))
                  for k, v in data.items() if isinstance(v, Persistent) and k != 'ema'}
        sources = {v.class_name: hashlib.sha256(v.module_src.encode()).hexdigest() for v in data.values()
                   if isinstance(v, Persistent)}  # which source each class came with (read as text only)
        info = dict(snapshot=path.name, sha256=_sha256(path), kimg=kimg and int(kimg[1]), class_name=ema.class_name,
                    init_args=_plain(ema.state.get('_init_args')), init_kwargs=_plain(ema.state.get('_init_kwargs')),
                    dataset_kwargs=_plain(data.get('dataset_kwargs')), module_src_sha256=sources, **others)
    except OfficialPickleError as e: raise OfficialPickleError(f'{path}: {e}') from None
    except RecursionError: refuse(f'{path}: the network or its init_kwargs are nested too deeply')
    return Snapshot(model, tensors, info)


def _check_fit(net: torch.nn.Module, tensors: dict, path) -> None:
    """Raise OfficialPickleError naming the first mismatches unless `tensors` has exactly `net`'s names and shapes."""
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = [f'missing {k}' for k in want if k not in have] + [f'unexpected {k}' for k in have if k not in want]
    problems += [f'{k} is {have[k]} in the file, {want[k]} here' for k in want if k in have and have[k] != want[k]]
    if problems: refuse(f'{path}: the weights do not fit the network its init_kwargs describe ({len(problems)} '
                        f'problem(s)): {"; ".join(problems[:6])}')


def build_official(snapshot: Snapshot, path='the snapshot') -> torch.nn.Module:
    """Our network with the snapshot's weights (strict: every name and shape), in eval mode, on the CPU."""
    tensors, o = dict(snapshot.tensors), snapshot.model['overrides']
    blocks, mult = o.get('num_blocks'), o.get('channel_mult')
    if not (type(blocks) is int and isinstance(mult, list) and 0 <= blocks * len(mult) <= len(tensors)):
        refuse(f'{path}: num_blocks={blocks!r} and channel_mult={str(mult)[:40]} describe more blocks than the file '
               f'has tensors ({len(tensors)})')  # bounds the work of building the network
    try: net = network_from_record(snapshot.model, device='meta')  # shapes only: costs no memory whatever kwargs say
    except Exception as e:  # anything our constructors refuse
        refuse(f'{path}: our classes refuse the init_kwargs {str(snapshot.model)[:600]}: {type(e).__name__}: {e}')
    u = tensors.pop('u', None) if snapshot.model['precond'] == 'iddpm' else None  # official: a buffer; ours: derived
    _check_fit(net, tensors, path)
    if u is not None and (u.shape != net.u.shape or not torch.allclose(u.double(), net.u, rtol=1e-2, atol=0)):
        refuse(f'{path}: the iDDPM grid u in the file differs from the one its C_1, C_2, M give by more than '
               f'float32 round-off (1 %)')  # the official grid is float32; ours float64
    net.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, assign=True)
    return net.eval().requires_grad_(False)


def load_official_pickle(path) -> torch.nn.Module:
    """Our network, in eval mode, with the weights of an official EDM snapshot; nothing from the file is run."""
    return build_official(read_official(path), path)
