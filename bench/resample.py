"""Benchmark: resampling the MRI grid through a thin-plate spline (issue 7, item 6). Run by hand:

    .venv/bin/python bench/resample.py [--counts 20 50 200 500] [--repeats 3]

MRI grid 100 x 200 x 120 voxels (i, j, k) at 0.1 mm (2.4 M voxels); TPS (kernel U(r) = r, Slicer's R basis)
from N random landmarks with a smooth warp (shrink ~0.9, sinusoidal displacement 0.3 mm, 0.01 mm placement
noise). Contenders, each in its own child process (time = best of --repeats, peak RSS from wait4):
  mrihistoreg  resample.resampleToGrid (verified coarse lattice + cone corrections + one trilinear pass)
  vtk          vtkImageReslice + vtkThinPlateSplineTransform (R basis): Slicer's own resampling path
  itk          ITK ThinPlateSplineKernelTransform + ResampleImageFilter, only when the `itk` package is installed
Errors are measured against an exact TPS solved and evaluated here (independently of fitting.py/resample.py),
at 200 k random output voxels plus every voxel within 2 voxels of a landmark, in output voxels (moving-space
error pulled back through the linear part); `img` is the max |intensity difference| against the same trilinear
sampling at exact coordinates (image range 0..1).

Targets (issue 7): every count no slower than VTK at 50 landmarks (same run), >= 10x faster than VTK at 500,
max error <= 0.1 voxel, p99 <= 0.02 voxel.
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

SHAPE = (120, 200, 100)  # (k, j, i): 100 x 200 x 120 voxels (i, j, k)
SPACING = 0.1
SOURCE_SHAPE = (130, 210, 110)


def geometry(shape, spacing, origin=0.0):
    m = np.diag([spacing, spacing, spacing, 1.0])
    m[:3, 3] = origin
    return m


def landmarks(count, seed):
    rng = np.random.default_rng(seed)
    extent = np.array(SHAPE[::-1], float) * SPACING
    fixed = rng.uniform(0.03, 0.97, (count, 3)) * extent
    moving = (fixed * 0.9 + 0.6 + 0.3 * np.sin(2 * np.pi * fixed[:, [1, 2, 0]] / 18.0)
              + rng.normal(0.0, 0.01, (count, 3)))
    return fixed, moving


def sourceImage():
    """A smooth-plus-texture 'histology' volume on a 0.1 mm grid (values 0..1)."""
    kk, jj, ii = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SOURCE_SHAPE], indexing="ij", sparse=True)
    image = 0.5 + 0.25 * np.sin(ii / 7.0) * np.cos(jj / 11.0) + 0.25 * np.sin(kk / 5.0 + ii / 13.0)
    rng = np.random.default_rng(0)
    return (0.9 * image + 0.1 * rng.random(SOURCE_SHAPE)).astype(np.float32)


class ExactTps:
    """Interpolating TPS with U(r) = r and a linear polynomial, solved and evaluated directly (no tricks)."""

    def __init__(self, fixed, moving):
        n = len(fixed)
        K = np.linalg.norm(fixed[:, None, :] - fixed[None, :, :], axis=2)
        P = np.concatenate([np.ones((n, 1)), fixed], axis=1)
        A = np.zeros((n + 4, n + 4))
        A[:n, :n], A[:n, n:], A[n:, :n] = K, P, P.T
        b = np.zeros((n + 4, 3))
        b[:n] = moving
        solution = np.linalg.solve(A, b)
        self.centres, self.weights, self.poly = fixed, solution[:n], solution[n:]

    def transformPoints(self, points):
        out = np.empty((len(points), 3))
        for start in range(0, len(points), 2048):
            x = points[start:start + 2048]
            r = np.linalg.norm(x[:, None, :] - self.centres[None, :, :], axis=2)
            out[start:start + 2048] = r @ self.weights + self.poly[0] + x @ self.poly[1:]
        return out

    def linear(self):
        return self.poly[1:].T


def samplePositions(fixed, seed=1):
    rng = np.random.default_rng(seed)
    nk, nj, ni = SHAPE
    flat = rng.choice(nk * nj * ni, 200000, replace=False)
    k, rest = np.divmod(flat, nj * ni)
    j, i = np.divmod(rest, ni)
    near = []
    centres = np.round(fixed / SPACING).astype(int)
    r = np.arange(-2, 3)
    offsets = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    for c in centres:
        near.append(c[None, :] + offsets)
    near = np.concatenate(near)
    near = near[np.all((near >= 0) & (near < np.array([ni, nj, nk])), axis=1)]
    return np.concatenate([np.stack([i, j, k], 1), near])  # (i, j, k)


def errorsInVoxels(approx, exact, tps):
    pulledBack = np.linalg.solve(tps.linear(), (approx - exact).T).T
    error = np.linalg.norm(pulledBack, axis=1) / SPACING
    return float(error.max()), float(np.percentile(error, 99))


def exactImage(source, srcM, exactMoving, samples):
    from MRIHistoRegLib.resample import sampleLinear

    index = (exactMoving - srcM[:3, 3]) / SPACING
    return sampleLinear(source, index[:, 0].astype(np.float32), index[:, 1].astype(np.float32),
                        index[:, 2].astype(np.float32))


# ------------------------------------------------------------------------------------------------ contenders
def runMriHistoReg(count, seed, repeats):
    from MRIHistoRegLib import fitting, resample

    fixed, moving = landmarks(count, seed)
    model = fitting.fitLandmarks(fixed, moving, "affine+tps")
    source, srcM, refM = sourceImage(), geometry(SOURCE_SHAPE, SPACING), geometry(SHAPE, SPACING)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        lattice = resample.LatticeMapping(model, SHAPE, refM, targetRasToIjk=np.linalg.inv(srcM), maxErrorVoxels=0.1)
        out, info = resample.resampleToGrid((source, srcM), model, SHAPE, refM, lattice=lattice)
        best = min(best, time.perf_counter() - start)
    samples = samplePositions(fixed)
    nk, nj, ni = SHAPE
    coords = np.empty((3,) + SHAPE, np.float32)
    for k0 in range(0, nk, 10):  # the coordinates the resampler used (same grid path)
        coords[:, k0:k0 + 10] = lattice.evaluateGrid(np.arange(k0, min(nk, k0 + 10), dtype=float),
                                                     np.arange(nj, dtype=float), np.arange(ni, dtype=float))
    used = coords[:, samples[:, 2], samples[:, 1], samples[:, 0]].T.astype(float) * SPACING + srcM[:3, 3]
    note = f"step {info['lattice_step_voxels'][0]:g}, probe max {info['probe_max_error_voxels']:.3f}"
    return dict(measured(used, out, source, srcM, fixed, moving, samples, note), time_s=best)


def measured(used, out, source, srcM, fixed, moving, samples, note):
    """The bench's row for a contender: its mapped sample points `used` and output image `out` against the exact
    TPS (independent solve) and the source image sampled exactly there."""
    tps = ExactTps(fixed, moving)
    exact = tps.transformPoints(samples * SPACING)
    maxError, p99Error = errorsInVoxels(used, exact, tps)
    imageError = np.abs(out[samples[:, 2], samples[:, 1], samples[:, 0]] - exactImage(source, srcM, exact, samples)).max()
    return {"max_err_vox": maxError, "p99_err_vox": p99Error, "img_err": float(imageError), "note": note}


def runVtk(count, seed, repeats):
    import vtk
    from vtk.util import numpy_support

    fixed, moving = landmarks(count, seed)
    source, srcM = sourceImage(), geometry(SOURCE_SHAPE, SPACING)
    image = vtk.vtkImageData()
    image.SetDimensions(SOURCE_SHAPE[2], SOURCE_SHAPE[1], SOURCE_SHAPE[0])
    image.SetSpacing(SPACING, SPACING, SPACING)
    image.SetOrigin(0.0, 0.0, 0.0)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(source.ravel(), deep=True))
    tpsVtk = vtk.vtkThinPlateSplineTransform()
    tpsVtk.SetBasisToR()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for a, b in zip(fixed, moving):
        src.InsertNextPoint(*a)
        dst.InsertNextPoint(*b)
    tpsVtk.SetSourceLandmarks(src)
    tpsVtk.SetTargetLandmarks(dst)
    best = np.inf
    for _ in range(repeats):
        tpsVtk.Modified()
        start = time.perf_counter()
        reslice = vtk.vtkImageReslice()
        reslice.SetInputData(image)
        reslice.SetResliceTransform(tpsVtk)
        reslice.SetInterpolationModeToLinear()
        reslice.SetOutputSpacing(SPACING, SPACING, SPACING)
        reslice.SetOutputOrigin(0.0, 0.0, 0.0)
        reslice.SetOutputExtent(0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1)
        reslice.Update()
        out = numpy_support.vtk_to_numpy(reslice.GetOutput().GetPointData().GetScalars()).reshape(SHAPE)
        best = min(best, time.perf_counter() - start)
    samples = samplePositions(fixed)
    points = vtk.vtkPoints()
    for p in samples * SPACING:
        points.InsertNextPoint(*p)
    mapped = vtk.vtkPoints()
    tpsVtk.TransformPoints(points, mapped)
    used = numpy_support.vtk_to_numpy(mapped.GetData()).astype(float)
    note = f"{vtk.vtkVersion.GetVTKVersion()}, {os.cpu_count()} threads"
    return dict(measured(used, out, source, srcM, fixed, moving, samples, note), time_s=best)


def runItk(count, seed, repeats):
    import itk

    fixed, moving = landmarks(count, seed)
    source = sourceImage()
    image = itk.image_from_array(source)
    image.SetSpacing([SPACING] * 3)
    ImageType = type(image)
    transform = itk.ThinPlateSplineKernelTransform[itk.D, 3].New()
    src = transform.GetModifiableSourceLandmarks()
    dst = transform.GetModifiableTargetLandmarks()
    for index, (a, b) in enumerate(zip(fixed, moving)):
        src.GetPoints().InsertElement(index, [float(v) for v in a])
        dst.GetPoints().InsertElement(index, [float(v) for v in b])
    transform.ComputeWMatrix()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        resampler = itk.ResampleImageFilter[ImageType, ImageType].New(Input=image, Transform=transform)
        resampler.SetSize([SHAPE[2], SHAPE[1], SHAPE[0]])
        resampler.SetOutputSpacing([SPACING] * 3)
        resampler.Update()
        itk.array_from_image(resampler.GetOutput())  # converted to numpy inside the timed loop, like the VTK output
        best = min(best, time.perf_counter() - start)
    samples = samplePositions(fixed)
    used = np.array([list(transform.TransformPoint([float(v) for v in p])) for p in samples[:20000] * SPACING])
    tps = ExactTps(fixed, moving)
    exact = tps.transformPoints(samples[:20000] * SPACING)
    maxError, p99Error = errorsInVoxels(used, exact, tps)
    return {"time_s": best, "max_err_vox": maxError, "p99_err_vox": p99Error, "img_err": float("nan"),
            "note": "ITK (U(r)=r kernel), errors at 20 k points"}


CONTENDERS = {"mrihistoreg": runMriHistoReg, "vtk": runVtk, "itk": runItk}


def child(name, count, seed, repeats):
    result = CONTENDERS[name](count, seed, repeats)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(name, count, seed, repeats):
    env = dict(os.environ)
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", name, str(count), str(seed),
                                str(repeats)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    stdout, stderr = process.stdout.read(), process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"{name} with {count} landmarks failed:\n{stderr[-2000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024.0  # Linux: kilobytes
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[20, 50, 200, 500])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, count, seed, repeats = args.child
        child(name, int(count), int(seed), int(repeats))
        return
    contenders = ["mrihistoreg", "vtk"]
    try:
        import importlib.util

        if importlib.util.find_spec("itk") is not None:
            contenders.append("itk")
        else:
            print("itk: not installed (ITK's ThinPlateSplineKernelTransform skipped; SimpleITK has no TPS)")
    except Exception:  # pragma: no cover
        pass
    results = {}
    for count in args.counts:
        for name in contenders:
            results[(name, count)] = spawn(name, count, args.seed + count, args.repeats)
            r = results[(name, count)]
            print(f"  {name:12s} {count:4d} landmarks: {r['time_s']:.3f} s", file=sys.stderr, flush=True)
    vtk50 = results.get(("vtk", 50), {}).get("time_s")
    print(f"\nMRI grid {SHAPE[::-1]} (i, j, k) @ {SPACING} mm = {np.prod(SHAPE) / 1e6:.1f} M voxels; "
          f"source {SOURCE_SHAPE[::-1]}; best of {args.repeats}; {os.cpu_count()} CPUs\n")
    header = (f"{'landmarks':>9} {'contender':>12} {'time s':>8} {'vs VTK@50':>9} {'VTK/this':>8} {'RSS MB':>7} "
              f"{'max vox':>8} {'p99 vox':>8} {'img':>7}  note")
    print(header)
    print("-" * len(header))
    verdicts = []
    for count in args.counts:
        vtkTime = results[("vtk", count)]["time_s"]
        for name in contenders:
            r = results[(name, count)]
            ratio50 = r["time_s"] / vtk50 if vtk50 else float("nan")
            print(f"{count:9d} {name:>12} {r['time_s']:8.3f} {ratio50:9.2f} {vtkTime / r['time_s']:8.1f} "
                  f"{r['peak_rss_mb']:7.0f} {r['max_err_vox']:8.4f} {r['p99_err_vox']:8.4f} {r['img_err']:7.4f}  {r['note']}")
        ours = results[("mrihistoreg", count)]
        verdicts.append((f"{count} landmarks: no slower than VTK@50", vtk50 is not None and ours["time_s"] <= vtk50))
        verdicts.append((f"{count} landmarks: max <= 0.1 voxel, p99 <= 0.02 voxel",
                         ours["max_err_vox"] <= 0.1 and ours["p99_err_vox"] <= 0.02))
        if count == 500:
            verdicts.append(("500 landmarks: >= 10x faster than VTK", vtkTime / ours["time_s"] >= 10))
    print()
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'MISS'}  {text}")


if __name__ == "__main__":
    main()
