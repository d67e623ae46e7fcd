"""Official EDM snapshots (`edm_lit.official`, `edm-lit convert`): the two real snapshots of ../shared/fixtures give
the official outputs; every preconditioning x network combination maps onto our classes; malicious or broken files
are refused with a message naming what was found, run nothing and write nothing.

The synthetic snapshots below are written here, with pickle, in the layout of `torch_utils.persistence`: each object
pickles as `torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = dict(type, version, module_src,
class_name, state). Stub modules under the official names exist only while pickle writes those references (it checks
that they import); nothing official is imported or needed, and the stubs are never called.
"""
import contextlib
import json
import os
import pickle
import subprocess
import sys
import time
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_lit import official
from edm_lit.cli.sample import load_net
from edm_lit.networks import DhariwalUNet, SongUNet
from edm_lit.persistence import ALLOWED, Persistent
from edm_lit.precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from test_cli import _run  # cli.main in this process: (exit status, stdout, stderr)

FIXTURES = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'official-edm'
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f'no official snapshots at {FIXTURES}')
SOURCE = '# the module source a persistent class carries: read as text here, never run\n'


# ---------------------------------------------------------------------------------------------------------------------
# A writer of snapshots in the official layout (our own code).

def _reconstruct_persistent_obj(meta):
    raise AssertionError('a stub for pickle to name; never called')


class EasyDict(dict):
    """Pickles as dnnlib.util.EasyDict."""


@contextlib.contextmanager
def _official_names():
    """Stub modules torch_utils.persistence and dnnlib.util while pickle writes references to them."""
    names = ('torch_utils', 'torch_utils.persistence', 'dnnlib', 'dnnlib.util')
    mods = {name: types.ModuleType(name) for name in names}
    mods['torch_utils.persistence']._reconstruct_persistent_obj = _reconstruct_persistent_obj
    mods['dnnlib.util'].EasyDict = EasyDict
    _reconstruct_persistent_obj.__module__, EasyDict.__module__ = 'torch_utils.persistence', 'dnnlib.util'
    saved = {name: sys.modules.get(name) for name in mods}
    sys.modules.update(mods)
    try: yield
    finally:
        for name, module in saved.items():
            if module is None: sys.modules.pop(name)
            else: sys.modules[name] = module


