"""The record of a study's training run: run.json (command, hardware, settings, throughput) and metrics.jsonl.

    python benchmarks/run_record.py RUN OUT --command "edm-lit train ..." [--note TEXT]

Writes OUT/run.json and copies RUN/metrics.jsonl to OUT. The wall time is the sum over the run's processes (a resumed
run logs time from its own start) and includes any time the process spent stopped; images/s is therefore the median
over the logging intervals, which a pause or a neighbour on the cores only touches in the intervals it falls into.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch

from fashion_edm_record import cpu_name


def segments(log: list[dict]) -> list[list[dict]]:
    """The log split where the time restarts: one piece per process that trained the run."""
    out = [[]]
    for r in log:
        if out[-1] and r['time'] < out[-1][-1]['time']: out.append([])
        out[-1].append(r)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('run', type=Path)
    p.add_argument('out', type=Path)
    p.add_argument('--command', action='append', default=[], help='a command that made the run (repeatable)')
    p.add_argument('--note', default='', help='anything the numbers alone do not say')
    args = p.parse_args(argv)
    from edm_lit import checkpoints
    try:
        latest = checkpoints.find_latest(args.run)
        meta = checkpoints.read_meta(latest)
        log = [json.loads(s) for s in (args.run / 'metrics.jsonl').read_text().splitlines() if s.strip()]
    except (OSError, ValueError, checkpoints.CheckpointError) as e:
        print(f'run_record.py: {args.run} is not a finished run folder: {e}', file=sys.stderr)
        return 1
    from edm_lit import cli
    parameters = sum(q.numel() for q in cli.build_net(meta['model']).parameters())
    rates = [(b['nimg'] - a['nimg']) / (b['time'] - a['time'])
             for seg in segments(log) for a, b in zip(seg, seg[1:]) if b['time'] > a['time']]
    flags = ' '.join(f for f in ('avx512_bf16', 'amx_bf16') if f in Path('/proc/cpuinfo').read_text())
    record = dict(commands=args.command, hardware=f'{os.cpu_count()}-core {cpu_name()} ({flags}), no GPU',
                  torch=torch.__version__, parameters=parameters, omp_num_threads=os.environ.get('OMP_NUM_THREADS'),
                  steps=meta.get('step', log[-1]['step']), nimg=meta['nimg'],
                  batch=meta.get('config', {}).get('batch_size'),
                  wall_seconds=round(sum(seg[-1]['time'] for seg in segments(log)), 1),
                  images_per_second=round(statistics.median(rates), 1) if rates else None,
                  checkpoint=latest.name, run_id=meta.get('run_id'), model=meta['model'], config=meta.get('config'),
                  loss=meta.get('loss'), ladder=meta.get('ladder'), phema=meta.get('phema'),
                  data={k: meta.get('data', {}).get(k)
                        for k in ('dataset', 'source', 'num_images', 'fingerprint', 'cond')},
                  note=args.note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'run.json').write_text(json.dumps(record, indent=1) + '\n')
    shutil.copyfile(args.run / 'metrics.jsonl', args.out / 'metrics.jsonl')
    print(f"{args.out / 'run.json'}: {record['steps']} steps, {record['nimg']:,} images, "
          f"{record['images_per_second']} images/s (median), {record['wall_seconds'] / 60:.1f} min wall")
    return 0


if __name__ == '__main__':
    sys.exit(main())
