"""How many NFE does each multistep solver of chapter 11 need to match Heun with 35 NFE? (plain script)

For three problems whose ideal denoiser is exact (the Gaussian mixture of chapters 3 and 11, an 8-mode ring with
narrow modes, a single Gaussian) and six sigma grids (Eq. 5 with rho = 3, 5, 7, 10, 20, and steps uniform in
lambda = -log sigma), every solver of `edm_lit.solvers.GRID_SOLVERS` runs at NFE = 2 ... max_nfe, and Heun (chapter 3)
for comparison. The target is the terminal RMS error of Heun with num_steps = 18 (35 NFE) on the paper's rho = 7
grid, fixed for all grids; the reference is the Richardson extrapolation (4 x_2048 - x_1024) / 3 of Heun. Prints one
table per problem (the smallest NFE from which on the error stays below the target) and optionally writes JSON.

    python benchmarks/solver_nfe.py --out book/results/solver_nfe.json
"""
import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

from edm_lit.samplers import denoiser_derivative, edm_t_steps, error_vs_nfe, heun_sampler, integrate, time_steps
from edm_lit.schedules import ve_sigma_steps
from edm_lit.solvers import GRID_SOLVERS, nfe_to_reach
from edm_lit.toy import GaussianMixture, ring_mixture

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
GRIDS = ('rho=3', 'rho=5', 'rho=7', 'rho=10', 'rho=20', 'uniform-lambda')
PROBLEMS = {
    'mixture': lambda: GaussianMixture(torch.tensor([0.5, 0.3, 0.2]),
                                       torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.5, -1.0]]),
                                       torch.tensor([0.4, 0.3, 0.5])),
    'ring': lambda: ring_mixture(8, radius=1.0, std=0.1),
    'gaussian': lambda: GaussianMixture(torch.tensor([1.0]), torch.tensor([[0.3, -0.2]]), torch.tensor([0.5])),
}


def sigma_grid(net, grid, num_steps, device=None):
    """sigma_0 > ... > sigma_{N-1} > sigma_N = 0: Eq. 5 with the named rho, or geometric in sigma (uniform lambda)."""
    if grid == 'uniform-lambda':
        return time_steps(net, ve_sigma_steps(num_steps, SIGMA_MIN, SIGMA_MAX).to(device))  # geometric sigma grid
    return edm_t_steps(net, num_steps, SIGMA_MIN, SIGMA_MAX, rho=float(grid.split('=')[1]), device=device)


def heun_on_grid(net, latents, sigmas, class_labels=None):
    """Heun's method (Alg. 1, chapter 3) on any sigma grid ending at 0: NFE = 2N - 1."""
    return integrate(denoiser_derivative(net, class_labels), latents.to(torch.float64) * sigmas[0], sigmas)


def on_grid(net, latents, num_steps, solver, grid):
    """Run a grid-level solver `solver(net, latents, sigmas)` with num_steps steps of the named grid."""
    return solver(net, latents, sigma_grid(net, grid, num_steps, latents.device))


def run_problem(net, latents, max_nfe):
    """The target, the smallest NFE per solver and grid, and the errors at 18 NFE on the rho = 7 grid."""
    reference = (4 * heun_sampler(net, latents, num_steps=2048) - heun_sampler(net, latents, num_steps=1024)) / 3
    target = error_vs_nfe(heun_sampler, net, latents, reference, [18])['error'][0]  # Heun, rho = 7: 35 NFE
    solvers = {'heun': heun_on_grid, **GRID_SOLVERS}
    needed, at_18 = {name: {} for name in solvers}, {}
    for name, solver in solvers.items():
        steps = range(2, (max_nfe + 1) // 2 + 1) if name == 'heun' else range(2, max_nfe + 1)
        for grid in GRIDS:
            rows = error_vs_nfe(partial(on_grid, solver=solver, grid=grid), net, latents, reference, steps)
            needed[name][grid] = nfe_to_reach(rows, target)
            if grid == 'rho=7': at_18[name] = dict(zip(rows['nfe'], rows['error'])).get(18)
    return dict(target=target, needed=needed, error_at_18_rho7=at_18)


def print_table(problem, result):
    print(f'\n{problem}: target RMS error {result["target"]:.3g} (Heun, num_steps = 18, 35 NFE, rho = 7)')
    print('smallest NFE from which on the error stays below the target (-: not within the scan)')
    print(f'{"solver":>9} ' + ' '.join(f'{g:>14}' for g in GRIDS) + f' {"error@18 NFE":>13}')
    for name, row in result['needed'].items():
        err = result['error_at_18_rho7'].get(name)
        print(f'{name:>9} ' + ' '.join(f'{row[g] or "-":>14}' for g in GRIDS) + f' {f"{err:.3g}" if err else "-":>13}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', type=Path, help='write the results as JSON to this file')
    parser.add_argument('--max-nfe', type=int, default=40, help='largest NFE scanned (default 40)')
    parser.add_argument('--num-latents', type=int, default=128, help='latents per problem (default 128, seed 1)')
    args = parser.parse_args(argv)
    if args.max_nfe < 4: parser.error(f'--max-nfe must be >= 4, got {args.max_nfe}')
    if args.num_latents < 1: parser.error(f'--num-latents must be >= 1, got {args.num_latents}')
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    start = time.perf_counter()
    latents = torch.randn(args.num_latents, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    problems = {}
    for problem, make in PROBLEMS.items():
        problems[problem] = run_problem(make(), latents, args.max_nfe)
        print_table(problem, problems[problem])
    seconds = time.perf_counter() - start
    print(f'\n{seconds:.0f} s on {os.cpu_count()} CPU cores, torch {torch.__version__}')
    if args.out:
        command = 'python benchmarks/solver_nfe.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
        record = dict(command=command.strip(), hardware=f'{os.cpu_count()}-core CPU ({platform.machine()}), float64',
                      torch=torch.__version__, seconds=seconds, max_nfe=args.max_nfe, num_latents=args.num_latents,
                      grids=list(GRIDS), problems=problems)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + '\n')
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