class Pickled:
    """Pickles as torch_utils.persistence pickles an instance of a persistent class."""
    def __init__(self, class_name, state, module_src=SOURCE):
        self.meta = dict(type='class', version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return _reconstruct_persistent_obj, (self.meta,)


def as_official(module, class_name=None, init_kwargs=None, init_args=()):
    """Our module tree in the official layout: persistent objects, the same state names; ModuleDicts stay torch's."""
    state = dict(training=False, _parameters=OrderedDict(module._parameters), _buffers=OrderedDict(module._buffers),
                 _non_persistent_buffers_set=set(module._non_persistent_buffers_set), _modules=OrderedDict(),
                 _forward_hooks=OrderedDict(), skip_scale=np.float64(np.sqrt(0.5)), _init_args=tuple(init_args),
                 _init_kwargs=dict(init_kwargs or {}))
    if 'u' in state['_buffers']:  # the official iDDPMPrecond keeps its grid as a (float32) buffer
        state['_non_persistent_buffers_set'].discard('u')
        state['_buffers']['u'] = module.u.float()
    for name, child in module._modules.items():
        if child is None: state['_modules'][name] = None
        elif isinstance(child, torch.nn.ModuleDict):
            container = torch.nn.ModuleDict()
            container._modules.update({k: as_official(v) for k, v in child._modules.items()})
            state['_modules'][name] = container
        else: state['_modules'][name] = as_official(child)
    return Pickled(class_name or type(module).__name__, state)


def write_snapshot(path, ema, **extra):
    """A snapshot as the official training loop writes one: dict(ema, loss_fn, augment_pipe, dataset_kwargs)."""
    data = dict(ema=ema, loss_fn=Pickled('EDMLoss', dict(P_mean=-1.2, _init_args=(), _init_kwargs={})),
                augment_pipe=None, dataset_kwargs=EasyDict(path='datasets/x.zip', use_labels=False))
    data.update(extra)
    with _official_names(): Path(path).write_bytes(pickle.dumps(data))
    return Path(path)


def randomized(net, seed=0):
    """`net` with every parameter drawn at random (the official init zeroes some layers, which would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def denoise(net, label_dim, augment_dim=0, seed=1):
    """D(x; sigma) of `net` for three noise levels (0.05, 1.3, 40) and fixed labels."""
    g = torch.Generator().manual_seed(seed)
    x, sigma = torch.randn(3, net.model.in_channels, 8, 8, generator=g), torch.tensor([0.05, 1.3, 40.0])
    labels = torch.eye(label_dim)[[1, 2, 3]] if label_dim else None
    augment = torch.randn(3, augment_dim, generator=g) * 0.1 if augment_dim else None
    with torch.no_grad(): return net(x, sigma, labels, augment_labels=augment)


# ---------------------------------------------------------------------------------------------------------------------
# The two real snapshots.

@needs_fixtures
@pytest.mark.parametrize('name, precond, network', [('edm_ddpmpp_uncond', EDMPrecond, SongUNet),
                                                    ('iddpm_adm_cond', iDDPMPrecond, DhariwalUNet)])
def test_real_snapshots_give_the_official_outputs(name, precond, network):
    """D(x; sigma) equals the official float32 output to 1e-5 * max(1, |c_out|): the network output F to 1e-5.

    For EDM |c_out| <= sigma_data = 0.5, so D itself agrees to 1e-5. For iDDPM D = x - sigma F: at sigma = 40 the
    recorded D differs by 1.0e-4 (ours) and by 8e-5 (the official code, run once on this machine) from the file's:
    float32 round-off, multiplied by 40.
    """
    net = official.load_official_pickle(FIXTURES / f'{name}.pkl')
    ref = {k: torch.from_numpy(v) for k, v in np.load(FIXTURES / f'{name}.npz').items()}
    assert type(net) is precond and type(net.model) is network and not net.training
    assert sum(p.numel() for p in net.parameters()) == int(ref['n_params'])
    labels, augment = (ref[k] if ref[k].numel() else None for k in ('class_labels', 'augment_labels'))
    with torch.no_grad(): D = net(ref['x'], ref['sigma'], labels, augment_labels=augment)
    c_out = net.coefficients(ref['sigma'].double())[1].abs().clamp(min=1).float()
    error = (D - ref['D']).abs().amax(dim=(1, 2, 3))
    assert (error <= 1e-5 * c_out).all(), (error, c_out)


@needs_fixtures
def test_convert_then_info_sample_with_every_sampler(capsys, tmp_path):
    code, out, err = _run(capsys, 'convert', FIXTURES / 'iddpm_adm_cond.pkl', tmp_path / 'ckpt')
    assert code == 0 and 'iDDPMPrecond around DhariwalUNet (829,638 parameters)' in out, err
    code, out, _ = _run(capsys, 'info', tmp_path / 'ckpt')
    info = json.loads(out)
    assert code == 0 and info['parameters'] == 829_638 and info['model']['precond'] == 'iddpm'
    assert info['config']['official']['class_name'] == 'iDDPMPrecond'
    net, _ = load_net(tmp_path / 'ckpt', 'ema', 'cpu')  # the checkpoint gives the network the pickle gives
    direct = official.load_official_pickle(FIXTURES / 'iddpm_adm_cond.pkl')
    assert torch.equal(denoise(net, 10), denoise(direct, 10))
    for sampler in ('heun', 'churn', 'dpmpp_2m', 'ipndm', 'ipndm_v', 'unipc'):
        code, _, err = _run(capsys, 'sample', tmp_path / 'ckpt', '--seeds', '0-1', '--steps', 3, '--sampler', sampler,
                            '--outdir', tmp_path / sampler)
        assert code == 0 and (tmp_path / sampler / '000001.png').is_file(), (sampler, err)


def test_convert_then_eval(capsys, tmp_path):
    """A converted class-conditional 1x32x32 model: `edm-lit eval` generates and scores it like one of ours."""
    inner = SongUNet(img_resolution=32, in_channels=1, out_channels=1, label_dim=10, model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    kwargs = dict(img_resolution=32, img_channels=1, label_dim=10, model_type='SongUNet', model_channels=16,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    ema = as_official(randomized(EDMPrecond(inner, label_dim=10)), init_kwargs=kwargs)
    code, _, err = _run(capsys, 'convert', write_snapshot(tmp_path / 'network-snapshot-000200.pkl', ema),
                        tmp_path / 'ckpt')
    assert code == 0, err
    code, out, err = _run(capsys, 'eval', tmp_path / 'ckpt', '--n', 4, '--steps', 2, '--source', 'embedded', '--json')
    record = json.loads(out)
    assert code == 0 and record['n'] == 4 and record['nimg'] == 200_000 and np.isfinite(record['fid']), err
    assert record['class_labels'] == 'seed % 10'


# ---------------------------------------------------------------------------------------------------------------------
# The mapping of every official combination, on synthetic snapshots.

ARCH = {  # the official SongUNet (DDPM++, NCSN++ settings) and DhariwalUNet, tiny; non-default settings throughout
    'ddpmpp': (SongUNet, dict(embedding_type='positional', encoder_type='standard', decoder_type='standard',
                              channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2],
                              num_blocks=1, attn_resolutions=[4], dropout=0.0, augment_dim=9)),
    'ncsnpp': (SongUNet, dict(embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                              channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=16,
                              channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)),
    'adm': (DhariwalUNet, dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                               dropout=0.0, augment_dim=9)),
}
PRECOND = {  # official class -> (ours, kwargs other than the defaults: they must reach our class)
    'VPPrecond': (VPPrecond, dict(beta_d=18.0, beta_min=0.2, M=999, epsilon_t=2e-5)),
    'VEPrecond': (VEPrecond, dict(sigma_min=0.01, sigma_max=90.0)),
    'iDDPMPrecond': (iDDPMPrecond, dict(C_1=0.002, C_2=0.009, M=800)),
    'EDMPrecond': (EDMPrecond, dict(sigma_min=0.001, sigma_max=100.0, sigma_data=0.6)),
}
COMBOS = [(p, a) for p in PRECOND for a in ARCH]


def _expected(precond_name, arch, label_dim):
    """Our network for an official (precond, arch), built directly: what the snapshot must map onto."""
    ours, pk = PRECOND[precond_name]
    network, ak = ARCH[arch]
    out_channels = 6 if ours is iDDPMPrecond else 3  # iDDPM's network also predicts a variance
    inner = network(img_resolution=8, in_channels=3, out_channels=out_channels, label_dim=label_dim, **ak)
    net = randomized(ours(inner, label_dim=label_dim, **pk))
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=label_dim, model_type=network.__name__, **pk, **ak)
    return net, kwargs


@pytest.mark.parametrize('precond_name, arch', COMBOS)
def test_every_official_combination_maps_onto_ours(tmp_path, precond_name, arch):
    label_dim = 4 if COMBOS.index((precond_name, arch)) % 2 else 0
    net, kwargs = _expected(precond_name, arch, label_dim)
    snapshot = official.read_official(write_snapshot(tmp_path / 's.pkl', as_official(net, precond_name, kwargs)))
    loaded = official.build_official(snapshot)
    assert type(loaded) is type(net) and type(loaded.model) is type(net.model) and not loaded.training
    for name in ('sigma_min', 'sigma_max', 'sigma_data', 'label_dim', 'beta_d', 'beta_min', 'M', 'C_1', 'C_2'):
        assert getattr(loaded, name, None) == getattr(net, name, None), name
    augment_dim = ARCH[arch][1].get('augment_dim', 0)
    assert torch.equal(denoise(loaded, label_dim, augment_dim), denoise(net, label_dim, augment_dim))
    rebuilt = official.network_from_record(json.loads(json.dumps(snapshot.model)))  # as a checkpoint rebuilds it
    rebuilt.load_state_dict(loaded.state_dict())
    assert torch.equal(denoise(rebuilt, label_dim, augment_dim), denoise(net, label_dim, augment_dim))


@pytest.mark.parametrize('precond_name, arch', [('VPPrecond', 'ddpmpp'), ('VEPrecond', 'ncsnpp')])
def test_converted_vp_and_ve_baselines_sample(capsys, tmp_path, precond_name, arch):
    """The baselines' columns of Table 1 through the command line: convert, then the EDM sampler and a solver."""
    net, kwargs = _expected(precond_name, arch, 0)
    snapshot = write_snapshot(tmp_path / 's.pkl', as_official(net, precond_name, kwargs))
    assert _run(capsys, 'convert', snapshot, tmp_path / 'ckpt')[0] == 0
    for sampler in ('heun', 'dpmpp_2m'):
        code, _, err = _run(capsys, 'sample', tmp_path / 'ckpt', '--seeds', '0-1', '--steps', 3, '--sampler', sampler,
                            '--outdir', tmp_path / sampler)
        assert code == 0 and (tmp_path / sampler / 'grid.png').is_file(), err


@pytest.mark.parametrize('precond_name, network', [('VPPrecond', SongUNet), ('VEPrecond', SongUNet),
                                                   ('iDDPMPrecond', DhariwalUNet), ('EDMPrecond', DhariwalUNet)])
def test_default_model_type_and_positional_init_args(tmp_path, precond_name, network):
    """Without model_type, each official class builds its default network; positional init_args are named."""
    arch = 'ddpmpp' if network is SongUNet else 'adm'
    net, kwargs = _expected(precond_name, arch, 0)
    del kwargs['model_type']
    args = (kwargs.pop('img_resolution'), kwargs.pop('img_channels'))
    loaded = official.load_official_pickle(write_snapshot(tmp_path / 's.pkl', as_official(net, precond_name, kwargs,
                                                                                           args)))
    assert type(loaded.model) is network and torch.equal(denoise(loaded, 0, 9), denoise(net, 0, 9))


def test_our_network_defaults_are_the_official_ones():
    """The mapping fills what init_kwargs omit with our defaults: they must be the official ones (008a4e5)."""
    official_song = dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2],
                         channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0,
                         embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                         decoder_type='standard', resample_filter=[1, 1])  # training/networks.py, SongUNet
    official_adm = dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4],
                        channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10,
                        label_dropout=0)  # training/networks.py, DhariwalUNet
    for model_type, defaults in (('SongUNet', official_song), ('DhariwalUNet', official_adm)):
        state = dict(_init_kwargs=dict(img_resolution=64, img_channels=3, model_type=model_type))
        record = official.model_record(Persistent('EDMPrecond', SOURCE, state, 6))
        assert {k: record['overrides'][k] for k in defaults} == defaults, model_type


