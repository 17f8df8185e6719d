"""Errors the tool reports as one line (no traceback unless --debug)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler ending the job, ``kill``), handled like Ctrl-C: finished files are kept for
    --resume and nothing appears at the destination."""


class MMConvertError(Exception):
    """Base class: the message names the file, key or option at fault and what was expected."""


class LayoutError(MMConvertError):
    """A parallel layout that does not fit the model or is malformed."""


class ConfigError(MMConvertError):
    """A missing or unsupported model config."""


class CheckpointError(MMConvertError):
    """A checkpoint file or tensor that is missing, corrupt, or not what the config says."""


class DataError(MMConvertError):
    """Training data that cannot be used: one line per bad sample, naming the data file, index and id."""


class VerifyError(MMConvertError):
    """Two checkpoints that should hold the same tensors do not."""


def load_json_object(path, error: type[MMConvertError]) -> dict:
    """A JSON file holding an object, or ``error`` with a one-line message naming the file."""
    import json
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})")
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object")
    return doc
