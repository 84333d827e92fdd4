"""PNG figures a person looks at to judge a registration: overlays, landmark errors, Jacobian map.

matplotlib is imported lazily (not bundled with Slicer; installed on demand there). All images are drawn
in physical proportions (voxel spacing respected) with the anatomical direction named on each axis.
"""
import numpy as np

from MRIHistoRegLib import deps, volumes

# Slicer's default views: (normal RAS axis, RAS axis pointing up on screen, RAS axis pointing right on screen,
# sign: +1 when the screen direction is the positive RAS direction). Patient left is on screen right.
_VIEWS = {
    "axial": (2, (1, +1), (0, -1)),     # anterior up, left to the right
    "coronal": (1, (2, +1), (0, -1)),   # superior up, left to the right
    "sagittal": (0, (2, +1), (1, -1)),  # superior up, posterior to the right
}


# anatomical letters at the (top, bottom, left, right) edges of each view, as Slicer's orientation markers
_EDGE_LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}


def _axisDirections(ijkToRas):
    """For array axes [k, j, i]: (dominant RAS axis, sign) of each increasing index."""
    matrix = np.asarray(ijkToRas, float)[:3, :3]
    result = []
    for ijkAxis in (2, 1, 0):
        column = matrix[:, ijkAxis]
        rasAxis = int(np.argmax(np.abs(column)))
        result.append((rasAxis, 1 if column[rasAxis] > 0 else -1))
    return result


def orientedSlice(array, ijkToRas, view, index):
    """The 2-D slice of `array` ([k, j, i]) for a Slicer view at array index `index` along its normal, flipped so
    that rows run up->down and columns left->right as Slicer displays them (nearest array axes; oblique volumes
    are shown along their closest axes). Returns (image, normal array axis, (row axis, row flipped), (col axis, col flipped))."""
    normalRas, (upRas, upSign), (rightRas, rightSign) = _VIEWS[view]
    directions = _axisDirections(ijkToRas)
    arrayAxisOf = {ras: axis for axis, (ras, _) in enumerate(directions)}
    normalAxis, rowAxis, colAxis = arrayAxisOf[normalRas], arrayAxisOf[upRas], arrayAxisOf[rightRas]
    image = np.take(array, index, axis=normalAxis)
    remaining = [a for a in range(3) if a != normalAxis]
    if remaining.index(rowAxis) != 0:
        image = image.T
    # row index grows downwards on screen, i.e. against "up"
    rowFlip = directions[rowAxis][1] == upSign
    colFlip = directions[colAxis][1] != rightSign
    if rowFlip:
        image = image[::-1, :]
    if colFlip:
        image = image[:, ::-1]
    return image, normalAxis, (rowAxis, rowFlip), (colAxis, colFlip)


def volumeAxisForView(ijkToRas, view):
    """The array axis ([k, j, i]) closest to the normal of a Slicer view ('axial', 'coronal', 'sagittal')."""
    directions = _axisDirections(ijkToRas)
    return [ras for ras, _ in directions].index(_VIEWS[view][0])


def _pyplot():
    matplotlib = deps.requirePackage("matplotlib")
    matplotlib.use("Agg")  # files only, no window (also inside Slicer)
    import matplotlib.pyplot as plt

    return plt


def _normalise(image, mask=None):
    values = image[mask] if mask is not None and mask.any() else image
    low, high = np.percentile(values, [1, 99.5]) if values.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    return np.clip((image - low) / (high - low), 0.0, 1.0)


