"""Call-time backend choice shared by the kernels (STYLE.md item 6).

Order, resolved on every call and never at import: the ``backend=`` argument, then the innermost ``use(...)``
context (thread-local, nestable), then an environment variable read at call time, then "auto". Values: "auto",
"torch" (alias "reference"), "triton". Triton is imported only when a call asks for it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Iterator

BACKENDS = ("auto", "torch", "reference", "triton")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (missing package, wrong device or layout)."""


class BackendSwitch:
    """The backend in force for one kernel family. ``what`` names it in messages; ``package`` holds ``.triton``."""

    def __init__(self, what: str, env_var: str, package: str):
        self.what, self.env_var, self.package = what, env_var, package
        self._local = threading.local()

    def normalise(self, name: str, where: str) -> str:
        value = str(name).strip().lower()
        if value not in BACKENDS:
            raise ValueError(f"{where}: {self.what} backend must be one of {list(BACKENDS)}; got {name!r}")
        return "torch" if value == "reference" else value

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Within this block, calls without ``backend=`` use ``name``."""
        value = self.normalise(name, "use_backend(name)")
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(value)
        try:
            yield
        finally:
            stack.pop()

    def requested(self, backend: str | None = None) -> str:
        """The backend name in force for a call: argument > context > env var > "auto" (not yet resolved)."""
        if backend is not None:
            return self.normalise(backend, "backend argument")
        stack = getattr(self._local, "stack", None)
        if stack:
            return stack[-1]
        env = os.environ.get(self.env_var, "").strip()
        if env:
            return self.normalise(env, f"environment variable {self.env_var}")
        return "auto"

    def triton_module(self, required: bool):
        """The family's triton module, or None (auto) / BackendUnavailableError (explicit) when triton is missing."""
        try:
            return importlib.import_module(".triton", self.package)
        except ImportError as exc:
            if required:
                raise BackendUnavailableError(
                    f"{self.what} backend 'triton' was requested but triton cannot be imported ({exc}); install the "
                    f"'cuda' extra (pip install triton) or choose backend 'torch' / unset {self.env_var}"
                ) from exc
            return None

    def triton_wanted(self, x, name: str, dtypes: tuple) -> bool:
        """For a call on tensor ``x`` under the resolved backend ``name``: whether to try Triton. "torch": no;
        "auto": only for CUDA tensors of ``dtypes``; "triton": yes, after raising ``needs_cuda`` off CUDA."""
        if name == "torch":
            return False
        if name == "auto":
            return x.device.type == "cuda" and x.dtype in dtypes
        if x.device.type != "cuda":
            raise self.needs_cuda(x.device)
        return True

    def needs_cuda(self, device) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"{self.what} backend 'triton' needs CUDA tensors; got tensors on '{device}'. Move them to a CUDA "
            f"device or choose backend 'torch' (the CPU/MPS path)"
        )
