"""The three.js viewer widget on the REAL ComfyUI page (issue 6's "done means"), in headless Chromium.

The session ComfyUI server (comfy_harness) gets the tiny snapshot and an input image; tests/js/viewer_comfy_check.mjs
opens the ComfyUI page with a fresh Chromium profile (every non-loopback request aborted), loads
workflows/trellis2_image_to_textured_glb.json with ``app.loadGraphData``, sets the tiny settings
(test_workflows.TINY) on the widgets, queues it with ``app.queuePrompt`` so the page itself receives 'executed',
waits for the viewers of Trellis2ExportGLB and Trellis2PreviewGLB, screenshots them (the export one in several
view modes, closer up, plus an off-screen pass that records each pixel's texture coordinate), then deletes both
nodes. This file judges the screenshots against the GLB the node wrote.

The tiny random model's surface is dust (thousands of voxel-sized fragments), so the pictures are sparse: the
checks count asset pixels against the background and compare colours per pixel, never against a reference
image. Needs what test_viewer_browser.py needs (chromium, node, ``npm ci --prefix tests/js``) plus the ComfyUI
of comfy_harness; missing browser pieces skip unless TRELLIS2_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser_tools import JS_DIR, browser_tools

from comfy_harness import comfy_server  # noqa: F401  (session fixture for the comfy tests)
from test_workflows import TINY

pytestmark = [pytest.mark.comfy, pytest.mark.browser]

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "workflows" / "trellis2_image_to_textured_glb.json"
BACKGROUND = (0x26, 0x26, 0x26)  # viewer_core.js BACKGROUND
TARGETS = ["Trellis2ExportGLB", "Trellis2PreviewGLB"]  # the first is shown in every mode of MODES
MODES = ["pbr", "basecolor", "roughness", "wireframe"]
IMAGE = "trellis2_viewer_object.png"

# ComfyUI's own noise on a fresh profile, not ours: optional per-user files the frontend asks for (404),
# a TypeError inside the frontend's settings code at start-up, its calls to api.comfy.org (refused by the
# server's CSP under --disable-api-nodes, or aborted by the test), and ComfyUI's bundled three.js next to ours.
KNOWN_MISSING = {"/user.css", "/api/userdata/user.css", "/api/userdata/comfy.templates.json"}
KNOWN_ERRORS = [
    re.compile(r"^Failed to load resource: the server responded with a status of 404"),
    re.compile(r"^Connecting to 'https?://(?!127\.0\.0\.1|localhost)[^']*' violates the following Content Security"),
    re.compile(r"^TypeError: Cannot read properties of undefined \(reading 'id'\)\s+at onChange"),
]
KNOWN_WARNING = "THREE.WARNING: Multiple instances of Three.js being imported."



def _known_missing(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    if parts.path in KNOWN_MISSING:
        return True
    if "trellis2_gone_00000_.glb" in parts.query:  # test_a_reopened_workflow_whose_glb_is_gone_shows_no_viewer
        return True
    query = urllib.parse.parse_qs(parts.query)
    # Listing a per-user folder that a fresh user does not have yet (workflows/, subgraphs/; newer frontends
    # ask without the slash).
    folder = query.get("dir", [""])[0]
    if parts.path == "/api/userdata" and folder in ("workflows", "subgraphs", "subgraphs/"):
        return True
    # Newer frontends preview LoadImage's default example.png, which ComfyUI ships in its own input/ only.
    return parts.path == "/api/view" and query.get("filename") == ["example.png"] and query.get("type") == ["input"]


@pytest.fixture(scope="module")
def page_run(request, tmp_path_factory):
    """Run viewer_comfy_check.mjs once against the session server; returns (result, out folder, server)."""
    chromium, node = browser_tools()

    from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot

    server = request.getfixturevalue("comfy_server")
    if "Trellis2LoadModel" not in server.client.object_info():
        pytest.fail("ComfyUI registered no Trellis2 nodes (see the server log)", pytrace=False)
    if not (server.models_dir / "tiny" / "pipeline.json").is_file():  # test_workflows may have placed it
        server.place_model(write_tiny_snapshot(tmp_path_factory.mktemp("snap") / "tiny", seed=0), "tiny")
    image = Image.new("RGBA", (96, 80), (0, 0, 0, 0))
    image.paste((200, 120, 60, 255), (24, 16, 72, 64))
    image.save(server.input_dir / IMAGE)
    # A fresh user's first visit opens the Templates dialog over the canvas unless the tutorial counts as done.
    server.client.request("/settings/Comfy.TutorialCompleted", True)

    work = tmp_path_factory.mktemp("viewer_comfy")
    config = {
        "workflow": json.loads(WORKFLOW.read_text(encoding="utf-8")),
        "widgets": {**TINY, "LoadImage": {"image": IMAGE}},
        "targets": TARGETS,
        "modes": MODES,
        "nodeSize": [520, 480],  # the widget gets ~500 x 340 CSS px
        "zoom": 3,  # camera 3x closer than fit-to-view for the mode pictures: bigger fragments
        "deviceScaleFactor": 2,  # and twice the pixels: enough fragment interiors for per-pixel colours
        "timeoutMs": 300000,
    }
    (work / "config.json").write_text(json.dumps(config))
    out = work / "out"
    command = [node, str(JS_DIR / "viewer_comfy_check.mjs"), server.client.url, str(work / "config.json"), str(out)]
    try:
        proc = subprocess.run(command, cwd=JS_DIR, env={**os.environ, "CHROMIUM_PATH": chromium},
                              capture_output=True, text=True, timeout=420)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"viewer_comfy_check.mjs ran past {e.timeout} s:\n{(e.stderr or b'')[-3000:]!r}", pytrace=False)
    result_file = out / "result.json"
    assert result_file.is_file(), f"viewer_comfy_check.mjs wrote no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(result_file.read_text())
    assert "fatal" not in result, f"{result['fatal']}\nserver log:\n{server.log_text()[-3000:]}"
    return result, out, server


def _png(out: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / f"{name}.png").convert("RGB")).astype(np.int16)


def _scene(result: dict, out: Path, name: str) -> np.ndarray:
    """The screenshot ``name`` without the toolbar and the stats line drawn over the canvas."""
    image, rect = _png(out, name), result["steps"][name]["rect"]
    scale = image.shape[1] / rect["width"]
    return image[int(np.ceil(rect["sceneTop"] * scale)) : int(rect["sceneBottom"] * scale)]


def _asset(image: np.ndarray) -> np.ndarray:
    return np.abs(image - np.array(BACKGROUND)).max(axis=-1) > 12


def _glb_path(result: dict, server) -> Path:
    url = result["steps"]["viewers"]["found"][0]["url"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, keep_blank_values=True)
    assert query["type"] == ["output"], url
    return server.output_dir / query["subfolder"][0] / query["filename"][0]


def test_the_page_runs_the_workflow_without_errors(page_run):
    result, _, _ = page_run
    loaded = result["steps"]["loaded"]
    assert loaded["missing"] == [], f"widgets not found on the loaded workflow: {loaded['missing']}"
    assert len(loaded["applied"]) == sum(len(v) for v in TINY.values()) + 1  # + LoadImage's image
    assert result["pageErrors"] == []
    errors = [m["text"] for m in result["console"] if m["type"] == "error"]
    assert [e for e in errors if not any(p.search(e) for p in KNOWN_ERRORS)] == []
    warnings = [m["text"] for m in result["console"]
                if m["type"] == "warning" and re.search("three|trellis", m["text"], re.I)]  # fmt: skip
    assert [w for w in warnings if w != KNOWN_WARNING] == []
    assert [r for r in result["failedRequests"] if not _known_missing(r["url"])] == []
    assert [r for r in result["badResponses"] if not _known_missing(r["url"])] == []
    assert all(urllib.parse.urlsplit(u).hostname not in ("127.0.0.1", "localhost") for u in result["blocked"])


def test_both_viewers_show_the_glb_their_node_wrote(page_run):
    import trimesh

    result, _, server = page_run
    export, preview = result["steps"]["viewers"]["found"]
    for info, kind in ((export, "output"), (preview, "temp")):
        assert info["url"].startswith("/api/view?") and f"type={kind}" in info["url"], info["url"]
        assert info["stats"]["vertices"] > 0 and info["stats"]["faces"] > 0 and info["renders"] > 0
    scene = trimesh.load(_glb_path(result, server), file_type="glb", process=False)
    (mesh,) = scene.geometry.values()
    assert export["stats"]["faces"] == len(mesh.faces) and export["stats"]["vertices"] == len(mesh.vertices)
    size = mesh.visual.material.baseColorTexture.size
    assert {"slot": "baseColor", "width": size[0], "height": size[1]} in export["stats"]["textures"]
    assert size == (TINY["Trellis2UVBake"]["texture_size"],) * 2


def test_the_asset_is_drawn_in_the_widget(page_run):
    result, out, _ = page_run
    for target in TARGETS:
        scene = _scene(result, out, f"{target}-fit")
        asset = _asset(scene)
        assert asset.mean() > 0.002, f"{target}: only {asset.mean():.3%} of the widget differs from the background"
        rows, cols = np.nonzero(asset)
        h, w = asset.shape
        # Fit-to-view: the (sparse) asset spreads over the middle of the widget, not a corner of it.
        spans = f"{target}: the asset spans {np.ptp(cols)} x {np.ptp(rows)} of {w} x {h} px"
        assert np.ptp(rows) > 0.4 * h and np.ptp(cols) > 0.3 * w, spans
        assert abs(rows.mean() - h / 2) < 0.2 * h and abs(cols.mean() - w / 2) < 0.2 * w, f"{target}: asset not centred"


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = c / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return 255.0 * np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def _bilinear(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """sRGB ``texture`` [H,W,3] sampled like the GPU: bilinear in linear light; glTF UV, origin at the top-left."""
    h, w = texture.shape[:2]
    linear = _srgb_to_linear(texture.astype(np.float64))
    x, y = u * w - 0.5, v * h - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    at = lambda yy, xx: linear[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]  # noqa: E731
    mixed = (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
             + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)  # fmt: skip
    return _linear_to_srgb(mixed)


def _uv_pass(result: dict, out: Path, target: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, covered) per screenshot pixel, from the page's texture-coordinate pass (rows bottom-up there)."""
    size = result["steps"][f"{target}-uv"]
    raw = np.fromfile(out / f"{target}-uv.bin", np.uint8).reshape(size["height"], size["width"], 4)
    raw = raw[::-1].astype(np.int64)
    u = ((raw[..., 0] << 4) | (raw[..., 1] >> 4)) / 4095.0
    v = (((raw[..., 1] & 15) << 8) | raw[..., 2]) / 4095.0
    return u, v, raw[..., 3] == 255


