"""Training checkpoints as safetensors + JSON, written atomically and read without pickle (plain module, not generated).

A checkpoint is a pair of files sharing a stem, e.g. `run/training-state-00000400.safetensors` and `.json`:

- the `.safetensors` file holds every tensor: the network (`net.*`), its EMA (`ema.*`) and the optimizer state
  (`optimizer.<param index>.<key>`), all on the CPU;
- the `.json` file (the record) holds everything else: the configuration, the step and the number of images seen,
  the run id, the data set's fingerprint, the random number generator states (base64 text), the optimizer's
  hyper-parameters, the SHA-256 and size of the tensor file and the SHA-256 of the record itself (`record_sha256`:
  always there in records of `FORMAT`; a record without it is refused unless its format is an earlier one,
  `LEGACY_FORMATS`, written before records were sealed).
  Its schema is in `edm_lit.validators`; a record holding only a model (written without training state, e.g. by a
  converter) is a valid checkpoint for sampling, `info` and `eval`, not for resuming.

The JSON file is written last: a checkpoint exists once its JSON file does. Each file is written (with the mode the umask gives) to a temporary name,
flushed, fsynced, renamed over its final name with `os.replace` and the directory is fsynced, so a crash (even
`kill -9`) leaves either the old checkpoint or the new one, never half of one; what a crash leaves behind (temporary
files, tensors without their JSON, a torn last line of metrics.jsonl) is cleared when the run resumes, and a run
folder belongs to one run (see `edm_lit.runs`). Loading uses `safetensors` and `json` only — never `pickle` or
`torch.load` — and any corrupt, truncated, edited or mismatched file raises `CheckpointError` naming the path. See
chapter 9 of the book.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from . import validators

__all__ = ['FORMAT', 'LEGACY_FORMATS', 'CheckpointError', 'atomic_write', 'checkpoint_paths', 'save_checkpoint',
           'load_checkpoint', 'read_meta', 'find_latest', 'list_checkpoints', 'prune_checkpoints', 'module_tensors', 'optimizer_tensors',
           'load_optimizer', 'rng_state', 'set_rng_state', 'encode_tensor', 'decode_tensor', 'load_module',
           'save_training_state', 'restore_training_state', 'record_sha256', 'read_training_meta',
           'check_model_record']

FORMAT = 'edm-lit-checkpoint/2'  # records of this format always carry record_sha256
LEGACY_FORMATS = ('edm-lit-checkpoint/1',)  # earlier records: read too; record_sha256 may be absent (before sealing)
_STEM = 'training-state-{step:08d}'  # 8 digits or more: step 10**8 is training-state-100000000
_STEM_RE = re.compile(r'^training-state-([0-9]{8,})\.json$')


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated or does not fit the run; the message names the path."""


def _umask() -> int:
    """This process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, data: bytes) -> Path:
    """Write `data` to `path` so that a crash leaves the old file or the new one: temp file, fsync, os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try: os.fsync(dir_fd)  # make the rename itself durable
    finally: os.close(dir_fd)
    return path


def checkpoint_paths(path) -> tuple[Path, Path]:
    """(tensor file, JSON file) of a checkpoint given either file or their common stem."""
    path = Path(path)
    stem = path.with_suffix('') if path.suffix in ('.json', '.safetensors') else path
    return stem.with_name(stem.name + '.safetensors'), stem.with_name(stem.name + '.json')


def encode_tensor(t: torch.Tensor) -> str:
    """A uint8 tensor (an RNG state) as base64 text for JSON."""
    return base64.b64encode(t.cpu().numpy().tobytes()).decode('ascii')


def decode_tensor(text: str) -> torch.Tensor:
    """Inverse of `encode_tensor`."""
    return torch.frombuffer(bytearray(base64.b64decode(text.encode('ascii'))), dtype=torch.uint8)


