"""Single-file downloads from the Hugging Face Hub that fail fast and explain themselves.

``Fetcher.fetch`` wraps ``huggingface_hub.hf_hub_download`` and never raises: it returns the local path, or
records the problem (gated repo, unknown repo or file, offline, unreachable Hub) and the place where the user
can put the file instead, so that ``weights.resolve_pipeline`` reports every missing file at once.

Fail-fast rules: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are read at call time (huggingface_hub reads
them once at import); a pinned commit's files are taken from the cache without contacting the Hub; before the
first download one TCP connect probes the Hub (huggingface_hub itself retries a refused connection with
backoff for ~25 s per file), and after a failure every further file is looked up in the cache only; after a
401/403 for a repo its other files are not requested again.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_LOGIN = "run `huggingface-cli login` (`hf auth login` in newer huggingface_hub) or set HF_TOKEN"
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


class Fetcher:
    """Downloads single files through huggingface_hub, collecting every problem instead of raising at once."""

    def __init__(self, *, cache_dir, allow_download: bool, progress: bool, etag_timeout: float, endpoint: str | None):
        self.cache_dir = cache_dir
        self.allow_download = allow_download
        self.progress = progress
        self.etag_timeout = etag_timeout
        self.endpoint = endpoint
        # Read at call time (a user may set it after importing us); huggingface_hub reads it at its import.
        self.offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
        self.network_down = False  # after one connection failure, use the cache only: no more timeouts
        self.network_reason = ""
        self.problems: list[str] = []
        self.needed: list[str] = []
        self._refused_repos: set[str] = set()
        self._probed = False

    def fetch(
        self, repo: str, filename: str, revision: str | None, place_at: Path, local_dir: Path | None
    ) -> Path | None:
        """Local path of ``repo/filename`` (cache, or download into the cache or ``local_dir``), or None after
        recording why and where to put it (``place_at``)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        kwargs: dict[str, Any] = {"etag_timeout": self.etag_timeout, "cache_dir": self.cache_dir, "revision": revision}
        if not self.progress:
            kwargs["tqdm_class"] = _silent_tqdm()
        if self.endpoint is not None:
            kwargs["endpoint"] = self.endpoint
        if local_dir is not None:
            kwargs["local_dir"] = local_dir
        local_only = self.offline or not self.allow_download or repo in self._refused_repos
        if not local_only and revision is not None and _COMMIT.match(revision):
            # A pinned commit's cached files never change: use them without contacting the Hub.
            try:
                return Path(hf_hub_download(repo, filename, local_files_only=True, **kwargs))
            except LocalEntryNotFoundError:
                pass
        if not local_only and not self._probed:
            self._probed = True
            reason = _hub_unreachable(self.endpoint, self.etag_timeout)
            if reason is not None:
                # huggingface_hub retries a failed connection with backoff for ~25 s per file; fail fast instead.
                self.network_down, self.network_reason = True, reason
                log.warning("Hugging Face Hub unreachable (%s); using the local cache only", reason)
        local_only = local_only or self.network_down
        repo_refused = False  # auth problems are per repo: do not ask again for its other files
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=local_only, **kwargs))
        except GatedRepoError:
            repo_refused = True
            why = f"{repo} is gated: accept its licence at https://huggingface.co/{repo}, then {_LOGIN}"
        except RepositoryNotFoundError:
            repo_refused = True
            why = (
                f"repository {repo} was not found or is private/gated (HTTP 401): check the name, accept its "
                f"licence at https://huggingface.co/{repo} if it is gated, and {_LOGIN}"
            )
        except RevisionNotFoundError:
            why = f"revision {revision} of {repo} does not exist"
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
            if self.offline:
                why = "offline (HF_HUB_OFFLINE is set; unset it to download) and not in the Hugging Face cache"
            elif not self.allow_download:
                why = "downloads are disabled (allow_download=False) and the file is not in the Hugging Face cache"
            elif repo in self._refused_repos:
                why = "not in the Hugging Face cache (access to the repo was refused, see above)"
            else:
                if not self.network_down:
                    self.network_down, self.network_reason = True, str(e).split("\n")[0]
                    log.warning("Hugging Face Hub unreachable (%s); using the local cache only", e)
                why = (
                    f"the Hugging Face Hub could not be reached ({self.network_reason}; check the connection, proxy "
                    "or HF_ENDPOINT) and the file is not in the Hugging Face cache"
                )
        except EntryNotFoundError:
            why = f"{repo} has no file {filename} (at revision {revision or 'main'})"
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            repo_refused = status in (401, 403)
            if repo_refused:
                why = (
                    f"access to {repo} was refused (HTTP {status}): accept its licence at "
                    f"https://huggingface.co/{repo}, then {_LOGIN}"
                )
            else:
                why = f"download failed: {e}"
        except OSError as e:  # disk full, permissions, ... while writing the cache
            why = f"download failed: {e}"
        if repo_refused:
            self._refused_repos.add(repo)
        self.problems.append(f"{repo}/{filename}: {why}")
        self.needed.append(str(place_at))
        return None


def _hub_unreachable(endpoint: str | None, timeout: float) -> str | None:
    """Why the Hub cannot be reached (one TCP connect), or None. Skipped behind a proxy: it may reach what we cannot."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(endpoint or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as e:  # refused, DNS failure, timeout
        return f"cannot connect to {url.hostname}:{port}: {e}"
    return None


def _silent_tqdm():
    from tqdm.auto import tqdm

    class _Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)

    return _Silent
