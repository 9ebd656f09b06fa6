"""workflows/*.json: valid ComfyUI UI-format graphs whose links agree and whose node types exist.

Fast checks need nothing but the files (and the node ids in nodes/*.py). With a ComfyUI install at hand the core
node types are checked against its source; the ``comfy`` tests check every widget list against a live 0.3.75
server's /object_info and that the server accepts each graph's API form (validation only: SDXL weights are absent).

``api_graph(workflow, object_info, overrides)`` turns a UI workflow into the API-format prompt POST /prompt takes;
the integration test uses it to queue the workflows with the tiny snapshot.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import pytest

from comfy_harness import comfy_server  # noqa: F401  (session fixture for the comfy tests)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
EXPECTED = {"trellis2_image_to_textured_glb", "trellis2_sdxl_text_to_3d", "trellis2_controlnet_image_to_3d",
            "trellis2_retexture_mesh", "trellis2_multiview_to_3d"}
# Workflows that generate a new object (every stage as its own node); the retexture one keeps the user's geometry.
GENERATING = [p for p in WORKFLOWS if p.stem != "trellis2_retexture_mesh"]
# Run here with the tiny snapshot; the issue-8 workflows run in test_workflows_issue8.py (their own inputs).
RUN_HERE = [p for p in WORKFLOWS if p.stem in ("trellis2_image_to_textured_glb", "trellis2_sdxl_text_to_3d",
                                               "trellis2_controlnet_image_to_3d")]  # fmt: skip
OUTPUT_TYPES = {"PreviewImage", "SaveImage", "Trellis2PreviewGLB", "Trellis2ExportGLB", "Preview3D", "SaveGLB"}
STAGES = {"Trellis2LoadModel", "Trellis2Conditioning", "Trellis2SparseStructure", "Trellis2Geometry", "Trellis2Material",
          "Trellis2OVoxelToMesh", "Trellis2MeshRepair", "Trellis2MeshDecimate", "Trellis2UVBake", "Trellis2ExportGLB"}  # fmt: skip


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def our_node_ids() -> set[str]:
    """Every ``node_id="Trellis2..."`` in nodes/*.py, read without importing ComfyUI."""
    ids = set()
    for f in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "node_id" and isinstance(node.value, ast.Constant):
                ids.add(node.value.value)
    return ids


def _is_widget(spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not opts.get("forceInput")


def _widget_slots(spec: list) -> int:
    """Values a widget input takes in widgets_values: itself, + the seed control, + the upload button's value."""
    opts = spec[1] if len(spec) > 1 else {}
    return 1 + bool(opts.get("control_after_generate")) + bool(opts.get("image_upload"))


def api_graph(workflow: dict, object_info: dict, overrides: dict | None = None) -> dict:
    """The API-format prompt of a UI workflow: {node id: {"class_type", "inputs"}}.

    Widget values are matched to input names in /object_info's ``input_order`` (required, then optional), skipping
    the extra values the frontend stores after a seed's "control after generate" and an upload combo. Linked inputs
    become [origin id, origin slot]. overrides: {node id (int or str) or node type: {input name: value}}.
    """
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        values = list(node.get("widgets_values") or [])
        inputs, i = {}, 0
        for name in order:
            if _is_widget(specs[name]):
                inputs[name] = values[i]
                i += _widget_slots(specs[name])
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        for key in (node["id"], str(node["id"]), node["type"]):
            inputs.update((overrides or {}).get(key, {}))
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


def with_loaded_image(graph: dict, source_type: str, image: str) -> dict:
    """``graph`` with every ``source_type`` node (e.g. the SDXL VAEDecode) replaced by a LoadImage of ``image`` and
    the nodes that only fed it removed: runs a workflow's 3D part without the weights of its 2D part."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        if node["class_type"] == source_type:
            node["class_type"], node["inputs"] = "LoadImage", {"image": image}
    needed, todo = set(), [k for k, n in graph.items() if n["class_type"] in OUTPUT_TYPES]
    while todo:
        key = todo.pop()
        if key not in needed:
            needed.add(key)
            todo += [v[0] for v in graph[key]["inputs"].values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]
    return {k: v for k, v in graph.items() if k in needed}


# ------------------------------------------------------------------------------------------------- fast checks
def test_the_example_workflows_exist():
    assert {p.stem for p in WORKFLOWS} == EXPECTED


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_format_and_consistent_links(path):
    wf = load(path)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(l[0] for l in wf["links"])
    seen = set()
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id not in seen, f"duplicate link id {link_id}"
        seen.add(link_id)
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id, f"link {link_id} is not recorded on both ends"
        assert out["type"] == inp["type"] == kind, f"link {link_id}: {out['type']} -> {inp['type']} as {kind}"
    for node in wf["nodes"]:
        for inp in node.get("inputs", []):
            assert inp["link"] is None or inp["link"] in seen, f"node {node['id']} input {inp['name']} has a dangling link"
        for out in node.get("outputs", []):
            assert set(out["links"] or []) <= seen, f"node {node['id']} output {out['name']} has dangling links"
    for group in wf.get("groups", []):
        assert len(group["bounding"]) == 4 and group["title"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_stage_is_its_own_node_and_ends_in_a_glb(path):
    wf = load(path)
    types = [n["type"] for n in wf["nodes"]]
    stages = STAGES if path in GENERATING else {"Trellis2LoadModel", "Trellis2Conditioning", "Trellis2LoadMesh",
                                                "Trellis2Retexture", "Trellis2ExportGLB"}  # fmt: skip
    if path.stem == "trellis2_multiview_to_3d":  # the multi-view node stands in for the single-image one
        stages = (stages - {"Trellis2Conditioning"}) | {"Trellis2MultiViewConditioning"}
    assert stages <= set(types), f"missing stages {stages - set(types)}"
    assert types.count("Trellis2ExportGLB") == 1
    ours = our_node_ids()
    assert {t for t in types if t.startswith("Trellis2")} <= ours, f"unknown Trellis2 nodes {set(types) - ours}"


def test_core_node_types_exist_in_comfyui_0_3_75_source():
    from comfy_harness import DEFAULT_DIR

    if not (DEFAULT_DIR / "nodes.py").is_file():
        pytest.skip(f"no ComfyUI 0.3.75 at {DEFAULT_DIR} (bash .ci/install_comfyui.sh installs it); the comfy test checks /object_info")
    source = "".join(p.read_text(errors="replace") for p in [DEFAULT_DIR / "nodes.py", *(DEFAULT_DIR / "comfy_extras").glob("*.py")])
    core = {t for p in WORKFLOWS for t in (n["type"] for n in load(p)["nodes"]) if not t.startswith("Trellis2")}
    missing = sorted(t for t in core if not re.search(rf'["\']{re.escape(t)}["\']\s*:|node_id\s*=\s*["\']{re.escape(t)}["\']', source))
    assert not missing, f"core node types not in ComfyUI 0.3.75: {missing}"


def test_api_graph_maps_widgets_skipping_seed_controls_and_upload_values():
    info = {
        "LoadImage": {"input_order": {"required": ["image"]}, "input": {"required": {"image": [["a.png"], {"image_upload": True}]}}},
        "K": {"input_order": {"required": ["image", "seed", "steps"], "optional": ["flag"]},
              "input": {"required": {"image": ["IMAGE"], "seed": ["INT", {"control_after_generate": True}], "steps": ["INT"]},
                        "optional": {"flag": ["BOOLEAN"]}}},
    }  # fmt: skip
    wf = {"links": [[1, 1, 0, 2, 0, "IMAGE"]], "nodes": [
        {"id": 1, "type": "LoadImage", "widgets_values": ["x.png", "image"], "inputs": []},
        {"id": 2, "type": "K", "widgets_values": [7, "fixed", 12, True], "inputs": [{"name": "image", "link": 1}]},
    ]}  # fmt: skip
    graph = api_graph(wf, info, {"K": {"steps": 2}})
    assert graph == {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
                     "2": {"class_type": "K", "inputs": {"seed": 7, "steps": 2, "flag": True, "image": ["1", 0]}}}  # fmt: skip


# ------------------------------------------------------------------------------------------------- live server
@pytest.mark.comfy
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widgets_match_the_live_object_info_and_the_server_validates_the_graph(path, request):
    from comfy_harness import PromptRejected

    server = request.getfixturevalue("comfy_server")
    info = server.client.object_info()
    if "Trellis2LoadModel" not in info:
        pytest.fail("ComfyUI registered no Trellis2 nodes: the pack's __init__.py must export comfy_entrypoint", pytrace=False)
    wf = load(path)
    for node in wf["nodes"]:
        assert node["type"] in info, f"{path.stem}: {node['type']} is not a node type of the running ComfyUI"
        spec = info[node["type"]]
        order = spec["input_order"].get("required", []) + spec["input_order"].get("optional", [])
        specs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        want = sum(_widget_slots(specs[n]) for n in order if _is_widget(specs[n]))
        assert len(node.get("widgets_values") or []) == want, f"{path.stem} node {node['id']} ({node['type']})"
        sockets = [n for n in order if not _is_widget(specs[n])]
        assert [i["name"] for i in node.get("inputs", [])] == sockets, f"{path.stem} node {node['id']} sockets"
    graph = api_graph(wf, info)
    try:
        server.client.queue_prompt(copy.deepcopy(graph))
    except PromptRejected as e:
        # Only missing files may fail validation here (model weights, the example image): never a type, link or widget.
        for node_id, err in e.body.get("node_errors", {}).items():
            for item in err["errors"]:
                assert item["type"] in ("value_not_in_list", "custom_validation_failed"), f"{path.stem} node {node_id}: {item}"
                assert item["extra_info"]["input_name"] in {"ckpt_name", "control_net_name", "image", "pipeline", "mesh_file"}, item
    else:
        server.client.interrupt()  # everything was present: do not let it run here


# Fast settings for the tiny random snapshot on a CPU: 512 pipeline, 2 steps per stage, small textures.
TINY = {
    "Trellis2LoadModel": {"pipeline": "tiny"},
    "Trellis2SparseStructure": {"pipeline_type": "512", "steps": 2},
    "Trellis2Geometry": {"pipeline_type": "512", "steps": 2},
    "Trellis2Material": {"steps": 2},
    "Trellis2UVBake": {"texture_size": 128},
}
IMAGE_SOURCE = {"trellis2_image_to_textured_glb": None, "trellis2_sdxl_text_to_3d": "VAEDecode",
                "trellis2_controlnet_image_to_3d": "VAEDecode"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_server(request, tmp_path_factory):
    """The session ComfyUI with the tiny snapshot as models/trellis2/tiny and an RGBA test image in input/."""
    from PIL import Image

    from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot

    server = request.getfixturevalue("comfy_server")
    if "Trellis2LoadModel" not in server.client.object_info():
        pytest.fail("ComfyUI registered no Trellis2 nodes: the pack's __init__.py must export comfy_entrypoint "
                    "(and no NODE_CLASS_MAPPINGS, which 0.3.75 prefers)", pytrace=False)
    server.place_model(write_tiny_snapshot(tmp_path_factory.mktemp("snap") / "tiny", seed=0), "tiny")
    image = Image.new("RGBA", (96, 80), (0, 0, 0, 0))
    image.paste((200, 120, 60, 255), (24, 16, 72, 64))
    image.save(server.input_dir / "trellis2_object.png")
    white = Image.new("RGB", (96, 80), (255, 255, 255))
    white.paste((200, 120, 60), (24, 16, 72, 64))
    white.save(server.input_dir / "trellis2_white.png")
    return server


@pytest.mark.comfy
@pytest.mark.slow
@pytest.mark.parametrize("path", RUN_HERE, ids=lambda p: p.stem)
def test_workflow_runs_to_a_valid_textured_glb(path, tiny_server):
    import io as _io

    import trimesh

    client = tiny_server.client
    source = IMAGE_SOURCE[path.stem]
    overrides = {**TINY, "LoadImage": {"image": "trellis2_object.png"}}
    graph = api_graph(load(path), client.object_info(), overrides)
    if source is not None:  # SDXL part: no weights here; a white-background photo stands in for its image
        graph = with_loaded_image(graph, source, "trellis2_white.png")
    result = client.run(graph, timeout=900)
    (glb,) = result.files("glb")[-1:]
    assert glb["type"] == "output"
    scene = trimesh.load(_io.BytesIO(client.view(**glb)), file_type="glb")
    (mesh,) = scene.geometry.values()
    assert len(mesh.faces) > 0 and mesh.visual.material.baseColorTexture.size == (128, 128)
    progress = {m["data"]["node"] for m in client.messages(result.prompt_id) if m["type"] == "progress"}
    stages = {k for k, n in graph.items() if n["class_type"] in ("Trellis2SparseStructure", "Trellis2Geometry", "Trellis2Material")}
    assert stages <= progress, f"no progress bar for {stages - progress}"


@pytest.mark.comfy
@pytest.mark.slow
def test_cancel_stops_a_stage_within_steps_and_the_next_prompt_succeeds(tiny_server):
    client = tiny_server.client
    wf = load(ROOT / "workflows" / "trellis2_image_to_textured_glb.json")
    slow = {**TINY, "LoadImage": {"image": "trellis2_object.png"},
            "Trellis2SparseStructure": {"pipeline_type": "512", "steps": 200, "seed": 11}}  # fmt: skip
    graph = api_graph(wf, client.object_info(), slow)
    ss = next(k for k, n in graph.items() if n["class_type"] == "Trellis2SparseStructure")
    prompt_id = client.queue_prompt(graph)
    started = client.wait_message(lambda m: m["type"] == "progress" and m["data"]["node"] == ss, prompt_id, 300)
    assert started, f"the structure stage never reported progress: {client.messages(prompt_id)[-5:]}"
    client.interrupt(prompt_id)
    result = client.wait(prompt_id, timeout=300)
    assert result.status == "error" and result.interrupted, result.messages
    steps = [m["data"]["value"] for m in client.messages(prompt_id) if m["type"] == "progress" and m["data"]["node"] == ss]
    assert max(steps) < 200, "the stage ran to the end despite Cancel"
    assert client.run(api_graph(wf, client.object_info(), {**TINY, "LoadImage": {"image": "trellis2_object.png"}}),
                      timeout=900).status == "success"


@pytest.mark.comfy
def test_bad_input_reaches_the_ui_as_a_clear_error(tiny_server):
    client = tiny_server.client
    wf = load(ROOT / "workflows" / "trellis2_image_to_textured_glb.json")
    # An opaque image and an all-background mask: nothing to reconstruct.
    graph = api_graph(wf, client.object_info(), {**TINY, "LoadImage": {"image": "trellis2_white.png"}})
    result = client.wait(client.queue_prompt(graph), timeout=300)
    assert result.status == "error" and result.error["node_type"] == "Trellis2Conditioning"
    assert "remove_background" in result.error["exception_message"] or "no pixel" in result.error["exception_message"]
