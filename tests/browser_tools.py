"""What the browser tests need (headless Chromium, Node.js, playwright-core from ``npm ci --prefix tests/js``).

A missing piece skips the test with the install command, unless TRELLIS2_REQUIRE_BROWSER=1 (CI), which turns the
skip into a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

JS_DIR = Path(__file__).resolve().parent / "js"


def need(what: str, fix: str):
    message = f"{what} missing: {fix}"
    if os.environ.get("TRELLIS2_REQUIRE_BROWSER") == "1":
        pytest.fail(message + " (TRELLIS2_REQUIRE_BROWSER=1)")
    pytest.skip(message)


def browser_tools() -> tuple[str, str]:
    """(chromium executable, node executable), or skip / fail naming the missing piece and its install command."""
    chromium = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    if not Path(chromium).is_file():
        need("chromium", "apt-get update && apt-get install -y chromium (or set CHROMIUM_PATH)")
    node = shutil.which("node")
    if node is None:
        need("node", "install Node.js >= 18")
    if not (JS_DIR / "node_modules" / "playwright-core").is_dir():
        need("playwright-core", "npm ci --prefix tests/js")
    return chromium, node
