"""Benchmark: the refinement engines side by side on the generated sample data (run by hand).

    .venv/bin/python bench/refine.py [--seeds 0 1 2 3 4] [--landmarks 12 6] [--engines elastix simpleitk]
                                     [--working-mm 0.1] [--threads 2] [--no-tumour-focus]

For each seed the small sample is generated (ground truth: 30 noise-free held-out point pairs and the tumour's
true volume in MRI space), affine+TPS is fitted to 12 landmarks (or every second one: 6), and workflow.refine -
the step every front calls - runs with each engine's preset: "elastix B-spline + landmarks" and "affine +
B-spline" (SimpleITK), given the MRI tumour labels as the pipeline gives them (so the elastix engine's tumour
focus runs; --no-tumour-focus leaves them out). Printed per case: held-out TRE median / p90 (mm, in MRI space) landmark-only -> refined
and the change, tumour volume in MRI space (Jacobian-integrated) vs the truth, refinement seconds, the verdict.
The elastix engine's one-time load is timed separately (first use in the process) and printed once. Targets
(issue 15): TRE median >= 55 % below landmark-only with 12 landmarks, volume within 2 % on every seed, <= 20 s
per refinement at 2 cores after the load; ratios to those bounds are printed. Timings are noisy on a shared
machine and machines differ (the same code took 16.4 s on seed 3 one day and 32.0 s on another): each refinement
is also printed as a multiple of a named anchor timed in the same run (ANCHOR: SimpleITK's recursive Gaussian of a
fixed 160^3 float image, best of 3), so runs on different machines compare by that ratio. Compare engines within
one run.
"""
import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MRIHistoReg"))

BOUND_SECONDS = 20.0
ANCHOR = "SimpleITK SmoothingRecursiveGaussian, 160^3 float32, sigma 2 voxels, best of 3"
PRESETS = {"elastix": "elastix B-spline + landmarks", "simpleitk": "affine + B-spline"}


def anchorSeconds(repeats=3):
    """Seconds of the ANCHOR workload (a machine-speed yardstick with the same thread count as the engines)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((160, 160, 160), dtype=np.float32))
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        sitk.SmoothingRecursiveGaussian(image, 2.0)
        best = min(best, time.perf_counter() - began)
    return best


def loadCase(folder):
    """(mri Image, stack source, landmark labels/points, held-out points, label Images, true tumour volume)."""
    from MRIHistoRegLib import context, landmarks, sampledata, stacks, volumes, workflow

    truth = sampledata.loadTruth(folder)
    scene = context.createScene()
    node = volumes.loadVolume(scene, os.path.join(folder, "mri.nrrd"))
    mri = workflow.Image(volumes.arrayFromVolume(node).astype(np.float32), volumes.ijkToRas(node))
    source = stacks.openStack(os.path.join(folder, "histology.tif"), truth["histology"]["true_spacing_mm"])
    read = lambda name: landmarks.readPoints(os.path.join(folder, name))  # noqa: E731
    labels, lmMri = read("landmarks_mri.csv")
    lmHist = read("landmarks_histology.csv")[1]
    evalMri, evalHist = read("eval_points_mri.csv")[1], read("eval_points_histology.csv")[1]
    label = lambda name: volumes.arrayFromVolume(volumes.loadVolume(scene, os.path.join(folder, name), labelmap=True))  # noqa: E731
    mriLabels = workflow.Image(label("mri_tumour_label.nrrd"), mri.ijkToRas)
    histLabels = workflow.Image(label("histology_tumour_label.nrrd"), np.array(truth["histology"]["true_ijk_to_ras"]))
    return dict(mri=mri, source=source, labels=labels, lmMri=lmMri, lmHist=lmHist, evalMri=evalMri,
                evalHist=evalHist, mriLabels=mriLabels, histLabels=histLabels,
                trueVolume=truth["tumour"]["mri_volume_mm3"])


def score(case, mapping):
    """(TRE median, TRE p90, volume error %) of a mapping against the construction's truth."""
    from MRIHistoRegLib import compare, workflow

    tre = np.linalg.norm(compare.InverseMapping(mapping).transformPoints(case["evalHist"]) - case["evalMri"], axis=1)
    rows, _ = workflow.compareLabels(case["mriLabels"], case["histLabels"], mapping)
    volume = 100 * (rows[1]["histology_in_mri_jacobian_mm3"] / case["trueVolume"] - 1)
    return float(np.median(tre)), float(np.percentile(tre, 90)), float(volume)


