"""benchmarks/sampler_study.py, guidance_sweep.py and cpu_train_choice.py at toy sizes: the sampler study's settings
(NFE counted, churn given as a multiple of N), its record and exact continuation after an interruption, its refusal
to mix studies, the figure; the guidance sweep's settings, scores and identities; the speed sweep's table and JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edm_lit import checkpoints, cli
from edm_lit.samplers import CountingDenoiser

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
sys.path.insert(0, str(ROOT / 'benchmarks'))
import sampler_study  # noqa: E402


def _script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / 'benchmarks' / name), *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)


def _tiny_model(folder, step=7, seed=0, jitter=0.0, **extra):
    model = dict(preset='ddpmpp-small', overrides=dict(img_resolution=32, in_channels=1, out_channels=1, label_dim=10,
                                                      augment_dim=0, model_channels=16, channel_mult=[1],
                                                      num_blocks=1, attn_resolutions=[], **extra))
    torch.manual_seed(seed)
    net = cli.build_net(model)
    with torch.no_grad():  # jitter > 0: weights off their init (whose zero output layer ignores x and the label)
        for p in net.parameters(): p.add_(jitter * torch.randn_like(p))
    checkpoints.save_checkpoint(folder, step, checkpoints.module_tensors('ema', net), dict(model=model, nimg=10 * step))
    return net


@pytest.mark.parametrize('setting', sampler_study.settings(), ids=lambda s: s['name'])
def test_every_setting_costs_the_nfe_it_claims(setting):
    """Each setting's sampler calls the network exactly `nfe` times (one batch), on a denoiser that returns 0."""
    counted = CountingDenoiser(lambda x, sigma, class_labels=None: torch.zeros_like(x))
    x = sampler_study.sampler_fn(setting['params'])(counted, torch.randn(2, 1, 4, 4), None,
                                                    num_steps=setting['num_steps'])
    assert counted.nfe == setting['nfe'] and torch.isfinite(x).all()
    if setting['params'].get('S_churn'):  # gamma = S_churn / N is the same at every N of a family
        gamma = float(setting['name'].split('-g')[1].split('-')[0])
        assert setting['params']['S_churn'] == pytest.approx(gamma * setting['num_steps'])


def test_study_record_continues_and_refuses_another_study(tmp_path):
    _tiny_model(tmp_path / 'model')
    out = tmp_path / 'study.json'
    proc = _script('sampler_study.py', tmp_path / 'model', '--n', 6, '--batch', 4, '--only', 'heun-4', 'ipndm-5',
                   '--out', out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r['n'], r['step'], r['nimg'], r['seed_start']) == (6, 7, 70, 0) and r['floor_fid'] > 0
    assert [x['name'] for x in r['results']] == ['heun-4', 'ipndm-5'] and [x['nfe'] for x in r['results']] == [7, 5]
    assert all(x['fid'] > 0 for x in r['results'])
    proc = _script('sampler_study.py', tmp_path / 'model', '--n', 6, '--batch', 3, '--only', 'heun-4', 'euler-8',
                   'euler-16', '--max-nfe', 10, '--out', out)  # heun-4 is done: kept; euler-8 added; euler-16 later
    again = json.loads(out.read_text())
    assert proc.returncode == 0 and [x['name'] for x in again['results']] == ['heun-4', 'ipndm-5', 'euler-8']
    assert again['results'][0] == r['results'][0]
    net, fn = _tiny_model(tmp_path / 'again'), sampler_study.sampler_fn(sampler_study.settings()[0]['params'])
    a, b = (sampler_study.generate(net, fn, [0, 1, 2], 8, 10, batch=k) for k in (2, 3))
    assert torch.equal(a, b) and a.shape == (3, 1, 32, 32) and a.min() >= -1 and a.max() <= 1  # seeds, not batches
    for args, message in (((tmp_path / 'model', '--n', 8), 'holds a study of n=6'),
                          ((tmp_path / 'model', '--n', 6, '--only', 'heun-5'), "unknown settings ['heun-5']")):
        proc = _script('sampler_study.py', *args, '--out', out)
        assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    (tmp_path / 'bad.json').write_text('{not json')
    for args, message in (((tmp_path / 'model', '--out', tmp_path / 'bad.json'), 'is not a sampler-study record'),
                          (('--out', tmp_path / 'none.json', '--plot', tmp_path / 'x.png'), 'not found')):
        proc = _script('sampler_study.py', *args)
        assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    proc = _script('sampler_study.py', '--out', out, '--plot', tmp_path / 'study.png')
    assert proc.returncode == 0 and (tmp_path / 'study.png').stat().st_size > 10_000, proc.stderr


def test_speed_sweep_prints_and_writes_each_setting(tmp_path):
    proc = _script('cpu_train_choice.py', '--nets', 8, '--batches', 4, '--settings', 'fp32', 'bf16', '--warmup', 1,
                   '--steps', 1, '--json', tmp_path / 'speed.json')
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / 'speed.json').read_text())
    assert [(x['channels'], x['batch'], x['setting']) for x in r['results']] == [(8, 4, 'fp32'), (8, 4, 'bf16')]
    assert all(x['train_images_per_s'] > 0 for x in r['results']) and 'train img/s' in proc.stdout


