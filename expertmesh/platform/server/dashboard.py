"""The /dashboard page, `dashboard.html` beside this module; the comment at its top says what the page
shows and the rules it keeps (self-contained, server data written as text only).

The page is package data (pyproject's `[tool.setuptools.package-data]` names it, so a non-editable install
such as the container image carries it), read once at import.
"""

from importlib import resources

DASHBOARD_HTML = resources.files(__package__).joinpath("dashboard.html").read_text(encoding="utf-8")
