"""A real ComfyUI 0.3.75 server on CPU loads the pack; core prompts, errors, templates and Cancel over HTTP.

The pack's own workflows and nodes are exercised by their own tests on the same session server; these tests
check the harness and the server-level contracts the pack depends on.
"""

from __future__ import annotations

import io
import json
import random
import re

import pytest
from PIL import Image

from comfy_harness import PACK_NAME, ROOT, PromptRejected, comfy_server  # noqa: F401  (session fixture)

pytestmark = pytest.mark.comfy


def _image_graph(width: int, height: int, color: int, prefix: str = "trellis2_harness") -> dict:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": height, "batch_size": 1, "color": color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def test_server_runs_0_3_75_or_newer_and_imported_the_pack(comfy_server):
    log = comfy_server.log_text()
    version = re.search(r"ComfyUI version: (\d+)\.(\d+)\.(\d+)", log)
    assert version, f"no version line in {comfy_server.log_path}"
    assert tuple(map(int, version.groups())) >= (0, 3, 75)
    # ComfyUI lists every custom-node folder it tried, "(IMPORT FAILED)" marking the ones that raised.
    ours = [line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK_NAME}")]
    assert ours, f"{PACK_NAME} is not in ComfyUI's custom-node list; log {comfy_server.log_path}"
    assert not any("IMPORT FAILED" in line for line in ours), "\n".join(ours) + "\n" + log[-4000:]
    assert f"Cannot import {comfy_server.base}" not in log, log[-4000:]


def test_pack_nodes_are_registered_once_the_nodes_layer_exists(comfy_server):
    info = comfy_server.client.object_info()
    ours = {k: v for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK_NAME}"}
    # A V3 node class defines its schema; files that only hold helpers (socket types) do not count.
    node_files = [p.name for p in (ROOT / "nodes").rglob("*.py") if "define_schema" in p.read_text()]
    if not node_files and not ours:
        pytest.skip("no node is written yet (no define_schema in nodes/)")
    # ComfyUI 0.3.75 reads NODE_CLASS_MAPPINGS first and never calls comfy_entrypoint when that is present,
    # so a V3 pack that also exports an (empty) NODE_CLASS_MAPPINGS silently registers nothing.
    assert ours, f"{node_files} define nodes but ComfyUI registered none; log {comfy_server.log_path}"
    bad = {k: v.get("category") for k, v in ours.items()
           if not k.startswith("Trellis2") or not str(v.get("category", "")).startswith("3d/trellis2")}
    assert not bad, f"node ids must start with Trellis2 and categories with 3d/trellis2: {bad}"


def test_workflow_templates_endpoint_lists_the_packs_workflows(comfy_server):
    listed = comfy_server.client.templates()
    assert isinstance(listed, dict)
    ours = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    if not ours:
        assert PACK_NAME not in listed
        pytest.skip("workflows/ has no *.json yet; this checks they are served once they exist")
    assert sorted(listed.get(PACK_NAME, [])) == ours
    for name in ours:
        served = comfy_server.client.template(name)
        assert served == json.loads((ROOT / "workflows" / f"{name}.json").read_text()), name


def test_core_prompt_runs_and_its_output_downloads(comfy_server):
    client = comfy_server.client
    color = random.randrange(1, 0xFFFFFF)  # a fresh value each run, so ComfyUI's cache cannot answer
    result = client.run(_image_graph(64, 48, color))
    assert result.status == "success" and result.error is None
    (entry,) = result.files()
    assert entry["type"] == "output" and entry["filename"].startswith("trellis2_harness")
    image = Image.open(io.BytesIO(client.view(**entry)))
    assert image.size == (64, 48)
    assert image.convert("RGB").getpixel((10, 10)) == ((color >> 16) & 255, (color >> 8) & 255, color & 255)
    assert (comfy_server.output_dir / entry["subfolder"] / entry["filename"]).is_file()
    # The websocket saw this prompt start, run both nodes and finish.
    events = client.messages(result.prompt_id)
    kinds = [m["type"] for m in events]
    assert "execution_start" in kinds and "executed" in kinds, kinds
    assert any(m["type"] == "executing" and m["data"]["node"] is None for m in events), kinds


def test_invalid_prompt_is_rejected_with_the_node_and_reason(comfy_server):
    graph = _image_graph(64, 64, 0)
    graph["1"]["inputs"]["width"] = 0  # EmptyImage's minimum is 1
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.client.queue_prompt(graph)
    node_errors = rejected.value.body["node_errors"]
    assert "1" in node_errors, rejected.value.body
    assert "width" in json.dumps(node_errors["1"]["errors"]), node_errors
    with pytest.raises(PromptRejected, match="NoSuchNode"):
        comfy_server.client.queue_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}})


def test_runtime_error_surfaces_node_and_message(comfy_server):
    # SaveImage refuses to write outside the output folder: a runtime error, not a validation one.
    result = comfy_server.client.wait(comfy_server.client.queue_prompt(_image_graph(8, 8, 1, "../outside/x")))
    assert result.status == "error"
    assert result.error["node_id"] == "2" and result.error["node_type"] == "SaveImage"
    assert "outside the output folder" in result.error["exception_message"]
    assert any(m["type"] == "execution_error" for m in comfy_server.client.messages(result.prompt_id))
    assert comfy_server.client.run(_image_graph(8, 8, random.randrange(1, 0xFFFFFF))).status == "success"


def _slow_graph(stages: int) -> dict:
    """EmptyImage then a chain of blurs (~0.5-2 s each on a CPU core), ending in PreviewImage.

    No core node runs long without weights, but ComfyUI checks for Cancel before every node, so a chain
    shows whether an interrupt stops the prompt and leaves the server usable.
    """
    graph = {"0": {"class_type": "EmptyImage",
                   "inputs": {"width": 768, "height": 768, "batch_size": 1, "color": random.randrange(1, 0xFFFFFF)}}}
    for i in range(1, stages + 1):
        graph[str(i)] = {"class_type": "ImageBlur",
                         "inputs": {"image": [str(i - 1), 0], "blur_radius": 15, "sigma": 3.0}}
    graph["out"] = {"class_type": "PreviewImage", "inputs": {"images": [str(stages), 0]}}
    return graph


def test_interrupt_stops_a_running_prompt_and_the_next_one_succeeds(comfy_server):
    client = comfy_server.client
    stages = 40
    prompt_id = client.queue_prompt(_slow_graph(stages))
    # Interrupt once a blur has finished, so the prompt is certainly running inside the chain.
    started = client.wait_message(lambda m: m["type"] == "executed" or
                                  (m["type"] == "executing" and m["data"].get("node") == "2"), prompt_id, 120)
    assert started, f"the slow prompt never started; events {client.messages(prompt_id)}"
    client.interrupt(prompt_id)
    result = client.wait(prompt_id, timeout=120)
    assert result.status == "error" and result.interrupted, result.messages
    ran = {m["data"]["node"] for m in client.messages(prompt_id) if m["type"] == "executing" and m["data"]["node"]}
    assert "out" not in ran and len(ran) < stages, f"the chain ran to the end: {sorted(ran)}"
    assert client.queue() == {"queue_running": [], "queue_pending": []}
    assert client.run(_image_graph(16, 16, random.randrange(1, 0xFFFFFF))).status == "success"
