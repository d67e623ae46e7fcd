/* edm-lit: two fixes for reading on a phone.
   1. pydata-sphinx-theme 0.17 binds its sidebar drawers to the first .primary-toggle / .secondary-toggle button of
      the page, a hidden one in its own header; sphinx-book-theme's visible buttons come later and do nothing
      (pydata/pydata-sphinx-theme#2451). Their clicks are passed on to the bound buttons.
   2. An inline formula wider than its paragraph is cut off by the theme; once MathJax has typeset the page, such a
      formula becomes a line of its own that scrolls sideways (class math-wide, edm_lit.css); again when the window
      is resized or a <details> block is opened. */
document.addEventListener('DOMContentLoaded', () => {
  for (const kind of ['primary', 'secondary']) {
    const buttons = document.querySelectorAll(`.${kind}-toggle`);
    buttons.forEach((button, i) => {
      if (i === 0) return;
      button.addEventListener('click', (event) => { event.preventDefault(); buttons[0].click(); });
    });
  }
  const markWide = () => {
    for (const span of document.querySelectorAll('span.math')) {
      const inner = span.querySelector('mjx-container');
      const box = span.parentElement;
      if (!inner || !box) continue;
      span.classList.remove('math-wide');
      if (inner.getBoundingClientRect().width > box.getBoundingClientRect().width) span.classList.add('math-wide');
    }
  };
  const ready = () => (window.MathJax && MathJax.startup && MathJax.startup.promise) || null;
  const wait = (tries) => {
    const promise = ready();
    if (promise) promise.then(markWide);
    else if (tries > 0) setTimeout(() => wait(tries - 1), 200);
  };
  wait(300);  // up to a minute for MathJax to load on a slow phone
  const later = () => { clearTimeout(window.edmLitResize); window.edmLitResize = setTimeout(markWide, 200); };
  window.addEventListener('resize', later);
  document.addEventListener('toggle', later, true);  // a <details> opened: its formulas now have a width
});
