"""No run is ever lost: kill -9 at every write point, run ids, resume into foreign folders, pruning, torn metrics,
stale temporary files, the dataset fingerprint, and checkpoint records that are validated and sealed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edm_lit import checkpoints, cli, runs

sys.path.insert(0, str(Path(__file__).parent))
import train_tiny  # noqa: E402
from test_bad_inputs import _images, _run, copy_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).parent / 'train_tiny.py'
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
TINY = ('--steps', '12', '--checkpoint-every', '2', '--keep', '2')


def _tiny(run, *args):
    return subprocess.run([sys.executable, str(HELPER), '--outdir', str(run), *TINY, *args], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)


def _steps(run):
    return [json.loads(s)['step'] for s in (run / 'metrics.jsonl').read_text().splitlines()]


# (kill point, what the folder must hold just after the kill, or None)
CHAIN = [('step:3', None),                   # mid-step, after checkpoint 2
         ('tensors-tmp', '.tmp'),            # the tensor file written to its temporary name, not renamed
         ('tensors-replaced', 'orphan'),     # the tensor file renamed, its JSON not yet written
         ('json-tmp', '.tmp'),               # the JSON written to its temporary name
         ('json-replaced', None),            # the checkpoint committed, the old ones not yet pruned
         ('metrics-torn', 'torn'),           # half a line of metrics.jsonl
         ('prune-half', 'orphan'),           # a pruned checkpoint's JSON deleted, its tensors not yet
         ('metrics-tmp', '.tmp')]            # the truncated metrics.jsonl written, not renamed (at start-up)


def test_kill_9_at_every_write_point_then_resume_is_bit_identical(tmp_path):
    """One run killed at eight points in turn, resumed after each; the end equals an uninterrupted run bit for bit."""
    a, b = tmp_path / 'a', tmp_path / 'b'
    assert train_tiny.main(['--outdir', str(a), *TINY]) == 0
    warnings = ''
    for point, left in CHAIN:
        out = _tiny(b, '--kill-at', point, *(['--resume', str(b)] if checkpoints.list_checkpoints(b) else []))
        assert out.returncode == -signal.SIGKILL, (point, out.stderr[-2000:])
        names = [p.name for p in b.iterdir()]
        if left == '.tmp': assert any(n.endswith('.tmp') for n in names), (point, names)
        if left == 'orphan': assert any(not (b / n).with_suffix('.json').exists() for n in names
                                        if n.endswith('.safetensors')), (point, names)
        if left == 'torn': assert not (b / 'metrics.jsonl').read_text().endswith('\n')
        warnings += out.stderr
    out = _tiny(b, '--resume', str(b))
    assert out.returncode == 0, out.stderr[-3000:]
    warnings += out.stderr
    newest = ['training-state-00000010.json', 'training-state-00000010.safetensors', 'training-state-00000012.json',
              'training-state-00000012.safetensors']
    assert sorted(p.name for p in a.iterdir()) == ['metrics.jsonl', *newest]
    assert sorted(p.name for p in b.iterdir()) == ['metrics.jsonl', 'training-state-00000006.json',
                                                   'training-state-00000006.safetensors', *newest]
    # nothing stale left; checkpoint 6, which the last resume started from, is never pruned (keep=2 otherwise)
    ta, ma = checkpoints.load_checkpoint(checkpoints.find_latest(a))
    tb, mb = checkpoints.load_checkpoint(checkpoints.find_latest(b))
    assert ma['step'] == mb['step'] == 12 and sorted(ta) == sorted(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert _steps(b) == _steps(a) == [2, 4, 6, 8, 10, 12]
    assert f'{b / "metrics.jsonl"}: dropped line 3' in warnings  # the torn line, said aloud
    assert 'removed 2 stale file(s) an interrupted run left' in warnings
    assert ma['run_id'] != mb['run_id'] and len({checkpoints.read_meta(p)['run_id']
                                                 for p in checkpoints.list_checkpoints(b)}) == 1


def test_pruning_never_deletes_the_checkpoint_resumed_from(tmp_path):
    assert train_tiny.main(['--outdir', str(tmp_path), '--steps', '4', '--checkpoint-every', '2']) == 0
    assert train_tiny.main(['--outdir', str(tmp_path), '--steps', '8', '--checkpoint-every', '2', '--keep', '1',
                            '--resume', str(tmp_path / 'training-state-00000004.json')]) == 0
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ['training-state-00000004.json',
                                                                       'training-state-00000008.json']
    for name in ('training-state-00000002.safetensors', 'training-state-00000006.safetensors'):
        assert not (tmp_path / name).exists()


def test_torn_and_foreign_metrics_lines_are_dropped_with_a_message(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 2, "loss": 1.0}\n[1, 2]\n{"step": 4, "loss": 0.5}\n{"step": 6, "lo')
    with pytest.warns(UserWarning, match=f'{path}: dropped line 2 \\(a JSON list, not a record\\) and line 4 '
                                         '\\(torn: Unterminated string'):
        runs.append_metrics(tmp_path, None, truncate_after=4)
    assert path.read_text() == '{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n'


def test_stale_temporaries_and_orphans_are_removed_on_start(tmp_path):
    run = tmp_path / 'run'
    assert train_tiny.main(['--outdir', str(run), '--steps', '2', '--checkpoint-every', '2']) == 0
    stale = [run / '.training-state-00000004.safetensors.x1y2.tmp', run / '.metrics.jsonl.abc.tmp',
             run / 'training-state-00000004.safetensors']
    for p in stale: p.write_bytes(b'partial')
    keep = run / 'notes.tmp'  # not ours: left alone
    keep.write_text('mine')
    with pytest.warns(UserWarning, match='removed 3 stale file'):
        assert train_tiny.main(['--outdir', str(run), '--steps', '4', '--checkpoint-every', '4', '--resume',
                                str(run)]) == 0
    assert keep.read_text() == 'mine' and not any(p.exists() for p in stale[:2])
    assert checkpoints.load_checkpoint(run / 'training-state-00000004.json')[1]['step'] == 4


def _train(capsys, *argv):
    code, err = _run(capsys, ['train', *argv, '--quiet'])
    assert code == 0, err
    return err


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli')
    images = _images(root / 'images')
    assert cli.main([str(a) for a in ('train', '--dataset', 'folder', '--data', images, '--preset', 'ddpmpp-small',
                                      '--batch', 4, '--steps', 4, '--lr-rampup', 0, '--checkpoint-every', 2,
                                      '--outdir', root / 'run', '--quiet')]) == 0
    return root


def test_every_record_carries_the_run_id_and_the_data_fingerprint(capsys, cli_run, tmp_path):
    run = copy_run(cli_run / 'run', tmp_path / 'run')
    _train(capsys, '--resume', run, '--steps', 6)
    records = [checkpoints.read_meta(p) for p in checkpoints.list_checkpoints(run)]
    assert [r['step'] for r in records] == [4, 6] and len({r['run_id'] for r in records}) == 1
    assert {r['data']['fingerprint'] for r in records} == {checkpoints.read_meta(
        cli_run / 'run' / 'training-state-00000002.json')['data']['fingerprint']}
    assert records[0]['data']['fingerprint'].startswith('sha256:') and len(records[0]['run_id']) == 32
    assert all(r['record_sha256'] == checkpoints.record_sha256(r) for r in records)


def test_branching_from_an_older_checkpoint_into_a_new_folder(capsys, cli_run, tmp_path):
    """The way out that the refusal names: --outdir NEW writes a new folder and leaves the old run alone."""
    code, err = _run(capsys, ['train', '--resume', cli_run / 'run' / 'training-state-00000002.json', '--steps', 3,
                              '--outdir', tmp_path / 'branch', '--quiet'])
    assert code == 0, err
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / 'branch')] == ['training-state-00000003.json']
    assert [p.name for p in checkpoints.list_checkpoints(cli_run / 'run')] == ['training-state-00000002.json',
                                                                              'training-state-00000004.json']
    parent, branch = (checkpoints.read_meta(p) for p in (cli_run / 'run' / 'training-state-00000002.json',
                                                         tmp_path / 'branch' / 'training-state-00000003.json'))
    assert branch['run_id'] != parent['run_id'] and branch['branched_from'] == dict(run_id=parent['run_id'], step=2)
    code, err = _run(capsys, ['train', '--resume', cli_run / 'run', '--steps', 6, '--outdir', tmp_path / 'branch'])
    assert code == 1 and f'{tmp_path / "branch"} holds checkpoints of another run' in err  # the branch is its own run


def test_allow_data_change_continues_and_records_the_new_fingerprint(capsys, cli_run, tmp_path):
    import shutil
    from PIL import Image
    images = shutil.copytree(cli_run / 'images', tmp_path / 'images')
    run = copy_run(cli_run / 'run', tmp_path / 'run')
    for p in checkpoints.list_checkpoints(run):  # point the run at the copy of its images
        record = json.loads(p.read_text())
        record['data']['path'] = str(images)
        record['record_sha256'] = checkpoints.record_sha256(record)
        p.write_text(json.dumps(record))
    Image.new('RGB', (8, 8), (0, 0, 0)).save(images / '99.png')  # a 13th image
    code, err = _run(capsys, ['train', '--resume', run, '--steps', 6, '--quiet'])
    assert code == 1 and '12 images then, 13 now' in err and '--allow-data-change' in err
    err = _train(capsys, '--resume', run, '--steps', 6, '--allow-data-change')
    assert 'warning: the training images in' in err
    before, after = (checkpoints.read_meta(run / f'training-state-0000000{s}.json')['data'] for s in (4, 6))
    assert before['fingerprint'] != after['fingerprint'] and after['num_images'] == 13


def test_a_model_without_training_state_is_read_by_info_sample_and_eval(capsys, tmp_path):
    """What a converter writes through the save API (model and weights only) stays loadable: sample, info, eval."""
    from edm_lit.cli.sample import build_net
    model = dict(preset='ddpmpp-small', overrides=dict(img_resolution=32, in_channels=1, out_channels=1, label_dim=0,
                                                       model_channels=8, channel_mult=[1], num_blocks=1,
                                                       attn_resolutions=[]))
    torch.manual_seed(0)
    net = build_net(model)
    checkpoints.save_checkpoint(tmp_path / 'm', 0, checkpoints.module_tensors('ema', net), dict(model=model))
    code = cli.main(['info', str(tmp_path / 'm')])
    info = json.loads(capsys.readouterr().out)
    assert code == 0 and info['step'] == 0 and info['nimg'] is None and info['config'] is None
    assert info['parameters'] == sum(p.numel() for p in net.parameters())
    code, err = _run(capsys, ['sample', tmp_path / 'm', '--seeds', '0-1', '--steps', 2, '--outdir', tmp_path / 's'])
    assert code == 0 and sorted(p.name for p in (tmp_path / 's').iterdir()) == ['000000.png', '000001.png',
                                                                               'grid.png'], err
    code, err = _run(capsys, ['eval', tmp_path / 'm', '--n', 2, '--steps', 2, '--source', 'embedded', '--json'])
    assert code == 0, err


def test_the_record_is_sealed_and_validated_before_use(tmp_path):
    net = torch.nn.Linear(2, 2)
    path = checkpoints.save_checkpoint(tmp_path, 5, checkpoints.module_tensors('ema', net), dict(note='x'))
    record = json.loads(path.read_text())
    assert record['record_sha256'] == checkpoints.record_sha256(record)
    path.write_text(path.read_text().replace('"note": "x"', '"note": "y"'))
    with pytest.raises(checkpoints.CheckpointError, match=f'checkpoint {path} was changed after it was written'):
        checkpoints.read_meta(path)
    record.pop('record_sha256')  # deleting the seal does not switch the check off ...
    path.write_text(json.dumps(record))
    with pytest.raises(checkpoints.CheckpointError, match="lacks the field 'record_sha256'"):
        checkpoints.read_meta(path)
    record['format'] = checkpoints.LEGACY_FORMATS[0]  # ... but a record written before records were sealed loads
    path.write_text(json.dumps(record))
    assert checkpoints.load_checkpoint(path)[1]['step'] == 5
    record['tensors_bytes'] = -1
    path.write_text(json.dumps(record))
    with pytest.raises(checkpoints.CheckpointError, match="field 'tensors_bytes' has the bad value -1"):
        checkpoints.read_meta(path)


# ------------------------------------------------------------------ one run at a time; what a run folder may be
def _lock_of(pid, folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / runs.LOCK).write_text(json.dumps(dict(pid=pid, host=__import__('socket').gethostname())))


def test_a_second_run_in_a_locked_folder_is_refused_and_the_lock_goes_on_exit(capsys, cli_run, tmp_path):
    run = copy_run(cli_run / 'run', tmp_path / 'run')
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])  # a live process "holding" it
    try:
        fresh = tmp_path / 'fresh'
        _lock_of(holder.pid, run)
        _lock_of(holder.pid, fresh)
        (run / '.metrics.jsonl.x.tmp').write_text('what a live run is writing')
        before = sorted(p.name for p in run.iterdir())
        for argv, folder in ((['--resume', run, '--steps', 6], run), (['--dataset', 'folder', '--data', cli_run /
                             'images', '--preset', 'ddpmpp-small', '--steps', 2, '--outdir', fresh], fresh)):
            code, err = _run(capsys, ['train', *argv, '--quiet'])
            assert code == 1 and f'{folder} is in use by another run: process {holder.pid} holds' in err, err
        assert sorted(p.name for p in run.iterdir()) == before  # nothing cleaned, truncated or written
        assert [p.name for p in fresh.iterdir()] == [runs.LOCK]
    finally:
        holder.kill()
        holder.wait()
    err = _train(capsys, '--resume', run, '--steps', 6)  # the holder is gone: its lock is stale, taken over
    assert f'{run}: took over the lock of a run that is gone (process {holder.pid}' in err
    assert not (run / runs.LOCK).exists() and checkpoints.find_latest(run).name == 'training-state-00000006.json'


def test_the_lock_is_given_back_on_errors_and_keyboard_interrupt(tmp_path, monkeypatch):
    for error in (KeyboardInterrupt, checkpoints.CheckpointError):
        with pytest.raises(error):
            with runs.run_lock(tmp_path / 'r') as path:
                assert json.loads(path.read_text())['pid'] == os.getpid()
                raise error('stop')
        assert not (tmp_path / 'r').exists()  # the folder the lock made, empty, goes with it
    (tmp_path / 'r').mkdir()
    with runs.run_lock(tmp_path / 'r'):
        with runs.run_lock(tmp_path / 'r'): pass  # the same process may nest (start_run inside edm-lit train)
        assert (tmp_path / 'r' / runs.LOCK).exists()
    assert list((tmp_path / 'r').iterdir()) == []


def test_two_runs_started_together_one_is_refused(tmp_path):
    procs = [subprocess.Popen([sys.executable, str(HELPER), '--outdir', str(tmp_path / 'conc'), '--steps', '6',
                               '--checkpoint-every', '2', '--stall-at', '1'], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT) for _ in range(2)]
    try:
        deadline = time.time() + 120
        while all(p.poll() is None for p in procs) and time.time() < deadline: time.sleep(0.1)
        time.sleep(0.5)  # one stalls holding the lock (--stall-at); the other is refused at once
        assert sorted(str(p.poll()) for p in procs) == ['1', 'None'], [p.poll() for p in procs]
        refused = next(p for p in procs if p.returncode == 1)
        assert f'{tmp_path / "conc"} is in use by another run: process' in refused.stderr.read()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_the_run_folder_must_not_lie_inside_the_image_folder(capsys, tmp_path):
    images = _images(tmp_path / 'dd')
    (tmp_path / 'link').symlink_to(images)
    for out in (images / 'run', tmp_path / 'link' / 'run', images):
        code, err = _run(capsys, ['train', '--dataset', 'folder', '--data', images, '--preset', 'ddpmpp-small',
                                  '--steps', 2, '--outdir', out, '--quiet'])
        assert code == 1 and f'--outdir {out} lies inside the image folder {images}' in err, err
    assert sorted(p.name for p in images.iterdir()) == [f'{i:02d}.png' for i in range(12)]


def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused(capsys, cli_run, tmp_path):
    run = copy_run(cli_run / 'run', tmp_path / 'run')
    code, err = _run(capsys, ['train', '--resume', run, '--steps', 2])
    assert code == 1 and '--steps 2 is below the resumed step 4' in err, err
    code, err = _run(capsys, ['train', '--resume', run, '--duration', 8])
    assert code == 1 and '--duration 8 images (2 steps of 4) is below the resumed step 4' in err, err


def test_files_get_the_umask_mode_and_steps_past_10_to_the_8_are_listed(tmp_path):
    old = os.umask(0o027)
    try:
        path = checkpoints.save_checkpoint(tmp_path, 10 ** 8, {'x': torch.zeros(1)}, {})
        runs.append_metrics(tmp_path, {'step': 1})
        runs.append_metrics(tmp_path, None, truncate_after=0)  # rewritten by atomic_write
    finally: os.umask(old)
    for p in (path, checkpoints.checkpoint_paths(path)[0], tmp_path / 'metrics.jsonl'):
        assert p.stat().st_mode & 0o777 == 0o640, (p, oct(p.stat().st_mode))
    checkpoints.save_checkpoint(tmp_path, 99999999, {'x': torch.zeros(1)}, {})
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ['training-state-99999999.json',
                                                                       'training-state-100000000.json']
    assert checkpoints.find_latest(tmp_path).name == 'training-state-100000000.json'
