"""The resource model and its parsers (see model.py, parse.py)."""

from tulle.resources.model import *  # noqa: F401,F403
from tulle.resources.parse import ManifestError, load_dir, load_file, parse_duration_ms, parse_object  # noqa: F401
