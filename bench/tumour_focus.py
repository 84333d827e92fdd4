"""Experiment (run by hand): a second, tumour-focused B-spline after the default refinement - NOT built into the
product. It reproduces the measurements in README ("Measured on the sample", issue 15's volume target) so the next
attempt starts from them instead of from scratch.

    .venv/bin/python bench/tumour_focus.py [--seeds 3 4] [--from-truth] [--sampler Random] [--grow-mm 0.5]
        [--box-mm 1.5] [--grid-mm 0.75] [--bending 1] [--iterations 250] [--affine]
        [--metric AdvancedMattesMutualInformation] [--scale-search 3 [--scale-sigma-mm 1] [--off-grid]]
        [--perturb-scale 1.5] [--bins 128] [--samples 20000] [--local-correlation [--shared-grid | --log-histology [--smoothing 0.8]]]
        [--real-mri 1]

Per seed (small sample, 12 landmarks): the default refinement (workflow.refine, the "elastix B-spline + landmarks"
preset) and then, on a 0.1 mm grid over the MRI tumour label's box grown by --box-mm, elastix with one metric
(mutual information by default) + bending energy over the label grown by --grow-mm (N4 on both images; --affine:
an affine map on the same metric first), composed as M2(x) = M1(x + d2(x)) and tapered to the identity over
0.5 mm at the box's faces. --scale-search replaces that B-spline by a one-parameter search: the isotropic
scaling about the tumour's centre (Gaussian-weighted, so it fades out within a few mm) that maximises mutual
information over the same mask (scaleSearch); --off-grid evaluates that information at points off the working
grid (elastix.mattesValue: on the grid the start is favoured by linear interpolation's cusp at d = 0).
--from-truth starts the focused stage from the TRUE mapping instead: whatever it moves then is the metric's own
bias, not a convergence problem. --perturb-scale PERCENT starts it from the true mapping followed by a KNOWN
isotropic scaling of the tumour region (the same Gaussian-weighted field): what it recovers of a known error.
--bins / --samples: the focused B-spline's histogram bins and samples per iteration. --local-correlation replaces
the B-spline by the product's tumour focus (MRIHistoRegLib/tumourfocus.py, which workflow.refine runs when given the
MRI tumour labels; here the default stage runs without them) - its Gaussian-weighted strain + shift of the tumour region (mask grown by
--grow-mm), --shared-grid reading both images on the working grid, --log-histology on the log of the histology's
counts (its speckle, stripes, shadows and depth attenuation are multiplicative: the log makes them additive and
of one size over bright and dim tissue, where a bright tumour's larger noise otherwise biases the correlation),
--smoothing both images blurred equally first (not in the product; its focus is --log-histology).
Printed: held-out TRE median (change vs landmark-only), tumour volume in MRI space vs the truth, and the tumour surface's mean radial bias (um;
1 % of volume is about 1.8 um on this tumour) against the true mapping on 4000 surface points, with its mean
displacement (x, y, z um). --real-mri MOUSE: Testing/realmri.py's case (the real 0.15 mm MRI of that mouse, seeds
as given) instead of the sample; no surface bias there (its tumour is a real structure, no ellipsoid).
"""
import argparse
import json
import logging
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MRIHistoReg"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

SURFACE_POINTS = 4000
TAPER_MM = 0.5
WORKING_MM = 0.1
# --off-grid: the MI's sample grid is the working grid scaled by this (not a ratio of small integers), so the
# fractional offsets of the samples in both images run through [0, 1) whatever the displacement
OFF_GRID_RATIO = 0.7321
PERTURB_BOX_MM = 3.0
FOCUS_SIGMA_MM = 1.0  # --local-correlation: the Gaussian weight of its strain + shift


def surfacePoints(count=SURFACE_POINTS):
    """(points, outward unit normals) on the phantom's tumour ellipsoid in MRI RAS (a Fibonacci lattice)."""
    from MRIHistoRegLib import sampledata

    anatomy = sampledata.PhantomAnatomy
    k = np.arange(count) + 0.5
    polar, azimuth = np.arccos(1 - 2 * k / count), np.pi * (1 + 5 ** 0.5) * k
    unit = np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], 1)
    rotation, axes = np.asarray(anatomy.tumourRotation), np.asarray(anatomy.tumourAxes)
    points = np.asarray(anatomy.tumourCentre) + (unit * axes) @ rotation.T
    normals = (unit / axes) @ rotation.T
    return points, normals / np.linalg.norm(normals, axis=1, keepdims=True)


