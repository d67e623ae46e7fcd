"""The book builds with warnings as errors (-W -n): a broken cross-reference, citation or toc entry fails here.

The notebooks are not re-executed here (nbval does that and compares outputs); the build renders stored outputs.
"""
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import check_html  # noqa: E402

JB = Path(sys.executable).with_name('jupyter-book')


@pytest.mark.skipif(not JB.exists(), reason='jupyter-book is not installed (pip install -e .[book])')
def test_book_builds_without_warnings(tmp_path):
    config = (ROOT / '_config.yml').read_text()
    assert 'execute_notebooks: force' in config
    stored = tmp_path / '_config.yml'
    config = config.replace(' book/_ext ', f' {ROOT / "book" / "_ext"} ')  # local extensions: relative to the config
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
    assert check_html.check(html) == {}, 'raw TeX in the HTML (python tools/check_html.py HTML_FOLDER lists it)'
    shutil.rmtree(out / '_build' / '.doctrees', ignore_errors=True)


def test_raw_tex_check_finds_tex_outside_math_only():
    """The build check: TeX cut out of its math by a stray list item is found; math, code and outputs are not."""
    clean = ('<section class="tex2jax_ignore mathjax_ignore"><p>For <span class="math notranslate">\\(x\\)</span>'
             '</p><div class="math">\\[\\operatorname{tr} C\\]</div><div class="highlight"><pre>echo $HOME</pre>'
             '</div><div class="cell_output"><pre>cost: $5</pre></div><p>Costs 5 dollars.</p><br></section>')
    assert check_html.raw_tex(clean) == []
    broken = ('<section class="mathjax_ignore"><p>expanding gives $\\E\\lVert X\\rVert^2</p><ul><li><p>2 '
              '\\operatorname{tr} C<span class="math">\\(, so \\)</span></p></li></ul><p>\\begin{pmatrix}</p>'
              '</section>')
    hits = check_html.raw_tex(broken)
    assert len(hits) == 3 and '$\\E' in hits[0] and '\\operatorname' in hits[1] and '\\begin{' in hits[2], hits


def test_make_book_executes_every_chapter_every_time():
    """`make book` re-reads every page (--all) and re-executes every notebook (force), even when nothing changed."""
    book = re.search(r'^book:.*?\n((?:\t.*\n)+)', (ROOT / 'Makefile').read_text(), re.M)[1]
    command = next(line for line in book.splitlines() if 'jupyter-book build' in line).split()
    assert '--all' in command and '-W' in command and '--keep-going' in command, command
    assert re.search(r'^\s+execute_notebooks:\s*force\b', (ROOT / '_config.yml').read_text(), re.M)


def test_nbval_has_a_cell_timeout_too():
    """`make test` runs nbval with a per-cell timeout (nbval's own default is 2000 s per cell)."""
    test = re.search(r'^test:.*?\n((?:\t.*\n)+)', (ROOT / 'Makefile').read_text(), re.M)[1]
    timeout = re.search(r'--nbval-cell-timeout=(\d+)', test)
    assert timeout and 60 <= int(timeout[1]) <= 600, test


def test_no_automated_run_executes_a_widget():
    """Widget cells run only by hand: building ch. 3's explorer widget made the client miss the cell's reply.

    Seen here, executing chapter 3 with nbclient again and again: with its `widgets.interactive` cell, 5 of 49 runs
    under ipykernel 7.4 sat at that cell for exactly the client's timeout (60 or 120 s; the book's was 900 s) and
    only then went on, and 1 of 25 under ipykernel 6.31 lost the same 60 s; without the cell, 0 of 30 under 7.4.
    The book build (myst-nb) skips cells tagged `skip-execution`, nbval those tagged `nbval-skip`.
    """
    for path in sorted((ROOT / 'notebooks').glob('*.ipynb')):
        for index, cell in enumerate(json.loads(path.read_text())['cells']):
            source = ''.join(cell['source'])
            if cell['cell_type'] == 'code' and re.search(r'\bipywidgets\b|\bwidgets\.\w+\(|\binteract\(', source):
                tags = cell['metadata'].get('tags', [])
                assert {'skip-execution', 'nbval-skip'} <= set(tags), f'{path.name}, cell {index}: tags {tags}'
                assert not cell.get('outputs'), f'{path.name}, cell {index}: a skipped cell keeps no outputs'


HANGING = {'cells': [{'cell_type': 'markdown', 'metadata': {}, 'source': ['# Hangs\n']},
                     {'cell_type': 'code', 'execution_count': None, 'metadata': {}, 'outputs': [],
                      'source': ['import time\n', 'time.sleep(600)  # a cell that never finishes\n']}],
           'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}},
           'nbformat': 4, 'nbformat_minor': 5}


