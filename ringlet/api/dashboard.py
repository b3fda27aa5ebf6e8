"""The web dashboard at `/`: the SvelteKit build in `dashboard/build/` when it exists, else a page saying how
to build it. Mounted after every API route, so API paths always win."""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

REPO_DASHBOARD_BUILD = Path(__file__).resolve().parents[2] / "dashboard" / "build"

_NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>ringlet</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 42rem; margin: 3rem auto; padding: 0 1rem">
<h1>ringlet</h1>
<p>This node is running, but the dashboard is not built: there is no <code>{build}</code>.</p>
<p>Build it with <code>cd dashboard &amp;&amp; npm ci &amp;&amp; npm run build</code> (or run
<code>scripts/setup.sh</code>), then restart the node.</p>
<p>The API works without it: <a href="/docs">/docs</a> (interactive), <a href="/v1/models">/v1/models</a>,
<a href="/state">/state</a>, <a href="/metrics">/metrics</a>.</p>
</body></html>
"""


def mount_dashboard(app: FastAPI, build_dir: Path = REPO_DASHBOARD_BUILD) -> None:
    if (build_dir / "index.html").is_file():
        app.mount("/", StaticFiles(directory=build_dir, html=True), name="dashboard")
        return
    page = _NOT_BUILT.format(build=html.escape(str(build_dir)))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard_not_built() -> HTMLResponse:
        return HTMLResponse(page)
