// View modes of the TRELLIS.2 viewer: one material per (mesh material, mode), built from the glTF material.
//
// glTF conventions used here: base colour texture is sRGB; the metallicRoughness texture is linear with
// metalness in B and roughness in G (factors multiply); UV origin top-left (three's GLTFLoader sets
// flipY = false, so uv is used as stored). Channel modes print the linear value as the grey level
// (0.5 roughness -> code 128), unlit and without tone mapping, so they read like the texture itself.
// Nothing here touches the DOM except the checker texture's canvas.

export const VIEW_MODES = Object.freeze([
  { id: "pbr", label: "Lit PBR" },
  { id: "basecolor", label: "Base colour" },
  { id: "metallic", label: "Metallic" },
  { id: "roughness", label: "Roughness" },
  { id: "normals", label: "Normals" },
  { id: "wireframe", label: "Wireframe overlay" },
  { id: "uv", label: "UV checker" },
]);

export const MODE_IDS = Object.freeze(VIEW_MODES.map((m) => m.id));

const CHANNEL_VERTEX = /* glsl */ `
  varying vec2 vUv;
  void main() {
    vUv = uv;
    gl_Position = projectionMatrix * modelViewMatrix * vec4(position, 1.0);
  }`;

// channel: 2 = blue (metalness), 1 = green (roughness) of glTF's metallicRoughness texture.
const CHANNEL_FRAGMENT = /* glsl */ `
  uniform sampler2D map;
  uniform bool hasMap;
  uniform float factor;
  uniform int channel;
  varying vec2 vUv;
  void main() {
    float v = factor;
    if (hasMap) v *= (channel == 2 ? texture2D(map, vUv).b : texture2D(map, vUv).g);
    gl_FragColor = vec4(vec3(clamp(v, 0.0, 1.0)), 1.0);
  }`;

/**
 * A UV checker texture drawn in a canvas: 8x8 cells, hue varying across U and brightness across V so
 * flipped or rotated islands are visible; cell (0,0) of the texture (UV 0,0 at the top-left) is labelled.
 */
export function makeCheckerTexture(THREE, size = 512) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  const ctx = canvas.getContext("2d");
  const cells = 8;
  const step = size / cells;
  for (let j = 0; j < cells; j++) {
    for (let i = 0; i < cells; i++) {
      const hue = Math.round((i / cells) * 300);
      const light = (i + j) % 2 === 0 ? 30 + j * 5 : 65 + j * 3;
      ctx.fillStyle = `hsl(${hue}, 70%, ${light}%)`;
      ctx.fillRect(i * step, j * step, step, step);
    }
  }
  ctx.fillStyle = "#ffffff";
  ctx.font = `bold ${Math.round(step * 0.45)}px sans-serif`;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText("UV", step / 2, step / 2);
  const texture = new THREE.CanvasTexture(canvas);
  texture.colorSpace = THREE.SRGBColorSpace;
  texture.wrapS = texture.wrapT = THREE.RepeatWrapping;
  texture.flipY = false; // same convention as glTF textures: v = 0 is the image's top row
  texture.anisotropy = 4;
  return texture;
}

function channelMaterial(THREE, source, channel) {
  const map = channel === 2 ? source.metalnessMap : source.roughnessMap;
  const factor = channel === 2 ? source.metalness : source.roughness;
  return new THREE.ShaderMaterial({ // unlit: flat vs smooth shading makes no difference here
    uniforms: {
      map: { value: map ?? null },
      hasMap: { value: Boolean(map) },
      factor: { value: factor ?? (channel === 2 ? 0 : 1) },
      channel: { value: channel },
    },
    vertexShader: CHANNEL_VERTEX,
    fragmentShader: CHANNEL_FRAGMENT,
    side: source.side,
    toneMapped: false,
  });
}

/**
 * The material that shows `source` (a glTF MeshStandardMaterial, or anything with .map/.color) in `mode`.
 * Returns `source` itself for "pbr"; "wireframe" gives a depth-offset copy (the overlay is separate geometry). Textures are shared
 * with `source`, never copied: disposing a mode material must not dispose them (three's Material.dispose
 * never does).
 * @param {object} THREE the three.js namespace
 * @param {object} source the loaded material
 * @param {string} mode one of MODE_IDS
 * @param {object} checker the UV checker texture (shared by all meshes)
 */
export function makeModeMaterial(THREE, source, mode, checker) {
  switch (mode) {
    case "pbr":
      return source;
    case "wireframe": {
      // The lit surface, pushed back a little in depth so the overlay's lines win the depth test.
      const surface = source.clone(); // shares the textures
      surface.polygonOffset = true;
      surface.polygonOffsetFactor = 1;
      surface.polygonOffsetUnits = 1;
      return surface;
    }
    case "basecolor":
      return new THREE.MeshBasicMaterial({
        map: source.map ?? null,
        color: source.color ? source.color.clone() : new THREE.Color(1, 1, 1),
        vertexColors: Boolean(source.vertexColors),
        side: source.side,
        transparent: source.transparent,
        opacity: source.opacity ?? 1,
        alphaTest: source.alphaTest ?? 0,
        toneMapped: false, // show the stored colours exactly
      });
    case "metallic":
      return channelMaterial(THREE, source, 2);
    case "roughness":
      return channelMaterial(THREE, source, 1);
    case "normals":
      return new THREE.MeshNormalMaterial({
        normalMap: source.normalMap ?? null,
        normalScale: source.normalScale ? source.normalScale.clone() : new THREE.Vector2(1, 1),
        flatShading: Boolean(source.flatShading), // GLTFLoader's choice for primitives without NORMAL
        side: source.side,
      });
    case "uv":
      return new THREE.MeshBasicMaterial({ map: checker, side: source.side, toneMapped: false });
    default:
      throw new Error(`Trellis2Viewer: unknown view mode "${mode}"; expected one of ${MODE_IDS.join(", ")}`);
  }
}

/** Every texture a material references (for the stats overlay and for disposal). */
export function materialTextures(material) {
  const out = [];
  for (const value of Object.values(material)) {
    if (value && value.isTexture) out.push(value);
  }
  if (material.uniforms) {
    for (const uniform of Object.values(material.uniforms)) {
      if (uniform.value && uniform.value.isTexture) out.push(uniform.value);
    }
  }
  return out;
}
