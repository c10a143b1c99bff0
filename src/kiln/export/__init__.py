"""Export ahead of time: artifacts (manifest, runtime-layout weights) and registries."""

from kiln.export.manifest import ArtifactManifest, read_manifest, verify_files
from kiln.export.reader import Artifact, open_artifact
from kiln.export.registry import list_artifacts, lookup, pull, push
from kiln.export.writer import ExportOptions, export_artifact

__all__ = [
    "Artifact",
    "ArtifactManifest",
    "ExportOptions",
    "export_artifact",
    "list_artifacts",
    "lookup",
    "open_artifact",
    "pull",
    "push",
    "read_manifest",
    "verify_files",
]
