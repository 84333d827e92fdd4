"""Which pyramid level the downsampler reads: the coarsest one still finer than (or equal to) the target spacing
along every axis, that holds the requested box on its own voxel grid, and that is a mean pooling of the level
below it.

The rule for trusting a level (decided here, tested in Testing/test_omezarr.py): a level is used only when its
spacing is an integer multiple of level 0's and of the finer level's along every axis (within what a size
rounded up to ceil(n / f) voxels explains; such a level is then read with exactly f times level 0's spacing) AND
a spot check passes - one block of up to 8^3 voxels near the level's centre equals the mean of the finer
level's corresponding blocks (within one unit for integer data, which a writer rounds or truncates, and 1e-4
relative for floats). The check reads two small
blocks per level step (the finer one inside one chunk when the source has a `chunkShape`), never a whole level.
A pyramid made otherwise (ome-zarr-py's default nearest-neighbour scaler, a Gaussian or a subsampled level)
fails it and the downsampler stays on the last level that passed (level 0 at worst), with a log line saying
why: averaging an aliased level would silently change intensities.

Consequence: when the target spacing is an integer multiple of the chosen level's along every axis (the "level
factors divide evenly"), the result equals the exact area average of level 0 up to the level's own rounding
(float rounding for float pyramids, half a unit for integer ones, whose stored means are rounded). Otherwise it
is the exact area average of the chosen level, boxes cutting its voxels fractionally.
"""
import logging
import math

import numpy as np

LOG = logging.getLogger(__name__)

_CHECK = 8  # coarse voxels per axis in the spot check (512 voxels: enough to tell a mean from a subsampling)


def _levelFactor(level, spacing0):
    """The level's integer factor (i, j, k) to level 0, or None. A level whose size was rounded up (ceil(n / f)
    voxels, as Imaris writes them) and whose spacing is its extent over that size is off an integer by up to
    f / n: accepted within that, so the spacing of such a level is taken as exactly f times level 0's."""
    ratio = np.asarray(level.spacingMm, float) / spacing0
    rounded = np.round(ratio)
    slack = np.maximum(1e-6 * ratio, rounded / np.asarray(level.shape[::-1], float))
    if np.all(rounded >= 1) and np.all(np.abs(ratio - rounded) <= slack):
        return rounded.astype(int)
    return None


