"""Every bad input gets a message: a table of wrong values, damaged files and foreign folders given to `edm-lit`.

Each case asserts the exit status (2: an argument argparse refuses, 1: anything else), a message that names the bad
value, no traceback, and that every file already there is byte-identical afterwards (nothing new is written either).
"""
import hashlib
import json
import os
import shutil
import struct
import zlib
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_lit import checkpoints, cli

STATE = 'training-state-{:08d}.json'


def _run(capsys, argv):
    """cli.main in this process: (exit status, stderr); argparse errors become status 2. Other exceptions escape."""
    try: code = cli.main([str(a) for a in argv])
    except SystemExit as e: code = e.code
    return code, capsys.readouterr().err


def _images(folder, n=12, size=8, seed=0):
    from PIL import Image
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f'{i:02d}.png')
    return folder


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
    """A 4-step run on 12 random 8x8 images with checkpoints at steps 2 and 4; cases only read it (or copy it)."""
    root = tmp_path_factory.mktemp('shared')
    images = _images(root / 'images')
    code = cli.main([str(a) for a in ('train', '--dataset', 'folder', '--data', images, '--preset', 'ddpmpp-small',
                                      '--batch', 4, '--steps', 4, '--lr-rampup', 0, '--checkpoint-every', 2,
                                      '--log-every', 1, '--outdir', root / 'run', '--quiet')])
    assert code == 0
    return root


class Ctx:
    """What a case's arguments and set-up refer to: {tmp} (empty, per case), {shared}, {images} and {run} (a copy
    of the shared run in {tmp}: tensor files hard-linked, since they are only ever replaced, never edited)."""
    def __init__(self, tmp: Path, shared: Path):
        self.tmp, self.shared, self.images = tmp, shared / 'run', shared / 'images'

    @cached_property
    def run(self) -> Path:
        return copy_run(self.shared, self.tmp / 'run')


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (os.link if p.suffix == '.safetensors' else shutil.copy)(p, dst / p.name)
    return dst


def rewrite_records(folder: Path, mutate):
    """Apply `mutate(record)` to every checkpoint record in `folder`, then re-seal it (a deliberate, valid edit)."""
    for path in checkpoints.list_checkpoints(folder):
        record = json.loads(path.read_text())
        mutate(record)
        if 'record_sha256' in record: record['record_sha256'] = checkpoints.record_sha256(record)
        path.write_text(json.dumps(record))


def resave_tensors(json_path: Path, change):
    """Rewrite a checkpoint through the public save API after `change(tensors)`: a well-formed checkpoint."""
    tensors, meta = checkpoints.load_checkpoint(json_path)
    change(tensors)
    keep = {k: v for k, v in meta.items() if k not in ('format', 'step', 'tensors', 'tensors_bytes', 'tensors_sha256',
                                                       'record_sha256')}
    checkpoints.save_checkpoint(json_path.parent, meta['step'], tensors, keep)