def test_guidance_sweep_scores_each_setting_and_keeps_the_identities(tmp_path):
    """none-w1 once, then cfg and one autoguidance curve per guide; a guide that is the model itself changes nothing
    (D_0 = D_1 gives D_w = D_1 exactly), a different guide does; accuracy and per-class FIDs are where they belong."""
    _tiny_model(tmp_path / 'model', jitter=0.05, label_dropout=0.1)
    _tiny_model(tmp_path / 'weak', step=3, seed=1, jitter=0.05, label_dropout=0.1)
    out = tmp_path / 'sweep.json'
    args = ('guidance_sweep.py', tmp_path / 'model', '--n-per-class', 3, '--steps', 2, '--batch', 8, '--out', out)
    proc = _script(*args, '--weights', 1, 2, '--guide', tmp_path / 'model', tmp_path / 'weak')
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    by = {x['name']: x for x in r['results']}
    assert list(by) == ['none-w1', 'cfg-w2', 'auto-0.04M-s7-w2', 'auto-0.04M-s3-w2'], list(by)
    assert [x['network_evaluations'] for x in r['results']] == [3, 6, 6, 6] and r['nfe'] == 3
    same = {k: by['auto-0.04M-s7-w2'][k] for k in ('class_fids', 'fid_all', 'class_accuracy')}
    assert same == {k: by['none-w1'][k] for k in same}  # guided by itself: the unguided model, bit for bit
    assert by['auto-0.04M-s3-w2']['class_fids'] != by['none-w1']['class_fids']
    assert by['cfg-w2']['class_fids'] != by['none-w1']['class_fids']
    for x in r['results']:
        assert len(x['class_fids']) == len(x['class_accuracy']) == 10 and 0 <= x['accuracy'] <= 1
        assert x['class_fid'] == pytest.approx(sum(x['class_fids']) / 10) and x['fid_all'] > 0
        assert x['accuracy'] == pytest.approx(sum(x['class_accuracy']) / 10)  # 3 images of every class
    assert len(r['floor_class_fids']) == 10 and r['floor_class_fid'] > 0
    proc = _script(*args, '--weights', 1, 3)  # continues: w = 1 is kept, cfg-w3 added
    again = json.loads(out.read_text())
    assert proc.returncode == 0 and [x['name'] for x in again['results']][-1] == 'cfg-w3', proc.stderr[-3000:]
    assert again['results'][0] == r['results'][0]
    proc = _script('guidance_sweep.py', tmp_path / 'model', '--n-per-class', 4, '--out', out)
    assert proc.returncode != 0 and 'holds a sweep' in proc.stderr and 'Traceback' not in proc.stderr
    _tiny_model(tmp_path / 'no-dropout')
    for extra, message in (((tmp_path / 'no-dropout', '--out', tmp_path / 'x.json'), 'label dropout'),
                           ((tmp_path / 'model', '--weights', 'nan', '--out', out), '--weights must be finite')):
        proc = _script('guidance_sweep.py', *extra)
        assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    proc = _script('guidance_sweep.py', '--out', out, '--plot', tmp_path / 'sweep.png')
    assert proc.returncode == 0 and (tmp_path / 'sweep.png').stat().st_size > 10_000, proc.stderr


@pytest.mark.parametrize('argv', [('sampler_study.py', 'MISSING', '--n', 4), ('guidance_sweep.py', 'MISSING'),
                                  ('guidance_sweep.py', 'model', '--guide', 'MISSING')])
def test_a_missing_checkpoint_is_a_message_naming_it(tmp_path, argv):
    _tiny_model(tmp_path / 'model', label_dropout=0.1)
    name, *args = [str(tmp_path / a) if a in ('MISSING', 'model') else a for a in argv]
    proc = _script(name, *args, '--out', tmp_path / 'out.json')
    assert proc.returncode == 1 and f'checkpoint not found: {tmp_path / "MISSING"}' in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr and not (tmp_path / 'out.json').exists()


def test_run_record_sums_the_processes_and_takes_the_median_rate(tmp_path):
    """benchmarks/run_record.py on a run made by two processes (the second resumed, its log time restarting): the
    wall time is the sum of both, images/s the median over logging intervals, the log is copied; no run: a message."""
    import run_record
    run, out = tmp_path / 'run', tmp_path / 'out'
    net = _tiny_model(run, step=6)
    log = [dict(step=s, nimg=10 * s, loss=1.0, time=t) for s, t in
           [(2, 1.0), (4, 2.0), (6, 3.0), (8, 103.0), (10, 5.0), (12, 6.0), (14, 7.0)]]
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in log))
    assert [len(s) for s in run_record.segments(log)] == [4, 3]
    r = _script('run_record.py', run, out, '--command', 'edm-lit train X', '--note', 'a pause at step 8')
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / 'run.json').read_text())
    # intervals: 20 images in 1 s (x2), 20 in 100 s (the pause), then 20 in 1 s (x2): median 20 images/s
    assert rec['images_per_second'] == 20.0 and rec['wall_seconds'] == 103.0 + 7.0
    assert rec['parameters'] == sum(p.numel() for p in net.parameters())
    assert rec['steps'] == 6 and rec['nimg'] == 60 and rec['commands'] == ['edm-lit train X'] and rec['note'] == 'a pause at step 8'
    assert (out / 'metrics.jsonl').read_text() == (run / 'metrics.jsonl').read_text()
    r = _script('run_record.py', tmp_path / 'nothing', out)
    assert r.returncode == 1 and 'not a finished run folder' in r.stderr and 'Traceback' not in r.stderr
