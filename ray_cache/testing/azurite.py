"""A real Azure Blob Storage emulator (Azurite, from npm) on loopback.

Azurite is a Node package; :func:`ensure_azurite` installs it on first use with
``npm install --prefix <dir> azurite@3.37.0`` (about 20 s; only Node and npm are needed),
into ``$RAY_CACHE_AZURITE_DIR`` or ``<repository>/.cache/azurite``, and reuses it after.
Clients (adlfs, azure-storage-blob) connect with the well-known development account
``devstoreaccount1``, whose key is public and documented by Microsoft.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

from ray_cache.testing.s3server import ManagedProcess

__all__ = ["AzuriteServer", "ensure_azurite", "AZURITE_VERSION", "ACCOUNT"]

AZURITE_VERSION = "3.37.0"
ACCOUNT = "devstoreaccount1"
# The emulator's fixed, publicly documented development key (not a secret).
_DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _default_dir() -> Path:
    env = os.environ.get("RAY_CACHE_AZURITE_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / ".cache" / "azurite"
    return Path.home() / ".cache" / "ray_cache" / "azurite"


def ensure_azurite(install_dir: Optional[os.PathLike] = None, timeout: float = 600.0) -> str:
    """Path of the ``azurite-blob`` executable, installing Azurite with npm if needed.

    Parameters
    ----------
    install_dir : path, optional
        npm prefix to install into (default ``$RAY_CACHE_AZURITE_DIR`` or
        ``<repository>/.cache/azurite``).
    timeout : float
        Seconds the install may take.

    Returns
    -------
    str
        The executable's path.

    Examples
    --------
    >>> ensure_azurite()  # doctest: +SKIP
    '/path/to/repo/.cache/azurite/node_modules/.bin/azurite-blob'
    """
    prefix = Path(install_dir) if install_dir is not None else _default_dir()
    exe = prefix / "node_modules" / ".bin" / "azurite-blob"
    if exe.exists():
        return str(exe)
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found: Node.js and npm are needed to install Azurite")
    prefix.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--prefix", str(prefix), f"azurite@{AZURITE_VERSION}",
         "--no-audit", "--no-fund", "--loglevel=error"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )
    if done.returncode != 0 or not exe.exists():
        raise RuntimeError(f"npm install azurite@{AZURITE_VERSION} failed:\n{done.stderr[-4000:]}")
    return str(exe)


class AzuriteServer(ManagedProcess):
    """Azurite's Blob service on ``127.0.0.1`` and a free port, data in a temp directory.

    Examples
    --------
    >>> with AzuriteServer() as az:  # doctest: +SKIP
    ...     az.create_container("data")
    ...     fs = adlfs.AzureBlobFileSystem(**az.storage_options())
    """

    _probe_path = f"/{ACCOUNT}?comp=list"

    def __init__(self, port: Optional[int] = None, install_dir: Optional[os.PathLike] = None,
                 start_timeout: float = 60.0) -> None:
        super().__init__(port, start_timeout)
        self.install_dir = install_dir
        self._location: Optional[str] = None

    def start(self) -> "AzuriteServer":
        """Install Azurite if needed, start it and wait until it answers HTTP."""
        if self._proc is not None:
            return self
        exe = ensure_azurite(self.install_dir)
        self._location = tempfile.mkdtemp(prefix="azurite-")
        cmd = [exe, "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
               "--location", self._location, "--silent", "--skipApiVersionCheck"]
        proc = self._spawn(cmd, "azurite_", stdin=subprocess.DEVNULL)
        self._wait_until_up(proc, "azurite", interval=0.1)
        return self

    def stop(self) -> None:
        """Stop the server by its pid and remove its data directory."""
        super().stop()
        if self._location:
            shutil.rmtree(self._location, ignore_errors=True)
            self._location = None

    def connection_string(self, endpoint_url: Optional[str] = None) -> str:
        """The development account's connection string, for this server or a proxy before it."""
        blob = f"{(endpoint_url or self.endpoint_url).rstrip('/')}/{ACCOUNT}"
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};"
                f"AccountKey={_DEV_KEY};BlobEndpoint={blob};")

    def storage_options(self, endpoint_url: Optional[str] = None) -> dict[str, Any]:
        """adlfs options: ``{"connection_string": ...}``."""
        return {"connection_string": self.connection_string(endpoint_url)}

    def create_container(self, name: str) -> None:
        """Create a container (adlfs ``mkdir`` of a top-level name does the same)."""
        from azure.storage.blob import BlobServiceClient

        client = BlobServiceClient.from_connection_string(self.connection_string())
        client.create_container(name)
