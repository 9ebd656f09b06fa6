// The DOM around the viewer's canvas: toolbar (mode select, fit, download), stats overlay, status line.
// Plain elements with inline styles, so the widget looks the same in ComfyUI and in the test page and
// needs no stylesheet request.

import { VIEW_MODES } from "./viewer_modes.js";

const BUTTON_STYLE = "font:12px sans-serif;color:#ddd;background:#333a;border:1px solid #555;" +
  "border-radius:4px;padding:2px 6px;cursor:pointer;text-decoration:none;";

function el(tag, style, props = {}) {
  const node = document.createElement(tag);
  node.style.cssText = style;
  Object.assign(node, props);
  return node;
}

/**
 * Build the viewer's elements inside `container`.
 * @param {HTMLElement} container the element the viewer fills (ComfyUI: the DOM widget's element)
 * @param {string} background CSS colour behind the canvas (same as the scene background)
 * @param {{onMode: function(string), onFit: function()}} handlers
 * @returns {{root, canvas, select, fit, download, stats, status}}
 */
export function buildViewerDom(container, background, { onMode, onFit }) {
  const root = el("div", `position:relative;width:100%;height:100%;min-height:120px;overflow:hidden;` +
    `background:${background};user-select:none;`, { className: "trellis2-viewer" });
  const canvas = el("canvas", "display:block;width:100%;height:100%;outline:none;touch-action:none;",
    { className: "trellis2-viewer-canvas" });
  const toolbar = el("div", "position:absolute;top:4px;left:4px;right:4px;display:flex;gap:4px;" +
    "align-items:center;pointer-events:none;", { className: "trellis2-viewer-toolbar" });
  const select = el("select", BUTTON_STYLE + "pointer-events:auto;", { className: "trellis2-viewer-mode",
    title: "View mode" });
  for (const mode of VIEW_MODES) select.append(new Option(mode.label, mode.id));
  select.addEventListener("change", () => onMode(select.value));
  const fit = el("button", BUTTON_STYLE + "pointer-events:auto;", { className: "trellis2-viewer-fit",
    textContent: "Fit", title: "Frame the asset", type: "button" });
  fit.addEventListener("click", () => onFit());
  const download = el("a", BUTTON_STYLE + "pointer-events:auto;margin-left:auto;display:none;",
    { className: "trellis2-viewer-download", textContent: "Download GLB", title: "Download the GLB file" });
  toolbar.append(select, fit, download);
  const stats = el("div", "position:absolute;left:4px;bottom:4px;right:4px;font:11px monospace;color:#ccc;" +
    "text-shadow:0 0 2px #000;pointer-events:none;white-space:pre-wrap;", { className: "trellis2-viewer-stats" });
  const status = el("div", "position:absolute;inset:0;display:none;align-items:center;justify-content:center;" +
    "font:13px sans-serif;color:#bbb;pointer-events:none;text-align:center;padding:8px;",
    { className: "trellis2-viewer-status" });
  root.append(canvas, toolbar, stats, status);
  // Wheel and right-drag belong to the orbit controls, not to the graph canvas behind the widget.
  root.addEventListener("wheel", (event) => event.stopPropagation(), { passive: true });
  root.addEventListener("contextmenu", (event) => { event.preventDefault(); event.stopPropagation(); });
  container.append(root);
  return { root, canvas, select, fit, download, stats, status };
}

/** One-line summary for the overlay, e.g. "24 vertices · 12 faces · baseColor 64×64 · metallicRoughness 64×64". */
export function formatStats(stats) {
  const parts = [`${stats.vertices.toLocaleString("en-US")} vertices`, `${stats.faces.toLocaleString("en-US")} faces`];
  for (const texture of stats.textures) parts.push(`${texture.slot} ${texture.width}×${texture.height}`);
  return parts.join(" · ");
}
