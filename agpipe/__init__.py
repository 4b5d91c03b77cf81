"""agpipe: genome-scale batch prediction with AlphaGenome."""

__version__ = "0.1.0"
