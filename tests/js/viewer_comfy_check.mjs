// Drives headless Chromium over the REAL ComfyUI page: loads a workflow, queues it from the page, waits for
// our viewer widgets, screenshots them per view mode, deletes the nodes. tests/test_viewer_comfy.py starts
// the server, writes the config and judges the output.
//
// Usage: node tests/js/viewer_comfy_check.mjs <ComfyUI base URL> <config.json> <output dir>
// config.json: {workflow: <UI-format workflow>, widgets: {<node type>: {<widget name>: value}},
//               targets: [<node type>, ...] (nodes whose viewer to check; the first is screenshotted per mode),
//               modes: [<view mode id>, ...] (the first is also the fitted view's), nodeSize: [w, h] (CSS px),
//               zoom: <camera this many times closer than fit-to-view for the per-mode pictures>,
//               deviceScaleFactor: <device pixels per CSS px>, timeoutMs: <wait for the prompt's viewers>}
// Env:   CHROMIUM_PATH (default /usr/bin/chromium)
// Writes into <output dir>: <target type>-fit.png (the widget as first shown, every target),
// <first target>-<mode>.png (closer, per mode), <first target>-uv.bin (the texture-coordinate pass of the
// base-colour picture, see uvPass) and result.json: steps (viewer debugInfo() snapshots, screenshot
// rectangles), timings, page errors, console messages, failed / >= 400 loopback requests and the blocked
// non-loopback ones. Exits 0 whenever it could write result.json: the Python test does the asserting, so one
// run reports every problem at once.

import { chromium } from "playwright-core";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [baseUrl, configPath, outDir] = process.argv.slice(2);
if (!baseUrl || !configPath || !outDir) {
  console.error("usage: node viewer_comfy_check.mjs <ComfyUI base URL> <config.json> <output dir>");
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });
const config = JSON.parse(readFileSync(configPath, "utf8"));
const timeoutMs = config.timeoutMs || 240000;

const t0 = Date.now();
const result = { steps: {}, timings: {}, pageErrors: [], console: [], failedRequests: [], badResponses: [],
  blocked: [] };
const mark = (name) => { result.timings[name] = (Date.now() - t0) / 1000; };
const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]"]);

const profile = mkdtempSync(join(tmpdir(), "trellis2-chromium-")); // fresh profile: no stored settings/workflows
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1280, height: 860 },
  deviceScaleFactor: config.deviceScaleFactor || 1,
  // WebGL 2 runs on SwiftShader. No background traffic, no first-run UI.
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run"],
});
mark("launched");

// Every frame of `page` that polls until `fn(arg)` is truthy (polling, not sleeping: a loaded 2-core CI
// machine may take its time) and returns that value.
async function until(page, fn, arg, what, ms = 60000) {
  try {
    const handle = await page.waitForFunction(fn, arg, { timeout: ms, polling: 100 });
    return await handle.jsonValue();
  } catch (error) {
    throw new Error(`timed out after ${ms / 1000} s waiting for ${what}: ${error.message.split("\n")[0]}`);
  }
}

// In the page: render the viewer's scene once more, off screen, with every surface showing its interpolated
// texture coordinate (12 bits each for u and v, alpha 255 where a surface is): the test then knows which texel
// each screenshot pixel should show. Same camera and size as the on-screen canvas; everything is disposed.
function uvPass(nodeId) {
  const viewer = [...window.__trellis2Viewers.live.values()].find((v) => v.label === `node:${nodeId}`);
  const { THREE } = viewer.lib;
  const { renderer, scene, camera } = viewer;
  const size = renderer.getDrawingBufferSize(new THREE.Vector2());
  const target = new THREE.WebGLRenderTarget(size.x, size.y,
    { minFilter: THREE.NearestFilter, magFilter: THREE.NearestFilter });
  const material = new THREE.ShaderMaterial({
    vertexShader: `varying vec2 vUv;
      void main() { vUv = uv; gl_Position = projectionMatrix * modelViewMatrix * vec4(position, 1.0); }`,
    fragmentShader: `varying vec2 vUv;
      void main() {
        vec2 q = floor(clamp(vUv, 0.0, 1.0) * 4095.0 + 0.5);
        float uLow = mod(q.x, 16.0);
        float vHigh = floor(q.y / 256.0);
        gl_FragColor = vec4(floor(q.x / 16.0), uLow * 16.0 + vHigh, q.y - vHigh * 256.0, 255.0) / 255.0;
      }`,
    side: viewer._meshes[0]?.source.side ?? THREE.FrontSide,
  });
  const saved = { background: scene.background, override: scene.overrideMaterial, target: renderer.getRenderTarget(),
    clear: renderer.getClearColor(new THREE.Color()), alpha: renderer.getClearAlpha() };
  try {
    scene.background = null;
    scene.overrideMaterial = material;
    renderer.setRenderTarget(target);
    renderer.setClearColor(0x000000, 0);
    renderer.clear();
    renderer.render(scene, camera);
    const pixels = new Uint8Array(size.x * size.y * 4);
    renderer.readRenderTargetPixels(target, 0, 0, size.x, size.y, pixels); // rows bottom-up
    let text = "";
    for (let i = 0; i < pixels.length; i += 0x8000) text += String.fromCharCode.apply(null, pixels.subarray(i, i + 0x8000));
    return { width: size.x, height: size.y, data: btoa(text) };
  } finally {
    scene.background = saved.background;
    scene.overrideMaterial = saved.override;
    renderer.setRenderTarget(saved.target);
    renderer.setClearColor(saved.clear, saved.alpha);
    material.dispose();
    target.dispose();
  }
}

