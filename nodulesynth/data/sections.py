"""World-space nodule annotations → their cross-sections on one axial slice of a CT grid.

This is where annotations meet the scan's geometry (``CTVolume``); the mask builder
(``masks.semantic``) then works in that slice's pixels only, with no knowledge of CT files.
"""
from __future__ import annotations

import math

from ..masks.semantic import SliceNodule
from .ct import CTVolume
from .records import Nodule


def nodules_in_slice(ct: CTVolume, k: int, nodules: list[Nodule], min_radius_mm: float = 0.75) -> list[SliceNodule]:
    """Cross-sections of ``nodules`` with axial slice ``k`` of ``ct`` (same grid the mask is built on).
    Contoured nodules contribute the outlines drawn on this slice (|Δz| < half the slice spacing);
    spheres their circle, if it is at least ``min_radius_mm``."""
    z = float(ct.slice_z_mm()[k])
    half = ct.spacing[0] / 2.0
    out = []
    for n in nodules:
        c_vox = ct.world_to_voxel(n.center_xyz_mm)
        if n.contours:
            polys = [(c.points_xy, c.inclusion, c.reader) for c in n.contours if abs(c.z_mm - z) < half]
            if not polys:
                continue
            r = n.radius_mm
            out.append(SliceNodule((float(c_vox[1]), float(c_vox[2])), (r / ct.spacing[1], r / ct.spacing[2]),
                                   polys, int(n.characteristics.get("n_readers", 1))))
        else:
            dz = (k - c_vox[0]) * ct.spacing[0]
            r2 = n.radius_mm**2 - dz**2
            if r2 < min_radius_mm**2:
                continue
            r = math.sqrt(r2)
            out.append(SliceNodule((float(c_vox[1]), float(c_vox[2])), (r / ct.spacing[1], r / ct.spacing[2])))
    return out