def surfaceBias(truthMapping, mapping):
    """(mean radial offset um, mean displacement um [3]) of the true tumour surface carried back by `mapping`."""
    from MRIHistoRegLib import compare

    points, normals = surfacePoints()
    estimated = compare.InverseMapping(mapping).transformPoints(truthMapping.transformPoints(points))
    offset = estimated - points
    return 1000 * float(np.mean(np.sum(offset * normals, axis=1))), 1000 * offset.mean(axis=0)


def tumourGrid(case, marginMm):
    """(shape, ijkToRas, box, centre RAS) of the working grid over the MRI tumour label's box grown by marginMm."""
    from MRIHistoRegLib import elastix
    from MRIHistoRegLib.geometry import applyMatrix, spacingOf

    mri, label = case["mri"], case["mriLabels"]
    kk, jj, ii = np.nonzero(label.array)
    ijk = np.stack([ii, jj, kk], 1)
    margin = marginMm / spacingOf(mri.ijkToRas)
    box = (np.maximum(ijk.min(0) - margin, -0.5), np.minimum(ijk.max(0) + margin, np.asarray(mri.shapeIjk) - 0.5))
    shape, matrix = elastix.workingGrid(mri.shape, mri.ijkToRas, WORKING_MM, box)
    return shape, matrix, box, np.mean(applyMatrix(label.ijkToRas, ijk.astype(float)), axis=0)


def focusedStage(case, histology, start, args):
    """M2 = start followed by the tumour-focused B-spline or, with --scale-search, the scaling (a RefinementResult)."""
    from scipy import ndimage

    from MRIHistoRegLib import elastix, refine
    from MRIHistoRegLib.geometry import gridPoints, spacingOf

    mri, label = case["mri"], case["mriLabels"]
    shape, matrix, box, centre = tumourGrid(case, args.box_mm)
    points = gridPoints(shape, matrix)
    fixed = elastix._sample(elastix._smoothForGrid(mri.array, mri.ijkToRas, WORKING_MM), mri.ijkToRas, points)
    moving = elastix._sample(histology.array, histology.ijkToRas, elastix._mappedPoints(start, points),
                             cval=float(histology.array.min()))
    onGrid = elastix._sample(label.array > 0, label.ijkToRas, points, order=0).reshape(shape) > 0.5
    mask = ndimage.distance_transform_edt(~onGrid, sampling=spacingOf(matrix)[::-1]) <= args.grow_mm
    taper = elastix._taper(shape, matrix, mri, box, TAPER_MM)
    if args.local_correlation:
        return localFocus(case, histology, start, (fixed.reshape(shape), moving.reshape(shape), mask),
                          (shape, matrix, box, centre, points, taper), args)
    fixed = refine.correctBiasField(fixed.reshape(shape), mask, WORKING_MM, 1.0)
    moving = refine.correctBiasField(moving.reshape(shape), mask, WORKING_MM, 1.0)
    images = elastix.WorkingImages(fixed, moving, mask.astype(np.uint8), matrix, taper)
    if args.scale_search:
        displacement = scaleSearch(images, points - centre, args) * taper[..., None]
        return refine.RefinementResult(start, displacement, matrix, accepted=True)
    settings = elastix.elastixSettings({
        "controlPointSpacingMm": args.grid_mm, "bendingWeight": args.bending, "iterations": args.iterations,
        "resolutions": 2, "gridSpacingSchedule": (2, 1), "pyramidSchedule": (2, 1), "affineStage": args.affine,
        "histogramBins": args.bins or elastix.DEFAULT_SETTINGS["histogramBins"],
        "samples": args.samples or elastix.DEFAULT_SETTINGS["samples"],
        "parameterOverrides": {"Metric": [args.metric, "TransformBendingEnergyPenalty"],
                               "ImageSampler": args.sampler}})
    displacement = elastix.runElastix(images, None, None, settings) * taper[..., None]
    return refine.RefinementResult(start, displacement, matrix, accepted=True)


