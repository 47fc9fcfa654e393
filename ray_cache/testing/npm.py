"""Node servers for the test bench, installed with npm on first use (only Node and npm needed).

Each package goes into its own npm prefix: ``$<ENV VAR>`` if set, else
``<repository>/.cache/<name>`` in a checkout, else ``~/.cache/ray_cache/<name>``; later
runs reuse it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

from ray_cache.testing.s3server import ManagedProcess


def default_prefix(name: str, env_var: str) -> Path:
    """Where ``name`` is installed unless the caller says otherwise."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / ".cache" / name
    return Path.home() / ".cache" / "ray_cache" / name


def ensure_npm_package(package: str, version: str, executable: str, prefix: Path,
                       timeout: float = 600.0) -> str:
    """Path of ``executable`` from ``package@version`` under ``prefix``, installing it if needed.

    Examples
    --------
    >>> ensure_npm_package("s3rver", "3.7.1", "s3rver", default_prefix("s3rver", "X"))  # doctest: +SKIP
    '/path/to/repo/.cache/s3rver/node_modules/.bin/s3rver'
    """
    exe = prefix / "node_modules" / ".bin" / executable
    if exe.exists():
        return str(exe)
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm not found: Node.js and npm are needed to install {package}")
    prefix.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--prefix", str(prefix), f"{package}@{version}",
         "--no-audit", "--no-fund", "--loglevel=error"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )
    if done.returncode != 0 or not exe.exists():
        raise RuntimeError(f"npm install {package}@{version} failed:\n{done.stderr[-4000:]}")
    return str(exe)


class NodeServer(ManagedProcess):
    """A server from an npm package on ``127.0.0.1`` and a free port, its data in a
    temporary directory removed at :meth:`stop`. Subclasses name the package and build
    the command line (:meth:`_command`)."""

    #: ``(package, version, executable, install-dir environment variable)``.
    npm: tuple = ("", "", "", "")

    def __init__(self, port: Optional[int] = None, install_dir: Optional[os.PathLike] = None,
                 start_timeout: float = 60.0) -> None:
        super().__init__(port, start_timeout)
        self.install_dir = install_dir
        self._location: Optional[str] = None

    def executable(self, timeout: float = 600.0) -> str:
        """The server's executable, installed with npm if needed (within ``timeout`` s)."""
        package, version, executable, env_var = self.npm
        prefix = Path(self.install_dir) if self.install_dir is not None else default_prefix(package, env_var)
        return ensure_npm_package(package, version, executable, prefix, timeout)

    def _command(self, exe: str, location: str) -> List[str]:
        raise NotImplementedError

    def start(self) -> "NodeServer":
        """Install the package if needed, start the server and wait until it answers HTTP."""
        if self._proc is not None:
            return self
        exe = self.executable()
        name = self.npm[0]
        self._location = tempfile.mkdtemp(prefix=f"{name}-")
        proc = self._spawn(self._command(exe, self._location), f"{name}_", stdin=subprocess.DEVNULL)
        self._wait_until_up(proc, name, interval=0.1)
        return self

    def stop(self) -> None:
        """Stop the server by its pid and remove its data directory."""
        super().stop()
        if self._location:
            shutil.rmtree(self._location, ignore_errors=True)
            self._location = None