def test_base_colour_mode_shows_the_baked_texture(page_run):
    """Per pixel: base-colour mode = the GLB's base colour texture at that pixel's texture coordinate.

    Only pixels inside a chart are compared: their 8 neighbours are surface too, with texture coordinates
    within one texel (multisampled edges and chart seams mix colours). Lit mode is the control: shading
    changes the colours, so the same comparison must fail there for most pixels.
    """
    import trimesh

    result, out, server = page_run
    target = TARGETS[0]
    scene = trimesh.load(_glb_path(result, server), file_type="glb", process=False)
    (mesh,) = scene.geometry.values()
    texture = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
    th, tw = texture.shape[:2]
    u, v, covered = _uv_pass(result, out, target)
    base = _png(out, f"{target}-basecolor")
    assert base.shape[:2] == u.shape, f"screenshot {base.shape[:2]} and texture-coordinate pass {u.shape} differ"
    inside = covered.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shift = lambda a: np.roll(np.roll(a, dy, 0), dx, 1)  # noqa: E731
            inside &= shift(covered) & (np.abs(shift(u) - u) * tw <= 1) & (np.abs(shift(v) - v) * th <= 1)
    inside[[0, -1], :] = inside[:, [0, -1]] = False
    assert inside.sum() >= 50, f"only {inside.sum()} chart-interior pixels to compare"
    rect = result["steps"][f"{target}-basecolor"]["rect"]
    scale = base.shape[1] / rect["width"]
    rows = slice(int(np.ceil(rect["sceneTop"] * scale)), int(rect["sceneBottom"] * scale))
    drawn = _asset(base[rows])
    # The pass sees what the screenshot shows: asset pixels outside it are at most antialiased rims.
    assert (drawn & ~covered[rows]).sum() <= 0.6 * drawn.sum(), "texture-coordinate pass and screenshot disagree"
    assert (covered[rows] & ~drawn).mean() < 0.001
    expected = _bilinear(texture, u[inside], v[inside])

    def matching(mode: str) -> float:
        return float((np.abs(_png(out, f"{target}-{mode}")[inside] - expected).max(axis=-1) <= 8).mean())

    base_match, lit_match = matching("basecolor"), matching("pbr")
    assert base_match >= 0.75, f"base-colour mode: {base_match:.0%} of {inside.sum()} pixels show the texture's colour"
    assert lit_match < base_match - 0.3, f"lit mode matches the raw texture as well ({lit_match:.0%}): is it lit?"


