"""Training checkpoints as safetensors + JSON, written atomically and read without pickle (plain module, not generated).

A checkpoint is a pair of files sharing a stem, e.g. `run/training-state-00000400.safetensors` and `.json`:

- the `.safetensors` file holds every tensor: the network (`net.*`), its EMA (`ema.*`) and the optimizer state
  (`optimizer.<param index>.<key>`), all on the CPU;
- the `.json` file holds everything else: the configuration, the step and the number of images seen, the random
  number generator states (base64 text), the optimizer's hyper-parameters and the SHA-256 and size of the tensor file.

The JSON file is written last: a checkpoint exists once its JSON file does. Each file is written to a temporary name,
flushed, fsynced, renamed over its final name with `os.replace` and the directory is fsynced, so a crash (even
`kill -9`) leaves either the old checkpoint or the new one, never half of one. Loading uses `safetensors` and `json`
only — never `pickle` or `torch.load` — and any corrupt, truncated or mismatched file raises `CheckpointError`
naming the path. See chapter 9 of the book.
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

__all__ = ['FORMAT', 'CheckpointError', 'atomic_write', 'checkpoint_paths', 'save_checkpoint', 'load_checkpoint',
           'read_meta', 'find_latest', 'list_checkpoints', 'prune_checkpoints', 'module_tensors', 'optimizer_tensors',
           'load_optimizer', 'rng_state', 'set_rng_state', 'encode_tensor', 'decode_tensor', 'load_module',
           'save_training_state', 'restore_training_state', 'append_metrics']

FORMAT = 'edm-lit-checkpoint/1'
_STEM = 'training-state-{step:08d}'
_STEM_RE = re.compile(r'^training-state-(\d{8})\.json$')


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated or does not fit the run; the message names the path."""


def atomic_write(path, data: bytes) -> Path:
    """Write `data` to `path` so that a crash leaves the old file or the new one: temp file, fsync, os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
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


def save_checkpoint(run_dir, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `training-state-<step>.safetensors` and then its `.json` (the commit) atomically; return the JSON path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    st_path, json_path = checkpoint_paths(run_dir / _STEM.format(step=step))
    blob = safetensors_save({k: v.contiguous() for k, v in tensors.items()})
    atomic_write(st_path, blob)
    record = dict(meta, format=FORMAT, step=step, tensors=st_path.name, tensors_bytes=len(blob),
                  tensors_sha256=_sha256(blob))
    atomic_write(json_path, (json.dumps(record, indent=1, sort_keys=True) + '\n').encode())
    return json_path


def _read_json(json_path: Path) -> dict:
    if not json_path.is_file(): raise CheckpointError(f'checkpoint not found: {json_path}')
    try: meta = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'checkpoint {json_path} is corrupt or truncated (not valid JSON: {e})') from e
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise CheckpointError(f'{json_path} is not an edm-lit checkpoint (expected format {FORMAT!r})')
    return meta


def read_meta(path) -> dict:
    """The JSON half of a checkpoint (either file, or its stem), without reading the tensors."""
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
    """The JSON files of the checkpoints in `run_dir`, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir(): return []
    return sorted(p for p in run_dir.iterdir() if _STEM_RE.match(p.name))


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


def prune_checkpoints(run_dir, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of `run_dir` (keep=0: keep them all)."""
    if keep <= 0: return
    for json_path in list_checkpoints(run_dir)[:-keep]:
        st_path = checkpoint_paths(json_path)[0]
        json_path.unlink()  # the JSON goes first: a half-deleted checkpoint is never mistaken for a whole one
        st_path.unlink(missing_ok=True)


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path) -> None:
    """Load the tensors named `prefix.*` into `module`; a mismatch raises CheckpointError naming `path`."""
    sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + '.')}
    try: module.load_state_dict(sd)
    except RuntimeError as e: raise CheckpointError(f'checkpoint {path} does not fit this network: {e}') from e


def save_training_state(run_dir, step: int, net, ema, optimizer, meta: dict, keep: int = 0) -> Path:
    """Checkpoint everything an exact resume needs (net, EMA, optimizer, RNG states, `meta`); keep the newest `keep`."""
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tensors = {**module_tensors('net', net), **module_tensors('ema', ema), **opt_tensors}
    path = save_checkpoint(run_dir, step, tensors, dict(meta, optimizer=opt_meta, rng=rng_state(),
                                                        torch=torch.__version__))
    prune_checkpoints(run_dir, keep)
    return path


def restore_training_state(path, net, ema, optimizer, expect: dict) -> tuple[int, dict]:
    """Load net, EMA, optimizer and RNG states; returns (step, metadata).

    `expect` maps config names to the values this run uses; a checkpoint made with other values is refused, since
    the run could not continue exactly.
    """
    tensors, meta = load_checkpoint(path)
    saved = meta.get('config', {})
    for name, value in expect.items():
        if saved.get(name) != value:
            raise CheckpointError(f'cannot resume from {path}: it was made with {name}={saved.get(name)!r}, this run '
                                  f'has {name}={value!r} (resuming keeps {", ".join(expect)} unchanged)')
    load_module(net, tensors, 'net', path)
    load_module(ema, tensors, 'ema', path)
    load_optimizer(optimizer, tensors, meta['optimizer'])
    set_rng_state(meta['rng'])
    return int(meta['step']), meta


def append_metrics(run_dir, record: dict | None, truncate_after: int | None = None) -> None:
    """Append a JSON line to `run_dir/metrics.jsonl`; `truncate_after` first drops lines of later steps (on resume)."""
    path = Path(run_dir) / 'metrics.jsonl'
    path.parent.mkdir(parents=True, exist_ok=True)
    if truncate_after is not None and path.is_file():
        lines = [s for s in path.read_text().splitlines() if s.strip()]
        keep = [s for s in lines if json.loads(s).get('step', 0) <= truncate_after]
        atomic_write(path, ''.join(s + '\n' for s in keep).encode())
    if record:
        with open(path, 'a') as f: f.write(json.dumps(record) + '\n')
