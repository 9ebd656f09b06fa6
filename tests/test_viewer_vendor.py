"""The vendored three.js (web/js/vendor/.three/) is the pinned npm release, unmodified, and loadable.

Offline checks: SHA256SUMS covers exactly the vendored files and matches them, the file list is the refresh
script's, VERSION agrees with the REVISION inside three.js, every import between the vendored files resolves,
and ComfyUI's extension scan (every *.js under WEB_DIRECTORY) never picks up a vendored file.
Online check: `npm pack three@VERSION` and byte-compare; skipped (with the reason) when npm or the registry
is unreachable.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WEB_DIR = REPO / "web" / "js"
VENDOR = WEB_DIR / "vendor" / ".three"
OWN_FILES = {"SHA256SUMS", "VERSION"}  # written by the refresh script, not from npm


def _refresh_script():
    spec = importlib.util.spec_from_file_location("refresh_three", REPO / "scripts" / "refresh_three.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sums() -> dict[str, str]:
    sums = {}
    for line in (VENDOR / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        digest, rel = line.split("  ", 1)
        sums[rel] = digest
    return sums


def _vendored_files() -> set[str]:
    return {p.relative_to(VENDOR).as_posix() for p in VENDOR.rglob("*") if p.is_file()} - OWN_FILES


def test_sha256sums_match_the_vendored_files():
    sums = _sums()
    assert set(sums) == _vendored_files(), "SHA256SUMS and the folder disagree: run scripts/refresh_three.py"
    for rel, digest in sums.items():
        actual = hashlib.sha256((VENDOR / rel).read_bytes()).hexdigest()
        assert actual == digest, f"{rel} was modified (sha256 {actual} != {digest}); re-run scripts/refresh_three.py"


def test_files_are_the_refresh_scripts_list():
    script = _refresh_script()
    assert script.VENDOR_DIR == VENDOR
    assert set(script.FILES) == set(_sums()), "refresh_three.FILES and SHA256SUMS disagree"
    assert "LICENSE" in script.FILES and "MIT License" in (VENDOR / "LICENSE").read_text(encoding="utf-8")


def test_version_matches_the_code():
    version = (VENDOR / "VERSION").read_text(encoding="utf-8").strip()
    assert re.fullmatch(r"0\.\d+\.\d+", version), f"VERSION holds {version!r}, expected an exact pin like 0.187.0"
    core = (VENDOR / "build" / "three.core.js").read_text(encoding="utf-8")
    revision = re.search(r"const REVISION = '(\d+)';", core)
    assert revision, "three.core.js has no REVISION constant"
    assert revision.group(1) == version.split(".")[1], f"three.core.js is r{revision.group(1)}, VERSION says {version}"
    module = (VENDOR / "build" / "three.module.js").read_text(encoding="utf-8")
    assert "from './three.core.js'" in module and "REVISION" in module  # the split build, one REVISION


def test_imports_between_vendored_files_resolve():
    """Each import is 'three' (mapped by web/js/three_loader.js) or a relative path to a vendored file."""
    statement = re.compile(r"^\s*(?:import|export)\b[^'\"\n]*?\bfrom\s*['\"]([^'\"]+)['\"]|^\s*\}\s*from\s*['\"]([^'\"]+)['\"]",
                           re.MULTILINE)
    files = _vendored_files()
    for rel in sorted(f for f in files if f.endswith(".js")):
        text = (VENDOR / rel).read_text(encoding="utf-8")
        for match in statement.finditer(text):
            spec = match.group(1) or match.group(2)
            if spec == "three":
                assert rel.startswith("examples/jsm/"), f"{rel}: only addons may import 'three'"
                continue
            assert spec.startswith(("./", "../")), f"{rel} imports {spec!r}: neither 'three' nor relative"
            target = os.path.normpath(os.path.join(os.path.dirname(rel), spec)).replace(os.sep, "/")
            assert target in files, f"{rel} imports {spec} -> {target}, which is not vendored"
    loader = (WEB_DIR / "three_loader.js").read_text(encoding="utf-8")
    for path in re.findall(r'"(examples/jsm/[^"]+\.js)"', loader) + ["build/three.module.js"]:
        assert path in files, f"three_loader.js loads {path}, which is not vendored"


def test_comfyui_extension_scan_skips_the_vendor_folder():
    """ComfyUI's server lists glob('**/*.js', recursive=True) under WEB_DIRECTORY and the page imports each
    one; a vendored addon imported that way fails on its bare 'three' import. The dot-folder hides them."""
    found = {Path(p).relative_to(WEB_DIR).as_posix()
             for p in glob.glob(os.path.join(glob.escape(str(WEB_DIR)), "**/*.js"), recursive=True)}
    assert not [p for p in found if "vendor" in p], f"ComfyUI would import vendored files: {sorted(found)}"
    assert {"trellis2_viewer.js", "viewer_core.js", "three_loader.js"} <= found


def test_matches_the_npm_tarball(tmp_path):
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm not installed: cannot compare with the registry's tarball (offline checks still ran)")
    version = (VENDOR / "VERSION").read_text(encoding="utf-8").strip()
    try:
        proc = subprocess.run([npm, "pack", f"three@{version}", "--pack-destination", str(tmp_path), "--silent"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("npm pack timed out: registry unreachable (offline checks still ran)")
    if proc.returncode != 0:
        pytest.skip(f"npm pack three@{version} failed, registry unreachable? {proc.stderr.strip()[-300:]}")
    with tarfile.open(tmp_path / f"three-{version}.tgz") as tar:
        for rel, digest in _sums().items():
            member = tar.extractfile(f"package/{rel}")
            assert member is not None, f"npm's three@{version} has no {rel}"
            assert hashlib.sha256(member.read()).hexdigest() == digest, f"{rel} differs from npm's three@{version}"
