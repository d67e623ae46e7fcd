"""Sphinx extension of the book: nbdev's `#| ...` directives (`#| export`, `#| default_exp`) are for the library
build, not for the reader. Before a chapter notebook is parsed (and executed) its code cells lose those lines, and a
cell left empty (`#| default_exp toy`) is not shown at all. Comments are all they are, so nothing else changes."""
import json
import re

_DIRECTIVE = re.compile(r'^#\|.*(?:\n|$)', re.M)


def strip_directives(text: str) -> str:
    """The notebook JSON `text` with the `#| ...` lines of every code cell removed; empty cells tagged remove-cell."""
    nb = json.loads(text)
    for cell in nb.get('cells', []):
        if cell.get('cell_type') != 'code': continue
        source = ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']
        if not _DIRECTIVE.search(source): continue
        source = _DIRECTIVE.sub('', source).lstrip('\n')
        cell['source'] = source
        if not source.strip():
            tags = cell.setdefault('metadata', {}).setdefault('tags', [])
            if 'remove-cell' not in tags: tags.append('remove-cell')
    return json.dumps(nb, ensure_ascii=False)


def _source_read(app, docname, source):
    path = app.env.doc2path(docname)
    if str(path).endswith('.ipynb'): source[0] = strip_directives(source[0])


def setup(app):
    app.connect('source-read', _source_read)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
