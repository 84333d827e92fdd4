"""Benchmark: the pipeline on the real in-vivo mouse T2 MRIs seen through a known mapping (run by hand).

    .venv/bin/python bench/real_mri.py [--mice 1 2] [--seeds 0 1 2] [--spacing-um 40 40 80] [--coverage 0.6]
                                       [--threads 2] [--no-mask] [--no-tumour-focus] [--keep DIR]
    .venv/bin/python bench/real_mri.py --table DIR   # the table again from a --keep folder (runs nothing)

For each mouse and seed, Testing/realmri.py builds the case (the real 0.15 mm MRI, a light-sheet-like stack at
--spacing-um covering --coverage of the brain's length, 12 noisy structure-centroid landmarks, the other
centroids held out, the right caudate putamen as the tumour) and pipeline.runPipeline runs its config.json as a
user would: landmark-only (refine false) and refined (the config's default preset and working spacing). Prints
one row per case: held-out TRE median / p90 (mm), the tumour's Jacobian-integrated volume in MRI space against
the truth (%), Dice, whether the refinement was accepted, and times, with the refined run's wall time as a
ratio to the landmark-only run of the same case (the anchor, measured in the same process). --no-mask leaves
the brain mask out of the config (`mri_mask`, on by default as a user with these data would set it). Needs
../shared/data/mouse_mri_dama (exits with the reason when absent).
"""
import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MRIHistoReg"))
sys.path.insert(0, os.path.join(ROOT, "Testing"))


def _row(report, truthMm3):
    tre = np.array(report["evaluation"]["tre_mm"])
    labels = report["labels"]
    tumour = labels.get(1, labels.get("1"))
    refinement = report["refinement"] or {}
    return {"median": float(np.median(tre)), "p90": float(np.percentile(tre, 90)),
            "volume": 100.0 * (tumour["histology_in_mri_jacobian_mm3"] / truthMm3 - 1.0), "dice": tumour["dice"],
            "accepted": refinement.get("accepted"), "reason": refinement.get("reason"),
            "refine_s": report["timing_s"].get("refine"), "total_s": report["timing_s"]["total"],
            "folded": report["jacobian"]["folded_fraction"]}


def runCase(work, mouse, seed, spacingUm, coverage, useMask=True, tumourFocus=True):
    import realmri
    from MRIHistoRegLib import config as configLib, pipeline

    folder = os.path.join(work, f"mouse{mouse}_seed{seed}")
    started = time.perf_counter()
    case = realmri.buildRealMriCase(os.path.join(folder, "case"), mouse=mouse, seed=seed, spacingUm=spacingUm,
                                    coverage=coverage, useMask=useMask)
    buildSeconds = time.perf_counter() - started
    config = configLib.loadConfig(os.path.join(folder, "case", "config.json"))
    truthMm3 = case["truth"]["tumour"]["mri_volume_mm3"]
    rows = {}
    for name, refine in (("landmarks", False), ("refined", True)):
        overrides = {} if tumourFocus else {"tumourFocus": False}
        report = pipeline.runPipeline(dataclasses.replace(config, refine=refine, refineOverrides=overrides),
                                      os.path.join(folder, name))
        rows[name] = _row(report, truthMm3)
    truth = case["truth"]
    return {"mouse": mouse, "seed": seed, "build_s": buildSeconds, "shape": truth["histology"]["shape_ijk"],
            "covered": truth["histology"]["brain_fraction_covered"], "held_out": truth["eval_points"]["count"],
            "truth_mm3": truthMm3, **rows}


def readKept(folder):
    """The results of the cases kept in a --keep folder (finished ones: both reports written)."""
    import json

    results = []
    for name in sorted(os.listdir(folder)):
        case = os.path.join(folder, name)
        paths = [os.path.join(case, part, file) for part, file in
                 (("case", "truth.json"), ("landmarks", "report.json"), ("refined", "report.json"))]
        if not all(os.path.isfile(p) for p in paths):
            continue
        truth, *reports = (json.load(open(p, encoding="utf-8")) for p in paths)
        truthMm3 = truth["tumour"]["mri_volume_mm3"]
        results.append({"mouse": truth["source"]["mouse"], "seed": truth["seed"], "build_s": None,
                        "shape": truth["histology"]["shape_ijk"], "covered": truth["histology"]["brain_fraction_covered"],
                        "held_out": truth["eval_points"]["count"], "truth_mm3": truthMm3,
                        "landmarks": _row(reports[0], truthMm3), "refined": _row(reports[1], truthMm3)})
    return results


def _print(results):
    print("\n| mouse | seed | stack (i x j x k) | brain covered | held-out | landmark-only median / p90 (mm) | "
          "refined median / p90 (mm) | tumour vol. landmark-only / refined | Dice lo / ref | refinement | "
          "time landmark-only / refined (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        lo, ref = r["landmarks"], r["refined"]
        verdict = "accepted" if ref["accepted"] else f"rejected: {ref['reason']}"
        print(f"| {r['mouse']} | {r['seed']} | {'x'.join(map(str, r['shape']))} | {100 * r['covered']:.0f} % | "
              f"{r['held_out']} | {lo['median']:.3f} / {lo['p90']:.3f} | {ref['median']:.3f} / {ref['p90']:.3f} | "
              f"{lo['volume']:+.1f} / {ref['volume']:+.1f} % | {lo['dice']:.3f} / {ref['dice']:.3f} | {verdict} | "
              f"{lo['total_s']:.1f} / {ref['total_s']:.1f} | {ref['total_s'] / lo['total_s']:.1f} |")
    worse = [r for r in results if r["refined"]["median"] > r["landmarks"]["median"] + 1e-9]
    folded = [r for r in results if r["landmarks"]["folded"] or r["refined"]["folded"]]
    medians = np.array([[r["landmarks"]["median"], r["refined"]["median"]] for r in results])
    print(f"\n{len(results)} cases: refined median worse than landmark-only in {len(worse)}, folding in {len(folded)}; "
          f"mean held-out median {medians[:, 0].mean():.3f} -> {medians[:, 1].mean():.3f} mm; "
          f"accepted {sum(bool(r['refined']['accepted']) for r in results)}/{len(results)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mice", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--spacing-um", type=float, nargs=3, default=[40.0, 40.0, 80.0])
    parser.add_argument("--coverage", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-mask", action="store_true", help="leave the brain mask out of the run config")
    parser.add_argument("--no-tumour-focus", action="store_true",
                        help="the refined run without the tumour focus (config tumour_focus false)")
    parser.add_argument("--table", help="print the table of the cases kept in this --keep folder and stop")
    parser.add_argument("--keep", help="write the cases and reports here (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")

    if args.table:
        _print(readKept(args.table))
        return
    import realmri
    import SimpleITK as sitk

    reason = realmri.missingData()
    if reason:
        sys.exit(reason)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as temporary:
        work = args.keep or temporary
        for mouse in args.mice:
            for seed in args.seeds:
                results.append(runCase(work, mouse, seed, args.spacing_um, args.coverage, not args.no_mask,
                                       not args.no_tumour_focus))
                r = results[-1]
                print(f"mouse {mouse} seed {seed}: built in {r['build_s']:.1f} s; held-out median "
                      f"{r['landmarks']['median']:.3f} -> {r['refined']['median']:.3f} mm, tumour "
                      f"{r['landmarks']['volume']:+.1f} -> {r['refined']['volume']:+.1f} %, refine "
                      f"{r['refined']['refine_s']} s ({'accepted' if r['refined']['accepted'] else 'rejected'})",
                      flush=True)
    _print(results)


if __name__ == "__main__":
    main()
