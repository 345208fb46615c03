"""Observability for operators: the admin API and page (api.py, static/), the log queries behind
them (queries.py, filters.py) and the dedicated metrics port (metrics_port.py).

Import the modules themselves: this package re-exports nothing, so the CLI can load the light
parsers in filters.py without the web server.
"""
