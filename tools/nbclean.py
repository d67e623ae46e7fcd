"""Store notebooks clean (plain tool, not generated): nbdev's clean_nb, then execution counts renumbered 1, 2, 3, ...

nbdev-clean blanks execution counts, but nbval treats a cell with outputs and no execution count as "unrun" and
fails; sequential counts keep the stored file free of volatile state and nbval happy.
Usage: python tools/nbclean.py [notebooks/*.ipynb]
"""
import json
import sys
from pathlib import Path

from nbdev.clean import clean_nb

ROOT = Path(__file__).resolve().parents[1]


def clean(nb: dict) -> dict:
    """Return a cleaned copy of the notebook dict `nb`."""
    nb = json.loads(json.dumps(nb))
    clean_nb(nb, allowed_cell_metadata_keys=['tags', 'mystnb'])  # mystnb: figure captions, alt text
    count = 0
    for cell in nb['cells']:
        if cell['cell_type'] != 'code': continue
        if not cell['source'] and not cell.get('outputs'): continue
        count += 1
        cell['execution_count'] = count
        for out in cell.get('outputs', []):
            if out.get('output_type') == 'execute_result': out['execution_count'] = count
    return nb


def dumps(nb: dict) -> str:
    """Serialize as Jupyter does (1-space indent, trailing newline)."""
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + '\n'


def main(paths):
    for p in map(Path, paths or sorted((ROOT / 'notebooks').glob('*.ipynb'))):
        p.write_text(dumps(clean(json.loads(p.read_text()))))


if __name__ == '__main__':
    main(sys.argv[1:])
