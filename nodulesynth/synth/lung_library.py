"""Real lung parenchyma for generated lungs: image quilting of real TRAIN lung tiles.

A mask says where the lungs are, not where their vessels run. The lung texture GAN (models.lung_texture)
draws a stationary field of blobs and short segments; cut into 64² windows it scores KID × 1000 ≈ 156
against held-out real lung, where real lung of other patients scores ≈ 1 (README "Real lung tiles").
Quilting real parenchyma (Efros & Freeman, "Image Quilting for Texture Synthesis and Transfer", 2001)
keeps real vessels, fissure fragments and the scanner's noise grain, tile by tile.

The library (``lung_library.npz``, built by ``benchmarks/build_lung_library.py``) holds ``TILE``² tiles at
0.8 mm of nodule-free lung from the LIDC crops of TRAIN patients. Per sample, by its own seed:
- an anchor patient, and the pool of tiles of the ``POOL_PATIENTS`` patients whose lungs look most like
  its own (median HU and noise grain; the builder stores each patient's pool), in all 8 flips/turns: one scan's look per lung, not a patchwork
  of kernels and doses;
- tiles laid on a grid with ``OVERLAP`` px overlaps over the lungs' box, each chosen at random among
  the ``TOP_K`` that best continue what is already laid (sum of squared HU differences on the overlap),
  and cut in along the overlap's minimum-error seam. Tiles keep their own HU: matching the overlap's
  mean instead lets the bright vessels in it lift the next tile, and the quilt drifted ~20 HU denser
  than real lung (README "Real lung tiles"). No tile is laid twice in a field while the pool lasts (real
  lung never repeats itself; the few best continuations otherwise made a third of a lung's cells
  repeats), and never beside its own copy.
The result replaces the lung interior as the texture field does (``models.lung_texture.composite``):
pleura, airway and nodules stay as drawn. A sample stays a pure function of (weights, seed, index): the
grid starts at its own lung box, which its own mask sets.

The quilt is NumPy on the CPU (about 0.1 CPU-s per slice's lungs), so beside a GPU it runs on the LIDC
placement worker processes when there are any (``sample_hu(run=...)``): this module imports no torch
at the top, as those workers import only NumPy and SciPy.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from .library import NpzLibrary

LIBRARY = Path(__file__).with_name("lung_library.npz")
SPACING_MM = 0.8
TILE = 32
OVERLAP = 4
POOL_PATIENTS = 12
TOP_K = 2
FILL_HU = -850.0  # outside the lung box, where the field is never blended in
MODES = ("library", "texture", "translator")  # generate --lungs


def _seam(err: np.ndarray) -> np.ndarray:
    """(rows, cols) error of a vertical overlap → bool mask, True right of the minimum-error path
    (the new tile's side): dynamic programming down the rows, the path moving ≤ 1 column a row."""
    rows, cols = err.shape
    cost = np.full((rows, cols + 2), np.inf)  # an infinite column each side: no path leaves the overlap
    cost[:, 1:-1] = err
    for r in range(1, rows):
        p = cost[r - 1]
        cost[r, 1:-1] += np.minimum(np.minimum(p[:-2], p[1:-1]), p[2:])
    path = np.empty(rows, dtype=np.int64)
    path[-1] = int(np.argmin(cost[-1, 1:-1]))
    for r in range(rows - 2, -1, -1):
        c = path[r + 1]
        path[r] = c - 1 + int(np.argmin(cost[r, c:c + 3]))  # padded columns c..c+2 are columns c-1..c+1
    return np.arange(err.shape[1])[None] >= path[:, None]


class LungLibrary(NpzLibrary):
    """The shipped library of real TRAIN lung tiles (loaded on first use); see the module docstring."""

    KEYS = ("hu", "source", "spacing_mm", "pool")
    WHAT = "lung library"
    BUILDER = "benchmarks/build_lung_library.py"

    def __init__(self, path: str | Path = LIBRARY):
        super().__init__(path)

    def check(self, d: dict[str, np.ndarray]) -> str | None:
        if why := super().check(d):
            return why
        if d["hu"].shape[1:] != (TILE, TILE):
            return f"tiles {d['hu'].shape[1:]}, expected {TILE}²"
        n = len(np.unique(d["source"]))
        if d["pool"].ndim != 2 or len(d["pool"]) != n or d["pool"].size == 0 or not 0 <= d["pool"].min() <= d["pool"].max() < n:
            return f"pool {d['pool'].shape} for {n} patients"
        return None

    @cached_property
    def _patients(self) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """(the patients' sources, sorted; each one's tile indices; each one's pool: the POOL_PATIENTS
        patients whose lungs look most like its own, itself among them, as the builder stored them)."""
        names, inv = np.unique(self._data["source"], return_inverse=True)
        return names, [np.flatnonzero(inv == p) for p in range(len(names))], self._data["pool"].astype(np.int64)

    def anchor(self, seed: int) -> int:
        """The anchor patient (index into the sorted sources) of the sample with this seed."""
        return int(np.random.default_rng(seed).integers(len(self._patients[1])))

    def record(self, seed: int) -> dict:
        """Provenance of one sample's lungs: the library revision and the patients its tiles came from."""
        names, _, near = self._patients
        return {"library": self.revision, "patients": [str(names[p]) for p in near[self.anchor(seed)]]}

    def quilt(self, height: int, width: int, seed: int) -> np.ndarray:
        """(height, width) float32 HU of real lung, at the library's spacing, for the sample ``seed``."""
        rng = np.random.default_rng(seed)
        _, tiles, near = self._patients
        anchor = int(rng.integers(len(tiles)))  # the first draw: see anchor()
        base = self._data["hu"][np.concatenate([tiles[p] for p in near[anchor]])].astype(np.float32)
        pool = np.concatenate([np.rot90(base, k, axes=(1, 2)) for k in range(4)])
        pool = np.concatenate([pool, pool[:, :, ::-1]])  # the 8 flips and turns
        base_of = np.tile(np.arange(len(base)), 8)
        step = TILE - OVERLAP
        ny, nx = (max(1, -(-(n - OVERLAP) // step)) for n in (height, width))
        out = np.zeros((ny * step + OVERLAP, nx * step + OVERLAP), np.float32)
        laid = np.full((ny + 1, nx + 2), -1)  # base tile of each grid cell (padded): no tile beside itself
        used = np.zeros(len(base), bool)  # base tiles laid anywhere in this field: real lung never repeats
        flat = pool.reshape(len(pool), -1)
        regions = {}
        for iy in range(ny):
            for ix in range(nx):
                y, x = iy * step, ix * step
                if iy == 0 and ix == 0:
                    j = int(rng.integers(len(pool)))
                    out[:TILE, :TILE] = pool[j]
                    laid[1, 1] = base_of[j]
                    used[base_of[j]] = True
                    continue
                if (iy > 0, ix > 0) not in regions:
                    r = np.zeros((TILE, TILE), bool)
                    r[:, :OVERLAP] |= ix > 0
                    r[:OVERLAP, :] |= iy > 0
                    c = flat[:, r.ravel()].astype(np.float64)
                    regions[iy > 0, ix > 0] = (r, c, (c * c).sum(1))
                r, cand, sq = regions[iy > 0, ix > 0]
                here = out[y:y + TILE, x:x + TILE]
                # Σ(tile − here)² less Σhere²: one product, in float64 on one thread (einsum, not BLAS), so
                # the same picks on every machine
                cost = sq - 2 * np.einsum("ij,j->i", cand, here[r].astype(np.float64))
                # a tile's own flipped copy continues it almost exactly: mirror images, not lung
                cost[np.isin(base_of, laid[iy:iy + 2, ix:ix + 3])] = np.inf
                if (~used).sum() > TOP_K:  # the best continuations are few: without this a third of
                    cost[used[base_of]] = np.inf  # a lung's cells repeated a tile laid elsewhere in it
                best = np.argpartition(cost, TOP_K)[:TOP_K] if len(cost) > TOP_K else np.arange(len(cost))
                j = int(rng.choice(np.sort(best)))
                t = pool[j]
                new = np.ones((TILE, TILE), bool)
                if ix > 0:
                    new[:, :OVERLAP] &= _seam((t[:, :OVERLAP] - here[:, :OVERLAP]) ** 2)
                if iy > 0:
                    new[:OVERLAP, :] &= _seam(((t[:OVERLAP, :] - here[:OVERLAP, :]) ** 2).T).T
                here[new] = t[new]
                laid[iy + 1, ix + 1] = base_of[j]
                used[base_of[j]] = True
        return out[:height, :width]

    def sample_hu(self, height: int, width: int, seeds: Sequence[int], device=None, spacing_mm: float | None = None,
                  boxes=None, cond=None, run=None):
        """(B, height, width) HU fields (a torch tensor on ``device``), one per seed, for pixels of
        ``spacing_mm`` (default the library's), quilted over each row's ``boxes`` ((B, 4) y0, x0, y1, x1;
        empty rows allowed; None: the whole field) and ``FILL_HU`` elsewhere: the same interface as the
        lung texture's ``sample_hu``. The grid starts at the box, so pass the boxes on every device (the
        values depend on them). ``run(fn, jobs)``: runs ``[fn(*job) for job in jobs]`` elsewhere, e.g. on the
        LIDC placement workers (``LidcPlacer.map``; the same values)."""
        import torch
        import torch.nn.functional as F

        scale = (spacing_mm or SPACING_MM) / SPACING_MM
        field = np.full((len(seeds), height, width), FILL_HU, np.float32)
        rows = [(b, y0, x0, y1, x1) for b, (y0, x0, y1, x1) in
                enumerate([(0, 0, height, width)] * len(seeds) if boxes is None else boxes.tolist()) if y1 > y0 and x1 > x0]
        jobs = [(str(self.path), max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale)), int(seeds[b]))
                for b, y0, x0, y1, x1 in rows]
        quilts = run(quilt_job, jobs) if run is not None and jobs else [self.quilt(h, w, s) for _, h, w, s in jobs]
        for (b, y0, x0, y1, x1), q in zip(rows, quilts):
            if abs(scale - 1) >= 1e-3:  # drawn at the library's spacing, resampled: a vessel keeps its size in mm
                q = F.interpolate(torch.from_numpy(q)[None, None], size=(y1 - y0, x1 - x0), mode="bicubic",
                                  align_corners=False)[0, 0].numpy()
            field[b, y0:y1, x0:x1] = q
        return torch.from_numpy(field).to(device if device is not None else "cpu")


_OPEN: dict[str, LungLibrary] = {}  # per process: a worker opens each library once


def quilt_job(path: str, height: int, width: int, seed: int) -> np.ndarray:
    """``LungLibrary(path).quilt(height, width, seed)``, the library opened once per process: a worker's task."""
    if path not in _OPEN:
        _OPEN[path] = LungLibrary(path)
    return _OPEN[path].quilt(height, width, seed)
