// Trellis2Viewer: a three.js GLB viewer that knows nothing about ComfyUI.
//
// Used by the ComfyUI extension (trellis2_viewer.js wraps it in a DOM widget) and by the standalone test
// page (tests/viewer_page/index.html). Importing this module registers nothing and loads no three.js:
// ComfyUI imports every .js of the pack at start-up, so the cost is paid on the first Trellis2Viewer.create().
//
// Scene conventions: glTF's, i.e. Y-up, metres, +Z towards the default camera side; sRGB output with
// Khronos PBR Neutral tone mapping; image-based light from three's RoomEnvironment, prefiltered in the page
// with PMREMGenerator (no HDR download). Rendering happens on demand only: after a load, a mode change,
// an orbit-controls 'change' event or a resize; there is no animation loop.
//
// Debug hook (for tests): globalThis.__trellis2Viewers = {live: Map<id, Trellis2Viewer>, released: [info],
// info()} where info = viewer.debugInfo() (mode, stats, renders, renderer.info.memory, disposed).

import { loadThree } from "./three_loader.js";
import { MODE_IDS, makeCheckerTexture, makeModeMaterial, materialTextures } from "./viewer_modes.js";
import { buildViewerDom, formatStats } from "./viewer_ui.js";

export const BACKGROUND = "#262626";
export { MODE_IDS };

// Slot names follow glTF's texture names (one glTF texture may fill two three.js slots).
const TEXTURE_SLOTS = [["map", "baseColor"], ["metalnessMap", "metallicRoughness"],
  ["roughnessMap", "metallicRoughness"], ["normalMap", "normal"], ["emissiveMap", "emissive"],
  ["aoMap", "occlusion"]];
const RELEASED_KEPT = 32;

function registry() {
  if (!globalThis.__trellis2Viewers) {
    globalThis.__trellis2Viewers = {
      live: new Map(),
      released: [],
      info() {
        return { live: [...this.live.values()].map((v) => v.debugInfo()), released: this.released.slice() };
      },
    };
  }
  return globalThis.__trellis2Viewers;
}

let nextId = 1;

export class Trellis2Viewer {
  /**
   * Load three.js (once per page) and build a viewer filling `container`.
   * @param {HTMLElement} container
   * @param {{label?: string}} options label: shown in debugInfo() (ComfyUI: "node:<id>")
   * @returns {Promise<Trellis2Viewer>}
   */
  static async create(container, options = {}) {
    const lib = await loadThree();
    return new Trellis2Viewer(container, lib, options);
  }

  constructor(container, lib, { label = "" } = {}) {
    if (!(container instanceof HTMLElement)) {
      throw new TypeError(`Trellis2Viewer: container must be an HTMLElement, got ${String(container)}; ` +
        "pass the element the viewer should fill");
    }
    const { THREE, OrbitControls, RoomEnvironment } = lib;
    this.lib = lib;
    this.id = nextId++;
    this.label = label;
    this.mode = "pbr";
    this.renders = 0;
    this.disposed = false;
    this.url = null;
    this.filename = null;
    this.stats = { meshes: 0, vertices: 0, faces: 0, textures: [] };
    this.model = null;
    this._meshes = []; // [{mesh, source: Material | Material[]}]
    this._modeMaterials = new Map(); // source material -> material shown in the current mode
    this._overlays = [];
    this._frame = 0;
    this._loadToken = 0;

    this.dom = buildViewerDom(container, BACKGROUND, {
      onMode: (mode) => this.setMode(mode),
      onFit: () => this.fitView(),
    });
    const renderer = new THREE.WebGLRenderer({ canvas: this.dom.canvas, antialias: true });
    renderer.setPixelRatio(Math.min(globalThis.devicePixelRatio || 1, 2));
    renderer.outputColorSpace = THREE.SRGBColorSpace;
    renderer.toneMapping = THREE.NeutralToneMapping;
    this.renderer = renderer;

    this.scene = new THREE.Scene();
    this.scene.background = new THREE.Color(BACKGROUND);
    const pmrem = new THREE.PMREMGenerator(renderer);
    const room = new RoomEnvironment();
    this._environment = pmrem.fromScene(room, 0.04); // a render target; its texture is the env map
    room.dispose();
    pmrem.dispose();
    this.scene.environment = this._environment.texture;

    this.camera = new THREE.PerspectiveCamera(35, 1, 0.01, 100);
    this.camera.position.set(1.5, 1, 2);
    this.controls = new OrbitControls(this.camera, this.dom.canvas);
    this.controls.enableDamping = false; // damping needs a running loop; we render on demand
    this.controls.addEventListener("change", () => this.requestRender());
    this._checker = makeCheckerTexture(THREE);
    this._loader = makeGltfLoader(lib);

    this._resizeObserver = new ResizeObserver(() => this._resize());
    this._resizeObserver.observe(this.dom.root);
    this._resize();
    registry().live.set(this.id, this);
  }