def isMeanPooled(fine, coarse, ratio):
    """True when a central block of `coarse` (a StackSource) equals the `ratio` (i, j, k) mean pooling of
    `fine` within the data type's rounding. Reads one small block of each."""
    ri, rj, rk = (int(r) for r in ratio)
    factors = (rk, rj, ri)
    size = [min(_CHECK, n) for n in coarse.shape]  # (k, j, i)
    start = [(n - s) // 2 for n, s in zip(coarse.shape, size)]
    chunks = getattr(fine, "chunkShape", None)
    if chunks is not None:  # the block inside one chunk of the fine level: one chunk decoded, not up to eight
        for axis, (c, f) in enumerate(zip(chunks, factors)):
            if c >= f:
                fineStart = (start[axis] * f // c) * c
                start[axis] = -(-fineStart // f)
                size[axis] = max(1, min(size[axis], (fineStart + c) // f - start[axis], coarse.shape[axis] - start[axis]))
    ends = [(a + s) * f for a, s, f in zip(start, size, factors)]
    if any(e > n for e, n in zip(ends, fine.shape)):
        return False
    block = coarse.readRegion(start[0], start[0] + size[0], start[1], start[1] + size[1], start[2], start[2] + size[2])
    data = fine.readRegion(start[0] * rk, ends[0], start[1] * rj, ends[1], start[2] * ri, ends[2])
    pooled = data.reshape(size[0], rk, size[1], rj, size[2], ri).mean(axis=(1, 3, 5), dtype=np.float64)
    difference = np.abs(block.astype(np.float64) - pooled)
    if np.dtype(coarse.dtype).kind in "iub":
        return bool(np.all(difference <= 1.0 + 1e-9))
    return bool(np.all(difference <= 1e-4 * max(1.0, float(np.max(np.abs(pooled))))))


def _boxOnLevel(box, factorToLevel0, targetFactors, levelShape):
    """The level-0 crop box ((i0, i1), (j0, j1), (k0, k1)) on a level `factorToLevel0` (i, j, k) times coarser,
    covering exactly the boxes the level-0 plan keeps, or None when the box's start is not on the level's grid
    or the level does not reach its end."""
    result = []
    for (a, b), f, big, n in zip(box, factorToLevel0, targetFactors, levelShape[::-1]):
        if a % f:
            return None
        length = b - a
        if length < big * (1 - 1e-9) and length % f:
            return None  # one box averaging the whole short axis: only exact on the level if it ends on its grid
        count = max(1, int(math.floor(length / big + 1e-9)))
        end = min(count * big, length) if length >= big * (1 - 1e-9) else length  # the last kept box edge
        stop = a // f + int(math.ceil(end / f - 1e-7))
        if stop > n:
            return None
        result.append((a // f, stop))
    return tuple(result)


def chooseLevel(source, targetSpacingMm, box, level=None):
    """(level index, the level's StackSource, the box on that level) to read for a downsampling of `source` to
    `targetSpacingMm` (i, j, k) mm over the level-0 voxel box `box`.

    level None: the rule in the module docstring. An int: that level (no spot check: the caller vouches for
    it), refused when it is coarser than the target or the box is not on its grid."""
    from MRIHistoRegLib.errors import UserInputError

    levels = source.levels
    target = np.asarray(targetSpacingMm, float)
    spacing0 = np.asarray(levels[0].spacingMm, float)
    targetFactors = target / spacing0
    if level is not None:
        level = int(level)
        if not 0 <= level < len(levels):
            raise UserInputError(f"{source.path} has levels 0..{len(levels) - 1}; no level {level}. Give one of them.")
        if level == 0:
            return 0, levels[0], box
        factor = _levelFactor(levels[level], spacing0)
        onLevel = None if factor is None else _boxOnLevel(box, factor, targetFactors, levels[level].shape)
        if onLevel is None or np.any(spacing0 * factor > target * (1 + 1e-6)):
            raise UserInputError(f"Level {level} of {source.path} (spacing {levels[level].spacingMm} mm) is coarser than the "
                                 f"target {tuple(target)} mm or does not hold the crop on its grid: choose a finer level.")
        return level, _exactSpacing(levels[level], spacing0 * factor), onLevel
    chosen, chosenBox, previous = 0, box, np.ones(3, int)
    for n in range(1, len(levels)):
        coarse, fine = levels[n], levels[n - 1]
        factor = _levelFactor(coarse, spacing0)
        if factor is not None and np.any(spacing0 * factor > target * (1 + 1e-6)):
            break  # coarser than the target (and so are the levels after it)
        onLevel = None if factor is None else _boxOnLevel(box, factor, targetFactors, coarse.shape)
        if factor is None or np.any(factor % previous) or onLevel is None:
            LOG.info("%s: level %d not used (its spacing is not an integer multiple of level %d's, or the crop is not "
                     "on its grid)", source.path, n, n - 1)
            break
        if not isMeanPooled(fine, coarse, factor // previous):
            LOG.warning("%s: level %d is not the mean of level %d (the pyramid was not made by area averaging): "
                        "downsampling from level %d instead, which reads more data", source.path, n, n - 1, chosen)
            break
        chosen, chosenBox, previous = n, onLevel, factor
    if chosen == 0:
        return 0, levels[0], box
    return chosen, _exactSpacing(levels[chosen], spacing0 * previous), chosenBox


def _exactSpacing(level, spacing):
    """The level with exactly `spacing` (f times level 0's) when its own differs by its size's rounding."""
    if np.allclose(level.spacingMm, spacing, rtol=1e-9, atol=0):
        return level
    return level.withSpacing(tuple(float(v) for v in spacing))
