"""The /dashboard page (being written)."""

DASHBOARD_HTML = "<!doctype html><title>expertmesh</title><p>dashboard</p>"
