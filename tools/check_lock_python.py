"""Refuse to install the lock with a Python it was not resolved on (plain tool, not generated).

constraints.txt says on its second line which Python `make lock` resolved it with ("# Python 3.11.7, x86_64.");
pins made for one minor version can be uninstallable on another (numpy, scipy and ipython drop old Pythons).
Usage: python tools/check_lock_python.py constraints.txt
"""
import re
import sys
from pathlib import Path


def main(lock: str) -> None:
    header = Path(lock).read_text().splitlines()[:3]
    found = next((m for line in header if (m := re.search(r'Python (\d+)\.(\d+)', line))), None)
    if found is None: sys.exit(f'{lock}: no "# Python X.Y" line in its header; run make lock')
    want, have = (int(found[1]), int(found[2])), sys.version_info[:2]
    if want != have:
        sys.exit(f'{lock} was resolved on Python {want[0]}.{want[1]}, but {sys.executable} is {have[0]}.{have[1]}: '
                 f'run make PYTHON=python{want[0]}.{want[1]} ..., or make lock to resolve it for this Python')


if __name__ == '__main__':
    main(sys.argv[1])
