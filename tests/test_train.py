"""Chapter 9: the training loop (EMA, lr ramp-up, data order, accumulation, exact resume, DDP, NaN stop) and the
image sets it trains on (Fashion-MNIST, a fake CIFAR-10 archive, image folders)."""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_lit import checkpoints, datasets, train
from edm_lit.data import DataError, ImageSet

sys.path.insert(0, str(Path(__file__).parent))
import train_tiny  # noqa: E402  (the tiny MLP setup shared with the subprocess tests)

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).parent / 'train_tiny.py'



# ---------------------------------------------------------------------------------------------- EMA and lr ramp-up
@pytest.mark.parametrize('B, h', [(512, 500_000), (16, 128), (1, 1)])
def test_ema_beta_is_half_life_in_images(B, h):
    beta = train.ema_beta(10**12, B, h)
    assert beta == pytest.approx(0.5 ** (B / h), rel=1e-15)
    assert beta ** (h / B) == pytest.approx(0.5, rel=1e-12)  # after h images the old weights count half
    n = 1000  # during the ramp-up the half-life is r * n images
    assert train.ema_beta(n, B, h) == pytest.approx(0.5 ** (B / min(h, 0.05 * n)), rel=1e-15)
    assert train.ema_beta(0, B, h) == 0.0


def test_update_ema_closed_form_for_constant_weights():
    net, ema = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p in net.parameters(): p.fill_(3.0)
        for p in ema.parameters(): p.fill_(1.0)
    beta, k = 0.75, 10
    for _ in range(k): train.update_ema(ema, net, beta)
    expect = 3.0 + beta ** k * (1.0 - 3.0)  # c + beta^k (ema_0 - c)
    for p in ema.parameters(): torch.testing.assert_close(p, torch.full_like(p, expect), rtol=0, atol=1e-6)
    train.update_ema(ema, net, 0.0)  # beta = 0 copies
    assert all(torch.equal(p, q) for p, q in zip(ema.parameters(), net.parameters()))


def test_learning_rate_ramp_end_points():
    assert train.learning_rate(0, 1e-3, 1000) == 0
    assert train.learning_rate(250, 1e-3, 1000) == pytest.approx(0.25e-3)
    assert train.learning_rate(1000, 1e-3, 1000) == 1e-3 == train.learning_rate(10**9, 1e-3, 1000)
    assert train.learning_rate(0, 1e-3, 0) == 1e-3


# ------------------------------------------------------------------------------------------------------ data order
def test_batches_are_epochs_of_permutations_and_pure_functions_of_the_step():
    N, B = 50, 10
    stream = torch.cat([train.batch_indices(k, B, N, seed=3) for k in range(10)])
    for e in range(2): assert torch.equal(stream[e * N:(e + 1) * N].sort().values, torch.arange(N))
    assert not torch.equal(stream[:N], stream[N:])
    straddle = train.batch_indices(3, 15, N, 3)  # positions 45..59: the end of epoch 0 and the start of epoch 1
    assert torch.equal(straddle, torch.cat([stream[45:50], stream[50:60]]))
    assert not torch.equal(train.batch_indices(0, B, N, 3), train.batch_indices(0, B, N, 4))  # the seed matters


def test_ranks_and_rounds_partition_the_global_batch():
    idx = train.batch_indices(2, 24, 100, 0)
    parts = [train.local_batches(idx, r, 3, batch_gpu=4) for r in range(3)]
    assert all(len(p) == 2 for p in parts)
    assert torch.equal(torch.cat([torch.cat(p) for p in parts]), idx)
    with pytest.raises(ValueError, match='batch_size 24 must split'):
        train.TrainConfig(batch_size=24, batch_gpu=5).check_world(3)
    with pytest.raises(ValueError, match='batch_size 10 must split'):
        train.TrainConfig(batch_size=10).check_world(4)


