"""The environment is locked: constraints.txt pins every distribution exactly, and this venv matches it.

The README's two commands install with `pip install -c constraints.txt`; pyproject.toml keeps ranges.
"""
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / 'constraints.txt'


def pins() -> dict:
    """{normalized name: version} of every `name==version` line of the lock."""
    lines = [line.strip() for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith('#')]
    bad = [line for line in lines if not re.fullmatch(r'[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-!]+', line)]
    assert not bad, f'constraints.txt lines that are not exact pins: {bad}'
    return {_norm(name): version for name, version in (line.split('==') for line in lines)}


def _norm(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def test_both_readme_commands_install_with_the_lock():
    makefile = (ROOT / 'Makefile').read_text()
    install = [line for line in makefile.splitlines() if line.startswith('\t$(PY) -m pip install')]
    assert install and all('-c $(LOCK)' in line for line in install), install
    assert re.search(r'^LOCK := constraints\.txt$', makefile, re.M)
    assert re.search(r'^\$\(STAMP\):.*\$\(LOCK\)', makefile, re.M), 'a new lock must reinstall the venv'
    assert re.search(r'^lock:', makefile, re.M), 'make lock refreshes the lock'


def test_every_dependency_is_pinned_and_installed_at_its_pin():
    locked = pins()
    requirements = metadata.requires('edm-lit') or []
    names = {_norm(Requirement(r).name) for r in requirements}
    assert {'torch', 'ipykernel', 'jupyter-book', 'nbval'} <= names
    missing = sorted(names - set(locked))
    assert not missing, f'dependencies without a pin in constraints.txt: {missing}'
    for dist in metadata.distributions():
        name = _norm(dist.metadata['Name'])
        if name in locked and name != 'edm-lit':
            assert dist.version == locked[name], f'{name} {dist.version} is installed, the lock says {locked[name]}'


def test_lock_satisfies_the_ranges_of_pyproject():
    locked = pins()
    for text in metadata.requires('edm-lit') or []:
        req = Requirement(text)
        if _norm(req.name) in locked:
            assert req.specifier.contains(locked[_norm(req.name)], prereleases=True), (text, locked[_norm(req.name)])
    assert not locked['ipykernel'].startswith('7.'), 'ipykernel 7 hung the book build'


def test_install_refuses_a_python_the_lock_was_not_made_for(tmp_path):
    import subprocess
    import sys
    tool, here = ROOT / 'tools' / 'check_lock_python.py', '%d.%d' % sys.version_info[:2]
    assert re.search(rf'^# Python {re.escape(here)}\.\d+', LOCK.read_text(), re.M), 'the lock names this Python'
    other = tmp_path / 'other.txt'
    other.write_text('# a lock\n# Python 2.7.18, x86_64.\nsix==1.16.0\n')
    run = lambda lock: subprocess.run([sys.executable, str(tool), str(lock)], capture_output=True, text=True)
    assert run(LOCK).returncode == 0
    refused = run(other)
    assert refused.returncode == 1 and 'Python 2.7' in refused.stderr and f'is {here}' in refused.stderr
    assert 'Traceback' not in refused.stderr
    assert re.search(r'^\t@\$\(PYTHON\) tools/check_lock_python\.py \$\(LOCK\)', (ROOT / 'Makefile').read_text(), re.M)
