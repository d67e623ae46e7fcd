"""The book builds with warnings as errors (-W -n): a broken cross-reference, citation or toc entry fails here.

The notebooks are not re-executed here (nbval does that and compares outputs); the build renders stored outputs.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JB = Path(sys.executable).with_name('jupyter-book')


@pytest.mark.skipif(not JB.exists(), reason='jupyter-book is not installed (pip install -e .[book])')
def test_book_builds_without_warnings(tmp_path):
    config = (ROOT / '_config.yml').read_text()
    assert 'execute_notebooks: force' in config
    stored = tmp_path / '_config.yml'
    stored.write_text(config.replace('execute_notebooks: force', 'execute_notebooks: "off"'))
    out = tmp_path / 'out'
    proc = subprocess.run([str(JB), 'build', str(ROOT), '--config', str(stored), '--toc', str(ROOT / 'book/_toc.yml'),
                           '--path-output', str(out), '-W', '-n', '--keep-going'],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    html = out / '_build' / 'html'
    pages = {p.relative_to(html).as_posix() for p in html.rglob('*.html')}
    for nb in (ROOT / 'notebooks').glob('*.ipynb'):
        assert f'notebooks/{nb.stem}.html' in pages, f'{nb.name} is not in the book: add it to book/_toc.yml'
    shutil.rmtree(out / '_build' / '.doctrees', ignore_errors=True)
