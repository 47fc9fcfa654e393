"""A real Azure Blob Storage emulator (Azurite, from npm) on loopback.

Azurite is a Node package; :func:`ensure_azurite` installs it on first use with
``npm install --prefix <dir> azurite@3.37.0`` (about 20 s; only Node and npm are needed),
into ``$RAY_CACHE_AZURITE_DIR`` or ``<repository>/.cache/azurite``, and reuses it after.
Clients (adlfs, azure-storage-blob) connect with the well-known development account
``devstoreaccount1``, whose key is public and documented by Microsoft.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

from ray_cache.testing.npm import NodeServer

__all__ = ["AzuriteServer", "ensure_azurite", "AZURITE_VERSION", "ACCOUNT"]

AZURITE_VERSION = "3.37.0"
ACCOUNT = "devstoreaccount1"
# The emulator's fixed, publicly documented development key (not a secret).
_DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


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
    return AzuriteServer(install_dir=install_dir).executable(timeout)


class AzuriteServer(NodeServer):
    """Azurite's Blob service on ``127.0.0.1`` and a free port, data in a temp directory.

    Examples
    --------
    >>> with AzuriteServer() as az:  # doctest: +SKIP
    ...     az.create_container("data")
    ...     fs = adlfs.AzureBlobFileSystem(**az.storage_options())
    """

    _probe_path = f"/{ACCOUNT}?comp=list"
    npm = ("azurite", AZURITE_VERSION, "azurite-blob", "RAY_CACHE_AZURITE_DIR")

    def _command(self, exe: str, location: str) -> List[str]:
        return [exe, "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                "--location", location, "--silent", "--skipApiVersionCheck"]

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