def test_accumulation_gives_the_gradient_of_the_batch_mean():
    """Eq. eq-train-ddp with A rounds: for D(x) = w x and l = sum (w x)^2, dL/dw = 2 w / B sum_i |x_i|^2."""
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(-1.5))

        def forward(self, x): return self.w * x
    data = ImageSet(torch.randn(12, 2, 3, 3, generator=torch.Generator().manual_seed(1)), torch.zeros(12).long(), 't')
    exact = 2 * -1.5 * data.images.pow(2).sum() / 12
    for rounds in (1, 3, 12):
        net = Scale()
        loss = train.accumulate_gradients(net, lambda net, images, labels=None, augment_pipe=None: net(images) ** 2,
                                          data, torch.arange(12).split(12 // rounds), torch.device('cpu'),
                                          train.TrainConfig())
        torch.testing.assert_close(net.w.grad, exact, rtol=1e-6, atol=0)
        torch.testing.assert_close(loss, (1.5 * data.images).pow(2).mean(), rtol=1e-6, atol=0)


def test_optimizer_step_replaces_nan_and_inf_gradients():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([float('nan'), float('inf'), -float('inf')])
    opt = torch.optim.SGD([p], lr=1.0)
    train.optimizer_step(torch.nn.ParameterList([p]), opt, lr=1e-5)
    torch.testing.assert_close(p.detach(), torch.tensor([0.0, -1.0, 1.0]), rtol=0, atol=1e-6)  # -lr * (0, 1e5, -1e5)


@pytest.mark.parametrize('bad, message', [(dict(batch_size=0), 'batch_size must be positive'),
                                          (dict(lr=-1.0), 'lr must be positive'),
                                          (dict(precision='fp16'), "unknown precision 'fp16'"),
                                          (dict(seed=-3), 'seed'), (dict(ema_halflife_nimg=0), 'ema_halflife')])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**bad)


# ------------------------------------------------------------------------------------------------- training runs
def _fixed_loss(net, data, n=256, seed=123):
    """The EDM loss on a fixed batch with fixed sigma and noise (seeded), in eval mode: comparable across models."""
    was = net.training
    net.eval()
    with torch.no_grad():
        torch.manual_seed(seed)
        loss = train_tiny.EDMLoss()(net, data.images[:n]).mean().item()
    net.train(was)
    return loss


def test_a_tiny_training_run_reduces_the_loss():
    torch.manual_seed(0)
    data, net = train_tiny.tiny_data(), train_tiny.tiny_net()
    before = _fixed_loss(net, data)
    config = train_tiny.tiny_config(150, 32, log_every=50, checkpoint_every=None)
    ema, history = train.training_loop(net, train_tiny.EDMLoss(), data, config,
                                       progress=False)
    after, after_ema = _fixed_loss(net, data), _fixed_loss(ema, data)
    assert [r['step'] for r in history] == [50, 100, 150] and history[-1]['nimg'] == 150 * 32
    assert after < 0.6 * before and after_ema < 0.6 * before, (before, after, after_ema)


def test_resume_in_process_is_exact(tmp_path):
    data, config = train_tiny.tiny_data(), train_tiny.tiny_config(8, checkpoint_every=4)
    straight = train_tiny.tiny_net()
    ema_a, _ = train.training_loop(straight, train_tiny.EDMLoss(), data, config, progress=False)
    first = train_tiny.tiny_net()
    train.training_loop(first, train_tiny.EDMLoss(), data, train_tiny.tiny_config(4, checkpoint_every=4), tmp_path,
                        progress=False)
    torch.manual_seed(999)  # a different global RNG state must not matter
    resumed = train_tiny.tiny_net(seed=5)  # and neither do different initial weights: they are overwritten
    ema_b, _ = train.training_loop(resumed, train_tiny.EDMLoss(), data, config, tmp_path, progress=False,
                                   resume=checkpoints.find_latest(tmp_path))
    assert train_tiny.weights_sha(straight) == train_tiny.weights_sha(resumed)
    assert train_tiny.weights_sha(ema_a) == train_tiny.weights_sha(ema_b)
    with pytest.raises(checkpoints.CheckpointError, match='lr='):
        train.training_loop(train_tiny.tiny_net(), train_tiny.EDMLoss(), data, train_tiny.tiny_config(8, lr=1e-4),
                            tmp_path, progress=False, resume=checkpoints.find_latest(tmp_path))


def test_bf16_autocast_and_channels_last_change_precision_not_mathematics():
    """The fast-mode knobs on a CPU: same seeds and data, so the losses differ only by rounding."""
    from edm_lit.networks import make_network
    small = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=(), dropout=0.0)
    last = {}
    for precision, channels_last in (('fp32', False), ('bf16', True)):
        torch.manual_seed(0)
        net = train_tiny.EDMPrecond(make_network('ddpmpp-small', **small))
        config = train_tiny.tiny_config(3, 8, precision=precision, channels_last=channels_last, log_every=1,
                                        checkpoint_every=None)
        _, history = train.training_loop(net, train_tiny.EDMLoss(), train_tiny.tiny_data(), config, progress=False)
        assert all(np.isfinite(r['loss']) for r in history)
        last[precision] = history[-1]['loss']
        conv = net.model.enc['8x8_block0'].conv0.weight  # 16 -> 16 channels, 3 x 3
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert last['bf16'] != last['fp32'] and last['bf16'] == pytest.approx(last['fp32'], rel=0.05)


ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')  # for the helper processes


def _run_helper(*args, **kwargs):
    return subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          **kwargs)


