// Loads the vendored, unmodified three.js (web/js/vendor/.three/, see vendor/README.md) into any page.
//
// The three.js addons import the bare specifier 'three'. A page resolves that only through an import map,
// and ComfyUI's page has none for "three" (nor can an extension add one reliably after the page's modules
// started loading). So this module does what an import map would do, for the few files we vendor: it
// fetches each addon's text, points its 'three' import at build/three.module.js (loaded natively, so every
// addon and the viewer share ONE three.js instance) and its relative imports at the equally rewritten
// siblings, and imports the result from a blob: URL. ComfyUI's CSP allows blob: scripts
// ("script-src 'self' 'unsafe-inline' 'unsafe-eval' blob:"). The files on disk stay byte-identical to npm.
//
// Importing this module costs nothing: three.js (2 MB) is fetched on the first loadThree() call, i.e. when
// the first viewer opens, not on every ComfyUI page load.

const VENDOR_ROOT = new URL("./vendor/.three/", import.meta.url);
const THREE_URL = new URL("build/three.module.js", VENDOR_ROOT).href;

// Addons the viewer uses, as paths inside the npm package (same layout under vendor/.three/).
const ADDONS = {
  OrbitControls: "examples/jsm/controls/OrbitControls.js",
  GLTFLoader: "examples/jsm/loaders/GLTFLoader.js",
  RoomEnvironment: "examples/jsm/environments/RoomEnvironment.js",
};

// Static import/export statements only: a line starting with `import`/`export` or closing a multi-line
// import list (`} from '...'`). JSDoc lines (" * @three_import import ... from 'three/addons/...'")
// start with "*" and are left alone.
const IMPORT_RE = /^(\s*(?:import|export)\b[^'"\n]*?\bfrom\s*|\s*\}\s*from\s*|\s*import\s*)(['"])([^'"\n]+)\2/gm;

const rewritten = new Map(); // absolute source URL -> Promise<blob: URL of the rewritten module>
let threePromise = null;

function resolveSpecifier(spec, fromUrl) {
  if (spec === "three") return Promise.resolve(THREE_URL);
  if (spec.startsWith("./") || spec.startsWith("../")) return rewrite(new URL(spec, fromUrl).href);
  return Promise.reject(new Error(`three_loader: ${fromUrl} imports "${spec}", which is neither "three" nor a ` +
    "relative path: vendor that file too (scripts/refresh_three.py FILES) or drop the addon"));
}

function rewrite(url) {
  if (!rewritten.has(url)) {
    rewritten.set(url, (async () => {
      const response = await fetch(url);
      if (!response.ok) {
        throw new Error(`three_loader: GET ${url} answered ${response.status}; ` +
          "is web/js/vendor/.three/ complete? (python3 scripts/refresh_three.py)");
      }
      const source = await response.text();
      const specs = new Set();
      for (const match of source.matchAll(IMPORT_RE)) specs.add(match[3]);
      const targets = new Map();
      await Promise.all([...specs].map(async (spec) => targets.set(spec, await resolveSpecifier(spec, url))));
      const code = source.replace(IMPORT_RE, (all, head, quote, spec) => `${head}${quote}${targets.get(spec)}${quote}`);
      // The sourceURL comment names the real file in devtools and error stacks instead of blob:...
      return URL.createObjectURL(new Blob([code, `\n//# sourceURL=${url}\n`], { type: "text/javascript" }));
    })());
  }
  return rewritten.get(url);
}

/**
 * Load three.js and the addons the viewer needs, once per page.
 * @returns {Promise<{THREE: object, OrbitControls: Function, GLTFLoader: Function, RoomEnvironment: Function}>}
 */
export function loadThree() {
  if (threePromise === null) {
    threePromise = (async () => {
      const THREE = await import(THREE_URL);
      const lib = { THREE };
      await Promise.all(Object.entries(ADDONS).map(async ([name, path]) => {
        const module = await import(await rewrite(new URL(path, VENDOR_ROOT).href));
        lib[name] = module[name];
      }));
      // Every module is instantiated now; the module map keeps them, the blob URLs are no longer needed.
      for (const blobUrl of await Promise.all(rewritten.values())) URL.revokeObjectURL(blobUrl);
      return lib;
    })();
    threePromise.catch(() => { threePromise = null; rewritten.clear(); }); // a later viewer may retry
  }
  return threePromise;
}

export const THREE_MODULE_URL = THREE_URL;