  /** Schedule one frame (coalesced); the only way frames are drawn besides renderNow(). */
  requestRender() {
    if (this.disposed || this._frame) return;
    this._frame = requestAnimationFrame(() => {
      this._frame = 0;
      this.renderNow();
    });
  }

  renderNow() {
    if (this.disposed) return;
    this.renderer.render(this.scene, this.camera);
    this.renders += 1;
  }

  /**
   * Fetch and show a GLB, replacing (and disposing) the current asset once the new one has parsed.
   * @param {string} url where to GET the .glb (ComfyUI: the /view route)
   * @param {{filename?: string, downloadUrl?: string}} options
   * @returns {Promise<object>} the stats of the new asset
   */
  async load(url, { filename, downloadUrl } = {}) {
    if (this.disposed) throw new Error("Trellis2Viewer.load: the viewer was destroyed; create a new one");
    const token = ++this._loadToken;
    this._setStatus("Loading…");
    let gltf;
    try {
      const response = await fetch(url);
      if (!response.ok) throw new Error(`GET ${url} answered ${response.status} ${response.statusText}`);
      const buffer = await response.arrayBuffer();
      if (this.disposed || token !== this._loadToken) return this.stats;
      gltf = await this._loader.parseAsync(buffer, "");
    } catch (error) {
      if (!this.disposed && token === this._loadToken) this._setStatus(`Could not load the GLB: ${error.message}`);
      throw error;
    }
    if (this.disposed || token !== this._loadToken) { // destroyed or replaced while parsing
      disposeObject(gltf.scene);
      return this.stats;
    }
    this._clearModel();
    this.model = gltf.scene;
    this.scene.add(this.model);
    this.model.traverse((object) => {
      if (object.isMesh) this._meshes.push({ mesh: object, source: object.material });
    });
    this.url = url;
    this.filename = filename || decodeURIComponent(new URL(url, location.href).pathname.split("/").pop());
    this.stats = this._computeStats();
    this.dom.stats.textContent = formatStats(this.stats);
    this.dom.download.href = downloadUrl || url;
    this.dom.download.download = this.filename;
    this.dom.download.style.display = "";
    this._setStatus("");
    this._applyMode();
    this.fitView();
    return this.stats;
  }

  /** Switch the view mode (one of MODE_IDS) and render once. */
  setMode(mode) {
    if (!MODE_IDS.includes(mode)) {
      throw new Error(`Trellis2Viewer.setMode: unknown mode "${mode}"; expected one of ${MODE_IDS.join(", ")}`);
    }
    this.mode = mode;
    this.dom.select.value = mode;
    if (!this.disposed) this._applyMode();
  }

  /** Frame the asset: camera looks at the bounding sphere's centre from above-front-right, Y up. */
  fitView() {
    const { THREE } = this.lib;
    if (!this.model) return;
    const box = new THREE.Box3().setFromObject(this.model);
    if (box.isEmpty()) return;
    const sphere = box.getBoundingSphere(new THREE.Sphere());
    const radius = Math.max(sphere.radius, 1e-6);
    const vFov = THREE.MathUtils.degToRad(this.camera.fov);
    const hFov = 2 * Math.atan(Math.tan(vFov / 2) * this.camera.aspect);
    const distance = (radius / Math.sin(Math.min(vFov, hFov) / 2)) * 1.05;
    const direction = new THREE.Vector3(0.8, 0.55, 1.2).normalize();
    this.camera.position.copy(sphere.center).addScaledVector(direction, distance);
    this.camera.near = distance / 100;
    this.camera.far = distance * 100;
    this.camera.updateProjectionMatrix();
    this.controls.target.copy(sphere.center);
    this.controls.maxDistance = distance * 20;
    this.controls.update(); // fires 'change' -> requestRender
    this.requestRender();
  }

  /** A JSON-able snapshot for tests and bug reports. */
  debugInfo() {
    const info = this.renderer.info;
    return {
      id: this.id,
      label: this.label,
      mode: this.mode,
      url: this.url,
      filename: this.filename,
      stats: this.stats,
      renders: this.renders,
      disposed: this.disposed,
      memory: { geometries: info.memory.geometries, textures: info.memory.textures },
      programs: info.programs ? info.programs.length : 0,
      canvasSize: [this.dom.canvas.width, this.dom.canvas.height],
      inDocument: this.dom.root.isConnected,
    };
  }

  /** Release every geometry, material, texture, the renderer and its WebGL context; remove the DOM. */
  destroy() {
    if (this.disposed) return;
    this._loadToken += 1; // a load in flight will dispose what it parsed
    if (this._frame) cancelAnimationFrame(this._frame);
    this._frame = 0;
    this._resizeObserver.disconnect();
    this.controls.dispose();
    this._clearModel();
    this._checker.dispose();
    this.scene.environment = null;
    this._environment.dispose();
    this.renderer.dispose();
    this.disposed = true;
    const snapshot = this.debugInfo();
    this.renderer.forceContextLoss(); // give the context back now: browsers cap live WebGL contexts (~16)
    this.dom.root.remove();
    snapshot.inDocument = this.dom.root.isConnected;
    const reg = registry();
    reg.live.delete(this.id);
    reg.released.push(snapshot);
    if (reg.released.length > RELEASED_KEPT) reg.released.shift();
  }

