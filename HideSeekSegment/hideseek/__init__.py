"""HideSeekSegment engine: Hide-and-Seek Attribution for vertebral metastases in CT (importable without Slicer)."""

__version__ = "0.1.0"
