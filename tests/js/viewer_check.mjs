// Drives headless Chromium over the standalone viewer page; tests/test_viewer_browser.py judges the output.
//
// Usage: node tests/js/viewer_check.mjs <page URL with ?glb=...> <output dir>
// Env:   CHROMIUM_PATH (default /usr/bin/chromium)
// Then opens /page/glue.html (the ComfyUI glue over stub app/api modules) and records result.glue.
// Writes <output dir>/mode-<id>.png (the widget element for each view mode), orbit.png (after a mouse
// drag), and result.json: per-step debugInfo() snapshots, render counters, page errors, console
// messages, failed requests and blocked non-loopback requests. Exits 0 whenever it could write
// result.json; the Python test does the asserting, so one run reports every problem at once.

import { chromium } from "playwright-core";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const [pageUrl, outDir] = process.argv.slice(2);
if (!pageUrl || !outDir) {
  console.error("usage: node viewer_check.mjs <page URL> <output dir>");
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });

const result = { steps: {}, pageErrors: [], console: [], failedRequests: [], badResponses: [], blocked: [] };
const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]"]);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  headless: true,
  // Fresh temporary profile per launch (playwright's default). WebGL 2 runs on SwiftShader.
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run"],
});

const frames = (page, n = 2) => page.evaluate((count) => new Promise((resolve) => {
  const step = (left) => (left === 0 ? resolve() : requestAnimationFrame(() => step(left - 1)));
  step(count);
}), n);
const info = (page) => page.evaluate(() => window.testPage.viewer.debugInfo());