@pytest.mark.skipif(not JB.exists(), reason='jupyter-book is not installed (pip install -e .[book])')
def test_a_hanging_cell_fails_the_build_fast_and_names_notebook_and_cell(tmp_path):
    """The book's per-cell timeout (execute.timeout) turns a hang into a failure that says where it happened."""
    timeout = int(re.search(r'^\s+timeout:\s*(\d+)', (ROOT / '_config.yml').read_text(), re.M)[1])
    assert 60 <= timeout <= 600, f'execute.timeout = {timeout} s: too short for the chapters, or not fast to fail'
    config = (ROOT / '_config.yml').read_text()
    config = re.sub(r'(?m)^(\s+timeout:\s*)\d+', r'\g<1>5', config)  # same config, a 5 s budget for the test
    config = config.replace(' book/_ext ', f' {ROOT / "book" / "_ext"} ')  # local extensions: relative to the config
    config = re.sub(r'(?m)^bibtex_bibfiles:\n(\s+-.*\n)+', '', config)
    config = re.sub(r'(?m)^(\s+html_static_path:).*\n', '', config)
    (tmp_path / '_config.yml').write_text(config)
    (tmp_path / '_toc.yml').write_text('format: jb-book\nroot: intro\nchapters:\n  - file: hang\n')
    (tmp_path / 'intro.md').write_text('# Intro\n')
    (tmp_path / 'hang.ipynb').write_text(json.dumps(HANGING))
    start = time.monotonic()
    proc = subprocess.run([str(JB), 'build', str(tmp_path), '--all', '-W', '-n', '--keep-going'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.monotonic() - start < 120, out[-3000:]
    assert 'hang' in out and 'CellTimeoutError' in out, out[-3000:]
    log = next((tmp_path / '_build').rglob('hang.err.log'))  # myst-nb's report for the failed notebook
    assert 'time.sleep(600)' in log.read_text() and '5 seconds' in log.read_text(), log.read_text()[-2000:]


def test_getting_started_example_runs(monkeypatch):
    """The five-line example of book/getting_started.md runs as printed and makes what its comments say."""
    monkeypatch.chdir(ROOT)  # the example names the model by its path in the repository
    text = (ROOT / 'book' / 'getting_started.md').read_text()
    code = re.findall(r'```python\n(.*?)```', text, re.S)
    assert len(code) == 1
    scope = {}
    exec(compile(code[0], 'getting_started.md', 'exec'), scope)  # noqa: S102 - our own page
    assert scope['points'].shape == (1000, 2) and scope['points'].isfinite().all()
    assert scope['points'].norm(dim=1).mean().item() == pytest.approx(0.7, abs=0.05)  # on the ring of radius 0.7
    assert scope['images'].shape == (8, 1, 32, 32) and scope['images'].dtype == torch.uint8


def test_nbdev_directives_are_hidden_from_the_reader():
    """book/_ext/hide_nbdev.py: `#| ...` lines leave every code cell; a cell that held nothing else is removed."""
    sys.path.insert(0, str(ROOT / 'book' / '_ext'))
    import hide_nbdev
    nb = json.loads((ROOT / 'notebooks' / '14_phema.ipynb').read_text())
    shown = json.loads(hide_nbdev.strip_directives(json.dumps(nb)))
    assert len(shown['cells']) == len(nb['cells'])
    for before, after in zip(nb['cells'], shown['cells']):
        if before['cell_type'] != 'code': assert after == before; continue
        src, out = ''.join(before['source']), ''.join(after['source'])
        assert not any(line.startswith('#|') for line in out.splitlines())
        assert [l for l in src.splitlines() if not l.startswith('#|')] == out.splitlines() or not out.strip()
        if not out.strip(): assert 'remove-cell' in after['metadata']['tags']
    assert any('#| export' in ''.join(c['source']) for c in nb['cells'])  # the notebook itself keeps them


@pytest.mark.skipif(shutil.which('git') is None or not (ROOT / '.git').exists(),
                    reason='not a git checkout')
def test_no_file_the_book_reads_is_git_ignored():
    """The chapters read committed records under book/results; a file there that .gitignore hides exists on the
    machine that made it and nowhere else (a `runs/` pattern once hid the ladder's run records from CI)."""
    out = subprocess.run(['git', 'ls-files', '--others', '--ignored', '--exclude-standard', '--', 'book', 'notebooks'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hidden = [p for p in out if '__pycache__' not in p and '.ipynb_checkpoints' not in p]
    assert not hidden, f'ignored by .gitignore but read by the book: {hidden[:10]}'
