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
import pickletools
import reprlib
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

__all__ = ['OfficialPickleError', 'Persistent', 'MODULE_RECORDS', 'ALLOWED', 'read_snapshot', 'describe', 'refuse',
           'short', 'message', 'MAX_NODES', 'MAX_DEPTH', 'MAX_TUPLE_NODES', 'MAX_TUPLE_DEPTH']

# Bounds on the work any traversal of unpickled data may do. A pickle shares objects through its memo, so a few
# hundred bytes (a = []; 40 x a = [a, a]) describe 2**40 leaves once expanded: every walk here counts the nodes it
# visits (repeats included) and its depth, and stops with a message instead of expanding.
MAX_NODES = 100_000  # nodes one walk of a value (init_kwargs, dataset_kwargs, ...) may visit; the real ones: < 100
MAX_DEPTH = 32       # nesting of such a value; the real ones: <= 3
MAX_TUPLE_NODES = 10_000  # the expanded size of one tuple the opcodes build (see _check_opcodes); the fixtures: 15
MAX_TUPLE_DEPTH = 20      # the nesting of tuples in tuples; the fixtures: 2


class OfficialPickleError(ValueError):
    """A file is not an official EDM snapshot we can read safely and map onto our classes; the message says why."""


class _ShortRepr(reprlib.Repr):
    """reprlib with small limits (at most 4**3 leaves), and without calling the repr of a tensor or of a huge int."""
    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxtuple, self.maxlist, self.maxarray, self.maxdict = 3, 4, 4, 4, 4
        self.maxset, self.maxfrozenset, self.maxdeque, self.maxstring, self.maxlong, self.maxother = 4, 4, 4, 40, 40, 40

    def repr1(self, x, level):
        if isinstance(x, torch.Tensor): return f'<tensor of shape {self.repr1(tuple(x.shape), level)}>'
        if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > 128:
            return f'<int of {x.bit_length()} bits>'
        if isinstance(x, Persistent): return f'<persistent {self.repr1(x.class_name, level)}>'
        if type(x).__repr__ is object.__repr__ or isinstance(x, (dict, list, tuple, set, frozenset, str, bytes,
                                                                   int, float, type(None))):
            return super().repr1(x, level)
        return f'<{type(x).__name__}>'  # a stand-in's own repr could be anything


short = _ShortRepr().repr  # a bounded repr of untrusted data: never builds the full str() first


def message(e: BaseException, limit: int = 300) -> str:
    """`type: text` of an exception met while reading untrusted data, without str() of values it may carry."""
    text = e.args[0] if e.args and isinstance(e.args[0], str) else ', '.join(short(a) for a in e.args[:3])
    return f'{type(e).__name__}: {text[:limit]}'


def describe(obj) -> str:
    """A short description of an unpickled value, for messages (bounded: see `short`)."""
    if isinstance(obj, Persistent): return f'a persistent {short(obj.class_name)} object'
    if isinstance(obj, dict):
        keys = [k if isinstance(k, str) else short(k) for k, _ in zip(obj, range(9))]
        return f'a dict with keys {sorted(k[:40] for k in keys)[:8]}{" ..." if len(obj) > 8 else ""}'
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

    def __setstate__(self, state):  # the official pickles carry the state inside `meta`, never as BUILD
        refuse('a torch_utils.persistence record with BUILD state (it would replace its checked fields)', state)


