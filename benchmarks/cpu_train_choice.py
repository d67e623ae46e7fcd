"""Training images/s on this CPU for a few network sizes, batch sizes and speed settings (issue 13's measurement).

Each (network, batch, setting) runs in a fresh process through the real training loop (`edm_lit.train.training_loop`,
EDM preconditioning and loss, class-conditional with label dropout) on random 1 x 32 x 32 images, and prints
training images/s after a warm-up (compilation, if any, happens in the warm-up). Settings: fp32; bf16 autocast;
channels_last; bf16 + channels_last; bf16 + channels_last + torch.compile.

    OMP_NUM_THREADS=2 python benchmarks/cpu_train_choice.py --json benchmarks/results/cpu_train_choice.json
    OMP_NUM_THREADS=2 python benchmarks/cpu_train_choice.py --nets 32 --batches 64 --settings fp32 bf16 --steps 2
    OMP_NUM_THREADS=2 python benchmarks/cpu_train_choice.py --loss-check 300 --nets 16 --batches 64

--loss-check STEPS trains fp32 and bf16 from the same seed on the real Fashion-MNIST training images (same batches,
noise and dropout) and prints both loss curves (means over windows of STEPS // 15 steps) and the difference of their means over the
second half beside that half's window-to-window spread: bf16 is trusted when the difference is within the noise.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

SETTINGS = {'fp32': dict(precision='fp32', channels_last=False, compile=False),
            'bf16': dict(precision='bf16', channels_last=False, compile=False),
            'channels_last': dict(precision='fp32', channels_last=True, compile=False),
            'bf16+cl': dict(precision='bf16', channels_last=True, compile=False),
            'bf16+cl+compile': dict(precision='bf16', channels_last=True, compile=True)}


def model_record(channels: int) -> dict:
    """The checkpoint `model` record of the Fashion-MNIST DDPM++ preset with `channels` base channels, conditional."""
    return dict(preset='ddpmpp-fashion-mnist',
                overrides=dict(model_channels=channels, label_dim=10, augment_dim=0, label_dropout=0.1))


def measure(channels: int, batch: int, setting: str, warmup: int, steps: int) -> dict:
    """Images/s of `steps` training steps after `warmup` untimed ones, in this process."""
    from edm_lit import train
    from edm_lit.cli.sample import build_net
    from edm_lit.data import ImageSet
    from edm_lit.loss import EDMLoss
    torch.manual_seed(0)
    net = build_net(model_record(channels))
    n = batch * 4
    images = torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = ImageSet(images, torch.arange(n) % 10, 'random')
    total = warmup + steps
    config = train.TrainConfig(batch_size=batch, total_nimg=total * batch, lr_rampup_nimg=0, log_every=total,
                               checkpoint_every=None, **SETTINGS[setting])
    stamps = {}

    def callback(step):
        if step in (warmup, total): stamps[step] = time.perf_counter()
    train.training_loop(net, EDMLoss(), data, config, device='cpu', callback=callback, progress=False, label_dim=10)
    return dict(channels=channels, batch=batch, setting=setting, **SETTINGS[setting],
                parameters=sum(p.numel() for p in net.parameters()),
                train_images_per_s=steps * batch / (stamps[total] - stamps[warmup]))


def loss_check(channels: int, batch: int, steps: int, window: int = 20) -> dict:
    """fp32 and bf16 loss curves from one seed on the Fashion-MNIST training images (see the module's docstring)."""
    from edm_lit import datasets, train
    from edm_lit.cli.sample import build_net
    from edm_lit.loss import EDMLoss
    data = datasets.load_dataset('fashion-mnist', None, 32, None)
    curves = {}
    for precision in ('fp32', 'bf16'):
        torch.manual_seed(0)
        net = build_net(model_record(channels))
        config = train.TrainConfig(batch_size=batch, total_nimg=steps * batch, lr=2e-3, lr_rampup_nimg=0,
                                   log_every=window, checkpoint_every=None, precision=precision)
        t0 = time.perf_counter()
        _, history = train.training_loop(net, EDMLoss(), data, config, device='cpu', progress=False, label_dim=10)
        curves[precision] = dict(loss=[h['loss'] for h in history], seconds=time.perf_counter() - t0)
    a, b = (torch.tensor(curves[k]['loss'][len(curves[k]['loss']) // 2:]) for k in ('fp32', 'bf16'))
    return dict(channels=channels, batch=batch, steps=steps, window=window, source=data.source, curves=curves,
                mean_difference=float(b.mean() - a.mean()), window_std_fp32=float(a.std()),
                paired_difference_std=float((b - a).std()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n')[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--nets', type=int, nargs='+', default=[32, 64], help='base channel counts (model_channels)')
    p.add_argument('--batches', type=int, nargs='+', default=[64, 128])
    p.add_argument('--settings', nargs='+', choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=4)
    p.add_argument('--loss-check', type=int, metavar='STEPS', help='compare fp32 and bf16 loss curves instead')
    p.add_argument('--json', help='also write the results to this file')
    p.add_argument('--one', nargs=3, help=argparse.SUPPRESS)  # internal: channels batch setting, in this process
    args = p.parse_args(argv)
    if any(v < 1 for v in [*args.nets, *args.batches, args.warmup, args.steps]):
        p.error('--nets, --batches, --warmup and --steps take positive integers')
    if args.one:
        c, b, s = args.one
        print('RESULT ' + json.dumps(measure(int(c), int(b), s, args.warmup, args.steps)), flush=True)
        return 0
    threads = os.environ.get('OMP_NUM_THREADS', str(torch.get_num_threads()))
    if args.loss_check:
        r = loss_check(args.nets[0], args.batches[0], args.loss_check, window=max(args.loss_check // 15, 1))
        print(f'loss check: {args.nets[0]} channels, batch {args.batches[0]}, {args.loss_check} steps, lr 2e-3, '
              f'{r["source"]}, OMP_NUM_THREADS={threads}')
        for k, c in r['curves'].items():
            print(f'{k}: ' + ' '.join(f'{x:.4f}' for x in c['loss']) + f'  ({c["seconds"]:.0f} s)')
        print(f'second half: mean bf16 - fp32 = {r["mean_difference"]:+.4f}; window-to-window std of fp32 = '
              f'{r["window_std_fp32"]:.4f}; std of the paired differences = {r["paired_difference_std"]:.4f}')
        if args.json:
            with open(args.json, 'w') as f: json.dump(dict(command=' '.join(['python', *sys.argv]), **r), f, indent=1)
        return 0
    print(f'CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={threads}, '
          f'torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up steps')
    print(f'{"channels":>8}{"params":>10}{"batch":>7}  {"setting":<17}{"train img/s":>12}')
    results = []
    for c in args.nets:
        for b in args.batches:
            for s in args.settings:
                cmd = [sys.executable, __file__, '--warmup', str(args.warmup), '--steps', str(args.steps),
                       '--one', str(c), str(b), s]
                out = subprocess.run(cmd, capture_output=True, text=True)
                lines = [x for x in out.stdout.splitlines() if x.startswith('RESULT ')]
                if out.returncode or not lines:
                    print(f'{c:>8}{"":>10}{b:>7}  {s:<17}{"failed":>12}  {out.stderr.strip().splitlines()[-1:]}')
                    continue
                r = json.loads(lines[-1][len('RESULT '):])
                results.append(r)
                print(f'{c:>8}{r["parameters"] / 1e6:>9.2f}M{b:>7}  {s:<17}{r["train_images_per_s"]:>12.1f}', flush=True)
                if args.json:  # after every measurement: an interrupted sweep keeps what it measured
                    with open(args.json, 'w') as f:
                        json.dump(dict(command=' '.join(['python', *sys.argv]), omp_num_threads=threads,
                                       cpu_count=os.cpu_count(), torch=torch.__version__, warmup=args.warmup,
                                       steps=args.steps, results=results), f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
