"""Benchmark: the refinement over a matrix of sample geometries x seeds x landmark counts (run by hand).

    nice -n 5 .venv/bin/python bench/refine_matrix.py [--seeds 0 1] [--landmarks 12 6] [--only NAME ...]
                                                      [--threads 2] [--out FOLDER] [--compare-focus]

For each case it generates the sample data with that geometry (sampledata.SampleGeometry; ground truth from
construction) and runs the `run` pipeline twice through its config.json, as a user would: landmark-only
(refine false) and refined (refine true, the default preset). Every figure comes from the two report.json files:
held-out TRE median / p90 (30 noise-free points) and the tumour volume in MRI space (Jacobian-integrated)
against the analytic truth. Prints one table row per case: geometry, seed, landmarks, landmark-only median / p90,
refined median / p90, tumour volume error of each, refinement time, accepted?, and any exception (a case that
raises is a row, not the end of the run). The last line counts the cases where the refinement made the
held-out median worse and the ones that raised (issue 15's bar: none of either). The refined run is the pipeline's
default, so the MRI tumour label's focus (tumourfocus.py) runs in it; --compare-focus repeats it without.

The test suite runs a tiny version of this matrix (Testing/test_geometry_matrix.py). Meant to be folded under
bench/refine.py (its engine comparison) by the integrator; the geometries live in `geometries()`.
"""
import argparse
import logging
import os
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MRIHistoReg"))


def geometries():
    """name -> SampleGeometry: larger versions of the test matrix's cases, the shipped sample and the issue's
    two failing user set-ups (a coarse-along-z stack with a 0.1 mm working grid; a 0.05 mm MRI with a 200 um
    stack)."""
    from MRIHistoRegLib.sampledata import SampleGeometry, rotationMatrix

    lps = np.diag([-1.0, -1.0, 1.0])
    oblique = tuple(map(tuple, rotationMatrix((0.2, 1.0, 0.4), 30.0) @ lps))
    flipped = ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))
    stack = (4.0, 4.0, 2.0)
    return {
        "sample (default)": SampleGeometry(),
        "mri 0.05 mm": SampleGeometry(mriSpacingMm=(0.05,) * 3, mriShapeIjk=(110, 110, 64), mriCentreRasMm="stack",
                                      stackSpacingUm=(26.0, 26.0, 40.0), stackExtentMm=(3.2, 3.2, 1.8)),
        "stack 80x80x120 um": SampleGeometry(mriShapeIjk=(70, 70, 40), mriCentreRasMm="stack",
                                             stackSpacingUm=(80.0, 80.0, 120.0), stackExtentMm=stack),
        "mri 0.05, stack 200 um": SampleGeometry(mriSpacingMm=(0.05,) * 3, mriShapeIjk=(120, 120, 70),
                                                 mriCentreRasMm="stack", stackSpacingUm=(200.0, 200.0, 200.0),
                                                 stackExtentMm=(3.6, 3.6, 2.0)),
        "oblique mri": SampleGeometry(mriShapeIjk=(70, 70, 50), mriCentreRasMm="stack", mriDirection=oblique,
                                      stackSpacingUm=(26.0, 26.0, 40.0), stackExtentMm=stack),
        "partial coverage, whole-brain MRI": SampleGeometry(stackSpacingUm=(26.0, 26.0, 40.0), stackExtentMm=(3.6, 3.6, 2.0)),
        "anisotropic mri 0.08x0.08x0.25": SampleGeometry(mriSpacingMm=(0.08, 0.08, 0.25), mriShapeIjk=(85, 85, 14),
                                                         mriCentreRasMm="stack", stackSpacingUm=(26.0, 26.0, 40.0),
                                                         stackExtentMm=stack),
        "flipped mri i axis": SampleGeometry(mriShapeIjk=(70, 70, 40), mriCentreRasMm="stack", mriDirection=flipped,
                                             stackSpacingUm=(40.0, 40.0, 25.0), stackExtentMm=stack),
    }