def localFocus(case, histology, start, images, grid, args):
    """--local-correlation: tumourfocus.py's strain + shift (local squared correlation, sigma 1 mm) with the
    product's region and images (tumourfocus.focusImages: each image on its own grid, --log-histology, both
    smoothed by --smoothing working voxels), or with --shared-grid both on the working grid (the histology
    resampled through `start` first: the cusp at d = 0). Tapered at the box's faces here (the product folds it
    into the refinement's own field instead)."""
    from MRIHistoRegLib import refine
    from MRIHistoRegLib import tumourfocus
    from MRIHistoRegLib.mapping import AffineMapping

    fixed, moving, mask = images
    shape, matrix, box, centre, points, taper = grid
    if args.shared_grid:
        found = tumourfocus.focusTumour((fixed, matrix), (moving, matrix), AffineMapping(np.eye(4)), mask, matrix,
                                        centre, FOCUS_SIGMA_MM)
    else:
        region = tumourfocus._Label(case["mriLabels"], 1, case["mri"], WORKING_MM, args.grow_mm)
        fixedImage, movingImage = tumourfocus.focusImages(case["mri"], histology, start, region, WORKING_MM,
                                                          log=args.log_histology,
                                                          smoothingWorkingVoxels=args.smoothing)
        found = tumourfocus.focusTumour(fixedImage, movingImage, start, region.mask, region.ijkToRas, centre,
                                        FOCUS_SIGMA_MM)
    displacement = tumourfocus.focusField(found, points, centre, FOCUS_SIGMA_MM).reshape(shape + (3,))
    return refine.RefinementResult(start, displacement * taper[..., None], matrix, accepted=True)


def gaussianScaling(offsets, sigmaMm):
    """(x - c) g(x), g the Gaussian of SD sigmaMm about c: the field one isotropic scaling of the tumour moves by."""
    return offsets * np.exp(-np.sum(offsets ** 2, axis=1) / (2 * sigmaMm ** 2))[:, None]


def perturbedTruth(case, truth, percent, sigmaMm):
    """The true mapping followed by the isotropic scaling `percent` (linear, Gaussian weight of SD sigmaMm) of the
    tumour region, on a 0.1 mm grid over the label's box grown by PERTURB_BOX_MM: a start whose error is known."""
    from MRIHistoRegLib import refine
    from MRIHistoRegLib.geometry import gridPoints

    shape, matrix, _, centre = tumourGrid(case, PERTURB_BOX_MM)
    offsets = gridPoints(shape, matrix) - centre
    field = percent / 100 * gaussianScaling(offsets, sigmaMm)
    return refine.RefinementResult(truth, field.reshape(shape + (3,)), matrix, accepted=True)


