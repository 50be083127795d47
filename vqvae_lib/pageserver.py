"""Serve a notebook as a Voilà page on the loopback interface, and open pages in headless Chromium.

`serve` starts Voilà bound to 127.0.0.1 on a free port with a random token, waits until it listens and, on
leaving the `with` block (normally or by an exception), stops it and the kernels it started; `run_server` does
the same for any server command (the tests start JupyterLab with it). The token reaches the server in its
environment (JUPYTER_TOKEN, which Jupyter Server's IdentityProvider reads), never on its command line, which
every local user can read with `ps`. `chromium` launches a Chromium or Chrome installed on this machine
(`find_chromium`) through Playwright; no browser is ever downloaded. Linux, macOS and Windows.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from playwright.sync_api import Browser

HOST = "127.0.0.1"
POSIX = os.name == "posix"  # process groups and signals; else Windows
TOKEN_ENV = "JUPYTER_TOKEN"
CHROMIUM_ENV = "CHROMIUM"  # the browser's executable, where it is not found on its own
_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_BROWSER_PATHS = ("/Applications/Chromium.app/Contents/MacOS/Chromium",
                  "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
                  r"C:\Program Files\Google\Chrome\Application\chrome.exe",
                  r"C:\Program Files (x86)\Google\Chrome\Application\chrome.exe")
INSTALL_CHROMIUM = ("install Chromium (Debian/Ubuntu: `sudo apt-get install chromium`; macOS: `brew install --cask "
                    "chromium`; Windows: Google Chrome) or set CHROMIUM to a Chromium or Chrome executable")
# Headless, and quiet on a closed network: without the background-networking flags Chromium keeps opening
# connections to Google's services, which this machine refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass(frozen=True)
class Server:
    """A running Voilà server: `url` opens the page (token included), `base` is http://127.0.0.1:PORT/."""

    base: str
    token: str
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"{self.base}?token={self.token}"


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on `host` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def voila_command(notebook: Path, port: int) -> list[str]:
    """The Voilà command line: loopback only, this port and no other, no browser, no code shown, and a token
    required. The token is not on it: with `auto_token` Voilà takes the IdentityProvider's default, which is
    $JUPYTER_TOKEN when set (`serve` sets it; Voilà makes up a random one otherwise)."""
    return [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--Voila.ip={HOST}",
            f"--port={port}", "--Voila.port_retries=0", "--Voila.auto_token=True", "--strip_sources=True",
            "--show_tracebacks=False"]


def showing(secret: str) -> list[psutil.Process]:
    """The processes whose command line, as any local user sees it in `ps`, contains `secret`."""
    found = []
    for process in psutil.process_iter():
        try:
            if any(secret in arg for arg in process.cmdline()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _signal(process: subprocess.Popen, hard: bool) -> None:
    """SIGTERM (hard: SIGKILL) to the process group of a server started in its own session; on Windows, which
    has no process groups to signal, terminate the process itself (its children are stopped by `stop`)."""
    if POSIX:
        os.killpg(process.pid, signal.SIGKILL if hard else signal.SIGTERM)
    elif hard:
        process.kill()
    else:
        process.terminate()


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a server started by `run_server`: terminate it (its process group on Linux and macOS), kill it after
    `grace` seconds; then the same for any child left over (Jupyter starts each kernel in a process group of
    its own)."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for hard in (False, True):
        if process.poll() is not None:
            break
        try:
            _signal(process, hard)
        except ProcessLookupError:
            break
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            continue
    process.wait()
    alive = [c for c in children if c.is_running()]
    for child in alive:
        child.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for child in alive:
        child.kill()


@contextmanager
def run_server(command: list[str], port: int, *, env: dict[str, str] | None = None, log: IO | None = None,
               timeout: float = 120.0) -> Iterator[subprocess.Popen]:
    """Start a server `command` in a session of its own, wait until something listens on 127.0.0.1:`port`, and
    stop it (`stop`) when the block ends, whether normally or by an exception.

    env: extra environment variables. log: a file for the server's output (default: this process's). Raises
    RuntimeError, with the log's tail when it is a file, if the server exits or does not listen within
    `timeout` seconds.
    """
    own_group = ({"start_new_session": True} if POSIX
                 else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP})
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT if log else None, **own_group)
    try:
        deadline = time.monotonic() + timeout
        while not _listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with code {process.returncode}" if process.poll() is not None
                       else f"did not listen on {HOST}:{port} within {timeout:.0f} s")
                raise RuntimeError(f"{' '.join(command[:4])} ... {why}{_tail(log)}")
            time.sleep(0.2)
        yield process
    finally:
        stop(process)


@contextmanager
def serve(notebook: str | Path, *, port: int | None = None, env: dict[str, str] | None = None,
          log: IO | None = None, timeout: float = 120.0) -> Iterator[Server]:
    """Serve `notebook` (.ipynb) with Voilà on 127.0.0.1 (port default: a free one) with a random token (passed
    in the server's environment) until the block ends; yields the Server. env, log, timeout: see `run_server`."""
    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} not found")
    port = free_port() if port is None else port
    token = secrets.token_hex(24)
    env = {**(env or {}), TOKEN_ENV: token}
    with run_server(voila_command(notebook, port), port, env=env, log=log, timeout=timeout) as process:
        yield Server(base=f"http://{HOST}:{port}/", token=token, process=process)


def _tail(log: IO | None, n: int = 3000) -> str:
    name = getattr(log, "name", None)
    if not isinstance(name, str) or not Path(name).is_file():
        return ""
    log.flush()
    return ":\n" + Path(name).read_text(errors="replace")[-n:]


class BrowserMissing(FileNotFoundError):
    """No Chromium or Chrome on this machine (or CHROMIUM names no file)."""


def find_chromium() -> Path:
    """The browser to drive: $CHROMIUM if set, else a Chromium or Chrome on the PATH or in its usual place."""
    if os.environ.get(CHROMIUM_ENV):
        path = Path(os.environ[CHROMIUM_ENV]).expanduser()
        if not path.is_file():
            raise BrowserMissing(f"{CHROMIUM_ENV}={path} is not a file; {INSTALL_CHROMIUM}")
        return path
    found = [shutil.which(name) for name in _BROWSER_NAMES] + [p for p in _BROWSER_PATHS if Path(p).is_file()]
    if not any(found):
        raise BrowserMissing(f"no Chromium or Chrome found; {INSTALL_CHROMIUM}")
    return Path(next(p for p in found if p))


@contextmanager
def chromium(executable: Path | None = None) -> Iterator[Browser]:
    """A headless Chromium (default: `find_chromium`) driven by Playwright; closed on exit. BrowserMissing if
    there is none."""
    executable = executable or find_chromium()
    if not executable.is_file():
        raise BrowserMissing(f"{executable} not found; {INSTALL_CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