# ---------------------------------------------------------------------------------------------------------------------
# Malicious and broken files: refused by name, nothing run, nothing written.

class Reduce:
    """An object that pickles as the call fn(*args) (what a malicious __reduce__ does)."""
    def __init__(self, fn, *args): self.fn, self.args = fn, args

    def __reduce__(self): return self.fn, self.args


def _valid_ema():
    net, kwargs = _expected('EDMPrecond', 'ddpmpp', 0)
    return as_official(net, 'EDMPrecond', kwargs)


def _dump(path, data: bytes):
    path.write_bytes(data)
    return path


def _malicious(case, tmp_path, canary):
    """(file, words its refusal must contain) for one malicious or broken input."""
    path, touch = tmp_path / f'{case}.pkl', ['touch', str(canary)]
    write = f'open({str(canary)!r}, "w").write("pwned")'
    if case == 'os_system':
        return _dump(path, pickle.dumps(Reduce(os.system, ' '.join(touch)))), f'{os.system.__module__}.system'
    if case == 'eval':
        return write_snapshot(path, Reduce(eval, write)), 'builtins.eval'
    if case == 'popen':
        return write_snapshot(path, Reduce(subprocess.Popen, touch)), 'subprocess.Popen'
    if case == 'exec_in_a_hook':  # deep inside an otherwise valid network
        ema = _valid_ema()
        ema.meta['state']['_modules']['model'].meta['state']['_forward_hooks'][0] = Reduce(exec, write)
        return write_snapshot(path, ema), 'builtins.exec'
    if case == 'storage_runs_code':  # a tensor storage whose own pickle calls os.system
        import io
        blob = io.BytesIO()
        torch.save(Reduce(os.system, ' '.join(touch)), blob, _use_new_zipfile_serialization=False)
        ema = _valid_ema()
        ema.meta['state']['_modules']['model'].meta['state']['_parameters']['x'] = Reduce(
            torch.storage._load_from_bytes, blob.getvalue())
        return write_snapshot(path, ema), f'GLOBAL {os.system.__module__}.system'
    if case == 'module_src_unknown_class':
        ema = _valid_ema()
        ema.meta.update(module_src=write, class_name='Pwned')
        return write_snapshot(path, ema), "'Pwned'"
    if case == 'unknown_model_type':
        ema = _valid_ema()
        ema.meta['state']['_init_kwargs']['model_type'] = 'StyleGAN2'
        return write_snapshot(path, ema), "model_type='StyleGAN2'"
    if case == 'missing_weight':
        ema = _valid_ema()
        del ema.meta['state']['_modules']['model'].meta['state']['_modules']['map_layer0'].meta['state'][
            '_parameters']['bias']
        return write_snapshot(path, ema), 'missing model.map_layer0.bias'
    if case == 'huge_num_blocks':
        ema = _valid_ema()
        ema.meta['state']['_init_kwargs']['num_blocks'] = 10 ** 9
        return write_snapshot(path, ema), 'num_blocks=1000000000'
    if case == 'object_dtype':
        return write_snapshot(path, _valid_ema(), extra=np.dtype(object)), "numpy dtype 'O"
    if case == 'truncated':
        data = write_snapshot(path, _valid_ema()).read_bytes()
        return _dump(path, data[:len(data) // 2]), 'not a readable pickle'
    if case == 'not_a_pickle':
        return _dump(path, b'\x89PNG\r\n\x1a\n' + bytes(64)), "is not a pickle: it starts with b'\\x89P'"
    if case == 'zip_archive':
        torch.save({'net': torch.zeros(2)}, path)
        return path, 'a zip archive'
    if case == 'no_ema':
        return _dump(path, pickle.dumps({'net': 1, 'kimg': 2})), "'ema' network; found a dict with keys ['kimg', 'net']"
    if case == 'persistent_id':
        class Pickler(pickle.Pickler):
            def persistent_id(self, obj): return 'storage-7' if obj == 'x' else None
        with open(path, 'wb') as f: Pickler(f).dump({'ema': 'x'})
        return path, 'persistent id'
    bomb, too_big = _bomb(), 'nests too deeply or is too large'
    if case == 'bomb_init_kwargs':  # 2**40 leaves in 41 lists: every walk of it must stop early
        ema = _valid_ema()
        ema.meta['state']['_init_kwargs']['attn_resolutions'] = bomb
        return write_snapshot(path, ema), 'init_kwargs attn_resolutions ' + too_big
    if case == 'bomb_init_args':
        ema = _valid_ema()
        del ema.meta['state']['_init_kwargs']['img_resolution']
        ema.meta['state']['_init_args'] = (bomb,)
        return write_snapshot(path, ema), too_big
    if case == 'bomb_dataset_kwargs':
        return write_snapshot(path, _valid_ema(), dataset_kwargs=EasyDict(path=bomb)), 'dataset_kwargs ' + too_big
    if case == 'bomb_tensor_size':
        ema = _valid_ema()
        ema.meta['state']['_modules']['model'].meta['state']['_parameters']['x'] = Reduce(
            torch._utils._rebuild_tensor_v2, torch.zeros(4).storage(), 0, bomb, (1,), False, OrderedDict())
        return write_snapshot(path, ema), 'a tensor must be (storage, offset, size, stride)'
    if case == 'bomb_dict_key':  # a = (); 40 x a = (a, a); {a: 1}: hashing it inside pickle.load never ends
        ops = b')q\x000' + b''.join(b'h%ch%c\x86q%c0' % (i, i, i + 1) for i in range(40))
        return _dump(path, b'\x80\x02}' + ops + b'h(K\x01s.'), 'a tuple ' + too_big
    if case.startswith('build_'):  # BUILD state on a persistent record: would replace its checked fields
        ema, field = _valid_ema(), case[len('build_'):]
        return write_snapshot(path, WithState(ema.meta, {field: 1 if field == 'module_src' else []})), 'BUILD state'
    if case == 'empty_module_dict':  # a ModuleDict made but never given its contents
        ema = _valid_ema()
        ema.meta['state']['_modules']['model'] = Reduce(torch.nn.ModuleDict)
        return write_snapshot(path, ema), 'model is a ModuleDict without contents'
    if case == 'levels_without_blocks':  # num_blocks=0 skipped the size check: 200 levels took minutes to build
        ema = _valid_ema()
        ema.meta['state']['_init_kwargs'].update(num_blocks=0, channel_mult=[1] * 200, img_resolution=2 ** 200)
        return write_snapshot(path, ema), 'channel_mult=[1, 1, 1, 1, ...]: expected 1..8 integers'
    raise KeyError(case)


def _bomb(depth=40):
    a = []
    for _ in range(depth): a = [a, a]
    return a


class WithState:
    """Pickles as a persistent record followed by BUILD with `state` (the official pickles never BUILD one)."""
    def __init__(self, meta, state): self.meta, self.state = meta, state

    def __reduce__(self): return _reconstruct_persistent_obj, (self.meta,), self.state


CASES = ['os_system', 'eval', 'popen', 'exec_in_a_hook', 'storage_runs_code', 'module_src_unknown_class',
         'unknown_model_type', 'missing_weight', 'huge_num_blocks', 'object_dtype', 'truncated', 'not_a_pickle',
         'zip_archive', 'no_ema', 'persistent_id', 'bomb_init_kwargs', 'bomb_init_args', 'bomb_dataset_kwargs',
         'bomb_tensor_size', 'bomb_dict_key', 'build_class_name', 'build_state', 'build_module_src',
         'empty_module_dict', 'levels_without_blocks']


@pytest.mark.parametrize('case', CASES)
def test_malicious_or_broken_snapshots_are_refused(capsys, tmp_path, case):
    canary = tmp_path / 'pwned'
    path, words = _malicious(case, tmp_path, canary)
    start = time.perf_counter()
    with pytest.raises(official.OfficialPickleError) as e: official.load_official_pickle(path)
    assert words in str(e.value), str(e.value)
    assert time.perf_counter() - start < 2, 'a hostile input must be refused quickly'
    code, out, err = _run(capsys, 'convert', path, tmp_path / 'out')
    assert code == 1 and err.startswith('edm-lit convert: error: ') and words in err and 'Traceback' not in err, err
    assert not canary.exists() and not (tmp_path / 'out').exists()


def test_convert_refuses_what_our_loader_would_refuse(capsys, tmp_path):
    """18 attention resolutions: our classes build it, the checkpoint loader refuses it, so convert writes nothing."""
    ema = _valid_ema()
    kwargs = ema.meta['state']['_init_kwargs']
    kwargs['attn_resolutions'] = [*kwargs.get('attn_resolutions', [16]), *range(100, 117)]  # 100+: no such level
    code, _, err = _run(capsys, 'convert', write_snapshot(tmp_path / 's.pkl', ema), tmp_path / 'out')
    assert code == 1 and 'attn_resolutions' in err and 'nothing was written' in err and 'Traceback' not in err, err
    assert not (tmp_path / 'out').exists()


@needs_fixtures
def test_the_real_snapshots_pass_the_opcode_check_with_a_margin(monkeypatch):
    """The real snapshots' tuples (<= 15 nodes, 2 deep) pass bounds 10x tighter than edm_lit.persistence's."""
    from edm_lit import persistence
    assert persistence.MAX_TUPLE_NODES >= 10 * 150 and persistence.MAX_TUPLE_DEPTH >= 10 * 2
    monkeypatch.setattr(persistence, 'MAX_TUPLE_NODES', 150)
    monkeypatch.setattr(persistence, 'MAX_TUPLE_DEPTH', 2)
    for path in sorted(FIXTURES.glob('*.pkl')):
        with open(path, 'rb') as f: persistence._check_opcodes(f)


def test_module_source_is_never_run(tmp_path):
    """A valid network whose embedded source would write a file: the weights load, the source stays text."""
    canary = tmp_path / 'pwned'
    ema = _valid_ema()
    ema.meta['module_src'] = f'open({str(canary)!r}, "w").write("pwned")\nclass EDMPrecond: pass\n'
    net = official.load_official_pickle(write_snapshot(tmp_path / 's.pkl', ema))
    assert type(net) is EDMPrecond and not canary.exists()


def test_convert_refuses_a_used_outdir_and_a_missing_file(capsys, tmp_path):
    snapshot = write_snapshot(tmp_path / 's.pkl', _valid_ema())
    assert _run(capsys, 'convert', snapshot, tmp_path / 'ckpt')[0] == 0
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / 'ckpt').iterdir())
    code, _, err = _run(capsys, 'convert', snapshot, tmp_path / 'ckpt')
    assert code == 1 and f'{tmp_path / "ckpt"} already holds checkpoints' in err
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / 'ckpt').iterdir()) == before
    code, _, err = _run(capsys, 'convert', tmp_path / 'nope.pkl', tmp_path / 'o')
    assert code == 1 and f'snapshot not found: {tmp_path / "nope.pkl"}' in err
    code, _, err = _run(capsys, 'convert', snapshot)
    assert code == 2 and 'OUTDIR' in err
    code, out, _ = _run(capsys, 'convert', '--help')
    assert code == 0 and out.startswith('usage: edm-lit convert')


@pytest.mark.parametrize('module, name', sorted(ALLOWED))
def test_a_pickle_cannot_rewrite_the_stand_ins(tmp_path, module, name):
    """BUILD on an allowed global (the class or function itself) would set its attributes: refused, nothing changed."""
    def text(s): return b'X' + len(s).to_bytes(4, 'little') + s.encode()
    global_ = b'c%s\n%s\n' % (module.encode(), name.encode())
    data = b'\x80\x04' + global_ + b'N}' + text('__defaults__') + b'(K\x01t' + b's\x86b.'  # BUILD (None, {...})
    before = {k: getattr(v, '__defaults__', None) for k, v in ALLOWED.items()}
    with pytest.raises(official.OfficialPickleError, match='not a readable pickle'):
        official.load_official_pickle(_dump(tmp_path / 's.pkl', data))
    assert {k: getattr(v, '__defaults__', None) for k, v in ALLOWED.items()} == before
