"""agpipe: genome-scale batch prediction with AlphaGenome."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `agpipe.open` is loaded on first use, so `import agpipe` (and the CLI's start) stays light.
    if name == "open":
        from agpipe.io.results import open_run

        return open_run
    raise AttributeError(f"module 'agpipe' has no attribute {name!r}")
