"""Helpers of the HideSeekSegment Slicer module that need no Slicer application (only MRML, VTK and numpy):
input export, result import, the out-of-process runner, model cards and dependency handling."""
