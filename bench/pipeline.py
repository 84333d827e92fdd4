"""Benchmark: the whole headless pipeline on the sample at the seed's full size (run by hand).

    .venv/bin/python bench/pipeline.py [--dir bench/output/pipeline] [--size full]

Generates the sample (full: a 2160 x 2560 x 472 uint16 stack, 5.2 GB as TIFF and again as NRRD, plus a label
map on that grid; ~11 GB of disk, ~2-3 min) once into --dir, then, each in its own subprocess:
- the read floor: sequential readinto of histology.tif into a reused 16 MiB buffer (warm cache);
- `run` of the whole pipeline as the sample's config asks (landmark TPS, intensity refinement on the stack
  streamed down to 0.1 mm, one streamed resampling of the ORIGINAL stack onto the MRI grid, streamed label crop,
  tumour comparison, report with figures).
Prints wall time, peak RSS (the child's VmHWM) and the ratio of the pipeline's time to the read floor. The
claim checked: memory stays bounded by planes and the labelled region, not by the 5.2 GB stack.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
ENV = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "MRIHistoReg"))

_FLOOR = r"""
import sys, time
buffer = bytearray(16 << 20)
start = time.perf_counter()
with open(sys.argv[1], "rb", buffering=0) as f:
    while f.readinto(buffer):
        pass
print(time.perf_counter() - start)
"""


def _peakRssMb(pid_status_text):
    for line in pid_status_text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _runChild(argv):
    """(stdout, wall seconds, peak RSS MB) of a child process; VmHWM read just before it exits via /proc."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as f:
                peak = max(peak, _peakRssMb(f.read()))
        except OSError:
            pass
        time.sleep(0.05)
    out, err = process.communicate()
    if process.returncode:
        raise SystemExit(f"{argv} failed:\n{err[-3000:]}")
    return out, time.perf_counter() - start, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=os.path.join(ROOT, "bench", "output", "pipeline"))
    parser.add_argument("--size", default="full", help="sample size: full (default), small, or a factor 1-20")
    args = parser.parse_args()
    sample = os.path.join(args.dir, f"sample-{args.size}")
    if not os.path.exists(os.path.join(sample, "config.json")):
        print(f"generating the {args.size} sample into {sample} ...", flush=True)
        _runChild([PYTHON, "-m", "MRIHistoRegLib", "sample", "--out", sample, "--size", args.size])
    stack = os.path.join(sample, "histology.tif")
    _runChild([PYTHON, "-c", _FLOOR, stack])  # warm the cache
    floorOut, _, floorPeak = _runChild([PYTHON, "-c", _FLOOR, stack])
    floor = float(floorOut.strip())
    report = os.path.join(args.dir, f"report-{args.size}")
    _, wall, peak = _runChild([PYTHON, "-m", "MRIHistoRegLib", "run", os.path.join(sample, "config.json"), "--out", report])
    with open(os.path.join(report, "report.json")) as f:
        figures = json.load(f)
    size = os.path.getsize(stack) / 1e9
    print(f"\nstack {stack}: {size:.2f} GB")
    print(f"{'contender':<34}{'wall s':>9}{'x floor':>9}{'peak RSS MB':>13}")
    print(f"{'read floor (readinto 16 MiB)':<34}{floor:>9.2f}{1.0:>9.2f}{floorPeak:>13.0f}")
    print(f"{'pipeline run (whole job)':<34}{wall:>9.2f}{wall / floor:>9.2f}{peak:>13.0f}")
    steps = figures["timing_s"]
    print("pipeline steps (s): " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
    label = next(iter((figures.get("labels") or {}).values()), {})
    print(f"held-out TRE median {figures['evaluation']['tre_median_mm']:.3f} mm; tumour in MRI "
          f"{label.get('histology_in_mri_resampled_mm3', float('nan')):.3f} mm3 (Jacobian "
          f"{label.get('histology_in_mri_jacobian_mm3', float('nan')):.3f}); stack/peak RSS = {size * 1e3 / peak:.1f}x")


if __name__ == "__main__":
    main()
