"""The three.js viewer widget in headless Chromium, without ComfyUI.

A local http.server on 127.0.0.1 serves web/js/ at /js/, tests/viewer_page/ at /page/ and a generated GLB
at /assets/box.glb (also as ComfyUI's /api/view?filename=box.glb&subfolder=&type=output), stub ComfyUI
modules at /scripts/ for the glue page, with the Content-Security-Policy that ComfyUI sends under --disable-api-nodes (so a
blob:/fetch use the real server would block fails here too). tests/js/viewer_check.mjs drives Debian's
chromium through playwright-core and writes screenshots plus result.json; this file judges them.

Needs: /usr/bin/chromium (or CHROMIUM_PATH), node, and `npm ci --prefix tests/js`. Missing pieces skip the
test with the install command, unless TRELLIS2_REQUIRE_BROWSER=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser_tools import JS_DIR, browser_tools

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
# ComfyUI 0.3.75 server.py, create_block_external_middleware (active with --disable-api-nodes).
COMFY_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' blob:; style-src 'self' "
             "'unsafe-inline'; img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; frame-src 'self'; "
             "object-src 'self';")
BACKGROUND = (0x26, 0x26, 0x26)
# Base-colour texture quadrants (sRGB) and metallic/roughness layout of the test asset.
QUADRANT_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
METAL_LEFT, METAL_RIGHT = 1.0, 0.0
ROUGH_TOP, ROUGH_BOTTOM = 0.25, 0.85
MODES = ["pbr", "basecolor", "metallic", "roughness", "normals", "wireframe", "uv"]



def _textures(size: int = 64) -> tuple[Image.Image, Image.Image]:
    half = size // 2
    base = np.zeros((size, size, 3), np.uint8)
    base[:half, :half] = QUADRANT_COLOURS["red"]
    base[:half, half:] = QUADRANT_COLOURS["green"]
    base[half:, :half] = QUADRANT_COLOURS["blue"]
    base[half:, half:] = QUADRANT_COLOURS["yellow"]
    mr = np.zeros((size, size, 3), np.uint8)  # glTF: G = roughness, B = metalness (linear)
    mr[:half, :, 1] = round(ROUGH_TOP * 255)
    mr[half:, :, 1] = round(ROUGH_BOTTOM * 255)
    mr[:, :half, 2] = round(METAL_LEFT * 255)
    mr[:, half:, 2] = round(METAL_RIGHT * 255)
    return Image.fromarray(base), Image.fromarray(mr)


def _write_box_glb(path: Path) -> None:
    """A unit cube, 24 vertices (one quad per face, each face maps the whole texture), PBR textured."""
    import trimesh

    vertices, uvs, faces = [], [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            n = np.zeros(3)
            n[axis] = sign
            u = np.zeros(3)
            u[(axis + 1) % 3] = 1.0
            v = np.cross(n, u)  # (u, v, n) right-handed: corners below wind counter-clockwise from outside
            base = len(vertices)
            for cu, cv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                vertices.append(n * 0.5 + (cu * u + cv * v) * 0.5)
                uvs.append(((cu + 1) / 2, (cv + 1) / 2))
            faces += [(base, base + 1, base + 2), (base, base + 2, base + 3)]
    base_colour, metallic_roughness = _textures()
    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=base_colour, metallicRoughnessTexture=metallic_roughness,
        metallicFactor=1.0, roughnessFactor=1.0)
    mesh = trimesh.Trimesh(np.array(vertices), np.array(faces),
                           visual=trimesh.visual.TextureVisuals(uv=np.array(uvs), material=material), process=False)
    # No NORMAL attribute on purpose: glTF says viewers must then shade flat, and GLTFLoader does it by
    # setting material.flatShading, which each view mode has to carry over (normals mode went black once).
    path.write_bytes(mesh.export(file_type="glb", include_normals=False))


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".mjs": "text/javascript", ".glb": "model/gltf-binary", ".html": "text/html"}

    def __init__(self, *args, roots: dict[str, Path], log: list, **kwargs):
        self.roots = roots
        self.log = log
        super().__init__(*args, directory=str(REPO / "tests" / "viewer_page"), **kwargs)

    def translate_path(self, path: str) -> str:
        path, _, query = path.split("#", 1)[0].partition("?")
        if path == "/api/view":  # ComfyUI's route, as the glue calls it: only type=output, no subfolder here
            params = urllib.parse.parse_qs(query, keep_blank_values=True)
            if params.get("type") == ["output"] and params.get("subfolder") == [""] and "filename" in params:
                path = "/assets/" + params["filename"][0]
        for prefix, root in self.roots.items():
            if path.startswith(prefix):
                target = (root / path[len(prefix):]).resolve()
                if root.resolve() in target.parents or target == root.resolve():
                    return str(target)
        return str(REPO / "does-not-exist")

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", COMFY_CSP)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, fmt: str, *args) -> None:  # keep pytest output clean; keep the record
        self.log.append(fmt % args)


@pytest.fixture(scope="module")
def browser_run(tmp_path_factory):
    chromium, node = browser_tools()

    work = tmp_path_factory.mktemp("viewer")
    assets = work / "assets"
    assets.mkdir()
    _write_box_glb(assets / "box.glb")
    log: list[str] = []
    roots = {"/js/": REPO / "web" / "js", "/page/": REPO / "tests" / "viewer_page", "/assets/": assets,
             "/scripts/": REPO / "tests" / "viewer_page" / "comfy_stub"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, roots=roots, log=log))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    out = work / "out"
    try:
        url = f"http://127.0.0.1:{server.server_port}/page/index.html?glb=/assets/box.glb"
        proc = subprocess.run([node, str(JS_DIR / "viewer_check.mjs"), url, str(out)], cwd=JS_DIR,
                              env={**os.environ, "CHROMIUM_PATH": chromium},
                              capture_output=True, text=True, timeout=180)
    finally:
        server.shutdown()
        server.server_close()
    result_file = out / "result.json"
    assert result_file.is_file(), f"viewer_check.mjs wrote no result (exit {proc.returncode}):\n{proc.stderr}"
    result = json.loads(result_file.read_text())
    result["serverLog"] = log
    return result, out


def _png(out: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / f"{name}.png").convert("RGB")).astype(np.int16)


def _scene_area(image: np.ndarray) -> np.ndarray:
    """The widget minus the toolbar (top 30 px) and the stats line (bottom 24 px), which are not the scene."""
    return image[30:-24]


def _near(image: np.ndarray, colour, tol: int = 14) -> int:
    return int((np.abs(image - np.array(colour)).max(axis=-1) <= tol).sum())


def test_page_loads_cleanly(browser_run):
    result, _ = browser_run
    assert "fatal" not in result, result.get("fatal")
    assert result["pageState"]["ready"], result["pageState"]["error"]
    assert result["pageErrors"] == []
    assert [m for m in result["console"] if m["type"] == "error"] == []
    assert result["failedRequests"] == [] and result["badResponses"] == [], result["serverLog"]
    assert result["blocked"] == []  # nothing tried to leave 127.0.0.1
    loaded = result["steps"]["loaded"]
    assert loaded["stats"]["vertices"] == 24 and loaded["stats"]["faces"] == 12
    slots = {(t["slot"], t["width"], t["height"]) for t in loaded["stats"]["textures"]}
    assert slots == {("baseColor", 64, 64), ("metallicRoughness", 64, 64)}
    assert loaded["memory"]["geometries"] >= 1 and loaded["memory"]["textures"] >= 3  # 2 maps + environment


def test_asset_is_drawn(browser_run):
    _, out = browser_run
    for mode in MODES:
        scene = _scene_area(_png(out, f"mode-{mode}"))
        not_background = (np.abs(scene - np.array(BACKGROUND)).max(axis=-1) > 12).mean()
        assert not_background > 0.08, f"{mode}: only {not_background:.1%} of the widget differs from the background"
        h, w, _ = scene.shape
        centre = scene[h // 2 - 5:h // 2 + 5, w // 2 - 5:w // 2 + 5]
        assert np.abs(centre - np.array(BACKGROUND)).max() > 12, f"{mode}: the asset is not centred (fit-to-view)"


def test_base_colour_mode_shows_texture_colours(browser_run):
    _, out = browser_run
    base = _scene_area(_png(out, "mode-basecolor"))
    for name, colour in QUADRANT_COLOURS.items():
        assert _near(base, colour) > 150, f"base-colour mode lacks the texture's {name} {colour}"
    lit = _scene_area(_png(out, "mode-pbr"))
    assert sum(_near(lit, c, tol=4) for c in QUADRANT_COLOURS.values()) < sum(
        _near(base, c, tol=4) for c in QUADRANT_COLOURS.values()) / 2, "lit mode should not show raw base colours"


def test_channel_modes_read_the_right_channel(browser_run):
    _, out = browser_run
    metal = _scene_area(_png(out, "mode-metallic"))
    rough = _scene_area(_png(out, "mode-roughness"))
    assert _near(metal, (255, 255, 255), 6) > 150 and _near(metal, (0, 0, 0), 6) > 150  # B channel: 1 | 0
    for value in (ROUGH_TOP, ROUGH_BOTTOM):  # G channel
        grey = round(value * 255)
        assert _near(rough, (grey, grey, grey), 6) > 150, f"roughness {value} (grey {grey}) not shown"
    assert _near(rough, (255, 255, 255), 6) < 20  # metalness must not leak into the roughness view


def test_normals_mode_shows_face_orientation(browser_run):
    _, out = browser_run
    scene = _scene_area(_png(out, "mode-normals"))
    asset = scene[np.abs(scene - np.array(BACKGROUND)).max(axis=-1) > 12]
    assert asset.mean() > 80, "normals mode is (nearly) black: normals missing or not shaded"
    colours, counts = np.unique(asset // 32, axis=0, return_counts=True)
    assert (counts > 0.05 * len(asset)).sum() >= 3, "three visible faces should show three normal colours"


def test_switching_modes_changes_the_picture(browser_run):
    result, out = browser_run
    images = {mode: _scene_area(_png(out, f"mode-{mode}")) for mode in MODES}
    for i, a in enumerate(MODES):
        assert result["steps"][f"mode-{a}"]["mode"] == a
        for b in MODES[i + 1:]:
            changed = (np.abs(images[a] - images[b]).max(axis=-1) > 16).mean()
            assert changed > 0.002, f"modes {a} and {b} look the same ({changed:.3%} of pixels differ)"
    assert result["steps"]["selectPbr"]["mode"] == "pbr"


def test_renders_on_demand_only(browser_run):
    result, out = browser_run
    idle = result["steps"]["idle"]
    assert idle["after"] == idle["before"], "frames were drawn while idle: there must be no animation loop"
    orbit = result["steps"]["orbit"]
    assert orbit["rendersAfter"] > orbit["rendersBefore"], "dragging did not render (controls 'change')"
    moved = (np.abs(_png(out, "orbit") - _png(out, "mode-pbr")).max(axis=-1) > 16).mean()
    assert moved > 0.01, "the orbit drag did not move the view"


def test_follows_container_size(browser_run):
    result, _ = browser_run
    assert result["steps"]["loaded"]["canvasSize"] == [480, 360]
    assert result["steps"]["resized"]["canvasSize"] == [320, 360]


def test_replacing_the_asset_frees_the_old_one(browser_run):
    result, _ = browser_run
    before, after = result["steps"]["beforeReload"], result["steps"]["reloaded"]
    assert after["memory"] == before["memory"], "GPU resources grew when the asset was replaced"
    assert after["stats"] == before["stats"]
    assert result["download"]["visible"] and result["download"]["download"] == "box.glb"
    assert result["download"]["href"].endswith("/assets/box.glb")


def test_destroy_releases_webgl_resources(browser_run):
    result, _ = browser_run
    destroyed = result["steps"]["destroyed"]
    info = destroyed["info"]
    assert info["disposed"] is True
    assert info["memory"] == {"geometries": 0, "textures": 0}, info["memory"]
    assert info["programs"] == 0 and info["inDocument"] is False
    assert destroyed["live"] == 0 and destroyed["widgetChildren"] == 0
    assert destroyed["released"]["memory"] == {"geometries": 0, "textures": 0}
    assert destroyed["released"]["label"] == "test-page"


def test_comfyui_glue(browser_run):
    """trellis2_viewer.js over stub app/api modules: only Trellis2* types, /view URL, widget, replace, remove."""
    result, _ = browser_run
    assert "glueFatal" not in result, result.get("glueFatal")
    glue = result["glue"]
    assert glue["extensions"] == ["trellis2.viewer"]
    assert glue["theirsPatched"] is False, "the extension must leave other node types alone"
    assert glue["widgetsWithoutGlb"] == 0, "a ui payload without 'glb' must not create a viewer"
    first = glue["first"]
    assert first["url"].startswith("/api/view?filename=box.glb&subfolder=&type=output&rand=")
    assert glue["download"] == "/api/view?filename=box.glb&subfolder=&type=output"
    assert first["filename"] == "box.glb" and first["stats"]["faces"] == 12 and first["label"] == "node:7"
    assert glue["widget"] == {"count": 1, "name": "trellis2_viewer", "serialize": False, "minHeight": 300}
    assert glue["size"][0] >= 360 and glue["size"][1] >= 360
    assert glue["liveAfterSecond"] == 1 and glue["second"]["memory"] == first["memory"]
    removed = glue["afterRemove"]
    assert removed["live"] == 0 and removed["widgetChildren"] == 0
    assert removed["released"]["label"] == "node:7" and removed["released"]["disposed"] is True
    assert removed["released"]["memory"] == {"geometries": 0, "textures": 0}
    early = glue["earlyRemoved"]
    assert early["live"] == 0, "a viewer finished after its node was removed must be destroyed"
    assert all(i["memory"] == {"geometries": 0, "textures": 0} for i in early["released"])