def overlayFigures(mriArray, histologyArray, ijkToRas, outDir, landmarksRas=None, tiles=8):
    """Checkerboard and fade overlays of MRI and registered histology through the histology footprint's centre.

    Writes overlay_<orientation>.png for axial, coronal and sagittal slices; landmarks within two slices of the
    cut are drawn as crosses. Returns the written paths.
    """
    import os

    plt = _pyplot()
    spacing = volumes.spacingOf(ijkToRas)
    footprint = histologyArray > 0
    centre = (np.round(np.argwhere(footprint).mean(axis=0)).astype(int) if footprint.any()
              else np.array(mriArray.shape) // 2)
    landmarksKji = None
    if landmarksRas is not None and len(landmarksRas):
        rasToIjk = np.linalg.inv(ijkToRas)
        ijk = np.c_[np.asarray(landmarksRas, float), np.ones(len(landmarksRas))] @ rasToIjk.T
        landmarksKji = ijk[:, 2::-1]
    paths = []
    for view in _VIEWS:
        axis = volumeAxisForView(ijkToRas, view)
        mriSlice, _, (rowAxis, rowFlip), (colAxis, colFlip) = orientedSlice(mriArray, ijkToRas, view, centre[axis])
        mriSlice = _normalise(mriSlice.astype(float))
        histSlice2d = orientedSlice(histologyArray, ijkToRas, view, centre[axis])[0].astype(float)
        histSlice = _normalise(histSlice2d, histSlice2d > 0)
        rows, cols = mriSlice.shape
        checker = ((np.arange(rows)[:, None] * tiles // rows) + (np.arange(cols)[None, :] * tiles // cols)) % 2 == 0
        checkerboard = np.where(checker, mriSlice, histSlice)
        fade = np.dstack([histSlice, mriSlice, histSlice])  # histology magenta, MRI green: grey where they agree
        rowSpacing, colSpacing = spacing[2 - rowAxis], spacing[2 - colAxis]
        extent = [0, cols * colSpacing, rows * rowSpacing, 0]
        aspect = extent[2] / max(extent[1], 1e-9)  # height / width in mm
        figure, axes = plt.subplots(1, 2, figsize=(11, min(11, max(3.0, 5.5 * aspect)) + 0.8))
        axes[0].imshow(checkerboard, cmap="gray", extent=extent, interpolation="nearest")
        axes[0].set_title(f"{view}: checkerboard (MRI / histology)")
        axes[1].imshow(fade, extent=extent, interpolation="nearest")
        axes[1].set_title(f"{view}: fade (MRI green, histology magenta)")
        if landmarksKji is not None:
            near = np.abs(landmarksKji[:, axis] - centre[axis]) <= 2
            rowsOf = landmarksKji[near, rowAxis]
            colsOf = landmarksKji[near, colAxis]
            rowsOf = (rows - 1 - rowsOf) if rowFlip else rowsOf
            colsOf = (cols - 1 - colsOf) if colFlip else colsOf
            for ax in axes:
                ax.plot((colsOf + 0.5) * colSpacing, (rowsOf + 0.5) * rowSpacing, "y+", markersize=10, mew=2)
        top, bottom, left, right = _EDGE_LETTERS[view]
        for ax in axes:
            ax.set_xlabel("mm")
            ax.set_ylabel("mm")
            for text, x, y in ((top, 0.5, 0.98), (bottom, 0.5, 0.02), (left, 0.02, 0.5), (right, 0.98, 0.5)):
                ax.text(x, y, text, transform=ax.transAxes, color="yellow", ha="center", va="center", fontsize=12)
        figure.tight_layout()
        path = os.path.join(outDir, f"overlay_{view}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def landmarkErrorChart(rows, path):
    """Bar chart of per-landmark fit residual and leave-one-out error (mm); outliers in red."""
    plt = _pyplot()
    labels = [r["label"] for r in rows]
    residual = [r["residual_mm"] for r in rows]
    loo = [r["loo_mm"] for r in rows]
    x = np.arange(len(rows))
    figure, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4))
    ax.bar(x - 0.2, residual, 0.4, label="fit residual")
    colours = ["tab:red" if r.get("outlier") else "tab:orange" for r in rows]
    ax.bar(x + 0.2, loo, 0.4, label="leave-one-out error", color=colours)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60)
    ax.set_ylabel("mm")
    ax.set_title("Landmark errors (red: outlier, LOO > 3x median)")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def jacobianFigure(determinant, spacingIjk, path, title="Jacobian determinant (MRI -> histology)"):
    """A slice of the Jacobian determinant map (volume change); folds (det <= 0) stand out in black."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 5))
    shape = determinant.shape
    extent = [0, shape[1] * spacingIjk[0], shape[0] * spacingIjk[1], 0]
    image = ax.imshow(determinant, cmap="coolwarm", extent=extent, interpolation="nearest")
    if (determinant <= 0).any():
        ax.contour(determinant > 0, levels=[0.5], colors="k", extent=[0, extent[1], 0, extent[2]], origin="upper")
    figure.colorbar(image, ax=ax, label="det J")
    ax.set_title(title)
    ax.set_xlabel("mm")
    ax.set_ylabel("mm")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
