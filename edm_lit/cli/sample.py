"""`edm-lit sample`: one PNG per seed and a grid from a checkpoint (plain module, not generated).

    edm-lit sample runs/fm --seeds 0-63 --outdir runs/fm/samples                  # Heun, 18 steps = 35 NFE
    edm-lit sample runs/fm --seeds 0-63 --sampler churn --outdir runs/fm/churn    # Alg. 2

Also the generation that `edm-lit eval` shares: the network of a checkpoint (`build_net`, `load_net`), the EDM
sampler of Algorithm 2 (chapter 4) or a multistep solver of chapter 11 with one seed per image (`generate`), class
labels `seed % classes` for a class-conditional model, and the PNG files (`write_pngs`).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from .. import checkpoints, validators
from ..guidance import Guided
from .args import device, finite_nonneg_float, nonneg_float, nonneg_int, parse_seeds, positive_int

__all__ = ['guided_net', 'SAMPLERS', 'MULTISTEP', 'GENERATION_DEFAULTS', 'CHURN_ARGS', 'build_net', 'load_net',
           'generate', 'nfe', 'churn_kwargs', 'class_labels', 'check_outdir', 'save_grid', 'write_pngs',
           'add_generation_arguments', 'cmd_sample', 'add_sample_parser']

SAMPLERS = {'heun': dict(S_churn=0.0), 'churn': dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)}
MULTISTEP = ('dpmpp_2m', 'ipndm', 'ipndm_v', 'unipc')  # edm_lit.solvers.SOLVERS, chapter 11
GENERATION_DEFAULTS = dict(sampler='heun', steps=18, weights='ema')
CHURN_ARGS = ('S_churn', 'S_min', 'S_max', 'S_noise')


def build_net(model: dict) -> torch.nn.Module:
    """The preconditioned U-Net described by a checkpoint's `model` record (preset name + overrides; EDM unless the
    record names another Table 1 column in `precond`, as converted official snapshots do)."""
    from ..official import network_from_record
    return network_from_record(model)


def load_net(path, weights: str, device):
    """(network in eval mode on `device`, checkpoint metadata) from a checkpoint file or a run directory.

    The network is built as shapes only (the meta device: no memory) and then takes the checkpoint's tensors, so a
    model record that does not describe them is refused before anything is allocated; so are NaN or infinite weights."""
    from ..official import network_from_record
    json_path = checkpoints.find_latest(path)
    tensors, meta = checkpoints.load_checkpoint(json_path)
    if 'model' not in meta: raise checkpoints.CheckpointError(f'checkpoint {json_path} holds no model record')
    validators.check_finite(f'checkpoint {json_path}: the {weights} weights',
                            {k: v for k, v in tensors.items() if k.startswith(weights + '.')})
    try: net = network_from_record(meta['model'], device='meta')
    except (ValueError, TypeError, RuntimeError) as e:
        raise checkpoints.CheckpointError(f'checkpoint {json_path}: its model record {meta["model"]} cannot be '
                                          f'built: {e}') from None
    checkpoints.load_module(net, tensors, weights, json_path, meta['model'])
    return net.eval().requires_grad_(False).to(device), meta


def generate(net, seeds, sampler='heun', num_steps=18, class_labels=None, batch=64, **sampler_kwargs):
    """Images (uint8, N x C x H x W) from the EDM sampler, Alg. 2; image i depends only on seeds[i] (and its label)."""
    from ..solvers import SOLVERS
    from ..stochastic import StackedRandomGenerator, edm_sampler
    if sampler in SOLVERS and any(v is not None for v in sampler_kwargs.values()):
        raise ValueError(f'S_churn / S_min / S_max / S_noise apply to heun and churn only, not to {sampler!r}')
    sample_fn = SOLVERS[sampler] if sampler in SOLVERS else \
        partial(edm_sampler, **{**SAMPLERS[sampler], **sampler_kwargs})
    p = next(net.parameters())
    model = (net.net if isinstance(net, Guided) else net).model  # the U-Net (a guided denoiser wraps it)
    shape = (model.in_channels, model.img_resolution, model.img_resolution)
    out = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        rnd = StackedRandomGenerator(p.device, chunk)
        labels = None if class_labels is None else class_labels[start:start + batch].to(p.device)
        with torch.no_grad():
            x = sample_fn(net, rnd.randn([len(chunk), *shape]), labels, randn_like=rnd.randn_like, num_steps=num_steps)
        bad = [chunk[i] for i in validators.nonfinite_rows(x)]
        if bad: raise ValueError(f'images of seeds {bad[:16]}{" ..." if bad[16:] else ""} hold NaN or infinite values; '
                                 f'nothing was written (sampler {sampler!r}, {sampler_kwargs or "its defaults"})')
        out.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu())
    return torch.cat(out)


def nfe(sampler: str, num_steps: int) -> int:
    """Network evaluations per image: 2N - 1 for heun / churn (Alg. 1-2: no 2nd order on the last step), else N."""
    return 2 * num_steps - 1 if sampler in SAMPLERS else num_steps


def churn_kwargs(args) -> dict:
    """The S_churn, S_min, S_max, S_noise given on the command line (the others keep the sampler's values)."""
    return {k: getattr(args, k) for k in CHURN_ARGS if getattr(args, k) is not None}


def class_labels(label_dim: int, seeds, class_label=None, checkpoint=None):
    """One-hot labels (N, label_dim): `class_label` for all, else seed % label_dim; None for an unconditional model."""
    if class_label is not None and not label_dim:
        raise ValueError(f'--class {class_label} given, but the model in {checkpoint} is unconditional')
    if not label_dim: return None
    if class_label is not None and class_label >= label_dim:  # before a tensor: 10**20 does not fit an int64
        raise ValueError(f'--class {class_label} is not in 0..{label_dim - 1}')
    classes = torch.tensor([class_label] * len(seeds)) if class_label is not None else torch.tensor(seeds) % label_dim
    if classes.max() >= label_dim: raise ValueError(f'--class {class_label} is not in 0..{label_dim - 1}')
    return torch.eye(label_dim)[classes]


def save_grid(images: torch.Tensor, path, nrow: int | None = None) -> Path:
    """Tile uint8 images (N, C, H, W) into one PNG."""
    from torchvision.utils import make_grid
    from PIL import Image
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(images, nrow=nrow, padding=0).permute(1, 2, 0).numpy()
    Image.fromarray(grid[..., 0] if images.shape[1] == 1 else grid).save(path)
    return Path(path)


def write_pngs(images: torch.Tensor, seeds, outdir) -> Path:
    """Write image i as `outdir/{seeds[i]:06d}.png` and all of them tiled as `outdir/grid.png`."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    for seed, image in zip(seeds, images): save_grid(image[None], out / f'{seed:06d}.png', nrow=1)
    save_grid(images, out / 'grid.png')
    return out


def guided_net(net, meta: dict, args, device):
    """`net`, or `edm_lit.guidance.Guided(net, --guidance, --guide)` (chapter 13): classifier-free guidance needs a
    class-conditional model trained with label dropout; autoguidance a guide of the same image shape and labels."""
    w, guide_path = getattr(args, 'guidance', None), getattr(args, 'guide', None)
    if w is None and guide_path is None: return net
    if guide_path is not None and w is None:
        raise ValueError(f'--guide {guide_path} needs --guidance W (W > 1 extrapolates away from the guide)')
    over = meta['model']['overrides']
    guide = None
    if guide_path is None:
        if not over.get('label_dim'):
            raise ValueError(f'--guidance {w}: classifier-free guidance needs a class-conditional model; '
                             f'{args.checkpoint if hasattr(args, "checkpoint") else args.input} is unconditional')
        if not over.get('label_dropout'):
            raise ValueError(f'--guidance {w}: the model was trained without label dropout, so it never learned '
                             f'the unconditional denoiser that classifier-free guidance needs (give --guide)')
    else:
        guide, guide_meta = load_net(guide_path, 'ema', device)
        mine, theirs = (tuple(m['model']['overrides'].get(k) for k in ('img_resolution', 'in_channels', 'label_dim'))
                        for m in (meta, guide_meta))
        if mine != theirs:
            raise ValueError(f'--guide {guide_path} makes images/labels of (resolution, channels, label_dim) = '
                             f'{theirs}, the model {mine}: a guide must model the same task')
    return Guided(net, w, guide)


def check_outdir(path, flag='--outdir') -> None:
    """Refuse an output folder that exists as something else than a folder (a file), before any work."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f'{flag} {path} is an existing file; it must be a folder (pick another name)')


def cmd_sample(args) -> int:
    """Write one PNG per seed and a grid, from a checkpoint's EMA (or raw) weights."""
    check_outdir(args.outdir)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    net, meta = load_net(args.checkpoint, args.weights, device)
    labels = class_labels(meta['model']['overrides']['label_dim'], args.seeds, args.class_label, args.checkpoint)
    kwargs = churn_kwargs(args)
    net = guided_net(net, meta, args, device)
    images = generate(net, args.seeds, args.sampler, args.steps, labels, args.batch, **kwargs)
    out = write_pngs(images, args.seeds, args.outdir)
    print(f'wrote {len(images)} PNG file(s) and grid.png to {out}')
    return 0


def add_generation_arguments(p):
    """The flags that say how images are generated (but --seeds): --sampler, --steps, --batch, --weights, --S-*."""
    p.add_argument('--sampler', choices=sorted(SAMPLERS) + list(MULTISTEP), default=GENERATION_DEFAULTS['sampler'],
                   help='heun: deterministic Alg. 1 (default); churn: stochastic Alg. 2 (S_churn 40, S_min 0.05, '
                        'S_max 50, S_noise 1.003 unless given); dpmpp_2m, ipndm, ipndm_v, unipc: the multistep '
                        'solvers of chapter 11 (NFE = steps)')
    p.add_argument('--steps', type=positive_int, default=GENERATION_DEFAULTS['steps'],
                   help='num_steps N (default 18: 35 NFE with heun or churn)')
    p.add_argument('--batch', type=positive_int, default=64, help='images per batch (default 64)')
    p.add_argument('--weights', choices=('ema', 'net'), default=GENERATION_DEFAULTS['weights'],
                   help='EMA (default) or raw weights')
    for name in CHURN_ARGS:  # S_max may be inf (the official default); the others are finite
        p.add_argument(f'--{name.replace("_", "-")}', dest=name, type=nonneg_float if name == 'S_max' else
                       finite_nonneg_float, help=f'{name} of Alg. 2 (heun and churn only)')
    p.add_argument('--device', type=device, help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    p.add_argument('--guidance', type=finite_nonneg_float, metavar='W', help='guidance weight (chapter 13): '
                   'classifier-free with a label-dropout model, or autoguidance with --guide; 1: none')
    p.add_argument('--guide', metavar='CHECKPOINT', help='autoguidance: a weaker model of the same task (e.g. an '
                   'early checkpoint of the same run), extrapolated away from with --guidance W')


def add_sample_parser(sub):
    """Add the `sample` subcommand to the subparsers `sub`; return its parser."""
    p = sub.add_parser('sample', help='generate images from a checkpoint', description=cmd_sample.__doc__)
    p.add_argument('checkpoint', help='a checkpoint file or a run directory (its latest checkpoint)')
    p.add_argument('--outdir', required=True, help='where the PNGs go: 000000.png, ... and grid.png')
    p.add_argument('--seeds', type=parse_seeds, default=parse_seeds('0-63'), help='e.g. 0-63 (default) or 1,5,10-12')
    add_generation_arguments(p)
    p.add_argument('--class', dest='class_label', type=nonneg_int,
                   help='class of all images (default: seed %% classes)')
    p.set_defaults(func=cmd_sample)
    return p