def test_switching_modes_changes_the_picture(page_run):
    result, out, _ = page_run
    target = TARGETS[0]
    images = {mode: _scene(result, out, f"{target}-{mode}") for mode in MODES}
    for i, a in enumerate(MODES):
        assert result["steps"][f"{target}-{a}"]["info"]["mode"] == a
        for b in MODES[i + 1 :]:
            asset = _asset(images[a]) | _asset(images[b])
            changed = (np.abs(images[a] - images[b]).max(axis=-1) > 16)[asset].mean()
            assert changed > 0.2, f"modes {a} and {b} look the same ({changed:.1%} of the asset pixels differ)"


def test_deleting_the_nodes_releases_the_webgl_resources(page_run):
    result, _, _ = page_run
    removed = result["steps"]["removed"]
    assert removed["live"] == [] and removed["canvasesLeft"] == 0
    for target in result["targets"]:
        info = removed["released"][str(target["id"])]
        assert info is not None, f"no released viewer for {target['type']} (node {target['id']})"
        assert info["disposed"] is True and info["inDocument"] is False
        assert info["memory"] == {"geometries": 0, "textures": 0}, f"{target['type']}: {info['memory']}"
        assert info["programs"] == 0


def test_reopening_the_workflow_shows_the_last_glb_again(page_run):
    """The last GLB is saved in the node's properties; a reopened workflow shows it again without running, and
    the old viewers are released (exactly one live viewer per node)."""
    result, _, _ = page_run
    reopened = result["steps"]["reopened"]
    saved = {p["type"]: p["glb"] for p in reopened["properties"]}
    assert set(saved) == set(TARGETS), saved
    assert saved["Trellis2ExportGLB"]["type"] == "output" and saved["Trellis2PreviewGLB"]["type"] == "temp"
    first = {v["label"]: v for v in result["steps"]["viewers"]["found"]}
    again = result["steps"]["reopenedViewers"]
    assert again["live"] == len(TARGETS)
    for target, info in zip(result["targets"], again["found"]):
        label = f"node:{target['id']}"
        assert info["label"] == label
        old = first[label]

        def file_of(url):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, keep_blank_values=True)
            return tuple(query[k][0] for k in ("filename", "subfolder", "type"))

        assert file_of(info["url"]) == file_of(old["url"]) == tuple(saved[target["type"]][k] for k in ("filename", "subfolder", "type"))
        assert info["stats"]["vertices"] == old["stats"]["vertices"] and info["stats"]["faces"] == old["stats"]["faces"]


def test_a_reopened_workflow_whose_glb_is_gone_shows_no_viewer(page_run):
    result, _, _ = page_run
    gone = result["steps"]["goneFile"]
    assert result["steps"]["goneChecked"]["live"] == 0
    said = [m["text"] for m in result["console"] if gone in m["text"]]
    assert len(said) == len(TARGETS) and all("is gone (404)" in t and "run the node" in t for t in said), said
    assert not any(gone in m["text"] for m in result["console"] if m["type"] == "error")
    assert result["pageErrors"] == []
