"""Find (and if needed download) a TRELLIS.2 pipeline in the official Hugging Face file layout.

Official layout (repo ``microsoft/TRELLIS.2-4B``)::

    pipeline.json              {"name": "Trellis2ImageTo3DPipeline", "args": {"models": {role: path}, ...}}
    texturing_pipeline.json    optional, same schema, the texturing pipeline's roles
    ckpts/<name>.json          {"name": <class>, "args": {...}}  +  ckpts/<name>.safetensors

A model path in pipeline.json is ``ckpts/<name>`` (same repo) or ``<org>/<repo>/ckpts/<name>`` (another
repo: the sparse-structure decoder lives in ``microsoft/TRELLIS-image-large``). DINOv3 is a transformers
model folder (config.json + model.safetensors) from the gated repo named in ``image_cond_model``.

Lookup order when ``source`` is a local folder F (first location holding both files wins):

* ``ckpts/<name>``                       -> ``F/ckpts/<name>.{json,safetensors}`` (nowhere else)
* ``<org>/<repo>/ckpts/<name>``          -> ``F/<org>/<repo>/ckpts/``, ``F/<repo>/ckpts/``,
  ``F/../<repo>/ckpts/`` (a sibling folder, e.g. ComfyUI ``models/trellis2/TRELLIS-image-large``),
  ``F/ckpts/``, then a download from ``<org>/<repo>``
* DINOv3 ``<org>/<repo>``                -> ``F/dinov3/``, ``F/<org>/<repo>/``, ``F/../<repo>/``, then a download

An existing folder wins over a repo id of the same spelling. When ``source`` is a Hugging Face repo id,
every file comes from the Hugging Face cache (or ``local_dir``, written in the layout above so it can be
passed as ``source`` later), downloaded on demand: only the files of the requested roles, at the revisions
SPEC.md was derived from for the official repos. ``HF_HUB_OFFLINE=1`` (read at call time) or
``allow_download=False`` restricts this to the cache. Every failure is collected and reported at once,
listing the files needed and exactly where to put them (see ``hub.py`` for the fail-fast rules).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from .checkpoints import read_safetensors_header
from .conditioning import DINOV3_REPO
from .errors import CheckpointError, ConfigError
from .hub import Fetcher

log = logging.getLogger(__name__)

DEFAULT_REPO = "microsoft/TRELLIS.2-4B"
PIPELINE_FILE = "pipeline.json"
TEXTURING_FILE = "texturing_pipeline.json"
DINOV3_FILES = ("config.json", "model.safetensors")
# The revisions SPEC.md was derived from (and the reference pins); other repos use their default branch.
PINNED_REVISIONS = {
    "microsoft/TRELLIS.2-4B": "af44b45f2e35a493886929c6d786e563ec68364d",
    "microsoft/TRELLIS-image-large": "25e0d31ffbebe4b5a97464dd851910efc3002d96",
    "facebook/dinov3-vitl16-pretrain-lvd1689m": "ea8dc2863c51be0a264bab82070e3e8836b02d51",
}
# Roles -> paths of the official pipeline.json, to say which files are needed when it cannot be read.
OFFICIAL_MODELS = {
    "sparse_structure_decoder": "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16",
    "sparse_structure_flow_model": "ckpts/ss_flow_img_dit_1_3B_64_bf16",
    "shape_slat_decoder": "ckpts/shape_dec_next_dc_f16c32_fp16",
    "shape_slat_flow_model_512": "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16",
    "shape_slat_flow_model_1024": "ckpts/slat_flow_img2shape_dit_1_3B_1024_bf16",
    "tex_slat_decoder": "ckpts/tex_dec_next_dc_f16c32_fp16",
    "tex_slat_flow_model_512": "ckpts/slat_flow_imgshape2tex_dit_1_3B_512_bf16",
    "tex_slat_flow_model_1024": "ckpts/slat_flow_imgshape2tex_dit_1_3B_1024_bf16",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """One model role's checkpoint: the official config JSON and the safetensors beside it."""

    role: str
    name: str  # checkpoint name, e.g. "ss_flow_img_dit_1_3B_64_bf16"
    path: str  # as written in pipeline.json, e.g. "ckpts/ss_flow_img_dit_1_3B_64_bf16"
    config_path: Path
    weights_path: Path


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A ``*_sampler`` entry: sampler class name, constructor args, default call params (lists as tuples)."""

    name: str
    args: Mapping[str, Any]
    params: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Normalization:
    """A ``*_normalization`` entry: per-channel latent mean and std (SPEC 12)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class PipelineFiles:
    """Everything a pipeline needs, resolved to local files. Keys are the JSON keys of pipeline.json.

    models:         role -> ModelFiles (only the requested roles).
    samplers:       e.g. "sparse_structure_sampler" -> SamplerSpec.
    normalizations: e.g. "shape_slat_normalization" -> Normalization.
    dinov3_path:    transformers DINOv3 folder (config.json + model.safetensors), None if not requested.
    args:           the whole parsed "args" (image_cond_model, rembg_model, default_pipeline_type, ...).
    """

    source: str
    root: Path | None  # the local folder (source, or local_dir for downloads); None when all files are in the cache
    config_path: Path
    name: str
    models: Mapping[str, ModelFiles]
    samplers: Mapping[str, SamplerSpec]
    normalizations: Mapping[str, Normalization]
    dinov3_path: Path | None
    args: Mapping[str, Any]

    @property
    def default_pipeline_type(self) -> str | None:
        return self.args.get("default_pipeline_type")


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return MappingProxyType({k: _freeze(x) for k, x in v.items()})
    return v


