"""MkDocs hooks of the pqjax site (mkdocs.yml names this file)."""

from __future__ import annotations

import re
from typing import Any

# The docstrings name objects with Sphinx roles (:class:`QArray`); Markdown renders
# the role's name as text before the code, so the API pages drop it.
_ROLE = re.compile(r':(?:class|func|meth|mod|attr|data|exc|obj):(?=<code>)')


def on_page_content(html: str, **kwargs: Any) -> str:
  """Removes the Sphinx role names left before inline code in a rendered page.

  Args:
    html: the page's HTML.
    **kwargs: what MkDocs passes besides (page, config, files), unused.

  Returns:
    The HTML without the role names.
  """
  return _ROLE.sub('', html)
