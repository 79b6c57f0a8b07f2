"""The case record of prediction input (a module of its own, so that the DICOM
reader and the input collection both use it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from medseg.labels import CHANNELS

if TYPE_CHECKING:   # for the annotation only: dicom imports this module
    from medseg.data.dicom import DicomCase

__all__ = ["InputCase"]


@dataclass
class InputCase:
    case_id: str
    images: list[Path]
    channels: list[str]
    #: Label convention of the dataset the case comes from (None: its names do not
    #: tell), and where that was read.
    convention: str | None = None
    convention_source: str = ""
    #: DICOM input (`medseg.data.dicom`): the checked series; `images` are then their folders.
    dicom: DicomCase | None = None
    #: Set by `check_modalities` from the model that will predict the case: whether it
    #: accepts missing modalities (trained with modality dropout; None: no model known
    #: yet) and its name. `check_inputs` then treats a blank modality file as missing
    #: or refuses it.
    accepts_missing: bool | None = None
    predicted_by: str = ""
    #: Raw-study input (`medseg.raw`): `images` are the atlas-space case, `space` maps
    #: `(C, …)` maps on its grid onto the native grid of the reference series →
    #: (maps, that grid's header image), and `record` (identification, QC,
    #: transforms) joins the case's entry in predictions.json. `dicom` then holds the
    #: reference series only (for the DICOM Segmentation).
    space: Callable | None = None
    record: dict | None = None

    @property
    def missing(self) -> list[str]:
        """Modalities (CHANNELS names) the case has no file for."""
        return [c for c in CHANNELS if c not in self.channels]
