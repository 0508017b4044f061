"""The error every user-facing input problem raises (config keys, files, model directories)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the file/line or dotted key and the fix."""
