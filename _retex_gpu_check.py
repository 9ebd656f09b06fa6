# temporary GPU smoke check for retexture/multiview (deleted after use)
import time, torch, numpy as np
from PIL import Image
from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot
from trellis2.trellis2_core.pipeline import Trellis2Pipeline, Structure
from trellis2.trellis2_core.mesh.mesh import Mesh
root = write_tiny_snapshot("/tmp/snap", overwrite=True)
tp = Trellis2Pipeline.from_pretrained(root, device="cuda", allow_download=False, config_file="texturing_pipeline.json")
th, ph = np.meshgrid(np.linspace(0, np.pi, 40), np.linspace(0, 2*np.pi, 80), indexing="ij")
v = 3 * np.stack([np.sin(th)*np.cos(ph), np.cos(th), np.sin(th)*np.sin(ph)], -1).reshape(-1, 3)
uv = np.stack([ph / (2*np.pi), th / np.pi], -1).reshape(-1, 2)
i = np.arange(39)[:, None] * 80 + np.arange(79)[None]
f = np.concatenate([np.stack([i, i+80, i+1], -1).reshape(-1, 3), np.stack([i+1, i+80, i+81], -1).reshape(-1, 3)])
mesh = Mesh.from_numpy(v + [0, 5, 0], f, uvs=uv)
imgs = []
for k in range(2):
    a = np.zeros((96, 80, 4), np.uint8); a[20+5*k:70, 15:60] = (200, 60+50*k, 30, 255); imgs.append(Image.fromarray(a, "RGBA"))
for R in (64, 512, 1024):
    t = time.time()
    out = tp.retexture(mesh, imgs[0], seed=1, resolution=R, texture_size=512, keep_uvs=True, sampler_overrides={"steps": 2})
    torch.cuda.synchronize()
    ok = out.mesh.vertices is mesh.vertices and out.mesh.faces is mesh.faces
    print(R, round(time.time()-t, 2), out.ovoxel, ok, out.material.latent.feats.dtype,
          torch.isfinite(out.ovoxel.attributes).all().item(), flush=True)
out2 = tp.retexture(mesh, imgs, seed=1, resolution=512, texture_size=256, multiview_mode="average", sampler_overrides={"steps": 2})
print("mv retex", out2.ovoxel, flush=True)
gp = Trellis2Pipeline.from_pretrained(root, device="cuda", allow_download=False)
r = torch.arange(32.) + 0.5 - 16; x, y, z = torch.meshgrid(r, r, r, indexing="ij")
st = Structure(coords=torch.argwhere(((x**2+y**2+z**2) <= 9)[None]).int(), resolution=32)
ov = {k: {"steps": 3} for k in ("sparse_structure", "shape_slat", "tex_slat")}
for mode in ("concat", "average", "alternate"):
    for pt in ("512", "1024_cascade"):
        o = gp.generate(imgs, seed=2, pipeline_type=pt, structure=st, multiview_mode=mode, sampler_overrides=ov)
        o2 = gp.generate(imgs, seed=2, pipeline_type=pt, structure=st, multiview_mode=mode, sampler_overrides=ov)
        print(mode, pt, o.ovoxel, torch.equal(o.material.latent.feats, o2.material.latent.feats), flush=True)
