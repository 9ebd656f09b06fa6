"""Command line: ``trellis2 generate IMAGE -o OUT.glb`` and friends.

    trellis2 generate chair.png -o chair.glb                      # official weights (downloaded on first use)
    trellis2 generate chair.png -o chair.glb --pipeline 512 --seed 7
    trellis2 generate chair.png -o chair.glb --weights ./TRELLIS.2-4B --offline
    trellis2 tiny-snapshot ./tiny                                  # a tiny random snapshot for smoke tests

The image needs a transparent background (RGBA) or a ``--mask``; background removal models are not bundled
(the usual one, RMBG-2.0, is gated and non-commercial).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

from .errors import Trellis2Error

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trellis2", description="TRELLIS.2 image to 3D (PBR-textured GLB).")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="image -> textured GLB")
    g.add_argument("image", type=Path, help="input image (PNG with alpha, or any image plus --mask)")
    g.add_argument("-o", "--output", type=Path, required=True, help="output .glb path (never overwritten without --overwrite)")
    g.add_argument("--mask", type=Path, help="foreground mask image (white = object), for images without alpha")
    g.add_argument("--pipeline", default=None, choices=["512", "1024", "1024_cascade", "1536_cascade"],
                   help="pipeline type (default: the snapshot's, officially 1024_cascade)")  # fmt: skip
    g.add_argument("--seed", type=int, default=42, help="random seed (default 42, as the reference)")
    g.add_argument("--weights", default=None, help="local folder in the official layout, or a Hugging Face repo id "
                   "(default microsoft/TRELLIS.2-4B, downloaded on first use)")  # fmt: skip
    g.add_argument("--offline", action="store_true", help="never download; use local or cached files only")
    g.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the best available)")
    g.add_argument("--policy", default="offload", choices=["keep", "offload", "free"],
                   help="model memory policy: keep all loaded, offload to CPU after each stage (default), or free")  # fmt: skip
    g.add_argument("--vram-budget", default=None, metavar="GiB|auto",
                   help="GPU memory to fit in: 'auto' (this card's) or GiB, e.g. 8; plans offloading, DiT block "
                   "streaming and chunked decoding for --pipeline")  # fmt: skip
    g.add_argument("--steps", type=int, default=None, help="sampler steps for every stage (default: pipeline.json's, 12)")
    g.add_argument("--faces", type=int, default=500_000, help="face count after decimation (default 500000)")
    g.add_argument("--texture-size", type=int, default=2048, help="texture resolution (default 2048, 16 to 8192)")
    g.add_argument("--normal-map", action="store_true",
                   help="also bake a tangent-space normal map of the full-resolution surface (exported with tangents)")
    g.add_argument("--webp", action="store_true", help="store textures as WebP (EXT_texture_webp) instead of PNG")
    g.add_argument("--fp8", action="store_true",
                   help="store the flow transformers' block weights as float8 e4m3: half their memory, faster on GPUs "
                        "with FP8 units (RTX 40xx, Ada, Hopper); results differ slightly from the released bf16")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the sampling loops eagerly instead of replaying CUDA graphs (CUDA only; for debugging)")
    g.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    t = sub.add_parser("tiny-snapshot", help="write a tiny random snapshot in the official layout (for smoke tests)")
    t.add_argument("directory", type=Path)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="write into a non-empty directory")
    return ap


def _progress_bar(quiet: bool, desc: str):
    """A progress(done, total) callback drawing a tqdm bar on stderr (tqdm comes with huggingface_hub)."""
    if quiet:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
        bar.total = total
        bar.n = done
        bar.refresh()

    return progress, lambda: bar is not None and bar.close()


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from .mesh.glb import export_glb
    from .mesh.mesh import Mesh
    from .mesh.postprocess import textured_mesh
    from .nn import cuda_graphs
    from .pipeline import Trellis2Pipeline
    from .weights import DEFAULT_REPO

    out = args.output
    # Checked before anything loads: the engine would reject these only after resolving weights or after sampling.
    if not 16 <= args.texture_size <= 8192:
        raise Trellis2Error(f"--texture-size must be in [16, 8192]; got {args.texture_size}. The default is 2048")
    if args.faces < 4:
        raise Trellis2Error(f"--faces must be >= 4; got {args.faces}. The default is 500000")
    if args.steps is not None and args.steps < 1:
        raise Trellis2Error(f"--steps must be >= 1; got {args.steps}. The official value is 12")
    if not 0 <= args.seed < 2**64:
        raise Trellis2Error(f"--seed must be in [0, 2**64 - 1]; got {args.seed}. The reference's default is 42")
    if out.suffix.lower() != ".glb":
        raise Trellis2Error(f"--output must end in .glb; got {str(out)!r}")
    if out.exists() and not args.overwrite:
        raise Trellis2Error(f"{str(out)!r} already exists; pass --overwrite to replace it or choose another name")
    if not out.parent.exists():
        raise Trellis2Error(f"the folder {str(out.parent)!r} does not exist; create it first")
    try:
        image = Image.open(args.image)
        image.load()
        mask = Image.open(args.mask).convert("L") if args.mask else None
    except OSError as e:
        raise Trellis2Error(f"cannot read the image: {e}") from e

    start = time.perf_counter()
    pipe = Trellis2Pipeline.from_pretrained(
        args.weights or DEFAULT_REPO, device=args.device, policy=args.policy, vram_budget=args.vram_budget,
        pipeline_type=args.pipeline, allow_download=not args.offline, progress=not args.quiet, fp8=args.fp8,
    )  # fmt: skip
    if mask is not None:
        from .image import preprocess_image

        image = preprocess_image(image, mask=mask)
    overrides = {s: {"steps": args.steps} for s in ("sparse_structure", "shape_slat", "tex_slat")} if args.steps else None
    progress, close = _progress_bar(args.quiet, "sampling")
    try:
        with cuda_graphs.disabled() if args.no_cuda_graphs else contextlib.nullcontext():
            result = pipe.generate(image, seed=args.seed, pipeline_type=args.pipeline, sampler_overrides=overrides,
                                   preprocess=mask is None, progress=progress)  # fmt: skip
    finally:
        close()
    ov = result.ovoxel
    vertices, faces = ov.to_mesh()
    if faces.shape[0] == 0:
        raise Trellis2Error("the generated O-Voxel has no surface (0 faces); try another seed or pipeline type")
    progress, close = _progress_bar(args.quiet, "mesh + textures")
    try:
        mesh, report = textured_mesh(
            Mesh(vertices.float().cpu(), faces.long().cpu()), ov.coords.cpu(), ov.attributes.float().cpu(),
            ov.resolution, decimation_target=args.faces, texture_size=args.texture_size, progress=progress,
            normal_map=args.normal_map,
        )  # fmt: skip
    finally:
        close()
    path = export_glb(mesh, out, overwrite=args.overwrite, webp=args.webp)
    print(f"wrote {path}: {mesh.num_vertices} vertices, {mesh.num_faces} faces, "
          f"{args.texture_size}^2 textures, {time.perf_counter() - start:.1f}s")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        from .testing.tiny_snapshot import write_tiny_snapshot

        path = write_tiny_snapshot(args.directory, seed=args.seed, overwrite=args.force)
        print(f"wrote a tiny TRELLIS.2 snapshot to {path}")
        return 0
    except (Trellis2Error, FileExistsError) as e:
        print(f"trellis2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trellis2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
