"""Where the CLI finds the operator's key and the local fleet that ``mqfleet up`` made.

``mqfleet up`` keeps its accounts' side of things in ``<user data dir>/mqfleet/up/``: the
operator's config file (broker URL with the operator token, key, password file) that the
CLI reads when no other config file is in use, so ``mqfleet nodes`` and ``mqfleet run``
work right after ``up`` without typing a token.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from mqfleet.settings import default_config_file, default_data_dir

if TYPE_CHECKING:
    from pathlib import Path

    from mqfleet.settings import Settings

__all__ = [
    "OPERATOR_KEY_NAME",
    "default_operator_key_file",
    "fallback_config_file",
    "local_fleet_dir",
    "operator_config_file",
    "operator_private_key_file",
    "public_key_file_for",
]

#: File name of the operator's private key made by ``mqfleet keys init``.
OPERATOR_KEY_NAME: Final = "operator.key"


def local_fleet_dir() -> Path:
    """Directory of ``mqfleet up``'s operator config and public key."""
    return default_data_dir() / "up"


def operator_config_file() -> Path:
    """Return the operator config file ``mqfleet up`` writes (0600: it holds a token)."""
    return local_fleet_dir() / "operator.toml"


def default_operator_key_file() -> Path:
    """Where ``mqfleet keys init`` puts the operator's private key by default."""
    return default_config_file().parent / OPERATOR_KEY_NAME


def public_key_file_for(private_key_file: Path) -> Path:
    """Return the public key file of ``private_key_file`` (same name, ``.pub``)."""
    return private_key_file.with_suffix(".pub")


def operator_private_key_file(settings: Settings) -> Path | None:
    """Return the key ``run`` signs with: the configured one, else ``keys init``'s."""
    if settings.operator_private_key_file is not None:
        return settings.operator_private_key_file
    default = default_operator_key_file()
    return default if default.is_file() else None


def fallback_config_file() -> Path | None:
    """``mqfleet up``'s operator config, when no other config file would be read."""
    if os.environ.get("MQFLEET_CONFIG") or default_config_file().is_file():
        return None
    path = operator_config_file()
    return path if path.is_file() else None
