"""benchmarks/gpu_suite.py: its --tiny run on a CPU (the JSON's structure, finite positive numbers, a FLOP count that
agrees with an independent one) and its one-line refusal to run the full suite without a GPU."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import safetensors
import torch
import tqdm
from torch.utils.flop_counter import FlopCounterMode

from edm_lit.official import network_from_record

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'gpu_suite.py'
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')


def _suite(*args, env=ENV, cwd=ROOT, flags=()):
    return subprocess.run([sys.executable, *flags, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_suite') / 'tiny.json'
    proc = _suite('--tiny', '--out', str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def _positive(record: dict, *keys):
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_tiny_run_writes_every_part_with_finite_positive_numbers(tiny):
    rec, stdout = tiny
    assert rec['tiny'] is True and rec['failed'] == [] and '--tiny' in rec['command']
    assert {'device_name', 'torch', 'cuda', 'cpu_count'} <= set(rec['hardware']) and rec['hardware']['cpu_count'] >= 1
    assert rec['hardware']['device'] == 'cpu' and rec['hardware']['torch'] == torch.__version__
    _positive(rec['wall_s'], 'training', 'sampling', 'fashion', 'total')
    a = rec['training']
    assert a['model']['preset'] == 'ddpmpp-cifar10' and set(a['modes']) == {'fp32', 'fast'}
    assert a['modes']['fp32']['precision'] == 'fp32' and a['modes']['fast']['precision'] == 'bf16'
    assert a['modes']['fast']['channels_last'] and a['peak_flops'] is None and 'mfu_note' in a  # no CPU peak
    _positive(a, 'flops_per_step', 'parameters', 'batch', 'speedup')
    for m in a['modes'].values():
        _positive(m, 'images_per_s', 'achieved_flops_per_s', 'peak_memory_per_image_mib', 'wall_s')
        assert m['mfu'] is None
        assert m['achieved_flops_per_s'] == pytest.approx(a['flops_per_step'] * m['images_per_s'] / a['batch'])
    b = rec['sampling']
    assert b['nfe'] == 35 and b['num_steps'] == 18 and {'fp32', 'bf16'} <= set(b['variants'])
    for v in b['variants'].values(): _positive(v, 'images_per_s', 'images')
    _positive(b, 'images_per_s', 'projected_50k_s')
    assert b['projected_50k_s'] == pytest.approx(50_000 / max(v['images_per_s'] for v in b['variants'].values()))
    c = rec['fashion']
    assert c['model']['preset'] == 'ddpmpp-fashion-mnist' and c['feature_net'] == 'domain'
    assert c['data_source'] in ('debian', 'torchvision', 'embedded')
    assert c['n'] == c['samples'] <= c['train_images'] // 2
    _positive(c, 'steps', 'images', 'train_wall_s', 'fid', 'floor_fid', 'n', 'sampling_wall_s', 'eval_wall_s')
    assert math.isfinite(c['kid']) and math.isfinite(c['floor_kid'])  # unbiased KID may be negative
    assert set(rec['goals']) == {'training_speedup', 'mfu_fast', 'sample_50k_s'}
    assert all(g['met'] is None for g in rec['goals'].values())  # --tiny: not evaluated
    assert 'fast / fp32' in stdout and 'goals: not evaluated' in stdout and 'FID' in stdout


def test_flops_per_step_are_about_three_forward_passes(tiny):
    """An independent count: one forward pass of the same network at the same batch. Backward costs about twice
    the forward, so a step is ~3x; counting the compiled module, forward only or per image would miss the band."""
    a = tiny[0]['training']
    net = network_from_record(a['model'])
    x = torch.randn(a['batch'], net.model.in_channels, net.model.img_resolution, net.model.img_resolution)
    with torch.no_grad(), FlopCounterMode(display=False) as counter: net(x, torch.full((a['batch'],), 1.0))
    assert 2.5 < a['flops_per_step'] / counter.get_total_flops() < 3.5
    assert a['parameters'] == sum(p.numel() for p in net.parameters())


def test_without_a_gpu_the_full_suite_exits_1_with_one_line(tmp_path):
    out = tmp_path / 'r.json'
    for args in ((), ('--device', 'cuda')):
        proc = _suite('--out', str(out), *args)
        assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith('gpu_suite: error: ')
        assert 'CUDA' in proc.stderr and not out.exists()


def test_runs_from_a_checkout_without_the_package_installed(tmp_path):
    """No site (-S): only the directories of torch and its company, not edm_lit's install; cwd is elsewhere."""
    sites = {str(Path(m.__file__).resolve().parents[1]) for m in (torch, numpy, safetensors, tqdm)}
    env = dict(ENV, PYTHONPATH=os.pathsep.join(sorted(sites)))
    proc = _suite('--out', str(tmp_path / 'r.json'), env=env, cwd=tmp_path, flags=('-S',))
    assert proc.returncode == 1 and proc.stderr.startswith('gpu_suite: error: no CUDA device'), proc.stderr