def _logged_steps(run_dir):
    return [json.loads(s)['step'] for s in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def _final_tensors(run_dir):
    tensors, meta = checkpoints.load_checkpoint(checkpoints.find_latest(run_dir))
    return tensors, meta


def test_kill_9_then_resume_gives_bit_identical_weights(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    assert train_tiny.main(['--outdir', str(a), '--steps', '12', '--checkpoint-every', '4']) == 0  # uninterrupted
    proc = subprocess.Popen([sys.executable, str(HELPER), '--outdir', str(b), '--steps', '12', '--checkpoint-every',
                             '4', '--stall-at', '6'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == 'STALLED 6', proc.stderr.read()  # checkpoint 4 written, 5-6 done
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None: proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert [p.name for p in checkpoints.list_checkpoints(b)] == ['training-state-00000004.json']
    resumed = _run_helper('--outdir', str(b), '--steps', '12', '--checkpoint-every', '4', '--resume', str(b),
                          timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    (ta, ma), (tb, mb) = _final_tensors(a), _final_tensors(b)
    assert ma['step'] == mb['step'] == 12 and sorted(ta) == sorted(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert _logged_steps(b) == [2, 4, 6, 8, 10, 12]  # the lines of the lost steps 5-6 were not duplicated


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    assert train_tiny.main(['--outdir', str(tmp_path), '--steps', '4', '--checkpoint-every', '4']) == 0
    good = {p.name: p.read_bytes() for p in tmp_path.glob('training-state-*')}
    out = _run_helper('--outdir', str(tmp_path), '--steps', '12', '--checkpoint-every', '2', '--resume',
                      str(tmp_path), '--nan-at', '5', timeout=300)
    assert out.returncode == 1
    assert 'training loss is nan at step 6' in out.stderr and 'training-state-00000004.json' in out.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.glob('training-state-*')} == good  # nothing new, nothing changed


def test_torchrun_two_processes_gloo(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(HELPER),
           '--outdir', str(tmp_path), '--steps', '6', '--checkpoint-every', '3', '--batch-gpu', '4']
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = sorted(s for s in out.stdout.splitlines() if s.startswith('RANK'))
    assert [s.split()[:4] for s in lines] == [['RANK', '0', 'OF', '2'], ['RANK', '1', 'OF', '2']]
    assert lines[0].split()[4:] == lines[1].split()[4:]  # DDP keeps the replicas identical
    assert sorted(p.name for p in tmp_path.iterdir()) == ['metrics.jsonl', 'training-state-00000003.json',
                                                          'training-state-00000003.safetensors',
                                                          'training-state-00000006.json',
                                                          'training-state-00000006.safetensors']
    ticks = [2, 3, 4, 6]  # log_every=2 and checkpoint_every=3: one line per tick, written by rank 0 alone
    assert _logged_steps(tmp_path) == ticks
    tensors, meta = _final_tensors(tmp_path)
    assert meta['world_size'] == 2 and meta['nimg'] == 6 * 16


# -------------------------------------------------------------------------------------------------------- datasets
def _write_fake_cifar(root: Path, n=4):
    """A tiny `cifar-10-batches-py` in the pickle layout torchvision reads; returns the raw data and labels."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    raw = {}
    for i, name in enumerate(names):
        data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), [(i + j) % 10 for j in range(n)]
        (folder / name).write_bytes(pickle.dumps({'data': data, 'labels': labels}))
        raw[name] = (data, labels)
    (folder / 'batches.meta').write_bytes(pickle.dumps({'label_names': [f'c{i}' for i in range(10)]}))
    return folder, raw


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_from_a_fake_archive(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10
    folder, raw = _write_fake_cifar(tmp_path)
    # torchvision checks every file against its MD5 sum: give it the sums of our fake files (the check stays on).
    monkeypatch.setattr(CIFAR10, 'train_list', [[f'data_batch_{i}', _md5(folder / f'data_batch_{i}')]
                                                for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, 'test_list', [['test_batch', _md5(folder / 'test_batch')]])
    monkeypatch.setattr(CIFAR10, 'meta', dict(CIFAR10.meta, md5=_md5(folder / 'batches.meta')))
    got = datasets.load_cifar10(tmp_path, download=False)
    assert got.images.shape == (20, 3, 32, 32) and got.source == 'cifar10'
    data = np.concatenate([raw[f'data_batch_{i}'][0] for i in range(1, 6)])
    expect = torch.from_numpy(data.reshape(20, 3, 32, 32).astype(np.float32)) / 127.5 - 1  # rows are R, G, B planes
    torch.testing.assert_close(got.images, expect, rtol=0, atol=1e-6)
    assert got.labels.tolist() == sum((raw[f'data_batch_{i}'][1] for i in range(1, 6)), [])
    assert len(datasets.load_cifar10(tmp_path, train=False, download=False)) == 4
    (folder / 'data_batch_3').write_bytes(b'truncated')  # a damaged file fails torchvision's MD5 check
    with pytest.raises(DataError, match='cifar-10-batches-py'):
        datasets.load_cifar10(tmp_path, download=False)


def test_cifar10_missing_without_network_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=f'CIFAR-10 not found.*{tmp_path}'):
        datasets.load_cifar10(tmp_path, download=False)

    def offline(root, train, download):
        if download: raise OSError('Temporary failure in name resolution')
        raise RuntimeError('Dataset not found or corrupted.')
    monkeypatch.setattr(datasets, '_cifar10', offline)
    with pytest.raises(DataError, match='downloading it failed: Temporary failure'):
        datasets.load_cifar10(tmp_path, download=True)


def _png(path, size, color, mode='RGB'):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_reads_exact_pixels_and_gray(tmp_path):
    _png(tmp_path / 'rgb' / 'a.png', (6, 6), (255, 0, 51))
    _png(tmp_path / 'rgb' / 'sub' / 'b.png', (6, 6), (0, 255, 102))
    got = datasets.load_image_folder(tmp_path / 'rgb')
    assert got.images.shape == (2, 3, 6, 6) and got.labels.tolist() == [0, 0]
    assert got.images[0, :, 0, 0].tolist() == pytest.approx([1.0, -1.0, 51 / 127.5 - 1])
    _png(tmp_path / 'gray' / 'a.png', (5, 5), 255, mode='L')
    assert datasets.load_image_folder(tmp_path / 'gray').images.shape == (1, 1, 5, 5)


def test_image_folder_transforms(tmp_path):
    from PIL import Image
    im = Image.new('RGB', (30, 10), (0, 0, 0))
    im.paste((255, 255, 255), (10, 0, 20, 10))  # white central square, black sides
    (tmp_path / 'wide').mkdir()
    im.save(tmp_path / 'wide' / 'w.png')
    _png(tmp_path / 'wide' / 'small.png', (4, 4), (255, 255, 255))
    crop = datasets.load_image_folder(tmp_path / 'wide', resolution=8, transform='center-crop')
    assert crop.images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(crop.images, torch.ones_like(crop.images), rtol=0, atol=1e-6)
    resized = datasets.load_image_folder(tmp_path / 'wide', resolution=8, transform='resize')
    assert resized.images[1, :, :, 0].max() < 0 and resized.images[1, :, :, 4].min() > 0.9  # black sides kept


@pytest.mark.parametrize('case, message', [
    ('empty', 'is empty'), ('missing', 'image folder not found'), ('mixed', 'images differ in size'),
    ('text', 'notes.txt is not a readable image'), ('wide', 'not square'), ('resolution', 'not the requested 8x8')])
def test_image_folder_errors_name_the_path(tmp_path, case, message):
    folder = tmp_path / case
    folder.mkdir()
    if case == 'mixed':
        _png(folder / 'a.png', (6, 6), 0, 'L')
        _png(folder / 'b.png', (7, 7), 0, 'L')
    if case == 'text':
        _png(folder / 'a.png', (6, 6), 0, 'L')
        (folder / 'notes.txt').write_text('not an image')
    if case == 'wide': _png(folder / 'a.png', (8, 6), 0, 'L')
    if case == 'resolution': _png(folder / 'a.png', (6, 6), 0, 'L')
    with pytest.raises(DataError, match=message) as info:
        datasets.load_image_folder(tmp_path / 'nowhere' if case == 'missing' else folder,
                                   resolution=8 if case == 'resolution' else None)
    assert str(tmp_path) in str(info.value)


def test_load_dataset_dispatch_and_errors(tmp_path):
    fm = datasets.load_dataset('fashion-mnist')
    assert fm.images.shape[1:] == (1, 32, 32) and fm.labels.max() == 9
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        datasets.load_dataset('mnist')
    with pytest.raises(ValueError, match='needs a path'):
        datasets.load_dataset('folder')
    small = datasets.load_dataset('fashion-mnist', resolution=16)  # 2 x 2 block means
    torch.testing.assert_close(small.images, fm.images.reshape(-1, 1, 16, 2, 16, 2).mean((3, 5)), rtol=0, atol=1e-6)
    for bad in (dict(resolution=64), dict(resolution=12), dict(transform='resize')):
        with pytest.raises(ValueError, match='cifar10 is 32x32'):
            datasets.load_dataset('cifar10', **bad)
    with pytest.raises(ValueError, match="unknown transform 'stretch'"):
        datasets.load_image_folder(tmp_path, resolution=8, transform='stretch')