def _first_complete(folders: Iterable[Path], files: Iterable[str]) -> Path | None:
    files = tuple(files)
    for folder in folders:
        if all((folder / f).is_file() for f in files):
            return folder
    return None


def _split_model_path(role: str, path: Any, where: str) -> tuple[str | None, str, str]:
    """(external repo id or None, folder inside the repo, checkpoint name) of a pipeline.json model path."""
    if not isinstance(path, str) or not path or path.startswith(("/", "\\")) or ".." in path.split("/") or "\\" in path:
        raise ConfigError(
            f"{where}: models.{role} must be 'ckpts/<name>' or '<org>/<repo>/ckpts/<name>'; got {path!r}"
        )
    parts = path.split("/")
    # The reference's rule: two or more slashes = a path inside another Hugging Face repo.
    repo = "/".join(parts[:2]) if len(parts) >= 3 else None
    inner = parts[2:] if repo else parts
    return repo, "/".join(inner[:-1]), inner[-1]


def _parse_entries(args: Mapping[str, Any], where: str):
    samplers, norms = {}, {}
    for key, v in args.items():
        if key.endswith("_sampler"):
            if not (isinstance(v, Mapping) and isinstance(v.get("name"), str)):
                raise ConfigError(f"{where}: {key} must be an object with 'name', 'args', 'params'; got {v!r:.200}")
            a, p = v.get("args", {}), v.get("params", {})
            if not (isinstance(a, Mapping) and isinstance(p, Mapping)):
                raise ConfigError(f"{where}: {key}.args and {key}.params must be objects; got {v!r:.200}")
            samplers[key] = SamplerSpec(v["name"], _freeze(dict(a)), _freeze(dict(p)))
        elif key.endswith("_normalization"):
            mean, std = (v.get("mean"), v.get("std")) if isinstance(v, Mapping) else (None, None)
            ok = isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) > 0
            if not ok or not all(isinstance(x, (int, float)) for x in mean + std) or min(std) <= 0:
                raise ConfigError(
                    f"{where}: {key} must hold equal-length 'mean' and positive 'std' lists; got {v!r:.200}"
                )
            norms[key] = Normalization(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    return samplers, norms


def resolve_pipeline(
    source: str | os.PathLike = DEFAULT_REPO,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
    progress: bool = True,
    config_file: str = PIPELINE_FILE,
    roles: Iterable[str] | None = None,
    dinov3: bool = True,
    verify: bool = True,
    revision: str | None = None,
    etag_timeout: float = 5.0,
    endpoint: str | None = None,
) -> PipelineFiles:
    """Locate every file of a pipeline; download missing ones from Hugging Face if allowed.

    source:       a local folder holding ``config_file``, or a Hugging Face repo id (default the official one).
    cache_dir:    Hugging Face cache folder (None = HF_HUB_CACHE).
    local_dir:    download into this folder instead, in the local layout this function reads back (the source
                  repo at its root, another repo's files under ``<repo name>/``, DINOv3 under ``dinov3/``), so
                  the folder can be passed as ``source`` later (e.g. ComfyUI's models folder).
    allow_download: False = local files and the cache only. progress: huggingface_hub's download bars.
    config_file:  "pipeline.json" or "texturing_pipeline.json".
    roles:        model roles to resolve (None = all in the file); dinov3: also resolve the DINOv3 folder.
    verify:       validate every safetensors header now (a truncated download fails here, not mid-run).
    revision:     revision of ``source`` when it is a repo id (None = the pinned one for official repos).
    etag_timeout: seconds to wait for the Hub (connection probe and metadata); endpoint: Hub mirror URL.
    Raises CheckpointError listing every missing file and where to put it; ConfigError for a malformed file.
    """
    fetcher = Fetcher(
        cache_dir=cache_dir,
        allow_download=allow_download,
        progress=progress,
        etag_timeout=etag_timeout,
        endpoint=endpoint,
    )
    source_str = os.fspath(source)
    folder = Path(source_str).expanduser()
    dl = Path(os.path.abspath(local_dir)) if local_dir is not None else None
    # Where to tell the user to put a file that could not be found: the download folder, else a placeholder.
    base = dl if dl is not None else Path("<folder>")
    if folder.is_dir():
        # abspath, not resolve(): the sibling lookup must follow a symlinked models folder, not its target.
        root, repo = Path(os.path.abspath(folder)), None
        config_path = root / config_file
        if not config_path.is_file():
            raise CheckpointError(
                f"{root} has no {config_file}: expected the official layout ({config_file}, ckpts/<name>.json + "
                f".safetensors). Download {DEFAULT_REPO} from https://huggingface.co/{DEFAULT_REPO} into this folder, "
                "or pass the repo id to download it automatically"
            )
    elif _REPO_ID.match(source_str) and not folder.exists():
        root, repo = None, source_str
        revision = revision or PINNED_REVISIONS.get(repo)
        config_path = fetcher.fetch(repo, config_file, revision, base / config_file, dl)
        if config_path is None:
            official = repo == DEFAULT_REPO and config_file == PIPELINE_FILE
            raise _missing_error(source_str, fetcher, official, dinov3, base)
    else:
        raise CheckpointError(
            f"pipeline source {source_str!r} is neither an existing folder nor a Hugging Face repo id "
            f"(like {DEFAULT_REPO!r}); pass the folder that holds {config_file}, or a repo id"
        )

    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e}); delete it and download again") from e
    where = str(config_path)
    args = data.get("args") if isinstance(data, dict) else None
    if not isinstance(args, dict) or not isinstance(args.get("models"), dict):
        raise ConfigError(
            f"{where}: expected {{'name': ..., 'args': {{'models': {{role: path}}, ...}}}}; got {data!r:.200}"
        )
    all_models = args["models"]
    wanted = list(all_models) if roles is None else list(roles)
    unknown = sorted(set(wanted) - set(all_models))
    if unknown:
        raise ConfigError(f"roles: {unknown} are not in {where}; it has {sorted(all_models)}")
    samplers, norms = _parse_entries(args, where)

    models: dict[str, ModelFiles] = {}
    for role in wanted:
        ext_repo, sub, name = _split_model_path(role, all_models[role], where)
        files = (f"{name}.json", f"{name}.safetensors")
        short = ext_repo.split("/")[1] if ext_repo else ""
        if root is not None and ext_repo is None:
            found = _first_complete([root / sub], files)
            if found is None:
                fetcher.problems.append(f"{role}: {root / sub / files[0]} and/or {files[1]} are missing")
                fetcher.needed += [str(root / sub / f) for f in files]
                continue
        elif root is not None:
            candidates = [root / ext_repo / sub, root / short / sub, root.parent / short / sub, root / "ckpts"]
            found = _first_complete(candidates, files)
        else:
            found = None
        if found is not None:
            models[role] = ModelFiles(role, name, all_models[role], found / files[0], found / files[1])
            continue
        from_repo, rev = (ext_repo, PINNED_REVISIONS.get(ext_repo)) if ext_repo else (repo, revision)
        target = (dl / short) if (dl is not None and ext_repo) else dl
        place = (root / short / sub) if (root is not None and dl is None) else (base / short / sub)
        got = [fetcher.fetch(from_repo, f"{sub}/{f}" if sub else f, rev, place / f, target) for f in files]
        if None not in got:
            models[role] = ModelFiles(role, name, all_models[role], got[0], got[1])

    dinov3_path = None
    cond = args.get("image_cond_model")
    if dinov3 and isinstance(cond, Mapping):
        dino_repo = str((cond.get("args") or {}).get("model_name", DINOV3_REPO))
        if root is not None:
            candidates = [root / "dinov3", root / dino_repo, root.parent / dino_repo.split("/")[-1]]
            dinov3_path = _first_complete(candidates, DINOV3_FILES)
        if dinov3_path is None:
            place = (root / "dinov3") if (root is not None and dl is None) else (base / "dinov3")
            target = dl / "dinov3" if dl is not None else None
            rev = PINNED_REVISIONS.get(dino_repo)
            got = [fetcher.fetch(dino_repo, f, rev, place / f, target) for f in DINOV3_FILES]
            dinov3_path = got[0].parent if None not in got else None

    if fetcher.problems:
        raise _missing_error(source_str, fetcher, False, dinov3, base)
    if verify:
        for m in models.values():
            read_safetensors_header(m.weights_path)
        if dinov3_path is not None:
            read_safetensors_header(dinov3_path / "model.safetensors")
    log.info("resolved %s from %s: %d models, dinov3=%s", config_file, source_str, len(models), dinov3_path)
    return PipelineFiles(
        source=source_str,
        root=root if root is not None else dl,
        config_path=config_path,
        name=str(data.get("name", "")),
        models=MappingProxyType(models),
        samplers=MappingProxyType(samplers),
        normalizations=MappingProxyType(norms),
        dinov3_path=dinov3_path,
        args=_freeze(args),
    )


