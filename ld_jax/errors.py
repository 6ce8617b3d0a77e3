"""The one exception type users see as a one-line message instead of a traceback."""


class LdJaxError(Exception):
    """Bad input or environment: the CLI prints `ld-jax: error: <message>` and exits with 2."""
