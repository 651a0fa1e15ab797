"""Data pipeline: raw panoptic readers, compact per-image targets, Ray preprocessing into WebDataset shards,
and augmenting streams that build the three tasks' targets."""

from pipeline.data.settings import DatasetSettings, PreprocessSettings, SplitPaths, StreamSettings

__all__ = ["DatasetSettings", "PreprocessSettings", "SplitPaths", "StreamSettings"]