def runCase(geometry, seed, count, work, compareFocus=False):
    """One row's figures (dict); an exception anywhere is caught into row["error"]. With compareFocus the refined
    run is repeated with the tumour focus off ("unfocused_*": the refinement alone, same everything else)."""
    import dataclasses

    from MRIHistoRegLib import config as configLib, pipeline, sampledata

    row = {"error": ""}
    try:
        geometry = dataclasses.replace(geometry, landmarkCount=count)
        manifest = sampledata.generateSampleData(os.path.join(work, "sample"), seed=seed, geometry=geometry)
        truth = manifest["truth"]
        row["coverage"] = truth["coverage"]["brain_fraction"]
        config = configLib.loadConfig(os.path.join(work, "sample", "config.json"))
        trueVolume = truth["tumour"]["mri_volume_mm3"]
        runs = [(False, "landmark", None), (True, "refined", None)]
        if compareFocus:
            runs.append((True, "unfocused", {"tumourFocus": False}))
        for refine, key, overrides in runs:
            config.refine, config.refineOverrides = refine, dict(overrides or {})
            started = time.perf_counter()
            report = pipeline.runPipeline(config, os.path.join(work, key))
            row[f"{key}_s"] = time.perf_counter() - started
            tre = np.array(report["evaluation"]["tre_mm"])
            row[f"{key}_median"], row[f"{key}_p90"] = float(np.median(tre)), float(np.percentile(tre, 90))
            label = report["labels"]["1"] if "1" in report["labels"] else report["labels"][1]
            row[f"{key}_volume"] = 100 * (label["histology_in_mri_jacobian_mm3"] / trueVolume - 1)
            if key == "refined":
                row["refine_s"] = report["timing_s"].get("refine", float("nan"))
                row["accepted"] = report["refinement"]["accepted"]
                row["reason"] = report["refinement"]["reason"]
                focus = report["refinement"].get("tumour_focus") or {}
                row["focus"] = "yes" if focus.get("applied") else f"no: {focus.get('reason', '')[:40]}"
    except Exception as error:  # noqa: BLE001 - a case that raises is a finding of the table, not its end
        row["error"] = f"{type(error).__name__}: {str(error)[:160]}"
        logging.debug("%s", traceback.format_exc())
    return row


def _format(name, seed, count, row):
    def f(key, spec):
        return format(row[key], spec) if key in row else "-"

    worse = ("WORSE" if "refined_median" in row and row["refined_median"] > row["landmark_median"] else "")
    accepted = {True: "yes", False: "no"}.get(row.get("accepted"), "-")
    unfocused = (f" (unfocused {f('unfocused_median', '.4f')}, {f('unfocused_volume', '+.2f')} %)"
                 if "unfocused_median" in row else "")
    return (f"| {name} | {seed} | {count} | {f('coverage', '.3f')} | {f('landmark_median', '.4f')} / {f('landmark_p90', '.4f')} | "
            f"{f('refined_median', '.4f')} / {f('refined_p90', '.4f')} {worse} | {f('landmark_volume', '+.1f')} % | "
            f"{f('refined_volume', '+.2f')} %{unfocused} | {f('refine_s', '.1f')} | {accepted} | {row.get('focus', '-')} | "
            f"{row.get('reason', '')[:60]} | {row['error']} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--landmarks", type=int, nargs="+", default=[12, 6])
    parser.add_argument("--only", nargs="+", help="geometry names (substring match)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="keep the cases' folders here (default: a temporary folder)")
    parser.add_argument("--compare-focus", action="store_true",
                        help="also run each refined case with the tumour focus off (its figures in brackets)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")

    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    cases = {n: g for n, g in geometries().items() if not args.only or any(o in n for o in args.only)}
    print(f"{len(cases)} geometries x seeds {args.seeds} x landmarks {args.landmarks}, {args.threads} threads")
    print("| geometry | seed | landmarks | brain covered | landmark-only median / p90 (mm) | refined median / p90 (mm) | "
          "landmark-only tumour vol | refined tumour vol | refine (s) | accepted | tumour focus | reason | exception |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worse = raised = total = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        base = args.out or temporary
        for index, (name, geometry) in enumerate(cases.items()):
            for seed in args.seeds:
                for count in args.landmarks:
                    work = os.path.join(base, f"case{index}_s{seed}_l{count}")
                    row = runCase(geometry, seed, count, work, args.compare_focus)
                    total += 1
                    raised += bool(row["error"])
                    worse += "refined_median" in row and row["refined_median"] > row["landmark_median"]
                    print(_format(name, seed, count, row), flush=True)
    print(f"{total} cases in {time.perf_counter() - started:.0f} s: refinement worse on the held-out median in {worse}, "
          f"raised in {raised}")


if __name__ == "__main__":
    main()
