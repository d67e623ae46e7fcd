"""One prepared command that measures edm_lit on one GPU (H100/H200) in under ten minutes (plain script).

(a) Training of `ddpmpp-cifar10` (the paper's DDPM++, unconditional) at batch 512 on random 3x32x32 images through
    `edm_lit.train.training_loop`: fp32 (TF32 off, as official) against the fast mode (bf16 autocast + torch.compile
    + channels_last + fused Adam): images/s after warm-up, their ratio, MFU (the FLOPs of one step counted by
    FlopCounterMode over the device's data-sheet peak) and peak memory per image.
(b) Sampling with that network, EDM sampler (Heun, num_steps = 18: 35 NFE), in fp32, bf16 and bf16 + compile, and
    the time for 50,000 images at the best of them.
(c) `ddpmpp-fashion-mnist` trained in the fast mode for --budget seconds of wall time (compilation included), then
    domain FID/KID of 10,000 samples (35 NFE) against Fashion-MNIST's training set and the real-vs-real floor. Data:
    Debian's package, torchvision's files under $EDM_LIT_DATA (default ~/.cache/edm_lit) or the embedded subset.
Prints a table; writes one JSON after every part (numbers, hardware, command, wall times, goals met or not: fast
>= 3x fp32, MFU >= 30 %, 50k images <= 5 min). `--tiny` runs the same code on a CPU in seconds (CI; no goals).

    python benchmarks/gpu_suite.py --out results.json           # one H100/H200, under 10 minutes
    python benchmarks/gpu_suite.py --tiny --out /tmp/tiny.json  # any CPU, under a minute on one core
"""
import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec('edm_lit') is None: sys.path.insert(0, str(HERE.parent))  # run from a checkout
sys.path.insert(0, str(HERE))
from train_speed import MODES, _sync, model_record, random_images, time_sampling, time_training  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# edm_lit is imported here, not where it is used: a missing dependency fails before any work is done
from edm_lit import cli, metrics, official, train, validators  # noqa: E402
from edm_lit.data import ImageSet, load_fashion_mnist  # noqa: E402
from edm_lit.loss import EDMLoss  # noqa: E402

SCALES = {  # per part: batch, warm-up and timed steps; --tiny: the same code path, small enough for a CPU
    'full': dict(overrides={}, batch=512, warmup=dict(fp32=2, fast=3), steps=dict(fp32=5, fast=20),
                 sample_batch=1024, fm_batch=512, probe=10, budget=300.0, samples=10_000, max_wall=570.0),
    'tiny': dict(overrides=dict(model_channels=16, channel_mult=(1, 2), num_blocks=1), batch=4,
                 warmup=dict(fp32=1, fast=1), steps=dict(fp32=2, fast=2), sample_batch=4, fm_batch=8, probe=2,
                 budget=3.0, samples=16, max_wall=float('inf')),
}
PEAK_FLOPS = (  # dense peak FLOP/s from NVIDIA's data sheets: device-name pattern, model, bf16, fp32 (TF32 off)
    (r'\bH200\b(?!.*NVL)', 'H200', 989.4e12, 66.9e12),
    (r'\bH100\b.*\bPCIe\b', 'H100 PCIe', 756e12, 51e12),
    (r'\bH100\b.*\b(HBM3|SXM)', 'H100 SXM', 989.4e12, 66.9e12),
    (r'\bA100\b', 'A100', 312e12, 19.5e12),
)
SAMPLING = {'fp32': dict(bf16=False, channels_last=False, compile=False, share=4),  # share: 1/share of the batch
            'bf16': dict(bf16=True, channels_last=True, compile=False, share=1),
            'bf16+compile': dict(bf16=True, channels_last=True, compile=True, share=1)}
GOALS = {'training_speedup': ('>=', 3.0), 'mfu_fast': ('>=', 0.30), 'sample_50k_s': ('<=', 300.0)}


def peak_flops(device) -> dict | None:
    """The device's dense peak FLOP/s per precision (bf16 tensor cores, fp32 without TF32); None when unknown."""
    if device.type != 'cuda': return None
    name = torch.cuda.get_device_name(device)
    for pattern, model, bf16, fp32 in PEAK_FLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return dict(model=model, bf16=bf16, fp32=fp32, source='NVIDIA data sheet, dense (no sparsity)')
    return None


