#!/usr/bin/env python3
"""Re-vendor three.js from the npm registry, unmodified, into web/js/vendor/.three/.

Usage:
    python3 scripts/refresh_three.py            # re-download the pinned version (web/js/vendor/.three/VERSION)
    python3 scripts/refresh_three.py 0.188.0    # bump the pin: download that version instead

It runs ``npm pack three@VERSION`` (npm checks the registry's sha512 integrity), copies exactly the files in
``FILES`` (paths inside the npm package, kept in the package's own layout so the relative imports between
them resolve), and writes ``VERSION`` and ``SHA256SUMS`` (``sha256sum -c`` format) next to them.
tests/test_viewer_vendor.py checks the folder against both.

Why a hidden folder (``.three``): ComfyUI imports every ``*.js`` under a pack's WEB_DIRECTORY as an extension
module, found with Python's ``glob('**/*.js')``, which skips dot-folders. The three.js addons import the bare
specifier ``'three'``, which ComfyUI's page cannot resolve (its import map has no "three"), so each would log
"Error loading extension ... Failed to resolve module specifier" on every page load. Inside the dot-folder
they are only served, never auto-imported; web/js/three_loader.js maps ``'three'`` when it loads them.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENDOR_DIR = REPO / "web" / "js" / "vendor" / ".three"

# Paths inside the npm tarball (below its "package/" folder). GLTFLoader imports the two utils.
FILES = (
    "LICENSE",
    "build/three.core.js",
    "build/three.module.js",
    "examples/jsm/controls/OrbitControls.js",
    "examples/jsm/environments/RoomEnvironment.js",
    "examples/jsm/loaders/GLTFLoader.js",
    "examples/jsm/utils/BufferGeometryUtils.js",
    "examples/jsm/utils/SkeletonUtils.js",
)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pinned_version() -> str:
    return (VENDOR_DIR / "VERSION").read_text(encoding="utf-8").strip()


def npm_pack(version: str, dest: Path) -> Path:
    """Download three@version with npm into dest; return the extracted package folder."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found on PATH: install Node.js (npm) to refresh the vendored three.js")
    result = subprocess.run(
        [npm, "pack", f"three@{version}", "--pack-destination", str(dest), "--silent"],
        cwd=dest, capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"npm pack three@{version} failed (exit {result.returncode}): {result.stderr.strip()}")
    tarball = dest / f"three-{version}.tgz"
    if not tarball.is_file():
        raise RuntimeError(f"npm pack three@{version} produced no {tarball.name} in {dest}")
    with tarfile.open(tarball) as tar:
        # The "data" filter refuses links and paths outside dest (Python >= 3.10.12 / 3.11.4).
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest / "x", **kwargs)
    return dest / "x" / "package"


def refresh(version: str) -> None:
    with tempfile.TemporaryDirectory(prefix="three-npm-") as tmp:
        package = npm_pack(version, Path(tmp))
        missing = [f for f in FILES if not (package / f).is_file()]
        if missing:
            raise RuntimeError(f"three@{version} lacks {missing}: update FILES in {Path(__file__).name}")
        if VENDOR_DIR.exists():
            shutil.rmtree(VENDOR_DIR)
        for rel in FILES:
            target = VENDOR_DIR / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package / rel, target)
    (VENDOR_DIR / "VERSION").write_text(version + "\n", encoding="utf-8")
    sums = "".join(f"{sha256_file(VENDOR_DIR / rel)}  {rel}\n" for rel in FILES)
    (VENDOR_DIR / "SHA256SUMS").write_text(sums, encoding="utf-8")


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        sys.stderr.write(__doc__)
        return 2
    version = argv[1] if len(argv) == 2 else pinned_version()
    refresh(version)
    sys.stdout.write(f"vendored three@{version} into {VENDOR_DIR.relative_to(REPO)} ({len(FILES)} files)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
