"""One error type for bad data inputs, so the CLI and the loader can print one line naming the file."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A problem with a data file or data setting; the message is one line and names the file or key."""


def read_yaml(path: str | Path, what: str):
    """The parsed YAML/JSON of ``path``; unreadable or invalid files are a one-line DataError
    naming the file (``what`` says which input it is: 'label rules', '--label-map')."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise DataError(f"{what} {path}: invalid YAML/JSON ({str(exc).splitlines()[0]})") from None
