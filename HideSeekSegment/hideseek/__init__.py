"""HideSeekSegment engine: Hide-and-Seek Attribution for vertebral metastases in CT (importable without Slicer).

The library API is ``hideseek.segment_ct`` (pipeline.py); it is imported on first use so that the command line
starts without loading torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "segment_ct"]


def __getattr__(name: str):
    if name == "segment_ct":
        from .pipeline import segment_ct

        return segment_ct
    raise AttributeError(f"module 'hideseek' has no attribute {name!r}")
