"""Typed nodule annotations shared by the LUNA16 and LIDC-IDRI readers."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Largest plausible nodule: lesions > 30 mm are masses, and LIDC/LUNA16 hold none near 100 mm; a
# larger annotation is a unit or coordinate error and would label most of a slice as "nodule".
MAX_DIAMETER_MM = 100.0


@dataclass
class Contour:
    """One outline on one axial slice: LIDC ``roi`` edgeMap points in pixel (col, row) of that slice.
    ``inclusion=False`` marks a hole to cut out of the nodule; ``reader`` tells readers apart once
    several readers' contours are merged into one consensus nodule."""

    z_mm: float
    points_xy: np.ndarray  # (N, 2) float, pixel (col, row)
    inclusion: bool = True
    reader: str | None = None


@dataclass
class Nodule:
    """A nodule in world millimetres (LPS x, y, z), the way LUNA16's annotations.csv gives it."""

    series_uid: str
    center_xyz_mm: tuple[float, float, float]
    diameter_mm: float
    contours: list[Contour] = field(default_factory=list)
    reader: str | None = None
    characteristics: dict = field(default_factory=dict)

    @property
    def radius_mm(self) -> float:
        return float(self.diameter_mm) / 2.0

    @property
    def z_range_mm(self) -> tuple[float, float]:
        """Axial extent: contoured z positions if any, else the sphere's."""
        if self.contours:
            zs = [c.z_mm for c in self.contours]
            return float(min(zs)), float(max(zs))
        z = float(self.center_xyz_mm[2])
        return z - self.radius_mm, z + self.radius_mm
