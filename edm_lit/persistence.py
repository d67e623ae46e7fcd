"""Pickles of `torch_utils.persistence` (official EDM snapshots) read as data, running nothing (plain module, not
generated).

NVlabs/edm's training loop writes `network-snapshot-*.pkl`, a pickle of `dict(ema=<network>, loss_fn=...,
augment_pipe=..., dataset_kwargs=...)`. Its classes are `torch_utils.persistence` classes: each object is pickled as
the call `_reconstruct_persistent_obj(meta)`, whose `meta` holds the source of the module that defined the class
(`module_src`), the class name and the object's `__dict__` (`state`, with the constructor's `_init_kwargs`);
`pickle.load` would `exec` that source and call whatever else the file names.

Here a restricted unpickler resolves only the globals of `ALLOWED`, each to a stand-in written for this module: a
persistent object becomes a `Persistent` record (its source stays text, never run), a tensor storage is read by
`torch.load(..., weights_only=True)`, a tensor is a bounds-checked view of it. Anything else raises
`OfficialPickleError` naming what was found. `edm_lit.official` maps the network onto our classes.
"""
from __future__ import annotations

import functools
import io
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

__all__ = ['OfficialPickleError', 'Persistent', 'MODULE_RECORDS', 'ALLOWED', 'read_snapshot', 'describe', 'refuse']


class OfficialPickleError(ValueError):
    """A file is not an official EDM snapshot we can read safely and map onto our classes; the message says why."""


def describe(obj) -> str:
    """A short description of an unpickled value, for messages."""
    if isinstance(obj, Persistent): return f'a persistent {obj.class_name!r} object'
    if isinstance(obj, dict): return f'a dict with keys {sorted(map(str, obj))[:8]}'
    return f'a {type(obj).__name__}'


def refuse(what, found=None):
    """Raise OfficialPickleError: `what`, and a description of what was `found` instead."""
    raise OfficialPickleError(what if found is None else f'{what}; found {describe(found)}')


# ---------------------------------------------------------------------------------------------------------------------
# The stand-ins for the allowed globals. None runs anything from the file, and the file cannot rewrite them: pickle's
# BUILD sets attributes on what it is given, so the functions are handed out as fresh partials, and the classes'
# own __setstate__ turns a BUILD on the class itself into an error.

class Persistent:
    """A `torch_utils.persistence` object as data: class name, module source (text, never run), state, version."""
    def __init__(self, class_name: str, module_src: str, state: dict, version=None):
        self.class_name, self.module_src, self.state, self.version = class_name, module_src, state, version


def _persistent(meta):
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj(meta)`: checks `meta`, executes nothing."""
    if not (isinstance(meta, dict) and meta.get('type') == 'class' and isinstance(meta.get('class_name'), str)
            and isinstance(meta.get('module_src'), str) and isinstance(meta.get('state'), dict)):
        refuse('a torch_utils.persistence record must be a dict with type "class", class_name, module_src, state',
               meta)
    return Persistent(meta['class_name'], meta['module_src'], meta['state'], meta.get('version'))


class _Container:
    """Stand-in for `torch.nn.ModuleDict`: pickle makes an empty one (NEWOBJ) and hands it its `__dict__` (BUILD)."""
    def __setstate__(self, state):
        if not isinstance(state, dict): refuse('a ModuleDict state must be a dict', state)
        self.state = state


MODULE_RECORDS = (Persistent, _Container)  # what a module tree of a snapshot is made of here

class _EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict`: a plain dict of items, without attribute state."""
    def __setstate__(self, state):
        if state: refuse('an EasyDict with attribute state', state)


class _DType:
    """Stand-in for `numpy.dtype(code, align, copy)`: plain numbers only (bool, int, uint, float, complex)."""
    def __init__(self, code, align=False, copy=False):
        try: self.dtype = np.dtype(code) if isinstance(code, str) and len(code) <= 8 else None
        except TypeError: self.dtype = None
        if self.dtype is None or self.dtype.kind not in 'biufc':
            refuse(f'numpy dtype {code!r} refused: only plain numbers are read')

    def __setstate__(self, state):  # numpy's (version, byte order, ...): for a number only the byte order matters
        if not (isinstance(state, tuple) and len(state) > 1 and state[1] in ('<', '>', '|', '=')):
            refuse(f'numpy dtype state {str(state)[:80]} refused: expected (version, byte order, ...)')
        if state[1] in '<>': self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data):
    """Stand-in for numpy's `scalar(dtype, bytes)`: the Python number those bytes hold."""
    if not (isinstance(dtype, _DType) and isinstance(data, bytes) and len(data) == dtype.dtype.itemsize):
        refuse('a numpy scalar must be (a plain dtype, its bytes)', dtype)
    return np.frombuffer(data, dtype.dtype)[0].item()


