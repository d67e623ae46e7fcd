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

from . import validators
from .networks import DhariwalUNet, SongUNet, make_network
from .persistence import (ALLOWED, MAX_DEPTH, MAX_NODES, MODULE_RECORDS, OfficialPickleError, Persistent, describe,
                          message, read_snapshot, refuse, short)
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


def _plain(value, what='a value', budget=None, depth=0):
    """A JSON-ready copy of an init_kwargs value (lists for tuples, plain dicts); other objects by type name.

    Bounded: shared references are copied once per use, so the copy counts every node it makes (MAX_NODES) and its
    depth (MAX_DEPTH), and refuses a value beyond either (a "pickle bomb": 40 x a = [a, a] is 2**40 nodes)."""
    budget = [MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        refuse(f'{what} nests too deeply or is too large (more than {MAX_DEPTH} levels or {MAX_NODES} values)')
    if isinstance(value, dict):
        return {k if isinstance(k, str) else short(k): _plain(v, what, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)): return [_plain(v, what, budget, depth + 1) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return short(value)  # JSON readers (and str()) balk at huge ints
    return value if value is None or isinstance(value, (bool, int, float, str)) else f'<{type(value).__name__}>'


# Bounds on the network an init_kwargs may describe, checked before anything is built: the official models have
# at most 4 levels (channel_mult), 64 px images and ~300 M parameters.
MAX_LEVELS, MAX_PARAMETERS = 8, 4_000_000_000


def _check_size(o: dict, n_tensors: int, path) -> None:
    """Refuse overrides `o` whose network would be slow to build or huge, whatever num_blocks is."""
    blocks, mult, res, ch = (o.get(k) for k in ('num_blocks', 'channel_mult', 'img_resolution', 'model_channels'))
    if not (type(blocks) is int and isinstance(mult, list) and 0 <= blocks * len(mult) <= n_tensors):
        refuse(f'{path}: num_blocks={short(blocks)} and channel_mult={short(mult)} describe more blocks than the '
               f'file has tensors ({n_tensors})')  # bounds the work of building the network
    if not (1 <= len(mult) <= MAX_LEVELS and all(type(m) is int and 1 <= m <= 64 for m in mult)):
        refuse(f'{path}: channel_mult={short(mult)}: expected 1..{MAX_LEVELS} integers in 1..64')
    if not (type(res) is int and 2 ** (len(mult) - 1) <= res <= validators.MAX_RESOLUTION):
        refuse(f'{path}: img_resolution={short(res)}: expected an integer in {2 ** (len(mult) - 1)}..'
               f'{validators.MAX_RESOLUTION} (at least 2 ** (levels - 1))')
    if not (type(ch) is int and 1 <= ch <= 4096):
        refuse(f'{path}: model_channels={short(ch)}: expected an integer in 1..4096')
    estimate = sum((blocks + 2) * 20 * (ch * m) ** 2 for m in mult)  # convolutions of each level, generously
    if estimate > MAX_PARAMETERS:
        refuse(f'{path}: the init_kwargs describe a network of about {estimate:.2g} parameters; more than '
               f'{MAX_PARAMETERS:.0e} is refused')


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
        refuse(f'unknown network class {short(ema.class_name)}: expected one of {list(OFFICIAL_PRECONDS)}')
    column, own, default_model = OFFICIAL_PRECONDS[ema.class_name]
    kwargs = _init_kwargs(ema, ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', *own, 'model_type'))
    model_type = kwargs.pop('model_type', default_model)
    if not isinstance(model_type, str) or model_type not in NETWORKS:
        refuse(f'{short(ema.class_name)} wraps model_type={short(model_type)}: expected one of {list(NETWORKS)}')
    if type(kwargs.get('img_channels')) is not int or 'img_resolution' not in kwargs:
        refuse(f'{ema.class_name} init_kwargs lack img_resolution or an integer img_channels: {sorted(kwargs)[:12]}')
    channels = kwargs.pop('img_channels')
    precond_kwargs = {k: kwargs.pop(k) for k in ('use_fp16', *own) if k in kwargs}
    M = precond_kwargs.get('M', 1000)
    if column == 'iddpm' and not (type(M) is int and 1 <= M <= 100_000):  # the grid u has M + 1 values
        refuse(f'iDDPMPrecond M={short(M)}: expected an integer in 1..100000 (the official M is 1000)')
    kwargs.update(in_channels=channels, out_channels=channels * (2 if column == 'iddpm' else 1),
                  label_dim=kwargs.get('label_dim', 0))
    params = inspect.signature(NETWORKS[model_type]).parameters
    if set(kwargs) - set(params):
        refuse(f'{model_type} has no parameter(s) {sorted(set(kwargs) - set(params))[:12]} (in the init_kwargs of '
               f'{ema.class_name})')
    overrides = {name: _plain(kwargs.get(name, p.default), f'init_kwargs {name}')  # all: our defaults are official
                 for name, p in params.items()}
    preset = 'ncsnpp-cifar10' if overrides.get('embedding_type') == 'fourier' else _PRESET[model_type]
    return dict(preset=preset, overrides=overrides, precond=column,
                precond_kwargs=_plain(precond_kwargs, 'init_kwargs'))


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
    if not isinstance(obj.state, dict):
        refuse(f'{prefix[:-1] or "the network"} is a ModuleDict without contents (no BUILD state)')
    if len(seen) >= MAX_NODES or prefix.count('.') > MAX_DEPTH:
        refuse(f'the module tree at {prefix[:-1] or "the network"} nests too deeply or is too large')
    seen.add(id(obj))
    skip = obj.state.get('_non_persistent_buffers_set') or set()
    if not isinstance(skip, (set, frozenset)): refuse(f'{where}_non_persistent_buffers_set is not a set', skip)
    for kind in ('_parameters', '_buffers', '_modules'):
        items = obj.state.get(kind, {})
        if not isinstance(items, dict): refuse(f'{where}{kind} is not a dict', items)
        for name, value in items.items():
            if not isinstance(name, str): refuse(f'{where}{kind} has a key that is not a string: {short(name)}')
            if value is None or (kind == '_buffers' and name in skip): continue
            if kind == '_modules' and isinstance(value, MODULE_RECORDS):
                _tensors(value, f'{prefix}{name}.', out, seen)
            elif kind != '_modules' and isinstance(value, torch.Tensor) and value.is_floating_point():
                out[f'{prefix}{name}'] = value
            else: refuse(f'{prefix}{short(name)} is neither a float tensor nor a module', value)
    return out


_MALFORMED = (TypeError, AttributeError, ValueError, KeyError, IndexError, OverflowError, MemoryError)


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
        others = {k: dict(class_name=v.class_name,
                          init_kwargs=_plain(v.state.get('_init_kwargs'), f'{k} init_kwargs'))
                  for k, v in data.items() if isinstance(v, Persistent) and k != 'ema' and isinstance(k, str)}
        sources = {v.class_name: hashlib.sha256(v.module_src.encode()).hexdigest() for v in data.values()
                   if isinstance(v, Persistent)}  # which source each class came with (read as text only)
        info = dict(snapshot=path.name, sha256=_sha256(path), kimg=kimg and int(kimg[1]), class_name=ema.class_name,
                    init_args=_plain(ema.state.get('_init_args'), 'init_args'),
                    init_kwargs=_plain(ema.state.get('_init_kwargs'), 'init_kwargs'),
                    dataset_kwargs=_plain(data.get('dataset_kwargs'), 'dataset_kwargs'), module_src_sha256=sources,
                    **others)
    except OfficialPickleError as e: raise OfficialPickleError(f'{path}: {e}') from None
    except RecursionError: refuse(f'{path}: the network or its init_kwargs are nested too deeply')
    except _MALFORMED as e: refuse(f'{path}: a malformed snapshot ({message(e)}); nothing from it was run')
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
    tensors = dict(snapshot.tensors)
    _check_size(snapshot.model['overrides'], len(tensors), path)
    try: net = network_from_record(snapshot.model, device='meta')  # shapes only: costs no memory whatever kwargs say
    except Exception as e:  # anything our constructors refuse
        refuse(f'{path}: our classes refuse the init_kwargs {short(snapshot.model)}: {message(e)}')
    u = tensors.pop('u', None) if snapshot.model['precond'] == 'iddpm' else None  # official: a buffer; ours: derived
    _check_fit(net, tensors, path)
    if u is not None and (u.shape != net.u.shape or not torch.allclose(u.double(), net.u, rtol=1e-2, atol=0)):
        refuse(f'{path}: the iDDPM grid u in the file differs from the one its C_1, C_2, M give by more than '
               f'float32 round-off (1 %)')  # the official grid is float32; ours float64
    try: net.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, assign=True)
    except (RuntimeError, *_MALFORMED) as e: refuse(f'{path}: the weights could not be loaded ({message(e)})')
    return net.eval().requires_grad_(False)


def load_official_pickle(path) -> torch.nn.Module:
    """Our network, in eval mode, with the weights of an official EDM snapshot; nothing from the file is run."""
    return build_official(read_official(path), path)
