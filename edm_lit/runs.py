"""A run folder: who owns it, what a crash left in it, and its metrics log (plain module, not generated).

A run folder holds the checkpoints of one run (`edm_lit.checkpoints`: every record carries the run id),
`metrics.jsonl` (one JSON line per logged step) and sample grids. Before a run writes into a folder, `start_run`
refuses one that holds another run — or checkpoints of this run later than the one it resumes from, which resuming
would overwrite; resuming from a checkpoint in another folder branches off a new run, with a new id —, removes what an interrupted run left there (temporary files of `atomic_write`, tensor files whose
JSON was never written or already pruned) and cuts `metrics.jsonl` back to the resumed step, keeping only whole lines.
One run at a time: a run holds `<run_dir>/.lock` (created with O_CREAT | O_EXCL, holding its pid and host) while it
writes (`run_lock`); a second run in the folder is refused, naming the pid; a lock whose process is gone (kill -9)
is taken over with a warning. Used by the training loop of chapter 9 and by `edm-lit train`.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import re
import socket
import time
import uuid
import warnings
from pathlib import Path

from .checkpoints import CheckpointError, atomic_write, list_checkpoints, read_meta

__all__ = ['RunWarning', 'LOCK', 'acquire_lock', 'release_lock', 'run_lock', 'new_run_id', 'claim_run_dir', 'remove_stale_files', 'append_metrics', 'start_run']


class RunWarning(UserWarning):
    """A run folder needed a repair (a torn line dropped, stale files removed); the message says what was done."""


_STALE_RE = re.compile(r'^(\.(training-state-[0-9]{8,}\.(json|safetensors)|metrics\.jsonl)\..+\.tmp|'
                       r'training-state-[0-9]{8,}\.safetensors)$')  # temporaries of atomic_write; tensors (if orphaned)


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


LOCK = '.lock'  # in a run folder while a run writes into it: {"pid": ..., "host": ...}
_held: dict[Path, list] = {}  # lock files this process holds -> [times taken, whether taking made the folder]


def _pid_alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    except PermissionError: return True  # another user's live process
    return True


def _read_lock(path: Path):
    """(pid, host) of a lock file, or None while it is unreadable (being written, or torn by a crash)."""
    try: holder = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError): return None
    if not isinstance(holder, dict) or not isinstance(holder.get('pid'), int): return None
    return holder['pid'], str(holder.get('host'))


def acquire_lock(run_dir) -> Path:
    """Take `run_dir/.lock` for this process (again, if it holds it already): refuse (CheckpointError) when another
    live process holds it; take over, with a warning, a lock whose process is gone (a run killed by kill -9)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f'--outdir {run_dir} is a file; the run folder must be a folder')
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = (run_dir / LOCK).resolve()
    if path in _held:
        _held[path][0] += 1
        return path
    host, me = socket.gethostname(), os.getpid()
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        if made: _held[path] = [0, True]  # a refusal below gives the new, empty folder back too
        fcntl.flock(dir_fd, fcntl.LOCK_EX)  # one process at a time checks, takes over or creates the lock
        for _ in range(2):
            try: fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError: pass
            else:
                with os.fdopen(fd, 'w') as f: f.write(json.dumps(dict(pid=me, host=host)) + '\n')
                _held[path] = [1, made]
                return path
            holder = _read_lock(path)
            if holder is None and time.time() - path.stat().st_mtime < 10:
                raise CheckpointError(f'{run_dir} is being taken by another run ({path} is being written); '
                                      f'one run at a time writes into a run folder')
            if holder is not None and holder[1] != host:
                raise CheckpointError(f'{run_dir} is in use by process {holder[0]} on host {holder[1]} ({path}); '
                                      f'one run at a time writes into a run folder (if that run is gone, delete '
                                      f'{path})')
            if holder is not None and holder[0] != me and _pid_alive(holder[0]):
                raise CheckpointError(f'{run_dir} is in use by another run: process {holder[0]} holds {path}; '
                                      f'one run at a time writes into a run folder (wait for it, or stop it)')
            warnings.warn(f'{run_dir}: took over the lock of a run that is gone ' +
                          (f'(process {holder[0]} on {holder[1]})' if holder else '(an unreadable lock file)'),
                          RunWarning)
            path.unlink(missing_ok=True)
        raise CheckpointError(f'{run_dir}: could not take {path}')
    finally:
        os.close(dir_fd)  # closing releases the flock
        if path in _held and _held[path][0] == 0: release_lock(path)


def release_lock(path) -> None:
    """Give back a lock (or a run folder's lock) taken by `acquire_lock`; the file goes with the last taking."""
    path = Path(path).resolve()
    if path.is_dir(): path = path / LOCK
    if path not in _held: return
    _held[path][0] -= 1
    if _held[path][0] > 0: return
    _, made = _held.pop(path)
    if (_read_lock(path) or (None,))[0] == os.getpid(): path.unlink(missing_ok=True)
    if made:  # the folder taking the lock made, if nothing was written into it
        with contextlib.suppress(OSError): path.parent.rmdir()


@atexit.register
def _release_all() -> None:  # a run that took its lock in start_run (the library) gives it back at exit
    for path in list(_held):
        _held[path][0] = 1
        release_lock(path)


@contextlib.contextmanager
def run_lock(run_dir):
    """`with run_lock(run_dir):` hold the folder's lock (see `acquire_lock`); given back on any exit, errors and
    KeyboardInterrupt included (kill -9 leaves it, and the next run takes it over)."""
    path = acquire_lock(run_dir)
    try: yield path
    finally: release_lock(path)


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
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f'--outdir {run_dir} is a file; the run folder must be a folder')
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
    new one (a branch also records the run and step it branched off). Takes the folder's lock first (kept until
    `release_lock`, or the process exits, unless a `run_lock` around the run holds it), so nothing here runs while
    another run writes into the folder."""
    if (Path(run_dir) / LOCK).resolve() not in _held: acquire_lock(run_dir)
    claim_run_dir(run_dir, resume)
    remove_stale_files(run_dir)
    append_metrics(run_dir, None, truncate_after=start)
    saved = read_meta(resume) if resume is not None else {}
    if _own_folder(run_dir, resume) and saved.get('run_id'): return dict(meta, run_id=saved['run_id'])
    branch = dict(branched_from=dict(run_id=saved.get('run_id'), step=saved['step'])) if saved else {}
    return dict(meta, run_id=new_run_id(), **branch)
