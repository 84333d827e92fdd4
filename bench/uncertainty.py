"""Calibration of the tumour volume's interval (uncertainty.py) on the generated sample (run by hand).

    .venv/bin/python bench/uncertainty.py                      # landmark-only, seeds 0-29, ~1-2 s per seed
    .venv/bin/python bench/uncertainty.py --seeds 5 --refined  # adds `run` with the sample's config (refined)

For each seed: the sample is generated into --dir, the affine+TPS landmark fit gives the Jacobian-integrated
volume in MRI space and its jackknife interval (the pipeline's own functions), and the truth is the analytic
tumour volume in MRI space from truth.json. With --refined the whole `run` (refinement on, as the sample's
config says) is run per seed and its report.json read. Prints per seed: error, interval, half-width, inside;
then coverage, the median half-width and the standard deviation of the error, and z = log error / jackknife SE
(its RMS should be ~1 for a calibrated interval). Interval time is printed against the point estimate's time
in the same run (ratio), not as an absolute claim.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MRIHistoReg"))


def landmarkOnly(folder):
    from MRIHistoRegLib import compare, fitting, landmarks, sampledata, stacks, uncertainty

    truth = sampledata.loadTruth(folder)
    with stacks.openStack(os.path.join(folder, "histology.nrrd"), spacingMm=truth["histology"]["true_spacing_mm"]) as s:
        geometry = s.ijkToRas()
    with stacks.openStack(os.path.join(folder, "histology_tumour_label.nrrd")) as source:
        labels, labelIjkToRas = compare.readLabelCrop(source, ijkToRas=geometry)
    _, fixed = landmarks.readPoints(os.path.join(folder, "landmarks_mri.csv"))
    _, moving = landmarks.readPoints(os.path.join(folder, "landmarks_histology.csv"))
    model = fitting.fitLandmarks(fixed, moving, "affine+tps")
    started = time.perf_counter()
    estimate = compare.jacobianIntegratedVolumeMm3(labels, labelIjkToRas, model, 1)
    estimateSeconds = time.perf_counter() - started
    rows = {1: {uncertainty.ESTIMATE_KEY: estimate}}
    started = time.perf_counter()
    uncertainty.addVolumeIntervals(rows, labels, labelIjkToRas, fixed, moving, "affine+tps")
    return rows[1], truth["tumour"]["mri_volume_mm3"], (time.perf_counter() - started) / estimateSeconds


def refined(folder, out):
    subprocess.run([sys.executable, "-m", "MRIHistoRegLib", "run", os.path.join(folder, "config.json"), "--out", out],
                   check=True, env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "MRIHistoReg")),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    with open(os.path.join(folder, "truth.json"), encoding="utf-8") as f:
        truth = json.load(f)
    return report["labels"]["1"], truth["tumour"]["mri_volume_mm3"], report["refinement"]["accepted"]


def summarise(name, results):
    from MRIHistoRegLib import uncertainty

    errors, halfWidths, inside, z = [], [], [], []
    for row, trueVolume in results:
        estimate, (low, high) = row[uncertainty.ESTIMATE_KEY], row[uncertainty.INTERVAL_KEY]
        errors.append(estimate / trueVolume - 1)
        halfWidths.append((high - low) / 2 / estimate)
        inside.append(low <= trueVolume <= high)
        se = np.log(high / low) / 2 / uncertainty.tQuantile(0.975, 11)  # the sample: 12 pairs, 12 refits
        z.append(np.log(estimate / trueVolume) / se)
    print(f"{name}: coverage {sum(inside)} / {len(inside)}, half-width median {100 * np.median(halfWidths):.1f} % "
          f"({100 * min(halfWidths):.1f}-{100 * max(halfWidths):.1f}), error sd {100 * np.std(errors):.1f} % "
          f"({100 * min(errors):+.1f} to {100 * max(errors):+.1f}), z rms {np.sqrt(np.mean(np.square(z))):.2f}")


def main():
    from MRIHistoRegLib import sampledata, uncertainty

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--refined", action="store_true", help="also run the sample's config (refinement on)")
    parser.add_argument("--dir", default=os.path.join(ROOT, "output", "bench-uncertainty"))
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    plain, chained = [], []
    for seed in range(args.seeds):
        folder = os.path.join(args.dir, f"sample{seed}")
        if not os.path.exists(os.path.join(folder, "truth.json")):
            sampledata.generateSampleData(folder, size="small", seed=seed)
        row, trueVolume, ratio = landmarkOnly(folder)
        plain.append((row, trueVolume))
        low, high = row[uncertainty.INTERVAL_KEY]
        estimate = row[uncertainty.ESTIMATE_KEY]
        print(f"seed {seed:2d} landmark-only: {100 * (estimate / trueVolume - 1):+6.2f} %  [{low:.4f}, {high:.4f}]  "
              f"half-width {100 * (high - low) / 2 / estimate:5.1f} %  inside {low <= trueVolume <= high}  "
              f"interval time / estimate time {ratio:.1f}", flush=True)
        if args.refined:
            row, trueVolume, accepted = refined(folder, os.path.join(args.dir, f"run{seed}"))
            chained.append((row, trueVolume))
            low, high = row[uncertainty.INTERVAL_KEY]
            estimate = row[uncertainty.ESTIMATE_KEY]
            print(f"seed {seed:2d} refined (accepted {accepted}): {100 * (estimate / trueVolume - 1):+6.2f} %  "
                  f"[{low:.4f}, {high:.4f}]  half-width {100 * (high - low) / 2 / estimate:5.1f} %  "
                  f"inside {low <= trueVolume <= high}", flush=True)
    summarise("landmark-only", plain)
    if chained:
        summarise("refined", chained)


if __name__ == "__main__":
    main()