  _resize() {
    if (this.disposed) return;
    const width = this.dom.root.clientWidth;
    const height = this.dom.root.clientHeight;
    if (width < 1 || height < 1) return; // hidden (collapsed node, zoomed-out graph)
    this.renderer.setSize(width, height, false); // CSS size stays 100%: the element follows the node
    this.camera.aspect = width / height;
    this.camera.updateProjectionMatrix();
    this.requestRender();
  }

  _setStatus(text) {
    this.dom.status.textContent = text;
    this.dom.status.style.display = text ? "flex" : "none";
  }

  _applyMode() {
    const { THREE } = this.lib;
    const previous = this._modeMaterials;
    this._modeMaterials = new Map();
    const shown = (source) => {
      if (!this._modeMaterials.has(source)) {
        this._modeMaterials.set(source, makeModeMaterial(THREE, source, this.mode, this._checker));
      }
      return this._modeMaterials.get(source);
    };
    for (const { mesh, source } of this._meshes) {
      mesh.material = Array.isArray(source) ? source.map(shown) : shown(source);
    }
    disposeModeMaterials(previous);
    this._removeOverlays();
    if (this.mode === "wireframe") {
      const lineMaterial = new THREE.LineBasicMaterial({ color: 0x00e0ff, transparent: true, opacity: 0.6,
        toneMapped: false });
      for (const { mesh } of this._meshes) {
        const lines = new THREE.LineSegments(new THREE.WireframeGeometry(mesh.geometry), lineMaterial);
        lines.raycast = () => {};
        mesh.add(lines);
        this._overlays.push(lines);
      }
    }
    this.requestRender();
  }

  _removeOverlays() {
    const materials = new Set();
    for (const lines of this._overlays) {
      lines.removeFromParent();
      lines.geometry.dispose();
      materials.add(lines.material);
    }
    for (const material of materials) material.dispose();
    this._overlays = [];
  }

  _clearModel() {
    this._removeOverlays();
    disposeModeMaterials(this._modeMaterials);
    this._modeMaterials = new Map();
    if (this.model) {
      for (const { mesh, source } of this._meshes) mesh.material = source; // dispose the originals below
      this.model.removeFromParent();
      disposeObject(this.model);
    }
    this.model = null;
    this._meshes = [];
  }

  _computeStats() {
    const stats = { meshes: 0, vertices: 0, faces: 0, textures: [] };
    const seen = new Set();
    for (const { mesh, source } of this._meshes) {
      const position = mesh.geometry.attributes.position;
      const count = mesh.geometry.index ? mesh.geometry.index.count : (position ? position.count : 0);
      stats.meshes += 1;
      stats.vertices += position ? position.count : 0;
      stats.faces += Math.floor(count / 3);
      for (const material of [source].flat()) {
        for (const [key, slot] of TEXTURE_SLOTS) {
          const texture = material[key];
          if (!texture || seen.has(texture)) continue;
          seen.add(texture);
          const image = texture.image || {};
          stats.textures.push({ slot, width: image.width || 0, height: image.height || 0 });
        }
      }
    }
    return stats;
  }
}

/**
 * A GLTFLoader whose embedded images decode through <img> (TextureLoader), not fetch() (ImageBitmapLoader,
 * its default in Chromium): GLTFLoader hands embedded images over as blob: URLs, and ComfyUI's CSP under
 * --disable-api-nodes ("connect-src 'self'") refuses fetch() of blob: URLs while "img-src ... blob:" allows
 * <img>. Without this, every texture of every GLB fails to load there.
 */
function makeGltfLoader({ THREE, GLTFLoader }) {
  const loader = new GLTFLoader();
  loader.register((parser) => {
    const textureLoader = new THREE.TextureLoader(parser.options.manager);
    textureLoader.setCrossOrigin(parser.options.crossOrigin);
    textureLoader.setWithCredentials(parser.options.withCredentials);
    parser.textureLoader = textureLoader;
    return { name: "TRELLIS2_img_texture_loader" };
  });
  return loader;
}

function disposeTexture(texture) {
  const image = texture.image;
  texture.dispose();
  // ImageBitmaps (GLTFLoader's choice in Chromium) hold decoded pixels until closed.
  if (image && typeof image.close === "function") image.close();
}

function disposeModeMaterials(map) {
  for (const [source, shown] of map) {
    if (shown !== source) shown.dispose(); // mode materials share textures with the source: not disposed here
  }
}

/** Dispose every geometry, material and texture under `root` (textures once each). */
export function disposeObject(root) {
  const textures = new Set();
  const materials = new Set();
  root.traverse((object) => {
    if (object.geometry) object.geometry.dispose();
    for (const material of [object.material].flat()) {
      if (material) materials.add(material);
    }
  });
  for (const material of materials) {
    for (const texture of materialTextures(material)) textures.add(texture);
    material.dispose();
  }
  for (const texture of textures) disposeTexture(texture);
}
