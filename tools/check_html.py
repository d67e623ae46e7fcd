"""Raw TeX in the built book: TeX that reached the reader as text instead of being typeset.

A markdown line that starts with `- `, `+ ` or `1. ` inside a paragraph becomes a list item and can cut an inline
`$...$` in two; a stray `$` or a macro outside math shows up as source. This scans the prose of every HTML page
(leaving out math, code, outputs, scripts and styles) for `$`, `\\begin`, `\\end` and TeX macros.

    python tools/check_html.py _build/book/_build/html    # lists each hit; exit 1 if there is any
"""
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

SKIP_TAGS = {'script', 'style', 'pre', 'code', 'kbd', 'samp', 'textarea', 'svg', 'math', 'head'}
SKIP_CLASSES = ('highlight', 'output', 'cell_output', 'MathJax', 'mjx-')  # and 'math' itself (not mathjax_ignore)
RAW = re.compile(r'\$|\\(?:begin|end)\{|\\[A-Za-z]{2,}(?![A-Za-z])')
VOID = {'area', 'base', 'br', 'col', 'embed', 'hr', 'img', 'input', 'link', 'meta', 'source', 'track', 'wbr'}


class _Prose(HTMLParser):
    """Collects the text outside math, code and outputs, with the tag path where each piece was found."""
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.hits = [], []

    def handle_starttag(self, tag, attrs):
        if tag in VOID: return
        classes = dict(attrs).get('class') or ''
        skip = tag in SKIP_TAGS or any(c == 'math' or c.startswith(SKIP_CLASSES) for c in classes.split())
        self.stack.append((tag, bool(skip or (self.stack and self.stack[-1][1]))))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):  # forgiving: close the nearest open tag of this name
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        if self.stack and self.stack[-1][1]: return
        m = RAW.search(data)  # one hit per piece of text is enough to find it
        if m: self.hits.append(data[max(0, m.start() - 40):m.end() + 40].replace('\n', ' '))


def raw_tex(html: str) -> list[str]:
    """The snippets of prose in `html` that hold raw TeX ($, \\begin{, \\end{ or a macro such as \\operatorname)."""
    parser = _Prose()
    parser.feed(html)
    return parser.hits


def check(folder) -> dict:
    """{page: snippets} for every HTML page under `folder` with raw TeX in its prose."""
    found = {}
    for page in sorted(Path(folder).rglob('*.html')):
        if '_sources' in page.parts or '_static' in page.parts: continue
        hits = raw_tex(page.read_text(encoding='utf-8'))
        if hits: found[page.relative_to(folder).as_posix()] = hits
    return found


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1 or not Path(args[0]).is_dir():
        print('usage: python tools/check_html.py HTML_FOLDER', file=sys.stderr)
        return 2
    found = check(args[0])
    for page, hits in found.items():
        for h in hits: print(f'{page}: raw TeX in the text: ...{h}...')
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main())