def _storage(data):
    """Stand-in for `torch.storage._load_from_bytes(data)`: `torch.load(weights_only=True)` of one storage."""
    if not isinstance(data, bytes): refuse('a tensor storage must be bytes', data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # TypedStorage is deprecated; the format of 2022 uses it
            storage = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except Exception as e:  # torch's message without its advice to retry with weights_only=False
        why = ' '.join(p.strip() for p in str(e).split('\n\n') if p.strip() and 'weights_only' not in p)
        refuse(f'a tensor storage could not be read by torch.load(weights_only=True): {(why or str(e))[:300]}')
    if not isinstance(storage, torch.storage.TypedStorage): refuse('expected a tensor storage', storage)
    return storage


def _tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for `torch._utils._rebuild_tensor_v2`: a bounds-checked view of a storage; no hooks, no metadata."""
    numbers = [storage_offset, *size, *stride] if isinstance(size, tuple) and isinstance(stride, tuple) else [None]
    if not (isinstance(storage, torch.storage.TypedStorage) and len(size) == len(stride) and not backward_hooks
            and not metadata and all(type(n) is int and n >= 0 for n in numbers)):
        refuse(f'a tensor must be (storage, offset, size, stride) without hooks; found size {str(size)[:60]}, '
               f'stride {str(stride)[:60]}, offset {str(storage_offset)[:20]}')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return torch.empty(0, dtype=storage.dtype).set_(storage.untyped(), storage_offset, size, stride)
    except RuntimeError as e: refuse(f'a tensor reaches outside its storage: {e}')


def _parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Stand-in for `torch._utils._rebuild_parameter(_with_state)`: the tensor itself (no hooks, no state)."""
    if not isinstance(data, torch.Tensor) or backward_hooks or state:
        refuse('a parameter must be a tensor without hooks or state', data)
    return data


ALLOWED = {  # (module, name) a snapshot refers to -> the stand-in used here
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent,
    ('torch.storage', '_load_from_bytes'): _storage,
    ('torch._utils', '_rebuild_tensor_v2'): _tensor,
    ('torch._utils', '_rebuild_parameter'): _parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _parameter,
    ('torch.nn.modules.container', 'ModuleDict'): _Container,
    ('collections', 'OrderedDict'): OrderedDict,
    ('dnnlib.util', 'EasyDict'): _EasyDict,
    ('numpy', 'dtype'): _DType,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,   # written by numpy 1.x
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,  # written by numpy 2.x
}


class _Unpickler(pickle.Unpickler):
    """pickle's unpickler with every global looked up in `ALLOWED` (and no persistent ids)."""
    def find_class(self, module, name):
        if (module, name) not in ALLOWED: refuse(f'refused the global {module}.{name}: it is not one of the '
                                                 f'{len(ALLOWED)} an EDM snapshot uses (edm_lit.persistence.ALLOWED)')
        found = ALLOWED[module, name]
        return found if isinstance(found, type) else functools.partial(found)

    def persistent_load(self, pid): refuse(f'refused a persistent id {str(pid)[:80]!r}: snapshots have none')


def read_snapshot(path) -> dict:
    """The dict an official snapshot holds, with `Persistent` records for its objects; nothing in it is run."""
    path = Path(path)
    with open(path, 'rb') as f:
        head = f.read(2)
        if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:  # PROTO 2..5: what Python 3 writes
            hint = ' (a zip archive: torch.save writes those, not the snapshot)' if head == b'PK' else ''
            refuse(f'{path} is not a pickle: it starts with {head!r}{hint}')
        f.seek(0)
        try: data = _Unpickler(f).load()
        except OfficialPickleError as e: raise OfficialPickleError(f'{path}: {e}; nothing from it was run') from None
        except Exception as e:  # truncated, or malformed opcodes
            raise OfficialPickleError(f'{path} is not a readable pickle ({type(e).__name__}: {e})') from None
    if not (isinstance(data, dict) and isinstance(data.get('ema'), Persistent)):
        refuse(f"{path} is not an official EDM snapshot: expected a dict with an 'ema' network", data)
    return data
