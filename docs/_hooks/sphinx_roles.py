"""MkDocs hook: render Sphinx cross-reference roles left in numpydoc docstrings.

Docstrings are written for both Sphinx-style readers and mkdocstrings;
``:class:`~rmkit.ArmoRM``` would otherwise show up verbatim. The role is
dropped and ``~a.b.C`` shortened to ``C``, as Sphinx displays it.
"""

import re

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|obj|exc|const):(?=<code>)")
_TILDE = re.compile(r"<code>~(?:[\w]+\.)*([\w]+)</code>")
# roles that reached the page unrendered, e.g. inside a parameter's type
_RAW = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|obj|exc|const):`~?([\w.]+)`")


def on_page_content(html, page, config, files):
    html = _RAW.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).count("~") else m.group(1), html)
    return _TILDE.sub(r"<code>\1</code>", _ROLE.sub("", html))
