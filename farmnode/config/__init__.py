"""Config: the agent's settings (`Config`), where they come from and how they are checked.

Owns /etc/farmnode/farmnode.yaml, its conf.d drop-ins and `--set key=value` overrides.
May import: the standard library, PyYAML, farmnode.pathmap (the path-mapping rules' syntax)
and farmnode.describe (values in error messages), both standard library only, only. Every
other package may import this one.
"""

from farmnode.config.loader import (
    COMMAND_LINE,
    DEFAULT_PATH,
    ConfigError,
    load_config,
    parse_override,
)
from farmnode.config.model import REDACTED, SECRET_KEYS, SETTINGS, Config, redacted

__all__ = [
    "COMMAND_LINE",
    "DEFAULT_PATH",
    "REDACTED",
    "SECRET_KEYS",
    "SETTINGS",
    "Config",
    "ConfigError",
    "load_config",
    "parse_override",
    "redacted",
]
