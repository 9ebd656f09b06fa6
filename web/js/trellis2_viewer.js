// ComfyUI glue for the TRELLIS.2 viewer: a DOM widget with a Trellis2Viewer on our preview/export nodes.
//
// Touches only node types whose id starts with "Trellis2" (e.g. Trellis2PreviewGLB, Trellis2ExportGLB), and
// only when one of them reports a GLB. The viewer itself (three.js, view modes, disposal) is viewer_core.js;
// nothing here loads three.js until the first GLB arrives.
//
// PAYLOAD the Python node must emit (the `ui` part of its output; V3: `io.NodeOutput(..., ui={...})`,
// V1: `return {"ui": {...}, "result": (...)}`):
//
//     {"glb": [{"filename": "trellis2_00001_.glb", "subfolder": "", "type": "output"}]}
//
//   filename   name of the file inside ComfyUI's output/temp/input folder (required, non-empty)
//   subfolder  folder below that root, "" for none (optional, default "")
//   type       "output" | "temp" | "input": which root folder (optional, default "output")
//
// Only glb[0] is shown; the file is fetched from ComfyUI's /view route:
//     /api/view?filename=<filename>&subfolder=<subfolder>&type=<type>
// Running the node again with a new file replaces the asset (the old one is disposed); deleting the node
// destroys the viewer and releases its WebGL context.
//
// Reopening: the last GLB shown is remembered in the node's properties (`trellis2_glb`, saved with the
// workflow), so a reopened or reloaded workflow shows it again without re-running, as long as the file is
// still there (checked first with a one-byte range request; temp files of Preview nodes go when ComfyUI restarts, and
// then the node simply shows no viewer until it runs again).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { Trellis2Viewer } from "./viewer_core.js";

const NODE_PREFIX = "Trellis2";
const WIDGET_NAME = "trellis2_viewer";
const MIN_HEIGHT = 300; // px; room for the toolbar, the model and the stats line
const MIN_WIDTH = 360;
const STATE = Symbol("trellis2.viewer");
const PROPERTY = "trellis2_glb"; // node.properties key of the last GLB shown (saved in the workflow)

/** The first GLB of a node's `ui` payload, normalised, or null when there is none. */
function glbFromMessage(message) {
  const list = message && message.glb;
  const item = Array.isArray(list) ? list[0] : null;
  if (!item || typeof item.filename !== "string" || item.filename === "") return null;
  return { filename: item.filename, subfolder: item.subfolder || "", type: item.type || "output" };
}

function viewRoute(item) {
  const query = new URLSearchParams({ filename: item.filename, subfolder: item.subfolder, type: item.type });
  return `/view?${query}`;
}

function ensureViewer(node) {
  if (node[STATE]) return node[STATE];
  const element = document.createElement("div");
  element.style.cssText = "width:100%;height:100%;";
  const widget = node.addDOMWidget(WIDGET_NAME, "trellis2-viewer", element, {
    serialize: false, // a view, not a value: keeps it out of the workflow's widgets_values
    getMinHeight: () => MIN_HEIGHT,
  });
  const state = { element, widget, viewer: null, removed: false };
  state.ready = Trellis2Viewer.create(element, { label: `node:${node.id}` }).then((viewer) => {
    if (state.removed) { // the node went away while three.js was loading
      viewer.destroy();
      return null;
    }
    state.viewer = viewer;
    return viewer;
  });
  node[STATE] = state;
  const wanted = node.computeSize();
  node.setSize([Math.max(node.size[0], wanted[0], MIN_WIDTH), Math.max(node.size[1], wanted[1])]);
  node.setDirtyCanvas?.(true, true);
  return state;
}

async function showGlb(node, item) {
  const state = ensureViewer(node);
  const route = viewRoute(item);
  try {
    const viewer = await state.ready;
    if (!viewer) return;
    // rand: a re-run may overwrite the same filename; never show a cached copy.
    await viewer.load(api.apiURL(`${route}&rand=${Math.random()}`), {
      filename: item.filename,
      downloadUrl: api.apiURL(route),
    });
  } catch (error) {
    // The viewer already shows the message in the widget; this is for bug reports.
    console.error(`[TRELLIS.2] viewer of node ${node.id} could not show ${item.filename}:`, error);
  }
}

/** Show the GLB a saved workflow remembers for this node, if the server still has the file. */
async function restoreGlb(node, item) {
  try {
    // One byte, not HEAD: Chromium reports ComfyUI's bodiless HEAD answers as aborted requests.
    const response = await fetch(api.apiURL(viewRoute(item)), { headers: { Range: "bytes=0-0" }, cache: "no-store" });
    if (!response.ok) {
      console.info(`[TRELLIS.2] node ${node.id}: ${item.filename} is gone (${response.status}); run the node to see it again`);
      return;
    }
  } catch (error) {
    console.info(`[TRELLIS.2] node ${node.id}: could not check ${item.filename}:`, error);
    return;
  }
  if (node.graph && !node[STATE]?.removed) await showGlb(node, item);
}

function destroyViewer(node) {
  const state = node[STATE];
  if (!state) return;
  state.removed = true;
  delete node[STATE];
  if (state.viewer) state.viewer.destroy();
}

app.registerExtension({
  name: "trellis2.viewer",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData || typeof nodeData.name !== "string" || !nodeData.name.startsWith(NODE_PREFIX)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted ? onExecuted.apply(this, arguments) : undefined;
      const item = glbFromMessage(message);
      if (item) {
        this.properties = this.properties || {};
        this.properties[PROPERTY] = { ...item }; // remembered with the workflow (see the header)
        showGlb(this, item);
      }
      return result;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure ? onConfigure.apply(this, arguments) : undefined;
      const item = glbFromMessage({ glb: [this.properties?.[PROPERTY]] });
      // After the graph has finished loading: DOM widgets need the node to be in the graph.
      if (item && !this[STATE]) setTimeout(() => restoreGlb(this, item), 0);
      return result;
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      destroyViewer(this);
      return onRemoved ? onRemoved.apply(this, arguments) : undefined;
    };
  },
});