def hardware(device) -> dict:
    """Device name, torch / CUDA / cuDNN versions, CPU count and model, Python."""
    cpuinfo = Path('/proc/cpuinfo').read_text() if Path('/proc/cpuinfo').is_file() else ''
    cpu = next((s.split(':', 1)[1].strip() for s in cpuinfo.splitlines() if s.startswith('model name')),
               platform.machine())
    h = dict(device=str(device), device_name=cpu, torch=torch.__version__, cuda=torch.version.cuda,
             cudnn=torch.backends.cudnn.version() if device.type == 'cuda' else None, cpu=cpu,
             cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), python=platform.python_version(),
             platform=platform.platform())
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        h.update(device_name=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                 capability=f'{p.major}.{p.minor}', multiprocessors=p.multi_processor_count)
    return h


def _free(device):
    if device.type == 'cuda': torch.cuda.empty_cache()


def build(model: dict):
    """The network of a model record with seeded initial weights."""
    torch.manual_seed(0)
    return official.network_from_record(model)


def on_device(data, device):
    """The ImageSet with its images moved to `device` once (the training loop then indexes them there)."""
    return ImageSet(data.images.to(device), data.labels, data.source)


def step_flops(model: dict, data, batch: int, device) -> tuple[int, int]:
    """(FLOPs of one training step: forward + backward of the EDM loss on one batch, fp32; parameter count)."""
    net = build(model).train().to(device)
    with FlopCounterMode(display=False) as counter:
        train.accumulate_gradients(net, EDMLoss(), data, [torch.arange(batch)], device,
                                   train.TrainConfig(batch_size=batch))
    return counter.get_total_flops(), sum(p.numel() for p in net.parameters())


def train_config(batch: int, steps: int, knobs: dict, **kwargs):
    """TrainConfig for `steps` steps at `batch`: no checkpoints, one log line at the end."""
    return train.TrainConfig(batch_size=batch, total_nimg=steps * batch, log_every=steps, checkpoint_every=None,
                             **knobs, **kwargs)


def part_training(s: dict, device, compile_fast: bool) -> dict:
    """(a) fp32 against the fast mode through the real training loop; img/s, MFU, peak memory per image."""
    model, batch = model_record('ddpmpp-cifar10', **s['overrides']), s['batch']
    data = on_device(random_images(model, 4 * batch), device)
    (flops, parameters), peak = step_flops(model, data, batch, device), peak_flops(device)
    _free(device)
    rec = dict(model=model, parameters=parameters, batch=batch,
               data='random uniform images in [-1, 1], 3x32x32, on the device', flops_per_step=flops,
               flop_counter='torch.utils.flop_counter.FlopCounterMode over edm_lit.train.accumulate_gradients '
                            '(forward + backward of one batch, fp32; the optimizer step is not counted)',
               peak_flops=peak, modes={})
    for mode in ('fp32', 'fast'):
        knobs = dict(MODES[mode], compile=MODES[mode]['compile'] and compile_fast)
        warmup, steps, t0 = s['warmup'][mode], s['steps'][mode], time.perf_counter()
        config = train_config(batch, warmup + steps, knobs, lr_rampup_nimg=0)
        _, ips, mib = time_training(build(model), data, config, device, warmup)
        achieved = flops * ips / batch
        mfu = achieved / peak[knobs['precision']] if peak else None
        rec['modes'][mode] = dict(knobs, warmup_steps=warmup, timed_steps=steps, images_per_s=ips,
                                  achieved_flops_per_s=achieved, mfu=mfu, peak_memory_mib=mib,
                                  peak_memory_per_image_mib=mib / batch, wall_s=time.perf_counter() - t0)
        print(f'(a) {mode}: {ips:.1f} img/s' + (f', MFU {mfu:.1%}' if mfu else ''), flush=True)
        _free(device)
    rec['memory'] = 'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'peak RSS of the process'
    rec['speedup'] = rec['modes']['fast']['images_per_s'] / rec['modes']['fp32']['images_per_s']
    if not peak: rec['mfu_note'] = 'no data-sheet peak (PEAK_FLOPS) for this device: MFU not computed'
    return rec


