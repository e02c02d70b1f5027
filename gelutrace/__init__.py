"""Tracing influential GELU neurons of GPT-2-family models: the library behind the stage scripts."""


class PipelineError(Exception):
    """Bad input or an unmet precondition: the scripts print its message as one line and exit non-zero."""
