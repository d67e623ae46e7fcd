"""Checkpoints: exact round trips, atomic writes, no pickle when loading, clear errors for damaged files."""
import json
import pickle

import pytest
import torch

from edm_lit import checkpoints as ckpt
from edm_lit import runs


def _trained_pair(seed=0):
    """A small network and an Adam optimizer with non-trivial state (two steps taken)."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.SiLU(), torch.nn.Linear(7, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-7)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(9, 5, generator=g)).pow(2).sum().backward()
        opt.step()
    return net, opt


def _save(tmp_path, step=3, keep=0, meta=None):
    net, opt = _trained_pair()
    ema = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.SiLU(), torch.nn.Linear(7, 3))
    path = ckpt.save_training_state(tmp_path, step, net, ema, opt, dict(meta or {}, config={'seed': 1}), keep=keep)
    return path, net, ema, opt


def test_round_trip_is_exact(tmp_path):
    path, net, ema, opt = _save(tmp_path)
    net2, opt2 = _trained_pair(seed=1)  # different weights and moments, overwritten by the load
    ema2 = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.SiLU(), torch.nn.Linear(7, 3))
    step, meta = ckpt.restore_training_state(path, net2, ema2, opt2, expect={'seed': 1})
    assert step == 3 and meta['config'] == {'seed': 1}
    for a, b in [(net, net2), (ema, ema2)]:
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1['param_groups'] == [dict(g, betas=tuple(g['betas'])) for g in s2['param_groups']]
    for i in s1['state']:
        for key in ('step', 'exp_avg', 'exp_avg_sq'):
            assert torch.equal(s1['state'][i][key], s2['state'][i][key])
    # The next Adam step is the same too (the optimizer really continues).
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    for n, o in [(net, opt), (net2, opt2)]:
        o.zero_grad()
        n(x).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net2.parameters()))


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = torch.rand(5)
    ckpt.set_rng_state(json.loads(json.dumps(state)))  # through JSON text, as on disk
    assert torch.equal(torch.rand(5), a)
    t = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(ckpt.decode_tensor(ckpt.encode_tensor(t)), t)


def test_loading_uses_no_pickle(tmp_path, monkeypatch):
    path, *_ = _save(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError('pickle / torch.load used while loading a checkpoint')
    for mod, name in [(pickle, 'load'), (pickle, 'loads'), (pickle, 'Unpickler'), (torch, 'load')]:
        monkeypatch.setattr(mod, name, forbidden)
    tensors, meta = ckpt.load_checkpoint(path)
    assert meta['step'] == 3 and 'net.0.weight' in tensors and 'optimizer.0.exp_avg' in tensors


def test_files_are_safetensors_and_json(tmp_path):
    path, *_ = _save(tmp_path, step=12)
    st, js = ckpt.checkpoint_paths(path)
    assert (st.name, js.name) == ('training-state-00000012.safetensors', 'training-state-00000012.json')
    header_len = int.from_bytes(st.read_bytes()[:8], 'little')  # the safetensors layout: u64 + JSON header
    assert json.loads(st.read_bytes()[8:8 + header_len])['net.0.weight']['shape'] == [7, 5]
    meta = json.loads(js.read_text())
    assert meta['format'] == ckpt.FORMAT and isinstance(meta['rng']['torch_cpu'], str)
    assert not list(tmp_path.glob('*.tmp')), 'temporary files left behind'


def test_corrupt_or_truncated_files_name_the_path(tmp_path):
    path, *_ = _save(tmp_path)
    st, js = ckpt.checkpoint_paths(path)
    blob, text = st.read_bytes(), js.read_text()
    st.write_bytes(blob[:-100])  # truncated tensors
    with pytest.raises(ckpt.CheckpointError, match=f'{st}.*corrupt or truncated'):
        ckpt.load_checkpoint(path)
    st.write_bytes(blob[:40] + bytes([blob[40] ^ 0xFF]) + blob[41:])  # one flipped byte, same size
    with pytest.raises(ckpt.CheckpointError, match=str(st)):
        ckpt.load_checkpoint(path)
    st.write_bytes(blob)
    js.write_text(text[:len(text) // 2])  # truncated JSON
    with pytest.raises(ckpt.CheckpointError, match=f'{js}.*not valid JSON'):
        ckpt.load_checkpoint(path)
    js.write_text('{"format": "something else"}')
    with pytest.raises(ckpt.CheckpointError, match='not an edm-lit checkpoint'):
        ckpt.load_checkpoint(path)
    js.write_text(text)
    st.unlink()
    with pytest.raises(ckpt.CheckpointError, match=f'tensors not found: {st}'):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match='checkpoint not found'):
        ckpt.load_checkpoint(tmp_path / 'nothing.json')


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path):
    path, net, ema, opt = _save(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    with pytest.raises(ckpt.CheckpointError, match='does not fit this network'):
        ckpt.restore_training_state(path, other, other, torch.optim.Adam(other.parameters()), expect={'seed': 1})
    with pytest.raises(ckpt.CheckpointError, match='seed=1.*seed=2'):
        ckpt.restore_training_state(path, net, ema, opt, expect={'seed': 2})


def test_latest_and_pruning(tmp_path):
    for step in (4, 8, 12):
        _save(tmp_path, step=step, keep=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ['training-state-00000008.json', 'training-state-00000012.json']
    assert not (tmp_path / 'training-state-00000004.safetensors').exists()
    assert ckpt.find_latest(tmp_path).name == 'training-state-00000012.json'
    assert ckpt.find_latest(tmp_path / 'training-state-00000008.safetensors').name == 'training-state-00000008.json'
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ckpt.CheckpointError, match='no checkpoint'):
        ckpt.find_latest(tmp_path / 'empty')


def test_atomic_write_replaces_whole_files(tmp_path, monkeypatch):
    target = tmp_path / 'f.json'
    ckpt.atomic_write(target, b'old')

    def crash(*args):
        raise OSError('disk full')
    monkeypatch.setattr(ckpt.os, 'replace', crash)  # a crash between writing and renaming ...
    with pytest.raises(OSError):
        ckpt.atomic_write(target, b'new contents')
    assert target.read_bytes() == b'old'  # ... leaves the old file whole and no temporary behind
    assert [p.name for p in tmp_path.iterdir()] == ['f.json']


def test_metrics_are_truncated_on_resume(tmp_path):
    for step in (2, 4, 6):
        runs.append_metrics(tmp_path, {'step': step, 'loss': 1.0})
    runs.append_metrics(tmp_path, None, truncate_after=4)
    runs.append_metrics(tmp_path, {'step': 6, 'loss': 0.5})
    lines = [json.loads(s) for s in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [(r['step'], r['loss']) for r in lines] == [(2, 1.0), (4, 1.0), (6, 0.5)]