def generatedCase(work, seed):
    """(folder, loadCase) of the small sample generated for `seed` under the folder `work`."""
    from MRIHistoRegLib import sampledata

    folder = os.path.join(work, "sample")
    sampledata.generateSampleData(folder, size="small", seed=seed)
    return folder, loadCase(folder)


def landmarkFit(case, count):
    """affine+TPS fitted to the case's 12 landmarks (count 12) or to every second one (count 6)."""
    from MRIHistoRegLib import landmarks, workflow

    chosen = np.arange(12) if count == 12 else np.arange(0, 12, 2)
    pairs = landmarks.LandmarkPairs([case["labels"][i] for i in chosen], case["lmMri"][chosen], case["lmHist"][chosen])
    return workflow.fitLandmarks(pairs, "affine+tps")


def runCase(case, count, engine, workingMm, tumourFocus=True):
    """workflow.refine as the pipeline calls it: with the MRI tumour labels (the elastix engine's tumour focus),
    or without them (tumourFocus False: the refinement alone)."""
    from MRIHistoRegLib import settings, workflow

    fit = landmarkFit(case, count)
    before = score(case, fit.model)
    began = time.perf_counter()
    refinement = workflow.refine(case["mri"], case["source"], fit, settings.refineSettings(PRESETS[engine]),
                                 workingSpacingMm=workingMm, tumourLabels=case["mriLabels"] if tumourFocus else None)
    seconds = time.perf_counter() - began
    after = score(case, refinement.mapping)
    load = refinement.result.timings.get("engine_load", 0.0)
    return before, after, seconds - load, refinement


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--landmarks", type=int, nargs="+", default=[12, 6], choices=[12, 6])
    parser.add_argument("--engines", nargs="+", default=["elastix", "simpleitk"], choices=list(PRESETS))
    parser.add_argument("--working-mm", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2, help="SimpleITK threads (elastix keeps its default)")
    parser.add_argument("--no-tumour-focus", action="store_true",
                        help="without the MRI tumour labels: the refinement alone, no tumour focus")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")

    import SimpleITK as sitk

    from MRIHistoRegLib import elastix

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    if "elastix" in args.engines:
        began = time.perf_counter()
        elastix.loadEngine()
        print(f"itk-elastix one-time load: {time.perf_counter() - began:.1f} s")
    anchor = anchorSeconds()
    print(f"anchor ({ANCHOR}): {anchor:.3f} s")
    print("seed | landmarks | engine | TRE median before -> after (change) | p90 before -> after | "
          "tumour volume before -> after | seconds (ratio to 20 s; multiple of the anchor) | verdict")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as work:
            _, case = generatedCase(work, seed)
            for count in args.landmarks:
                for engine in args.engines:
                    before, after, seconds, refinement = runCase(case, count, engine, args.working_mm,
                                                                 not args.no_tumour_focus)
                    print(f"{seed} | {count} | {engine} | {before[0]:.4f} -> {after[0]:.4f} "
                          f"({100 * (after[0] / before[0] - 1):+.0f} %) | {before[1]:.4f} -> {after[1]:.4f} | "
                          f"{before[2]:+.2f} % -> {after[2]:+.2f} % | {seconds:.1f} ({seconds / BOUND_SECONDS:.2f}; "
                          f"{seconds / anchor:.0f}x) | "
                          f"{'accepted' if refinement.accepted else 'REJECTED'}: {refinement.reason}", flush=True)


if __name__ == "__main__":
    main()