def part_sampling(s: dict, device, compile_fast: bool) -> dict:
    """(b) EDM sampler (Heun, 35 NFE) in fp32, bf16, bf16 + compile; the projected time for 50,000 images."""
    model, batch = model_record('ddpmpp-cifar10', **s['overrides']), s['sample_batch']
    rec = dict(model=model, sampler='edm_lit.stochastic.edm_sampler (Heun, S_churn=0)', num_steps=18, nfe=35,
               batch=batch, variants={})
    for name, v in SAMPLING.items():
        if v['compile'] and not compile_fast: continue
        net = build(model).eval().requires_grad_(False).to(device)
        if v['channels_last']: net.to(memory_format=torch.channels_last)
        n, t0 = max(1, batch // v['share']), time.perf_counter()
        ips = time_sampling(torch.compile(net) if v['compile'] else net, n, n, v['bf16'],
                            warmup_images=n if v['compile'] else 2)  # compile for the timed shape
        rec['variants'][name] = dict(bf16=v['bf16'], channels_last=v['channels_last'], compile=v['compile'],
                                     images=n, images_per_s=ips, wall_s=time.perf_counter() - t0)
        print(f'(b) {name}: {ips:.2f} img/s at 35 NFE', flush=True)
        _free(device)
    best = max(rec['variants'], key=lambda k: rec['variants'][k]['images_per_s'])
    rec.update(best=best, images_per_s=rec['variants'][best]['images_per_s'])
    rec['projected_50k_s'] = 50_000 / rec['images_per_s']
    return rec


def train_for_budget(net, data, seconds: float, batch: int, knobs: dict, device, warmup: int, probe: int):
    """Train for about `seconds` of wall time: a probe run (warm-up, compilation) measures the rate, then one
    training_loop run takes as many steps as the rest of the budget allows. Returns (ema, record)."""
    t0, ramp = time.perf_counter(), dict(lr_rampup_nimg=100 * batch)
    _, ips, _ = time_training(net, data, train_config(batch, warmup + probe, knobs, **ramp), device, warmup)
    steps = max(1, int((seconds - (time.perf_counter() - t0)) * ips / batch))
    ema, history = train.training_loop(net, EDMLoss(), data, train_config(batch, steps, knobs, **ramp),
                                       device=device, progress=False)
    steps += warmup + probe
    return ema, dict(budget_s=seconds, train_wall_s=time.perf_counter() - t0, steps=steps, images=steps * batch,
                     probe_images_per_s=ips, final_loss=history[-1]['loss'], lr=train.TrainConfig.lr, **ramp)


def part_fashion(s: dict, device, compile_fast: bool, budget: float, asked: float) -> dict:
    """(c) a 32x32 Fashion-MNIST model trained for `budget` s in the fast mode, domain FID/KID vs the floor."""
    data = load_fashion_mnist(True, pad_to_32=True)
    model, knobs = model_record('ddpmpp-fashion-mnist', **s['overrides']), dict(MODES['fast'], compile=compile_fast)
    ema, rec = train_for_budget(build(model), on_device(data, device), budget, s['fm_batch'], knobs, device,
                                s['warmup']['fast'], s['probe'])
    print(f'(c) trained {rec["steps"]} steps in {rec["train_wall_s"]:.0f} s', flush=True)
    n, t0 = min(s['samples'], len(data) // 2), time.perf_counter()  # the floor takes 2n reference images
    with torch.autocast(device.type, torch.bfloat16):
        images = cli.generate(ema, list(range(n)), num_steps=18, batch=s['sample_batch'])
    _sync(device)
    rec.update(budget_requested_s=asked, model=model, **knobs, batch=s['fm_batch'], data_source=data.source,
               train_images=len(data), samples=n, samples_requested=s['samples'], sampling='35 NFE, bf16 autocast',
               sampling_wall_s=time.perf_counter() - t0)
    t0 = time.perf_counter()
    rec.update(metrics.evaluate(images.float() / 127.5 - 1, 'fashion-train', 'domain', n=n, device=device,
                                source=data.source), eval_wall_s=time.perf_counter() - t0)
    return rec


def goals(rec: dict) -> dict:
    """Each goal's target, value and whether it is met (None when --tiny or when a part did not run)."""
    a, b = rec['training'] or {}, rec['sampling'] or {}
    values = dict(training_speedup=a.get('speedup'), mfu_fast=a.get('modes', {}).get('fast', {}).get('mfu'),
                  sample_50k_s=b.get('projected_50k_s'))
    met = lambda v, op, t: None if rec['tiny'] or v is None else (v >= t if op == '>=' else v <= t)
    return {k: dict(target=f'{op} {t}', value=values[k], met=met(values[k], op, t)) for k, (op, t) in GOALS.items()}


def write_json(path: Path, rec: dict):
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(rec, indent=1) + '\n')
    os.replace(tmp, path)


def report(rec: dict) -> str:
    """A short table of the results."""
    h, a, b, c = rec['hardware'], rec['training'] or {}, rec['sampling'] or {}, rec['fashion'] or {}
    lines = [f'{h["device_name"]} ({h["device"]}), torch {h["torch"]}, CUDA {h["cuda"]}, {h["cpu_count"]} CPUs'
             + (', --tiny' if rec['tiny'] else '')]
    if 'modes' in a:
        lines.append(f'(a) training, batch {a["batch"]}, {a["flops_per_step"] / a["batch"] / 1e9:.3g} GFLOP/image'
                     f'\n    mode  compile     img/s    MFU  peak MiB/img')
        for mode, m in a['modes'].items():
            mfu = f'{m["mfu"]:.1%}' if m['mfu'] is not None else '-'
            lines.append(f'    {mode:<5} {str(m["compile"]):<7} {m["images_per_s"]:>9.1f} {mfu:>6} '
                         f'{m["peak_memory_per_image_mib"]:>13.2f}')
        lines.append(f'    fast / fp32: x{a["speedup"]:.2f}')
    if 'variants' in b:
        lines.append('(b) sampling at 35 NFE: ' + ', '.join(f'{k} {v["images_per_s"]:.1f} img/s'
                                                             for k, v in b['variants'].items())
                     + f'; 50,000 images in {b["projected_50k_s"] / 60:.1f} min ({b["best"]})')
    if 'fid' in c:
        lines.append(f'(c) Fashion-MNIST, {c["steps"]} steps in {c["train_wall_s"]:.0f} s: FID {c["fid"]:.2f} '
                     f'(floor {c["floor_fid"]:.2f}), KID {c["kid"]:.4f} (floor {c["floor_kid"]:.4f}), '
                     f'n = {c["n"]}, data: {c["data_source"]}')
    for part in ('training', 'sampling', 'fashion'):
        if 'error' in (rec[part] or {}): lines.append(f'{part}: FAILED: {rec[part]["error"]}')
    lines.append('goals: ' + ('not evaluated (--tiny)' if rec['tiny'] else '; '.join(
        f'{k} {g["target"]}: {"-" if g["met"] is None else "met" if g["met"] else "NOT met"}'
        for k, g in rec['goals'].items())))
    lines.append(f'wall: {rec["wall_s"]["total"]:.0f} s')
    return '\n'.join(lines)


def pick_device(args):
    """The device to run on, or an error message: the full suite needs a CUDA device unless --device says cpu."""
    if args.device is None:
        if args.tiny: return torch.device('cpu'), None
        if torch.cuda.is_available(): return torch.device('cuda'), None
        return None, ('no CUDA device (torch.cuda.is_available() is False): run the CPU smoke test with --tiny, '
                      'or force the full suite with --device cpu')
    try: return validators.check_device(args.device), None  # one that exists here
    except ValueError as e: return None, f'--device: {e}'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n')[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, required=True, help='the JSON file to write (rewritten after every part)')
    p.add_argument('--tiny', action='store_true', help='a small network, few steps and samples: seconds on a CPU')
    p.add_argument('--device', help='cuda, cuda:1, cpu (default: cuda; cpu with --tiny)')
    p.add_argument('--budget', type=cli.positive_float,
                   help='seconds of Fashion-MNIST training (default 300; 3 with --tiny)')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, help='torch.compile in the fast mode '
                   '(default: on CUDA only; compiling on a CPU takes minutes)')
    args = p.parse_args(argv)
    device, error = pick_device(args)
    if error:
        print(f'gpu_suite: error: {error}', file=sys.stderr)
        return 1
    s = SCALES['tiny' if args.tiny else 'full']
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 is fp32 throughout
    compile_fast = device.type == 'cuda' if args.compile is None else args.compile
    t_start = time.perf_counter()
    rec = dict(suite='benchmarks/gpu_suite.py', tiny=args.tiny, command=shlex.join(['python', *sys.argv]),
               started=datetime.now(timezone.utc).isoformat(timespec='seconds'), hardware=hardware(device),
               compile=compile_fast, wall_s={}, failed=[], training=None, sampling=None, fashion=None, goals=None)
    asked = args.budget or s['budget']
    left = lambda: s['max_wall'] - (time.perf_counter() - t_start) - 60  # of 570 s, less a minute for (c)'s FID
    parts = dict(training=lambda: part_training(s, device, compile_fast),
                 sampling=lambda: part_sampling(s, device, compile_fast),
                 fashion=lambda: part_fashion(s, device, compile_fast, min(asked, max(30.0, left())), asked))
    for name, run in parts.items():
        t0 = time.perf_counter()
        try: rec[name] = run()
        except Exception as e:  # one failed part must not lose the others' numbers
            traceback.print_exc()
            rec[name], rec['failed'] = dict(error=f'{type(e).__name__}: {e}'), rec['failed'] + [name]
        rec['wall_s'][name] = time.perf_counter() - t0
        rec['wall_s']['total'] = time.perf_counter() - t_start
        rec['goals'] = goals(rec)
        write_json(args.out, rec)
    print(report(rec))
    print(f'wrote {args.out}')
    return 1 if rec['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