def _missing_error(source: str, fetcher: Fetcher, list_official: bool, dinov3: bool, base: Path) -> CheckpointError:
    needed = list(fetcher.needed)
    if list_official:  # pipeline.json itself is missing: say what the official snapshot holds
        for path in OFFICIAL_MODELS.values():
            repo, sub, name = _split_model_path("", path, "")
            folder = base / (repo.split("/")[1] if repo else "") / sub
            needed += [str(folder / f"{name}.json"), str(folder / f"{name}.safetensors")]
        if dinov3:
            needed += [str(base / "dinov3" / f) for f in DINOV3_FILES]
    elif any(p.endswith((PIPELINE_FILE, TEXTURING_FILE)) for p in needed):
        needed.append(f"{base / 'ckpts'}/<name>.json + .safetensors for every model the pipeline file names")
    lines = "\n".join(f"  - {p}" for p in fetcher.problems)
    files = "\n".join(f"  {p}" for p in needed)
    fix = "Fix: solve the problems above and retry, or put these files exactly there" + (
        " (<folder> = a folder of your choice; then pass that folder as the source)"
        if any("<folder>" in p for p in needed)
        else ""
    )
    return CheckpointError(f"cannot resolve the TRELLIS.2 pipeline from {source}:\n{lines}\n{fix}:\n{files}")


__all__ = [
    "DEFAULT_REPO",
    "DINOV3_REPO",
    "OFFICIAL_MODELS",
    "PIPELINE_FILE",
    "TEXTURING_FILE",
    "ModelFiles",
    "Normalization",
    "PipelineFiles",
    "SamplerSpec",
    "resolve_pipeline",
]
