"""Training and sampling speed of edm_lit: float32 (TF32 off, as official) versus the fast mode.

The fast mode is bf16 autocast + torch.compile + channels_last + fused Adam (fused only on CUDA). Each mode runs in
a fresh process (so peak memory and compile caches do not leak between them) through the real training loop
(`edm_lit.train.training_loop`) on random images of the preset's shape, then samples with the EDM sampler at 35 NFE
(num_steps = 18, Heun). Prints images/second, peak memory and the fast/fp32 ratios.

    python benchmarks/train_speed.py --device cpu --preset ddpmpp-small --batch 16 --steps 5 --no-compile
    python benchmarks/train_speed.py --device cuda --preset ddpmpp-cifar10 --batch 512 --steps 50
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

MODES = {'fp32': dict(precision='fp32', compile=False, channels_last=False, fused_adam=False),
         'fast': dict(precision='bf16', compile=True, channels_last=True, fused_adam=None)}  # fused: CUDA only


def _peak_memory_mib(device) -> float:
    if device.type == 'cuda': return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # peak RSS of this process (KiB on Linux)


def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def model_record(preset: str, **overrides) -> dict:
    """The `model` record (as a checkpoint stores it) of an unconditional preset without augmentation labels."""
    return dict(preset=preset, overrides=dict(label_dim=0, augment_dim=0, **overrides))


def random_images(model: dict, n: int, seed: int = 0):
    """`n` uniform random images in [-1, 1] of the shape the model record's network takes, as an ImageSet."""
    from edm_lit.data import ImageSet
    from edm_lit.networks import PRESETS
    shape = {**PRESETS[model['preset']], **model['overrides']}
    res, ch = shape['img_resolution'], shape['in_channels']
    images = torch.rand(n, ch, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return ImageSet(images, torch.zeros(n, dtype=torch.long), 'random')


def time_training(net, data, config, device, warmup: int):
    """Run `edm_lit.train.training_loop`; returns (ema, images/s over the steps after `warmup`, peak MiB)."""
    from edm_lit import train
    from edm_lit.loss import EDMLoss
    device, stamps = torch.device(device), {}

    def callback(step):
        if step in (warmup, config.total_steps):
            _sync(device)
            stamps[step] = time.perf_counter()
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)
    ema, _ = train.training_loop(net, EDMLoss(), data, config, device=device, callback=callback, progress=False)
    timed = config.total_steps - warmup
    return ema, timed * config.batch_size / (stamps[config.total_steps] - stamps[warmup]), _peak_memory_mib(device)


def time_sampling(net, n: int, batch: int, bf16: bool, num_steps: int = 18, warmup_images: int = 2) -> float:
    """Images/s of the EDM sampler (Heun, 2 num_steps - 1 NFE, one seed per image) after a warm-up run."""
    from edm_lit import cli
    device = next(net.parameters()).device
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        cli.generate(net, list(range(warmup_images)), batch=batch, num_steps=num_steps)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        cli.generate(net, list(range(n)), num_steps=num_steps, batch=batch)
        _sync(device)
    return n / (time.perf_counter() - t0)


def measure(args, mode: str) -> dict:
    """Time `args.steps` training steps (after `args.warmup`) and one sampling batch in one mode."""
    from edm_lit import cli, train
    device = torch.device(args.device)
    knobs = dict(MODES[mode], compile=MODES[mode]['compile'] and not args.no_compile)
    model = model_record(args.preset)
    torch.manual_seed(0)
    net = cli.build_net(model)
    data = random_images(model, max(args.batch * 4, 64))
    total = args.warmup + args.steps
    config = train.TrainConfig(batch_size=args.batch, total_nimg=total * args.batch, lr_rampup_nimg=0,
                               log_every=total, checkpoint_every=None, **knobs)
    ema, train_ips, train_mem = time_training(net, data, config, device, args.warmup)
    sample_ips = time_sampling(ema, args.sample_batch, args.sample_batch, knobs['precision'] == 'bf16')
    return dict(mode=mode, **knobs, train_images_per_s=train_ips, peak_memory_mib=train_mem,
                sample_images_per_s=sample_ips, parameters=sum(p.numel() for p in net.parameters()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n')[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', help='network preset (default: ddpmpp-cifar10 on CUDA, ddpmpp-small on CPU)')
    p.add_argument('--batch', type=int, default=None, help='training batch (default: 512 on CUDA, 16 on CPU)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--steps', type=int, default=None, help='timed training steps (default: 50 on CUDA, 5 on CPU)')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first (compilation happens here)')
    p.add_argument('--sample-batch', type=int, default=None, help='images sampled (default: 256 on CUDA, 4 on CPU)')
    p.add_argument('--no-compile', action='store_true', help='fast mode without torch.compile (slow to compile on CPU)')
    p.add_argument('--json', help='also write the results to this file')
    p.add_argument('--mode', choices=sorted(MODES), help=argparse.SUPPRESS)  # internal: one mode in this process
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == 'cuda'
    args.preset = args.preset or ('ddpmpp-cifar10' if cuda else 'ddpmpp-small')
    args.batch = args.batch or (512 if cuda else 16)
    args.steps = args.steps or (50 if cuda else 5)
    args.sample_batch = args.sample_batch or (256 if cuda else 4)
    for name in ('batch', 'steps', 'sample_batch'):
        if getattr(args, name) < 1: p.error(f'--{name.replace("_", "-")} must be a positive integer')
    if args.warmup < 1: p.error('--warmup must be at least 1')
    if args.mode:  # child process: measure one mode, print JSON
        print('RESULT ' + json.dumps(measure(args, args.mode)), flush=True)
        return 0
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), '--mode', mode]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        lines = [s for s in out.stdout.splitlines() if s.startswith('RESULT ')]
        if out.returncode or not lines: sys.exit(f'{mode} run failed:\n{out.stderr[-4000:]}')
        results[mode] = json.loads(lines[-1][len('RESULT '):])
    r32, rf = results['fp32'], results['fast']
    name = torch.cuda.get_device_name(args.device) if cuda else f'CPU, {torch.get_num_threads()} threads'
    print(f'device {args.device} ({name}), torch {torch.__version__}, preset {args.preset} '
          f'({r32["parameters"] / 1e6:.2f} M parameters), batch {args.batch}, {args.steps} timed steps')
    print(f'{"mode":<6}{"compile":>8}{"train img/s":>13}{"peak MiB":>10}{"sample img/s (35 NFE)":>23}')
    for r in (r32, rf):
        print(f'{r["mode"]:<6}{str(r["compile"]):>8}{r["train_images_per_s"]:>13.1f}{r["peak_memory_mib"]:>10.0f}'
              f'{r["sample_images_per_s"]:>23.2f}')
    print('peak MiB: torch.cuda.max_memory_allocated on CUDA, the process\'s peak resident memory on a CPU')
    print(f'fast / fp32: training x{rf["train_images_per_s"] / r32["train_images_per_s"]:.2f}, '
          f'sampling x{rf["sample_images_per_s"] / r32["sample_images_per_s"]:.2f}')
    if args.json:
        with open(args.json, 'w') as f: json.dump(dict(device=args.device, name=name, **vars(args), results=results), f)
    return 0


if __name__ == '__main__':
    sys.exit(main())
