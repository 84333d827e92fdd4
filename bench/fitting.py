"""Landmark fitting speed (run by hand): fitting.fitLandmarks per model and evaluateFit's leave-one-out, against
SciPy's thin-plate RBFInterpolator fitted to the same pairs in the same run (the anchor).

    .venv/bin/python bench/fitting.py [--pairs 12 50 200] [--repeats 15]

The panel refits on every landmark move, so a fit must stay a small multiple of the anchor's. Printed per pair
count: the anchor's median time, each model's median as a ratio to it, and the leave-one-out evaluation's time as
a ratio to the anchor (it refits once per pair). Medians of interleaved repeats, so load on the machine affects
ours and the anchor alike.
"""
import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MRIHistoReg"))


def pointPairs(count, seed=12):
    """A shrunk, noisy cloud of `count` MRI / histology pairs over a mouse-brain-sized box (mm)."""
    rng = np.random.default_rng(seed)
    fixed = rng.uniform([-4.0, -7.0, -3.0], [4.0, 7.0, 3.0], size=(count, 3))
    return fixed, fixed * 0.8 + rng.normal(scale=0.05, size=fixed.shape)


def medianSeconds(call, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[12, 50, 200])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    from scipy.interpolate import RBFInterpolator

    from MRIHistoRegLib import fitting
    from MRIHistoRegLib.settings import MODELS

    print("pairs | anchor (SciPy TPS fit) ms | " + " | ".join(f"{m} / anchor" for m in MODELS)
          + " | leave-one-out (affine+tps) / anchor")
    for count in args.pairs:
        fixed, moving = pointPairs(count)
        anchor = lambda: RBFInterpolator(fixed, moving, kernel="thin_plate_spline", degree=1)  # noqa: E731
        medianSeconds(anchor, 3)  # warm-up: imports and first calls
        ratios = []
        for model in MODELS:
            ours = medianSeconds(lambda: fitting.fitLandmarks(fixed, moving, model), args.repeats)
            ratios.append(ours / medianSeconds(anchor, args.repeats))
        looRepeats = max(3, args.repeats // 5)
        loo = medianSeconds(lambda: fitting.evaluateFit(fixed, moving, None, "affine+tps"), looRepeats)
        anchorSeconds = medianSeconds(anchor, args.repeats)
        print(f"{count} | {1000 * anchorSeconds:.2f} | " + " | ".join(f"{r:.2f}x" for r in ratios)
              + f" | {loo / anchorSeconds:.1f}x", flush=True)


if __name__ == "__main__":
    main()