def rng_state() -> dict:
    """The global torch RNG states (CPU and every initialized CUDA device) as JSON-ready base64 strings."""
    state = {'torch_cpu': encode_tensor(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['torch_cuda'] = [encode_tensor(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (CUDA states only where CUDA is available)."""
    torch.set_rng_state(decode_tensor(state['torch_cpu']))
    if 'torch_cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode_tensor(s) for s in state['torch_cuda']][:torch.cuda.device_count()])


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state_dict as contiguous CPU tensors under `prefix.` (independent copies: safetensors-ready)."""
    return {f'{prefix}.{k}': v.detach().to('cpu', copy=True).contiguous() for k, v in module.state_dict().items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state_dict into tensors (`optimizer.<index>.<key>`) and a JSON-ready rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd['state'].items():
        for key, value in state.items():
            if torch.is_tensor(value): tensors[f'optimizer.{index}.{key}'] = value.detach().to('cpu', copy=True)
            else: scalars[f'{index}.{key}'] = value
    return tensors, {'param_groups': sd['param_groups'], 'scalars': scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Rebuild an optimizer's state_dict from `optimizer_tensors`' two halves and load it."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if not name.startswith('optimizer.'): continue
        _, index, key = name.split('.', 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta['scalars'].items():
        index, key = name.split('.', 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == 'betas' else v for k, v in g.items()} for g in meta['param_groups']]
    optimizer.load_state_dict({'state': state, 'param_groups': groups})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_sha256(record: dict) -> str:
    """The SHA-256 of a checkpoint record (its canonical JSON, without the field `record_sha256` itself)."""
    body = {k: v for k, v in record.items() if k != 'record_sha256'}
    return _sha256(json.dumps(body, sort_keys=True, separators=(',', ':')).encode())


def save_checkpoint(run_dir, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `training-state-<step>.safetensors` and then its `.json` (the commit) atomically; return the JSON path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    st_path, json_path = checkpoint_paths(run_dir / _STEM.format(step=step))
    blob = safetensors_save({k: v.contiguous() for k, v in tensors.items()})
    atomic_write(st_path, blob)
    record = json.loads(json.dumps(dict(meta, format=FORMAT, step=step, tensors=st_path.name, tensors_bytes=len(blob),
                                        tensors_sha256=_sha256(blob))))
    record['record_sha256'] = record_sha256(record)
    atomic_write(json_path, (json.dumps(record, indent=1, sort_keys=True) + '\n').encode())
    return json_path


def _read_json(json_path: Path) -> dict:
    if not json_path.is_file(): raise CheckpointError(f'checkpoint not found: {json_path}')
    try: meta = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'checkpoint {json_path} is corrupt or truncated (not valid JSON: {e})') from e
    if not isinstance(meta, dict) or not isinstance(meta.get('format'), str):
        raise CheckpointError(f'{json_path} is not an edm-lit checkpoint (a JSON object with format {FORMAT!r})')
    if meta['format'] != FORMAT and meta['format'] not in LEGACY_FORMATS:
        raise CheckpointError(f'{json_path} is not an edm-lit checkpoint of this version: format {meta["format"]!r}, '
                              f'expected {FORMAT!r}')
    if 'record_sha256' not in meta and meta['format'] == FORMAT:
        raise CheckpointError(f'checkpoint {json_path} lacks the field \'record_sha256\' that every {FORMAT} record '
                              f'carries: it was changed after it was written')
    try:
        validators.check_fields(meta, validators.RECORD_FIELDS, f'checkpoint {json_path}')
        if 'model' in meta: check_model_record(meta['model'], f'checkpoint {json_path}: model')
    except ValueError as e: raise CheckpointError(str(e)) from None
    if 'record_sha256' in meta and meta['record_sha256'] != record_sha256(meta):  # absent: a LEGACY_FORMATS record
        raise CheckpointError(f'checkpoint {json_path} was changed after it was written: its SHA-256 differs from '
                              f'the record_sha256 it holds')
    if meta['tensors'] != checkpoint_paths(json_path)[0].name:
        raise CheckpointError(f'checkpoint {json_path} names the tensor file {meta["tensors"]!r}, expected '
                              f'{checkpoint_paths(json_path)[0].name!r}')
    return meta


def check_model_record(model, where: str) -> dict:
    """The `model` record (preset + overrides) of a checkpoint, checked against the schema of edm_lit.validators."""
    validators.check_fields(model, validators.MODEL_FIELDS, where)
    return validators.check_fields(model['overrides'], validators.OVERRIDE_FIELDS, f'{where} overrides',
                                   others=validators.json_value)


def read_meta(path) -> dict:
    """The JSON half of a checkpoint (either file, or its stem), without reading the tensors; validated and sealed."""
    return _read_json(checkpoint_paths(path)[1])


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint (either file, or its stem) into (CPU tensors, metadata) using safetensors + json only."""
    st_path, json_path = checkpoint_paths(path)
    meta = _read_json(json_path)
    if not st_path.is_file(): raise CheckpointError(f'checkpoint tensors not found: {st_path} (named by {json_path})')
    blob = st_path.read_bytes()
    if len(blob) != meta['tensors_bytes'] or _sha256(blob) != meta['tensors_sha256']:
        raise CheckpointError(f'checkpoint {st_path} is corrupt or truncated: {len(blob)} bytes, SHA-256 differs '
                              f'from the {meta["tensors_bytes"]} bytes recorded in {json_path}')
    try: tensors = safetensors_load(blob)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f'checkpoint {st_path} cannot be decoded: {e}') from e
    return tensors, meta


def list_checkpoints(run_dir) -> list[Path]:
    """The JSON files of the checkpoints in `run_dir`, oldest step first (by step: 99999999 before 100000000)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir(): return []
    found = [p for p in run_dir.iterdir() if _STEM_RE.match(p.name)]
    return sorted(found, key=lambda p: (int(_STEM_RE.match(p.name)[1]), p.name))


def find_latest(path) -> Path:
    """The checkpoint named by `path`: a checkpoint file or stem, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found: raise CheckpointError(f'no checkpoint (training-state-*.json) in {path}')
        return found[-1]
    json_path = checkpoint_paths(path)[1]
    if not json_path.is_file(): raise CheckpointError(f'checkpoint not found: {path}')
    return json_path


def prune_checkpoints(run_dir, keep: int, protect=None) -> None:
    """Delete all but the newest `keep` checkpoints of `run_dir` (keep=0: keep them all), never `protect`."""
    if keep <= 0: return
    protect = checkpoint_paths(protect)[1].resolve() if protect is not None else None
    for json_path in list_checkpoints(run_dir)[:-keep]:
        if json_path.resolve() == protect: continue  # the checkpoint this run resumed from
        st_path = checkpoint_paths(json_path)[0]
        json_path.unlink()  # the JSON goes first: a half-deleted checkpoint is never mistaken for a whole one
        st_path.unlink(missing_ok=True)


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path, model=None) -> None:
    """Load the tensors named `prefix.*` into `module`; a mismatch raises CheckpointError naming `path` (and the
    `model` record the module was built from). A module built on the meta device takes the tensors themselves."""
    sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + '.')}
    try: module.load_state_dict(sd, assign=any(t.is_meta for t in module.state_dict().values()))
    except RuntimeError as e:
        what = f'its model record {model}' if model else 'this network'
        raise CheckpointError(f'checkpoint {path} does not fit {what}: {e}') from e


def save_training_state(run_dir, step: int, net, ema, optimizer, meta: dict, keep: int = 0, protect=None) -> Path:
    """Checkpoint everything an exact resume needs (net, EMA, optimizer, RNG states, `meta`); keep the newest `keep`
    (and `protect`, the checkpoint the run resumed from)."""
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tensors = {**module_tensors('net', net), **module_tensors('ema', ema), **opt_tensors}
    path = save_checkpoint(run_dir, step, tensors, dict(meta, optimizer=opt_meta, rng=rng_state(),
                                                        torch=torch.__version__))
    prune_checkpoints(run_dir, keep, protect)
    return path


def read_training_meta(path) -> dict:
    """The record of a checkpoint to resume from: it must hold the training state (a converted model does not)."""
    meta = read_meta(path)
    missing = [k for k, (_, required, _) in validators.TRAINING_FIELDS.items() if required and k not in meta]
    if missing:
        raise CheckpointError(f'cannot resume from {path}: it holds no training state to resume (lacks the field '
                              f'{missing[0]!r}); sample from it or evaluate it instead')
    try: validators.check_fields(meta, validators.TRAINING_FIELDS, f'cannot resume from {path}')
    except ValueError as e: raise CheckpointError(str(e)) from None
    return meta


def restore_training_state(path, net, ema, optimizer, expect: dict, defaults: dict | None = None) -> tuple[int, dict]:
    """Load net, EMA, optimizer and RNG states; returns (step, metadata).

    `expect` maps config names to the values this run uses; a checkpoint made with other values is refused, since
    the run could not continue exactly. A name the checkpoint lacks (written before the setting existed) has its
    value in `defaults`, if given there.
    """
    read_training_meta(path)
    tensors, meta = load_checkpoint(path)
    saved = dict(defaults or {}, **meta['config'])
    for name, value in expect.items():
        if saved.get(name) != value:
            raise CheckpointError(f'cannot resume from {path}: it was made with {name}={saved.get(name)!r}, this run '
                                  f'has {name}={value!r} (resuming keeps {", ".join(expect)} unchanged)')
    load_module(net, tensors, 'net', path)
    load_module(ema, tensors, 'ema', path)
    load_optimizer(optimizer, tensors, meta['optimizer'])
    set_rng_state(meta['rng'])
    return int(meta['step']), meta
