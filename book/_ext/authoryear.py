"""Sphinx extension of the book: bibliography labels in the author-year form the text cites with ({cite:t} and
{cite:p} give "Karras et al. (2022)"), instead of numbers: "Karras et al. 2022", "Song and Ermon 2019", with a, b, ...
when one author-year pair labels two entries. The entries keep pybtex's unsrt formatting, whose web references
render the arXiv id, DOI or URL of each entry as a link."""
import codecs
from collections import Counter

import latexcodec  # noqa: F401  (registers the 'ulatex' codec; a dependency of pybtex)

from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle


def _authors(entry) -> str:
    persons = entry.persons.get('author') or entry.persons.get('editor') or []
    # Hyv{\"a}rinen -> Hyvärinen: the label is plain text, so the name's LaTeX accents are decoded
    last = [codecs.decode(' '.join(p.last_names), 'ulatex').replace('{', '').replace('}', '') for p in persons]
    if not last: return entry.key
    if len(last) == 1: return last[0]
    if len(last) == 2: return f'{last[0]} and {last[1]}'
    return f'{last[0]} et al.'


class AuthorYearLabelStyle(BaseLabelStyle):
    """'Karras et al. 2022'; a suffix a, b, ... separates entries that would share a label."""
    def format_labels(self, sorted_entries):
        entries = list(sorted_entries)
        base = [f"{_authors(e)} {e.fields.get('year', '')}".strip() for e in entries]
        counts, seen = Counter(base), Counter()
        for label in base:
            if counts[label] == 1: yield label; continue
            seen[label] += 1
            yield f'{label}{chr(ord("a") + seen[label] - 1)}'


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabelStyle


def setup(app):
    register_plugin('pybtex.style.formatting', 'authoryear', AuthorYearStyle)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