async function newPage() {
  const context = await browser.newContext({ viewport: { width: 640, height: 480 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.on("pageerror", (error) => result.pageErrors.push(String(error.stack || error)));
  page.on("console", (msg) => result.console.push({ type: msg.type(), text: msg.text() }));
  page.on("requestfailed", (req) => result.failedRequests.push({ url: req.url(), error: req.failure()?.errorText }));
  page.on("response", (res) => { if (res.status() >= 400) result.badResponses.push({ url: res.url(), status: res.status() }); });
  await page.route("**/*", (route) => {
    const url = new URL(route.request().url());
    if (url.protocol === "data:" || url.protocol === "blob:" || LOOPBACK.has(url.hostname)) return route.continue();
    result.blocked.push(url.href);
    return route.abort("blockedbyclient");
  });
  return { context, page };
}

try {
  const { context, page } = await newPage();
  await page.goto(pageUrl, { waitUntil: "load" });
  await page.waitForFunction(() => window.testPage && (window.testPage.ready || window.testPage.error),
    null, { timeout: 60000 });
  result.pageState = await page.evaluate(() => ({ ready: window.testPage.ready, error: window.testPage.error,
    modes: window.testPage.MODE_IDS, background: window.testPage.BACKGROUND,
    box: (() => { const r = document.getElementById("widget").getBoundingClientRect();
      return [r.x, r.y, r.width, r.height]; })() }));
  if (!result.pageState.ready) throw new Error(`page did not get ready: ${result.pageState.error}`);
  await frames(page);
  result.steps.loaded = await info(page);

  // Idle: no frames without a reason (render on demand).
  const before = (await info(page)).renders;
  await page.waitForTimeout(700);
  result.steps.idle = { before, after: (await info(page)).renders };

  const widget = page.locator("#widget");
  for (const mode of result.pageState.modes) {
    await page.evaluate((m) => window.testPage.viewer.setMode(m), mode);
    await frames(page);
    await widget.screenshot({ path: join(outDir, `mode-${mode}.png`) });
    result.steps[`mode-${mode}`] = await info(page);
  }

  // The toolbar's <select> drives the same code path as setMode().
  await page.selectOption("#widget select.trellis2-viewer-mode", "pbr");
  await frames(page);
  result.steps.selectPbr = await info(page);

  // Orbit with the mouse: OrbitControls' 'change' must trigger renders, and the picture must move.
  const rendersBeforeDrag = (await info(page)).renders;
  const box = await widget.boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width / 2 + 120, box.y + box.height / 2 + 30, { steps: 8 });
  await page.mouse.up();
  await frames(page);
  await widget.screenshot({ path: join(outDir, "orbit.png") });
  result.steps.orbit = { rendersBefore: rendersBeforeDrag, rendersAfter: (await info(page)).renders };

  // Follows its container's size (ResizeObserver).
  await page.evaluate(() => { document.getElementById("widget").style.width = "320px"; });
  await frames(page, 4);
  result.steps.resized = await info(page);

  // Asset replacement: loading again must free the previous asset (counts stay, they do not add up).
  await page.evaluate(() => window.testPage.viewer.fitView());
  await frames(page);
  result.steps.beforeReload = await info(page);
  await page.evaluate(async () => {
    const v = window.testPage.viewer;
    await v.load(v.url, { filename: "box.glb" });
  });
  await frames(page);
  result.steps.reloaded = await info(page);
  result.download = await page.evaluate(() => {
    const a = document.querySelector("#widget a.trellis2-viewer-download");
    return { href: a.href, download: a.download, visible: a.style.display !== "none" };
  });

  // Destroy: every GPU resource released, renderer disposed, DOM gone, registry updated.
  result.steps.destroyed = await page.evaluate(() => {
    const v = window.testPage.viewer;
    v.destroy();
    const reg = globalThis.__trellis2Viewers;
    return { info: v.debugInfo(), live: reg.live.size, released: reg.released.at(-1),
      widgetChildren: document.getElementById("widget").children.length };
  });
  await page.waitForTimeout(200);
  await context.close();
} catch (error) {
  result.fatal = String(error.stack || error);
}

// The ComfyUI glue (trellis2_viewer.js) against stub app/api modules and fake nodes (tests/viewer_page/glue.html).
try {
  const { context, page } = await newPage();
  await page.goto(new URL("/page/glue.html", pageUrl).href, { waitUntil: "load" });
  await page.waitForFunction(() => window.glue, null, { timeout: 30000 });
  result.glue = await page.evaluate(async () => {
    const { Ours, Theirs, extensions } = window.glue;
    const reg = () => globalThis.__trellis2Viewers;
    const until = async (test, ms = 30000) => {
      const t0 = performance.now();
      while (!test()) {
        if (performance.now() - t0 > ms) throw new Error(`timed out waiting for ${test}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    // Memory counts change at the first frame after a load (uploads happen on render): compare after frames.
    const settle = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    const liveFor = (id) => (reg() ? [...reg().live.values()].filter((v) => v.label === `node:${id}`) : []);
    const out = { extensions, theirsPatched: Object.hasOwn(Theirs.prototype, "onExecuted") ||
      Object.hasOwn(Theirs.prototype, "onRemoved") };
    const node = new Ours(7);
    node.onExecuted({ text: ["not a glb"] });
    out.widgetsWithoutGlb = node.widgets.length;
    node.onExecuted({ glb: [{ filename: "box.glb", subfolder: "", type: "output" }] });
    await until(() => liveFor(7).length === 1 && liveFor(7)[0].stats.vertices > 0);
    await settle();
    const viewer = liveFor(7)[0];
    out.first = viewer.debugInfo();
    out.download = viewer.dom.download.getAttribute("href");
    out.widget = { count: node.widgets.length, name: node.widgets[0].name,
      serialize: node.widgets[0].options.serialize, minHeight: node.widgets[0].options.getMinHeight() };
    out.size = node.size;
    const loadsBefore = viewer.url;
    node.onExecuted({ glb: [{ filename: "box.glb", subfolder: "", type: "output" }] });
    await until(() => viewer.url !== loadsBefore && viewer.stats.vertices > 0);
    await settle();
    out.second = viewer.debugInfo();
    out.liveAfterSecond = liveFor(7).length;
    node.onRemoved();
    out.afterRemove = { live: liveFor(7).length, released: reg().released.at(-1),
      widgetChildren: node.widgets[0].element.children.length };
    const early = new Ours(8); // removed before its viewer finished starting
    early.onExecuted({ glb: [{ filename: "box.glb" }] });
    early.onRemoved();
    await new Promise((r) => setTimeout(r, 500));
    out.earlyRemoved = { live: liveFor(8).length, released: reg().released.filter((i) => i.label === "node:8") };
    return out;
  });
  await context.close();
} catch (error) {
  result.glueFatal = String(error.stack || error);
} finally {
  await browser.close();
  writeFileSync(join(outDir, "result.json"), JSON.stringify(result, null, 2));
}