def png_header(path: Path, width: int, height: int):
    """A PNG whose header claims width x height pixels (its data is tiny): a decompression bomb, cheaply."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))


def _folder_with(ctx, *files):
    """{tmp}/data holding a good 8x8 image plus `files` (name -> a function writing it)."""
    from PIL import Image
    folder = ctx.tmp / 'data'
    folder.mkdir()
    Image.new('RGB', (8, 8), (10, 20, 30)).save(folder / 'good.png')
    for name, write in files: write(folder / name)
    return folder


def _model(ctx, **overrides):
    rewrite_records(ctx.run, lambda r: r['model']['overrides'].update(overrides))


def _victim(ctx):  # another run's folder: same files, another run id
    copy_run(ctx.shared, ctx.tmp / 'victim')
    rewrite_records(ctx.tmp / 'victim', lambda r: r.update(run_id='f' * 32))


def _changed_data(ctx):
    shutil.copytree(ctx.images, ctx.tmp / 'images2')
    from PIL import Image
    Image.new('RGB', (8, 8), (0, 0, 0)).save(ctx.tmp / 'images2' / '05.png')  # one image edited in place
    rewrite_records(ctx.run, lambda r: r['data'].update(path=str(ctx.tmp / 'images2')))


def _converted(ctx):  # what a converter writes through the save API: a model, no training state
    tensors, meta = checkpoints.load_checkpoint(ctx.shared / STATE.format(4))
    checkpoints.save_checkpoint(ctx.tmp / 'converted', 0, {k: v for k, v in tensors.items() if k.startswith('ema.')},
                                dict(model=meta['model']))


def _nan_weight(ctx):
    def poison(tensors):
        name = sorted(k for k in tensors if k.startswith('ema.'))[3]
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float('nan')
    resave_tensors(ctx.run / STATE.format(4), poison)
    _outdir(ctx)


def _outdir(ctx):  # earlier samples that a failed command must leave alone
    (ctx.tmp / 'out').mkdir()
    (ctx.tmp / 'out' / '000000.png').write_bytes(b'earlier sample')


def _metrics_only(ctx):
    (ctx.tmp / 'old').mkdir()
    (ctx.tmp / 'old' / 'metrics.jsonl').write_text('{"step": 2, "loss": 1.0}\n')


NEW_RUN = ('train', '--dataset', 'folder', '--data', '{images}', '--preset', 'ddpmpp-small', '--batch', '4', '--steps',
           '2', '--quiet')
SAMPLE = ('sample', '{shared}', '--outdir', '{tmp}/s')
CHURN = ('--sampler', 'churn', '--steps', '3', '--S-min', '0', '--S-max', '1000')
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')


def case(name, argv, code, message, setup=None, marks=()):
    return pytest.param(argv, code, message, setup, id=name, marks=marks)


CASES = [
    # -------------------------------------------------------------------- arguments argparse refuses: exit 2
    case('train-batch-0', ('train', '--batch', '0'), 2, "--batch: expected a positive integer, got '0'"),
    case('train-lr-1e300', ('train', '--lr', '1e300'), 2, "--lr: expected a learning rate in (0, 1], got '1e300'"),
    case('train-lr-inf', ('train', '--lr', 'inf'), 2, "--lr: expected a learning rate in (0, 1], got 'inf'"),
    case('train-lr-negative', ('train', '--lr=-1e-3'), 2, "got '-1e-3'"),
    case('train-resolution-huge', ('train', '--resolution', '100000'), 2,
         "--resolution: expected an image size in [1, 4096], got '100000'"),
    case('train-duration-exponent', ('train', '--duration', '1e9'), 2, "--duration: expected a count of images"),
    case('train-ema-two-dots', ('train', '--ema', '1.5.5'), 2, "got '1.5.5'"),
    case('train-keep-negative', ('train', '--keep', '-1'), 2, "--keep: expected an integer >= 0, got '-1'"),
    case('train-device-bogus', ('train', '--device', 'bogus'), 2, "--device: unknown device 'bogus'"),
    case('train-device-gpu-99', ('train', '--device', 'cuda:99'), 2, "'cuda:99'"),
    case('sample-device-bogus', SAMPLE + ('--device', 'bogus'), 2, "--device: unknown device 'bogus'"),
    case('sample-device-cuda', SAMPLE + ('--device', 'cuda'), 2, "device 'cuda': CUDA is not available",
         marks=NO_CUDA),
    case('sample-seeds-0-999999999999', SAMPLE + ('--seeds', '0-999999999999'), 2,
         "'0-999999999999' names 1,000,000,000,000 seeds"),
    case('sample-seeds-100-million', SAMPLE + ('--seeds', '0-99999999'), 2, "'0-99999999' names 100,000,000 seeds"),
    case('sample-seed-2**32', SAMPLE + ('--seeds', '4294967296'), 2, 'seed 4294967296 in'),
    case('sample-seeds-junk', SAMPLE + ('--seeds', '1,x'), 2, "got '1,x'"),
    case('sample-seeds-empty', SAMPLE + ('--seeds', ''), 2, "got ''"),
    case('sample-S-noise-inf', SAMPLE + ('--S-noise', 'inf'), 2, "--S-noise: expected a finite number >= 0, got 'inf'"),
    case('sample-S-noise-nan', SAMPLE + ('--S-noise', 'nan'), 2, "got 'nan'"),
    case('sample-S-churn-negative', SAMPLE + ('--S-churn', '-1'), 2, "--S-churn: expected a finite number >= 0, got "),
    case('sample-S-min-inf', SAMPLE + ('--S-min', 'inf'), 2, "--S-min: expected a finite number >= 0, got 'inf'"),
    case('sample-steps-0', SAMPLE + ('--steps', '0'), 2, "--steps: expected a positive integer, got '0'"),
    case('sample-batch-0', SAMPLE + ('--batch', '0'), 2, "--batch: expected a positive integer, got '0'"),
    case('sample-class-negative', SAMPLE + ('--class', '-1'), 2, "--class: expected an integer >= 0, got '-1'"),
    case('eval-seed-2**32', ('eval', '{shared}', '--seeds', '0-3,4294967296'), 2, 'seed 4294967296 in'),
    case('eval-device-bogus', ('eval', '{shared}', '--device', 'bogus'), 2, "unknown device 'bogus'"),
    case('eval-n-negative', ('eval', '{shared}', '--n', '-5'), 2, "--n: expected a positive integer, got '-5'"),
    case('eval-batch-fraction', ('eval', '{shared}', '--batch', '1.5'), 2, "got '1.5'"),
    # -------------------------------------------------------------------- damaged or foreign checkpoints: exit 1
    case('info-missing-file', ('info', '{tmp}/missing.json'), 1, 'checkpoint not found: {tmp}/missing.json'),
    case('info-empty-dir', ('info', '{tmp}'), 1, 'no checkpoint (training-state-*.json) in {tmp}'),
    case('info-missing-key', ('info', '{run}'), 1, "lacks the field 'tensors_sha256'",
         lambda c: rewrite_records(c.run, lambda r: r.pop('tensors_sha256'))),
    case('info-step-a-string', ('info', '{run}'), 1, "field 'step' has the bad value 'ten'",
         lambda c: rewrite_records(c.run, lambda r: r.update(step='ten'))),
    case('info-format-9', ('info', '{run}'), 1, "format 'edm-lit-checkpoint/9'",
         lambda c: rewrite_records(c.run, lambda r: r.update(format='edm-lit-checkpoint/9'))),
    case('info-json-list', ('info', '{tmp}/' + STATE.format(1)), 1, f'{STATE.format(1)} is not an edm-lit checkpoint',
         lambda c: (c.tmp / STATE.format(1)).write_text('[1, 2]')),
    case('info-resolution-1e9', ('info', '{run}'), 1, "'img_resolution' has the bad value 1000000000",
         lambda c: _model(c, img_resolution=10 ** 9)),
    case('info-overrides-a-list', ('info', '{run}'), 1, "field 'overrides' has the bad value [1, 2]",
         lambda c: rewrite_records(c.run, lambda r: r['model'].update(overrides=[1, 2]))),
    case('info-channel-mult-a-dict', ('info', '{run}'), 1, "field 'channel_mult' has the bad value {{'a': 1}}",
         lambda c: _model(c, channel_mult={'a': 1})),
    case('sample-model-channels-4096', SAMPLE[:1] + ('{run}',) + SAMPLE[2:], 1, "'model_channels': 4096",
         lambda c: _model(c, model_channels=4096)),
    case('sample-record-edited', ('sample', '{run}', '--outdir', '{tmp}/out'), 1,
         f'checkpoint {{run}}/{STATE.format(4)} was changed after it was written',
         lambda c: (c.run / STATE.format(4)).write_text(
             (c.run / STATE.format(4)).read_text().replace('"nimg": 16', '"nimg": 17'))),
    case('sample-nan-weight', ('sample', '{run}', '--outdir', '{tmp}/out'), 1, 'ema weights hold NaN or infinite',
         _nan_weight),
    case('sample-S-noise-1e300', SAMPLE[:3] + ('{tmp}/out', '--seeds', '0-3') + CHURN + ('--S-noise', '1e300'), 1,
         'images of seeds [0, 1, 2, 3] hold NaN or infinite values; nothing was written', _outdir),
    case('sample-class-unconditional', SAMPLE + ('--class', '3'), 1, '--class 3 given, but the model'),
    case('eval-missing', ('eval', '{tmp}/nothing'), 1, '{tmp}/nothing not found'),
    case('eval-shape', ('eval', '{shared}', '--n', '4'), 1, 'holds 3x8x8 (CxHxW) images'),
    # -------------------------------------------------------------------- foreign run folders, resume: exit 1
    case('train-resume-into-another-run', ('train', '--resume', '{shared}/' + STATE.format(4), '--steps', '6',
                                           '--outdir', '{tmp}/victim', '--quiet'), 1,
         f'{{tmp}}/victim holds checkpoints of another run ({STATE.format(2)}: run ffff', _victim),
    case('train-resume-an-older-checkpoint', ('train', '--resume', '{run}/' + STATE.format(2), '--steps', '3'), 1,
         f'{{run}} holds {STATE.format(4)}, later than the checkpoint resumed from (step 2)', lambda c: c.run),
    case('train-new-run-into-a-run', NEW_RUN + ('--outdir', '{run}'), 1, '{run} already holds checkpoints'),
    case('train-new-run-into-old-metrics', NEW_RUN + ('--outdir', '{tmp}/old'), 1,
         '{tmp}/old holds metrics.jsonl of an earlier run', _metrics_only),
    case('train-resume-changed-data', ('train', '--resume', '{run}', '--steps', '6'), 1,
         'the training images in {tmp}/images2 changed since the run started', _changed_data),
    case('train-resume-data-gone', ('train', '--resume', '{run}', '--steps', '6'), 1,
         'image folder not found: {tmp}/gone',
         lambda c: rewrite_records(c.run, lambda r: r['data'].update(path=str(c.tmp / 'gone')))),
    case('train-resume-converted', ('train', '--resume', '{tmp}/converted', '--steps', '2'), 1,
         "holds no training state to resume (lacks the field 'config')", _converted),
    case('train-resume-config-lr-a-string', ('train', '--resume', '{run}', '--steps', '6'), 1,
         "field 'lr' has the bad value 'fast'",
         lambda c: rewrite_records(c.run, lambda r: r['config'].update(lr='fast'))),
    case('train-resume-missing', ('train', '--resume', '{tmp}/nothing'), 1, 'checkpoint not found: {tmp}/nothing'),
    case('train-resume-with-preset', ('train', '--resume', '{run}', '--preset', 'ddpmpp-cifar10'), 1,
         '--preset cannot change when resuming', lambda c: c.run),
    case('train-allow-data-change-alone', NEW_RUN + ('--outdir', '{tmp}/new', '--allow-data-change'), 1,
         '--allow-data-change applies only with --resume'),
    case('train-cond-on-a-folder', NEW_RUN + ('--outdir', '{tmp}/new', '--cond'), 1,
         "--cond needs class labels; dataset 'folder' has none"),
    case('train-cifar10-resolution-12', ('train', '--dataset', 'cifar10', '--resolution', '12', '--preset',
                                         'ddpmpp-small', '--outdir', '{tmp}/new'), 1, 'resolution=12'),
    # -------------------------------------------------------------------- image folders: exit 1
    case('train-decompression-bomb', NEW_RUN[:4] + ('{tmp}/data',) + NEW_RUN[5:] + ('--outdir', '{tmp}/new'), 1,
         '{tmp}/data/bomb.png is 15000x15000 = 225,000,000 pixels',
         lambda c: _folder_with(c, ('bomb.png', lambda p: png_header(p, 15000, 15000)))),
    case('train-text-file', NEW_RUN[:4] + ('{tmp}/data',) + NEW_RUN[5:] + ('--outdir', '{tmp}/new'), 1,
         '{tmp}/data/notes.txt is not a readable image', lambda c: _folder_with(c, ('notes.txt',
                                                                                    lambda p: p.write_text('hi')))),
    case('train-float-tiff', NEW_RUN[:4] + ('{tmp}/data',) + NEW_RUN[5:] + ('--outdir', '{tmp}/new'), 1,
         "{tmp}/data/f.tiff: mode 'F'", lambda c: _folder_with(c, ('f.tiff', lambda p: __import__('PIL.Image').Image
                                                                   .fromarray(np.zeros((8, 8), np.float32)).save(p)))),
    case('train-broken-symlink', NEW_RUN[:4] + ('{tmp}/data',) + NEW_RUN[5:] + ('--outdir', '{tmp}/new'), 1,
         '{tmp}/data/link.png is a broken symbolic link', lambda c: _folder_with(c, ('link.png', lambda p: p.symlink_to(
             c.tmp / 'nowhere.png')))),
    # -------------------------------------------------------------------- review: folders, seeds, --out, --steps
    case('sample-seeds-duplicate', SAMPLE + ('--seeds', '1,0-3'), 2, "seed 1 appears more than once in '1,0-3'"),
    case('sample-seeds-full-width', SAMPLE + ('--seeds', '\uff10-3'), 2, "got '\uff10-3'"),
    case('sample-steps-full-width', SAMPLE + ('--steps', '\uff13'), 2, "--steps: expected a positive integer"),
    case('sample-outdir-a-file', ('sample', '{shared}', '--outdir', '{tmp}/f'), 1,
         '--outdir {tmp}/f is an existing file; it must be a folder', lambda c: (c.tmp / 'f').write_text('keep me')),
    case('eval-out-a-checkpoint', ('eval', '{run}', '--out', '{run}/' + STATE.format(4)), 1,
         f'--out {{run}}/{STATE.format(4)} is a checkpoint file name', lambda c: c.run),
    case('eval-out-an-existing-file', ('eval', '{shared}', '--out', '{tmp}/notes.txt'), 1,
         '--out {tmp}/notes.txt exists and is not an earlier eval record: refusing to overwrite it',
         lambda c: (c.tmp / 'notes.txt').write_text('{"fid": 1}')),
    case('eval-save-images-a-file', ('eval', '{shared}', '--save-images', '{tmp}/f'), 1,
         '--save-images {tmp}/f is an existing file', lambda c: (c.tmp / 'f').write_text('keep me')),
    case('train-outdir-a-file', NEW_RUN + ('--outdir', '{tmp}/f'), 1, '--outdir {tmp}/f is a file; the run folder '
         'must be a folder', lambda c: (c.tmp / 'f').write_text('keep me')),
    case('train-outdir-inside-the-data', NEW_RUN[:4] + ('{tmp}/data',) + NEW_RUN[5:] + ('--outdir', '{tmp}/data/r'),
         1, '--outdir {tmp}/data/r lies inside the image folder {tmp}/data', lambda c: _images(c.tmp / 'data')),
    case('train-steps-below-the-resumed-step', ('train', '--resume', '{run}', '--steps', '2'), 1,
         '--steps 2 is below the resumed step 4', lambda c: c.run),
]


def _snapshot(folder: Path) -> dict:
    """Every file, folder and link under `folder`: path -> SHA-256 of the bytes (files up to 1 MB) or inode, size and
    mtime (larger ones: the tensor files, which are only ever replaced by a rename, never edited in place)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root, name)
            st = p.lstat()
            if p.is_symlink(): out[str(p)] = 'link:' + os.readlink(p)
            elif p.is_dir(): out[str(p)] = 'dir'
            elif st.st_size > 2 ** 20: out[str(p)] = (st.st_ino, st.st_size, st.st_mtime_ns)
            else: out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_there_are_at_least_40_bad_inputs():
    assert len(CASES) >= 40, len(CASES)


@pytest.mark.parametrize('argv, code, message, setup', CASES)
def test_bad_input_exits_with_a_message_and_writes_nothing(capsys, tmp_path, shared, argv, code, message, setup):
    ctx = Ctx(tmp_path, shared)
    if setup is not None: setup(ctx)
    fill = dict(tmp=ctx.tmp, shared=ctx.shared, images=ctx.images)
    if any('{run}' in a for a in (*argv, message)): fill['run'] = ctx.run
    argv, message = [a.format(**fill) for a in argv], message.format(**fill)
    before, shared_before = _snapshot(tmp_path), _snapshot(shared / 'run')
    got, err = _run(capsys, argv)
    assert (got, 'Traceback' in err) == (code, False), err
    assert message in err, err
    assert _snapshot(tmp_path) == before, 'a refused command changed or added files'
    assert _snapshot(shared / 'run') == shared_before
