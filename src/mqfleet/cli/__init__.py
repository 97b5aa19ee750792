"""The ``mqfleet`` command line."""


def main() -> None:
    """Console entry point (placeholder until the CLI lands)."""
    raise SystemExit("mqfleet: CLI not built yet")
