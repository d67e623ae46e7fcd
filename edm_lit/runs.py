"""A run folder: who owns it, what a crash left in it, and its metrics log (plain module, not generated).

A run folder holds the checkpoints of one run (`edm_lit.checkpoints`: every record carries the run id),
`metrics.jsonl` (one JSON line per logged step) and sample grids. Before a run writes into a folder, `start_run`
refuses one that holds another run — or checkpoints of this run later than the one it resumes from, which resuming
would overwrite; resuming from a checkpoint in another folder branches off a new run, with a new id —, removes what an interrupted run left there (temporary files of `atomic_write`, tensor files whose
JSON was never written or already pruned) and cuts `metrics.jsonl` back to the resumed step, keeping only whole lines.
Used by the training loop of chapter 9 and by `edm-lit train`.
"""
from __future__ import annotations

import json
import re
import uuid
import warnings
from pathlib import Path

from .checkpoints import CheckpointError, atomic_write, list_checkpoints, read_meta

__all__ = ['RunWarning', 'new_run_id', 'claim_run_dir', 'remove_stale_files', 'append_metrics', 'start_run']


class RunWarning(UserWarning):
    """A run folder needed a repair (a torn line dropped, stale files removed); the message says what was done."""


_STALE_RE = re.compile(r'^(\.(training-state-\d{8}\.(json|safetensors)|metrics\.jsonl)\..+\.tmp|'
                       r'training-state-\d{8}\.safetensors)$')  # temporaries of atomic_write; tensors (if orphaned)


def _metrics_line(text: str):
    """(record, None) for a whole line of metrics.jsonl, else (None, what is wrong with it)."""
    try: record = json.loads(text)
    except json.JSONDecodeError as e: return None, f'torn: {e.msg}'
    if isinstance(record, dict) and isinstance(record.get('step'), int) and not isinstance(record['step'], bool):
        return record, None
    kind = {dict: 'object without an integer step', list: 'list', str: 'string'}.get(type(record), 'number')
    return None, f'a JSON {kind}, not a record'


def append_metrics(run_dir, record: dict | None, truncate_after: int | None = None) -> None:
    """Append a JSON line to `run_dir/metrics.jsonl`; `truncate_after` first drops lines of later steps (on resume)
    and lines that are not whole records (a crash mid-append tears the last one), with a warning naming them."""
    path = Path(run_dir) / 'metrics.jsonl'
    path.parent.mkdir(parents=True, exist_ok=True)
    if truncate_after is not None and path.is_file():
        keep, dropped = [], []
        for number, text in enumerate(path.read_bytes().decode('utf-8', 'replace').split('\n'), 1):
            if not text.strip(): continue
            line, why = _metrics_line(text)
            if why: dropped.append(f'line {number} ({why})')
            elif line['step'] <= truncate_after: keep.append(text)
        if dropped:
            said = dropped[0] if len(dropped) == 1 else ', '.join(dropped[:-1]) + ' and ' + dropped[-1]
            warnings.warn(f'{path}: dropped {said}; kept the {len(keep)} whole line(s) up to step {truncate_after}',
                          RunWarning)
        atomic_write(path, ''.join(s + '\n' for s in keep).encode())
    if record:
        with open(path, 'a') as f: f.write(json.dumps(record) + '\n')


def new_run_id() -> str:
    """A fresh run id: 32 hex digits, written into every checkpoint record of the run."""
    return uuid.uuid4().hex


def _own_folder(run_dir, resume) -> bool:
    """True when `resume` (a checkpoint) lies in `run_dir`: the run continues in its own folder."""
    return resume is not None and Path(resume).resolve().parent == Path(run_dir).resolve()


def claim_run_dir(run_dir, resume=None) -> None:
    """Refuse (CheckpointError) to write into `run_dir` unless it belongs to this run. A new run — or a branch,
    resumed from a checkpoint in another folder, which is a new run too — needs a folder without checkpoints or
    metrics. A run resumed in its own folder needs every checkpoint there to be of its run (a record without a run id
    counts as any run's) and none later than the checkpoint `resume` it continues from: it would overwrite them."""
    run_dir, new = Path(run_dir), 'pick a new --outdir'
    found, metrics = list_checkpoints(run_dir), Path(run_dir) / 'metrics.jsonl'
    if not _own_folder(run_dir, resume):
        if found and resume is None:
            raise CheckpointError(f'{run_dir} already holds checkpoints; continue with --resume {run_dir} or {new}')
        if found:
            raise CheckpointError(f'{run_dir} holds checkpoints of another run ({found[0].name}: run '
                                  f'{read_meta(found[0]).get("run_id")}); resuming {resume} in another folder '
                                  f'branches off a new run, which needs a folder of its own: {new}')
        if metrics.is_file() and metrics.stat().st_size:
            raise CheckpointError(f'{run_dir} holds metrics.jsonl of an earlier run (and no checkpoint); move it '
                                  f'away or {new}')
        return
    saved = read_meta(resume)
    for path in found:
        other = read_meta(path)
        if other.get('run_id') and saved.get('run_id') and other['run_id'] != saved['run_id']:
            raise CheckpointError(f'{run_dir} holds checkpoints of another run ({path.name}: run {other["run_id"]}, '
                                  f'not run {saved["run_id"]} of {resume}); a run writes only into its own folder')
        if other['step'] > saved['step']:
            raise CheckpointError(f'{run_dir} holds {path.name}, later than the checkpoint resumed from (step '
                                  f'{saved["step"]}); resuming here would overwrite the later steps: resume from '
                                  f'{path.name}, or branch off at step {saved["step"]} with --outdir NEW')


def remove_stale_files(run_dir) -> list[str]:
    """Delete what an interrupted run left in `run_dir`: temporary files of atomic_write and tensor files without
    their JSON (a checkpoint half written or half pruned); warn naming them. Returns their names."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir(): return []
    stale = sorted(p.name for p in run_dir.iterdir() if _STALE_RE.match(p.name)
                   and (p.suffix == '.tmp' or not p.with_suffix('.json').is_file()))
    for name in stale: (run_dir / name).unlink(missing_ok=True)
    if stale: warnings.warn(f'{run_dir}: removed {len(stale)} stale file(s) an interrupted run left behind: '
                            f'{", ".join(stale)}', RunWarning)
    return stale


def start_run(run_dir, meta: dict, resume=None, start: int = 0) -> dict:
    """Before a run writes into `run_dir`: claim the folder (`claim_run_dir`), remove what a crash left there and cut
    metrics.jsonl back to step `start`. Returns `meta` with the run id: the resumed run's in its own folder, else a
    new one (a branch also records the run and step it branched off)."""
    claim_run_dir(run_dir, resume)
    remove_stale_files(run_dir)
    append_metrics(run_dir, None, truncate_after=start)
    saved = read_meta(resume) if resume is not None else {}
    if _own_folder(run_dir, resume) and saved.get('run_id'): return dict(meta, run_id=saved['run_id'])
    branch = dict(branched_from=dict(run_id=saved.get('run_id'), step=saved['step'])) if saved else {}
    return dict(meta, run_id=new_run_id(), **branch)
