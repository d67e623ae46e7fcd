"""Argument types of the `edm-lit` command line (plain module, not generated).

Each one turns a command-line string into a value or raises `argparse.ArgumentTypeError` naming the string and what
was expected, which argparse reports as `argument --flag: ...` with exit status 2.
"""
from __future__ import annotations

import argparse
import math
import re

from .. import validators

__all__ = ['parse_count', 'parse_seeds', 'format_seeds', 'number', 'positive_int', 'nonneg_int', 'positive_float',
           'nonneg_float', 'finite_nonneg_float', 'probability', 'learning_rate', 'resolution', 'device', 'channel_mult',
           'ratio_or_none', 'positive_or_none']

_SUFFIX = {'': 1, 'k': 10**3, 'M': 10**6, 'G': 10**9}


def parse_count(text: str) -> int:
    """'200M' -> 200000000, '0.5M' -> 500000, '64' -> 64: a whole number of images, >= 0."""
    m = re.fullmatch(r'([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([kMG]?)', text.strip())  # ASCII digits only
    value = float(m[1]) * _SUFFIX[m[2]] if m else -1
    if not m or value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f'expected a count of images like 5000, 10k or 0.5M, got {text!r}')
    return int(value)


def number(kind, ok, what):
    """A parser of `kind` (int, float) accepting the values for which `ok(value)` holds; `what` names them."""
    def parse(text):
        try: value = kind(text) if text.isascii() else None  # int('１') would be 1: ASCII digits only
        except ValueError: value = None
        if value is None or not ok(value): raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}')
        return value
    return parse


positive_int = number(int, lambda v: v > 0, 'a positive integer')
nonneg_int = number(int, lambda v: v >= 0, 'an integer >= 0')
positive_float = number(float, lambda v: v > 0 and v != float('inf'), 'a positive number')
nonneg_float = number(float, lambda v: v >= 0, 'a number >= 0')
finite_nonneg_float = number(float, lambda v: 0 <= v < math.inf, 'a finite number >= 0')
probability = number(float, lambda v: 0 <= v <= 1, 'a probability in [0, 1]')
learning_rate = number(float, lambda v: 0 < v <= validators.MAX_LR, f'a learning rate in (0, {validators.MAX_LR:g}]')
resolution = number(int, lambda v: 1 <= v <= validators.MAX_RESOLUTION,
                    f'an image size in [1, {validators.MAX_RESOLUTION}]')


def channel_mult(text: str) -> list[int]:
    """'1,2,2' -> [1, 2, 2]: a U-Net's channel multiplier per resolution level (chapter 7), 1 to 8 levels of 1 to 64."""
    parts = text.split(',')
    if not 1 <= len(parts) <= 8 or not all(p.strip().isascii() and p.strip().isdigit() and 1 <= int(p) <= 64
                                           for p in parts):
        raise argparse.ArgumentTypeError(f'expected 1 to 8 multipliers in 1..64 like 1,2,2, got {text!r}')
    return [int(p) for p in parts]


def ratio_or_none(text: str) -> float | None:
    """'0.05' -> 0.05, 'none' -> None: a ratio in (0, 1], or none."""
    if text.strip().lower() == 'none': return None
    return number(float, lambda v: 0 < v <= 1, "a ratio in (0, 1] or 'none'")(text)


def positive_or_none(text: str) -> float | None:
    """'1' -> 1.0, 'none' -> None: a positive finite number, or none."""
    if text.strip().lower() == 'none': return None
    return positive_float(text)


def device(text: str):
    """'cpu', 'cuda', 'cuda:1', 'mps' -> torch.device, if this machine has it."""
    try: return validators.check_device(text)
    except ValueError as e: raise argparse.ArgumentTypeError(str(e)) from None


def parse_seeds(text: str) -> list[int]:
    """'0-63' -> [0, ..., 63]; '1,5,10-12' -> [1, 5, 10, 11, 12] (as the official generate.py --seeds); each seed
    below 2**32 (the sampler takes seed % 2**32), at most a million of them, none twice, ASCII digits only."""
    ranges = []
    for part in text.split(','):
        m = re.fullmatch(r'\s*([0-9]+)\s*(?:-\s*([0-9]+))?\s*', part)  # ASCII digits: not '０-3'
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise argparse.ArgumentTypeError(f'expected seeds like 0-63 or 1,5,10-12, got {text!r}')
        ranges.append((int(m[1]), int(m[2] or m[1])))
    try: validators.check_seed_ranges(ranges, text)
    except ValueError as e: raise argparse.ArgumentTypeError(str(e)) from None
    seeds = [s for a, b in ranges for s in range(a, b + 1)]
    if len(set(seeds)) < len(seeds):  # one PNG per seed: a repeated seed would overwrite its own file
        seen, twice = set(), None
        for s in seeds:
            if s in seen: twice = s; break
            seen.add(s)
        raise argparse.ArgumentTypeError(f'seed {twice} appears more than once in {text!r}: one image per seed')
    return seeds


def format_seeds(seeds) -> str:
    """[0, ..., 63] -> '0-63'; [1, 5, 10, 11, 12] -> '1,5,10-12': the inverse of `parse_seeds`, for records."""
    runs = []
    for s in seeds:
        if runs and s == runs[-1][1] + 1: runs[-1][1] = s
        else: runs.append([s, s])
    return ','.join(str(a) if a == b else f'{a}-{b}' for a, b in runs)
