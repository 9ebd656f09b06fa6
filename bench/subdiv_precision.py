"""Issue 7: do the shape decoder's subdivision decisions survive half precision? fp16 (released) vs fp32.

    python3 bench/subdiv_precision.py [--grid 32 --rho 0.36] [--seeds 0 1]

Builds the full-size shape decoder (tests/data/manifests/shape_dec_*.json) twice with the same random weights
(bench/_models.fill_random_): blocks in fp32, and in fp16 as released. The latent is a realistic structure: the
sphere shell of bench/_models (grid 32, rho 0.36: ~3k voxels, the 512 pipeline's shape latent), feats N(0, 1).
Two comparisons of the ``to_subdiv`` decisions (logit > 0), level by level:

  teacher-forced: at the start of every level the fp16 blocks get the fp32 path's hidden state (rounded to
      fp16), run that level's ConvNeXt blocks and ``to_subdiv``; both logits are on the same parents, so every
      one of the 8 decisions per parent is compared. Measures the precision of one level, no compounding.
  free-running: both decoders decode on their own decisions (``return_subs=True``); deeper levels may hold
      different parents, so decisions are compared on the parents both have (coordinate match), and the
      parent counts are reported.
Per level: parents, decisions compared, disagreements, the fp16-fp32 logit error (p50/p99/max over all logits),
the fp32 logit std, and for the disagreements max |fp32 logit| and how many have |logit| >= 1e-2.
Run from the repo root with the package importable as ``trellis2``, on CUDA (sparse convs through triton).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models as M  # noqa: E402

from trellis2.trellis2_core.models import from_config  # noqa: E402
from trellis2.trellis2_core.models.sparse_unet_vae import SparseResBlockC2S3d  # noqa: E402
from trellis2.trellis2_core.sparse import SparseTensor  # noqa: E402


def decoders(dev, seed):
    name = sorted(M.MANIFESTS.glob("shape_dec_*.json"))[0]
    cfg = json.loads(name.read_text())["config"]
    d32 = from_config(cfg, device="meta", dtype=torch.float32).to_empty(device=dev).eval()
    M.fill_random_(d32, seed)
    d16 = from_config(cfg, device="meta").to_empty(device=dev).eval()
    d16.load_state_dict(d32.state_dict())  # casts block weights to fp16, keeps fp32 ones
    assert any(p.dtype == torch.float16 for p in d16.parameters())
    return name.stem, d32.requires_grad_(False), d16.requires_grad_(False)


def stats(level, mode, l32, l16, parents):
    l32, l16 = l32.float(), l16.float()
    dec32, dec16 = l32 > 0, l16 > 0
    dis = dec32 != dec16
    err = (l16 - l32).abs().flatten()
    q = torch.quantile(err[:: max(1, err.numel() // 1_000_000)], torch.tensor([0.5, 0.99], device=err.device))
    mag = l32[dis].abs()
    return dict(level=level, mode=mode, parents=parents, decisions=dis.numel(), disagree=int(dis.sum()),
                err_p50=q[0].item(), err_p99=q[1].item(), err_max=err.max().item(), logit_std=l32.std().item(),
                dis_max_abs=mag.max().item() if mag.numel() else 0.0, dis_ge_1e2=int((mag >= 1e-2).sum()),
                pos_frac=dec32.float().mean().item())  # fmt: skip


@torch.no_grad()
def teacher_forced(d32, d16, x):
    rows = []
    h = d32._from_latent(x)
    level = 0
    for lv32, lv16 in zip(d32.blocks, d16.blocks):
        a32, a16 = h, h.replace(h.feats.to(_block_dtype(d16)))
        for b32, b16 in zip(lv32, lv16):
            if isinstance(b32, SparseResBlockC2S3d):
                l32, l16 = b32.to_subdiv(a32.feats), b16.to_subdiv(a16.feats)
                rows.append(stats(level, "teacher", l32, l16, len(a32)))
                h, _ = b32(a32)
                level += 1
                break
            a32, a16 = b32(a32), b16(a16)
    return rows


def _block_dtype(model):
    return next(p.dtype for n, p in model.blocks.named_parameters() if p.dim() > 1)


def _keys(coords):
    c = coords.long()
    return ((c[:, 0] * 4096 + c[:, 1]) * 4096 + c[:, 2]) * 4096 + c[:, 3]


@torch.no_grad()
def free_running(d32, d16, x):
    _, s32 = d32(x, return_subs=True)
    _, s16 = d16(x, return_subs=True)
    rows = []
    for level, (a, b) in enumerate(zip(s32, s16)):
        ka, kb = _keys(a.coords), _keys(b.coords)
        order = torch.argsort(kb)
        pos = torch.searchsorted(kb[order], ka).clamp_max(len(kb) - 1)
        hit = kb[order][pos] == ka
        la, lb = a.feats[hit], b.feats[order[pos[hit]]]
        r = stats(level, "free", la, lb, f"{len(a)}/{len(b)}")
        r["common"] = int(hit.sum())
        rows.append(r)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--rho", type=float, default=0.36)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for seed in args.seeds:
        name, d32, d16 = decoders(dev, seed)
        coords = M.shell_coords(args.grid, args.rho, 0.0, dev)
        g = torch.Generator(device=dev).manual_seed(100 + seed)
        x = SparseTensor(torch.randn(coords.shape[0], d32.from_latent.in_features, device=dev, generator=g), coords)
        print(f"# {name}, seed {seed}: latent {len(x)} voxels at grid {args.grid}", flush=True)
        for r in teacher_forced(d32, d16, x) + free_running(d32, d16, x):
            r["seed"] = seed
            rows.append(r)
        del d32, d16
        torch.cuda.empty_cache()
    print(f"\n{'seed':>4} {'mode':<8} {'lvl':>3} {'parents':>15} {'decisions':>10} {'disagree':>8} {'pos%':>5} "
          f"{'err_p50':>8} {'err_p99':>8} {'err_max':>8} {'std32':>6} {'dis_max|l|':>10} {'>=1e-2':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['seed']:4d} {r['mode']:<8} {r['level']:3d} {str(r['parents']):>15} {r['decisions']:10d} "
              f"{r['disagree']:8d} {100 * r['pos_frac']:5.1f} {r['err_p50']:8.1e} {r['err_p99']:8.1e} "
              f"{r['err_max']:8.1e} {r['logit_std']:6.2f} {r['dis_max_abs']:10.2e} {r['dis_ge_1e2']:6d}")  # fmt: skip
    if args.log:
        with open(args.log, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