def _persistent(meta):
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj(meta)`: checks `meta`, executes nothing."""
    if not (isinstance(meta, dict) and meta.get('type') == 'class' and isinstance(meta.get('class_name'), str)
            and isinstance(meta.get('module_src'), str) and isinstance(meta.get('state'), dict)):
        refuse('a torch_utils.persistence record must be a dict with type "class", class_name, module_src, state',
               meta)
    return Persistent(meta['class_name'], meta['module_src'], meta['state'], meta.get('version'))


class _Container:
    """Stand-in for `torch.nn.ModuleDict`: pickle makes an empty one (NEWOBJ) and hands it its `__dict__` (BUILD)."""
    state = None  # until BUILD gives it contents: `edm_lit.official` refuses a ModuleDict without them

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
            refuse(f'numpy dtype state {short(state)} refused: expected (version, byte order, ...)')
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
    ok = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= 16
    numbers = [storage_offset, *size, *stride] if ok else [None]
    if not (ok and isinstance(storage, torch.storage.TypedStorage) and not backward_hooks and not metadata
            and all(type(n) is int and n >= 0 for n in numbers)):
        refuse(f'a tensor must be (storage, offset, size, stride) without hooks; found size {short(size)}, '
               f'stride {short(stride)}, offset {short(storage_offset)}')
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

    def persistent_load(self, pid): refuse(f'refused a persistent id {short(pid)}: snapshots have none')


_GETS, _PUTS = {'GET', 'BINGET', 'LONG_BINGET'}, {'PUT', 'BINPUT', 'LONG_BINPUT'}
_TUPLES = {'TUPLE': None, 'TUPLE1': 1, 'TUPLE2': 2, 'TUPLE3': 3, 'EMPTY_TUPLE': 0}


def _check_opcodes(f) -> None:
    """Refuse a pickle whose tuples, expanded, are huge or deep, before pickle builds anything.

    pickle hashes a tuple used as a dict key or set member, and the hash of a tuple walks it expanded: a tuple built
    from memo fetches of one smaller tuple (a = (); 40 x a = (a, a)) hashes 2**40 nodes inside `pickle.load`, where
    nothing can stop it. So this pass follows the opcode stream (`pickletools.genops`, nothing built) with a stack
    of sizes: each tuple opcode makes a value of size 1 + the sizes of its items, the memo keeps the sizes stored in
    it, anything else is size 1 (a list or dict is not hashed through). The rule: no tuple may expand to more than
    MAX_TUPLE_NODES nodes or nest deeper than MAX_TUPLE_DEPTH. The two real snapshots of shared/fixtures
    (~17,000 opcodes, ~5,300 memo fetches, ~2,100 tuples each) have tuples of at most 15 nodes, 2 deep: the bounds
    leave a margin of 10x and more, and the tuple bomb above (3 bytes a level) is refused at level 13.
    """
    stack, marks, memo = [], [], {}  # stack entries: (expanded size, depth)
    try:
        for op, arg, _ in pickletools.genops(f):
            name = op.name
            if name in _GETS: stack.append(memo.get(arg, (1, 0)))
            elif name in _PUTS: memo[arg] = stack[-1]
            elif name == 'MEMOIZE': memo[len(memo)] = stack[-1]
            elif name == 'MARK': marks.append(len(stack))
            elif name in _TUPLES:
                n = _TUPLES[name]
                start = marks.pop() if n is None else len(stack) - n
                if start < 0: raise IndexError('stack underflow')
                items, stack[start:] = stack[start:], []
                size, depth = 1 + sum(s for s, _ in items), 1 + max((d for _, d in items), default=0)
                if size > MAX_TUPLE_NODES or depth > MAX_TUPLE_DEPTH:
                    refuse(f'a tuple nests too deeply or is too large once its shared parts are expanded (more than '
                           f'{MAX_TUPLE_NODES} nodes or {MAX_TUPLE_DEPTH} levels: a "pickle bomb")')
                stack.append((size, depth))
            else:  # any other opcode: pops what it takes (down to the mark if it takes a slice), pushes size-1 values
                before = op.stack_before
                if pickletools.markobject in before:
                    start = marks.pop() - before.index(pickletools.markobject)
                else: start = len(stack) - len(before)
                if start < 0: raise IndexError('stack underflow')
                del stack[start:]
                after = [x for x in op.stack_after if x is not pickletools.markobject]
                stack.extend([(1, 0)] * len(after))
    except OfficialPickleError: raise
    except Exception as e:  # malformed or truncated: pickle itself would fail too
        raise OfficialPickleError(f'not a readable pickle ({message(e)})') from None


def read_snapshot(path) -> dict:
    """The dict an official snapshot holds, with `Persistent` records for its objects; nothing in it is run."""
    path = Path(path)
    with open(path, 'rb') as f:
        head = f.read(2)
        if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:  # PROTO 2..5: what Python 3 writes
            hint = ' (a zip archive: torch.save writes those, not the snapshot)' if head == b'PK' else ''
            refuse(f'{path} is not a pickle: it starts with {head!r}{hint}')
        f.seek(0)
        try: _check_opcodes(f)
        except OfficialPickleError as e: raise OfficialPickleError(f'{path}: {e}; nothing from it was run') from None
        f.seek(0)
        try: data = _Unpickler(f).load()
        except OfficialPickleError as e: raise OfficialPickleError(f'{path}: {e}; nothing from it was run') from None
        except Exception as e:  # truncated, or malformed opcodes
            raise OfficialPickleError(f'{path} is not a readable pickle ({message(e)})') from None
    if not (isinstance(data, dict) and isinstance(data.get('ema'), Persistent)):
        refuse(f"{path} is not an official EDM snapshot: expected a dict with an 'ema' network", data)
    return data