try {
  const page = context.pages()[0] || await context.newPage();
  page.on("pageerror", (error) => result.pageErrors.push(String(error.stack || error)));
  page.on("console", (msg) => result.console.push({ type: msg.type(), text: msg.text() }));
  page.on("requestfailed", (req) => {
    const url = new URL(req.url());
    if (LOOPBACK.has(url.hostname)) result.failedRequests.push({ url: req.url(), error: req.failure()?.errorText });
  });
  page.on("response", (res) => { if (res.status() >= 400) result.badResponses.push({ url: res.url(), status: res.status() }); });
  await page.route("**/*", (route) => {
    const url = new URL(route.request().url());
    if (url.protocol === "data:" || url.protocol === "blob:" || LOOPBACK.has(url.hostname)) return route.continue();
    result.blocked.push(url.href);
    return route.abort("blockedbyclient");
  });

  await page.goto(baseUrl, { waitUntil: "load", timeout: 120000 });
  // The app is up once its graph exists and our extension and node types are registered.
  result.steps.app = await until(page, (types) => {
    const app = window.app;
    if (!app || !app.graph || !app.canvas || !window.LiteGraph) return false;
    const ours = (app.extensions || []).some((e) => e.name === "trellis2.viewer");
    const registered = types.every((t) => window.LiteGraph.registered_node_types[t]);
    return ours && registered && { extensions: app.extensions.length };
  }, config.targets, "the ComfyUI app with the trellis2.viewer extension", 120000);
  mark("appReady");

  // Load the workflow and apply the test's widget values by widget name.
  result.steps.loaded = await page.evaluate(async ({ workflow, widgets }) => {
    await window.app.loadGraphData(workflow);
    const graph = window.app.graph;
    const applied = {};
    const missing = [];
    for (const node of graph._nodes) {
      const wanted = widgets[node.type];
      if (!wanted) continue;
      for (const [name, value] of Object.entries(wanted)) {
        const widget = (node.widgets || []).find((w) => w.name === name);
        if (!widget) { missing.push(`${node.type}.${name}`); continue; }
        widget.value = value;
        widget.callback?.(value);
        applied[`${node.id}:${node.type}.${name}`] = widget.value;
      }
    }
    return { nodes: graph._nodes.map((n) => ({ id: n.id, type: n.type })), applied, missing };
  }, { workflow: config.workflow, widgets: config.widgets });
  mark("workflowLoaded");
  const idOf = Object.fromEntries(result.steps.loaded.nodes.map((n) => [n.type, n.id]));
  const targets = config.targets.map((type) => ({ type, id: idOf[type] }));

  // Queue from the page: the page's websocket then receives 'executed' and calls our node's onExecuted.
  result.steps.queued = await page.evaluate(async () => {
    const answer = await window.app.queuePrompt(0, 1);
    return { answer: answer ?? null, lastNodeErrors: window.app.lastNodeErrors ?? null,
      lastExecutionError: window.app.lastExecutionError ?? null };
  });
  mark("queued");
  const nodeErrors = result.steps.queued.lastNodeErrors;
  if (nodeErrors && Object.keys(nodeErrors).length) {
    throw new Error(`the server refused the prompt: ${JSON.stringify(nodeErrors).slice(0, 3000)}`);
  }
  result.steps.viewers = await until(page, ({ ids }) => {
    const app = window.app;
    if (app.lastExecutionError) return { error: app.lastExecutionError }; // a node raised: stop waiting
    const reg = window.__trellis2Viewers;
    if (!reg) return false;
    const live = reg.info().live;
    const found = ids.map((id) => live.find((v) => v.label === `node:${id}`));
    return found.every((v) => v && v.stats.vertices > 0 && v.renders > 0) && { found };
  }, { ids: targets.map((t) => t.id) }, `viewers with vertices > 0 on nodes ${targets.map((t) => t.id)}`,
  timeoutMs);
  mark("viewersLoaded");
  if (result.steps.viewers.error) throw new Error(`the prompt failed: ${JSON.stringify(result.steps.viewers.error)}`);

  // Bring a node into view at zoom 1 (DOM widgets are hidden off-screen and when zoomed out) and return
  // its viewer's info and on-page rectangle once the canvas has the element's size and has drawn.
  async function focus(id) {
    await page.evaluate((nodeId) => {
      const app = window.app;
      const node = app.graph.getNodeById(nodeId);
      const ds = app.canvas.ds;
      ds.scale = 1;
      ds.offset[0] = -node.pos[0] + 200;
      ds.offset[1] = -node.pos[1] + 120;
      app.canvas.setDirty(true, true);
      app.canvas.draw(true, true);
    }, id);
    return until(page, (nodeId) => {
      const viewer = [...window.__trellis2Viewers.live.values()].find((v) => v.label === `node:${nodeId}`);
      const r = viewer.dom.root.getBoundingClientRect();
      const canvas = viewer.dom.canvas;
      const visible = r.width > 100 && r.height > 100 && r.x >= 0 && r.y >= 0 &&
        r.right <= window.innerWidth && r.bottom <= window.innerHeight;
      const ratio = viewer.renderer.getPixelRatio();
      const sized = canvas.width === Math.floor(viewer.dom.root.clientWidth * ratio) &&
        canvas.height === Math.floor(viewer.dom.root.clientHeight * ratio);
      return visible && sized && !viewer._frame && { rect: [r.x, r.y, r.width, r.height], info: viewer.debugInfo() };
    }, id, `node ${id}'s widget on screen at its canvas size`, 60000);
  }

  // Wait until the viewer drew at least one frame after `before` renders and nothing is pending.
  const settled = (id, before) => until(page, ({ nodeId, n }) => {
    const viewer = [...window.__trellis2Viewers.live.values()].find((v) => v.label === `node:${nodeId}`);
    return viewer.renders > n && !viewer._frame && viewer.debugInfo();
  }, { nodeId: id, n: before }, `node ${id}'s viewer to render`, 30000);

  async function shoot(id, name) {
    // Two animation frames: the compositor has the last WebGL frame on screen.
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    const rect = await page.evaluate((nodeId) => {
      const viewer = [...window.__trellis2Viewers.live.values()].find((v) => v.label === `node:${nodeId}`);
      const r = viewer.dom.root.getBoundingClientRect();
      // The scene is what lies between the toolbar and the stats line (both drawn over the canvas).
      const toolbar = viewer.dom.root.querySelector(".trellis2-viewer-toolbar").getBoundingClientRect();
      const stats = viewer.dom.stats.getBoundingClientRect();
      return { x: r.x, y: r.y, width: r.width, height: r.height, sceneTop: toolbar.bottom - r.y,
        sceneBottom: (stats.height > 0 ? stats.top : r.bottom) - r.y, scale: window.devicePixelRatio };
    }, id);
    const { x, y, width, height } = rect;
    await page.screenshot({ path: join(outDir, `${name}.png`), clip: { x, y, width, height } });
    return rect;
  }

  async function showMode(target, mode, name) {
    // Through the widget's own <select>, as a user would: it must be reachable inside ComfyUI's page.
    const select = await page.evaluateHandle((nodeId) =>
      [...window.__trellis2Viewers.live.values()].find((v) => v.label === `node:${nodeId}`).dom.select, target.id);
    const before = await page.evaluate((nodeId) =>
      [...window.__trellis2Viewers.live.values()].find((v) => v.label === `node:${nodeId}`).renders, target.id);
    const current = await select.evaluate((element) => element.value);
    await select.selectOption(mode);
    await select.dispose();
    // Choosing the mode already shown fires no 'change' and draws nothing new.
    const info = await settled(target.id, current === mode ? before - 1 : before);
    const rect = await shoot(target.id, name);
    result.steps[name] = { info, rect };
  }

  // Every target: a bigger widget, then the fitted view (what a user sees first) in lit mode.
  await page.evaluate(({ ids, size }) => {
    for (const id of ids) window.app.graph.getNodeById(id).setSize(size);
    window.app.canvas.setDirty(true, true);
  }, { ids: targets.map((t) => t.id), size: config.nodeSize || [520, 480] });
  for (const [index, target] of targets.entries()) {
    result.steps[`focus-${target.type}`] = await focus(target.id);
    await showMode(target, config.modes[0], `${target.type}-fit`);
    if (index !== 0) continue;
    // The first target, closer (the tiny model's surface is fine-grained): every view mode.
    await page.evaluate(({ nodeId, zoom }) => {
      const viewer = [...window.__trellis2Viewers.live.values()].find((v) => v.label === `node:${nodeId}`);
      viewer.camera.position.lerp(viewer.controls.target, 1 - 1 / zoom);
      viewer.controls.update(); // 'change' -> render
    }, { nodeId: target.id, zoom: config.zoom || 1 });
    for (const mode of config.modes) {
      await showMode(target, mode, `${target.type}-${mode}`);
      if (mode === "basecolor") {
        const pass = await page.evaluate(uvPass, target.id);
        writeFileSync(join(outDir, `${target.type}-uv.bin`), Buffer.from(pass.data, "base64"));
        result.steps[`${target.type}-uv`] = { width: pass.width, height: pass.height };
      }
    }
  }
  mark("screenshots");

  // Reopen the workflow (what loading a saved workflow or reloading the page does): the old nodes go, new ones
  // are configured from the saved data, and each must show the GLB it showed before without running again.
  result.steps.reopened = await page.evaluate(async () => {
    const app = window.app;
    const before = window.__trellis2Viewers.info().live.map((v) => ({ label: v.label, url: v.url }));
    const saved = app.graph.serialize();
    await app.loadGraphData(JSON.parse(JSON.stringify(saved)));
    return { before, saved, properties: app.graph._nodes.filter((n) => n.properties?.trellis2_glb)
      .map((n) => ({ id: n.id, type: n.type, glb: n.properties.trellis2_glb })) };
  });
  result.steps.reopenedViewers = await until(page, ({ ids }) => {
    const live = window.__trellis2Viewers.info().live;
    const found = ids.map((id) => live.filter((v) => v.label === `node:${id}`));
    return found.every((v) => v.length === 1 && v[0].stats.vertices > 0 && v[0].renders > 0) &&
      { found: found.map((v) => v[0]), live: live.length };
  }, { ids: targets.map((t) => t.id) }, "viewers shown again after reopening the workflow", 60000);
  mark("reopened");

  // Delete the nodes the way the UI does (graph.remove -> onRemoved): every viewer must release its resources.
  result.steps.removed = await page.evaluate(async (ids) => {
    const app = window.app;
    for (const id of ids) app.graph.remove(app.graph.getNodeById(id));
    app.canvas.setDirty(true, true);
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    const info = window.__trellis2Viewers.info();
    return {
      live: info.live.filter((v) => ids.some((id) => v.label === `node:${id}`)),
      released: Object.fromEntries(ids.map((id) => [id, info.released.filter((v) => v.label === `node:${id}`).at(-1) ?? null])),
      canvasesLeft: document.querySelectorAll(".trellis2-viewer").length,
    };
  }, targets.map((t) => t.id));
  result.targets = targets;
  mark("removed");

  // A saved workflow whose GLB is gone (a Preview node's temp file after a restart): no viewer, no error.
  const GONE = "trellis2_gone_00000_.glb";
  result.steps.gone = await page.evaluate(async ({ data, gone }) => {
    const app = window.app;
    for (const node of data.nodes) {
      if (node.properties?.trellis2_glb) node.properties.trellis2_glb = { ...node.properties.trellis2_glb, filename: gone };
    }
    await app.loadGraphData(data);
    return { nodes: app.graph._nodes.length };
  }, { data: result.steps.reopened.saved, gone: GONE });
  // The check is one small request; give it time, then count viewers (polling for "nothing" proves nothing).
  await until(page, () => window.__trellis2Viewers !== undefined, null, "the viewer registry", 10000);
  await page.waitForTimeout(1500);
  result.steps.goneChecked = await page.evaluate(() => ({ live: window.__trellis2Viewers.info().live.length }));
  result.steps.goneFile = GONE;
  mark("gone");
} catch (error) {
  result.fatal = String(error.stack || error);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
  mark("closed");
  writeFileSync(join(outDir, "result.json"), JSON.stringify(result, null, 2));
}