def scaleSearch(images, offsets, args):
    """d(x) = s (x - c) g(x): the isotropic scaling s about the tumour's centre c (Gaussian weight g of SD
    --scale-sigma-mm) that maximises Mattes MI over the mask, searched on 13 values over +-(--scale-search) % and
    refined by a parabola through the best three; with --off-grid the MI is sampled off the working grid
    (elastix.mattesValue's virtual grid of OFF_GRID_RATIO x the working spacing)."""
    from MRIHistoRegLib import elastix

    shape = images.fixed.shape
    weighted = gaussianScaling(offsets, args.scale_sigma_mm)
    scales = np.linspace(-args.scale_search, args.scale_search, 13) / 100
    bins, ratio = elastix.DEFAULT_SETTINGS["histogramBins"], OFF_GRID_RATIO if args.off_grid else None
    values = np.array([elastix.mattesValue(images, (s * weighted).reshape(shape + (3,)), bins, ratio)
                       for s in scales])
    best = int(np.clip(np.argmin(values), 1, len(values) - 2))
    low, mid, high = values[best - 1:best + 2]
    curvature = low - 2 * mid + high
    step = scales[1] - scales[0]
    chosen = scales[best] + (0.5 * step * (low - high) / curvature if curvature > 0 else 0.0)
    return (chosen * weighted).reshape(shape + (3,))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--from-truth", action="store_true", help="start the focused stage from the true mapping")
    parser.add_argument("--sampler", default="RandomCoordinate", help="elastix ImageSampler of the focused stage")
    parser.add_argument("--metric", default="AdvancedMattesMutualInformation")
    parser.add_argument("--grow-mm", type=float, default=0.5)
    parser.add_argument("--box-mm", type=float, default=1.5)
    parser.add_argument("--grid-mm", type=float, default=0.75)
    parser.add_argument("--bending", type=float, default=1.0)
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--affine", action="store_true", help="an affine map of the tumour region first")
    parser.add_argument("--bins", type=int, default=0, help="histogram bins of the focused B-spline (0: the default)")
    parser.add_argument("--samples", type=int, default=0, help="its spatial samples per iteration (0: the default)")
    parser.add_argument("--scale-search", type=float, default=0.0, metavar="PERCENT",
                        help="instead of the B-spline: search an isotropic scaling of the tumour region over +-PERCENT")
    parser.add_argument("--scale-sigma-mm", type=float, default=1.0)
    parser.add_argument("--off-grid", action="store_true",
                        help="the scale search's MI sampled off the working grid (elastix.mattesValue)")
    parser.add_argument("--perturb-scale", type=float, default=0.0, metavar="PERCENT",
                        help="start from the true mapping followed by this known isotropic scaling of the tumour")
    parser.add_argument("--local-correlation", action="store_true",
                        help="instead of the B-spline: tumourfocus.py's strain + shift (local squared correlation)")
    parser.add_argument("--log-histology", action="store_true",
                        help="--local-correlation on the log of the working histology (multiplicative noise made even)")
    parser.add_argument("--smoothing", type=float, nargs="+", default=[0.0], metavar="VOXELS",
                        help="with --local-correlation: both images' equal Gaussian blur, SD in working voxels (the "
                             "product: none); several values: one line each")
    parser.add_argument("--shared-grid", action="store_true",
                        help="with --local-correlation: both images on the working grid (shows the cusp at d = 0)")
    parser.add_argument("--real-mri", type=int, default=0, metavar="MOUSE",
                        help="Testing/realmri.py's case of mouse 1 or 2 (the real MRI) instead of the sample")
    parser.add_argument("--default-overrides", default="{}",
                        help="JSON parameterOverrides of the default stage, e.g. '{\"ImageSampler\": \"Random\"}'")
    args = parser.parse_args(argv)
    if (args.log_histology or any(args.smoothing)) and (args.shared_grid or not args.local_correlation):
        parser.error("--log-histology and --smoothing apply to --local-correlation on the images' own grids "
                     "(not --shared-grid)")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")

    import tempfile

    import refine as bench
    from MRIHistoRegLib import elastix, sampledata, settings, workflow

    if args.real_mri:
        sys.path.insert(0, os.path.join(ROOT, "Testing"))
        import realmri

        if realmri.missingData():
            raise SystemExit(realmri.missingData())
    elastix.loadEngine()
    print("seed | landmark-only TRE / volume | default: TRE, volume, surface bias (x y z) um, s | "
          "focused: TRE, volume, surface bias (x y z) um, s")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as work:
            if args.real_mri:
                folder = os.path.join(work, "case")
                realmri.buildRealMriCase(folder, mouse=args.real_mri, seed=seed)
                case = dict(bench.loadCase(folder), realMri=True)
            else:
                folder, case = bench.generatedCase(work, seed)
            truth = sampledata.GroundTruthMapping(folder)
            fit = bench.landmarkFit(case, 12)
            histology = workflow.elastixHistology(case["source"], fit, WORKING_MM)  # what workflow.refine registers
            before = bench.score(case, fit.model)
            row = f"{seed} | {before[0]:.4f} / {before[2]:+.1f} % | "
            if args.perturb_scale:
                start = perturbedTruth(case, truth, args.perturb_scale, args.scale_sigma_mm)
                row += f"(from the truth scaled by {args.perturb_scale:+g} %) " + _describe(case, truth, start, before, 0.0) + " | "
            elif args.from_truth:
                start = truth
                row += "(from the truth) | "
            else:
                preset = dict(settings.refineSettings(bench.PRESETS["elastix"]))
                preset["parameterOverrides"] = json.loads(args.default_overrides) or None
                began = time.perf_counter()
                start = workflow.refine(case["mri"], histology, fit, preset, workingSpacingMm=WORKING_MM).mapping
                row += _describe(case, truth, start, before, time.perf_counter() - began) + " | "
            for smoothing in args.smoothing:  # one line per value, all from the same default result
                began = time.perf_counter()
                focused = focusedStage(case, histology, start, argparse.Namespace(**dict(vars(args),
                                                                                         smoothing=smoothing)))
                label = f"(smoothing {smoothing:g}) " if len(args.smoothing) > 1 else ""
                print(row + label + _describe(case, truth, focused, before, time.perf_counter() - began), flush=True)


def _describe(case, truth, mapping, before, seconds):
    import refine as bench

    tre, _, volume = bench.score(case, mapping)
    if case.get("realMri"):  # the real structure is no ellipsoid: no surface bias
        return f"{tre:.4f} ({100 * (tre / before[0] - 1):+.0f} %), {volume:+.2f} %, {seconds:.1f}"
    bias, mean = surfaceBias(truth, mapping)
    return (f"{tre:.4f} ({100 * (tre / before[0] - 1):+.0f} %), {volume:+.2f} %, {bias:+.1f} "
            f"({mean[0]:+.0f} {mean[1]:+.0f} {mean[2]:+.0f}), {seconds:.1f}")


if __name__ == "__main__":
    main()
