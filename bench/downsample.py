"""Benchmark: streamed downsampling of huge stacks against the read floor and SimpleITK (run by hand).

    .venv/bin/python bench/downsample.py                 # mid size (2160 x 2560 x 118 and 2x depth), ~3 GB disk
    .venv/bin/python bench/downsample.py --full          # adds the seed's full 2160 x 2560 x 472 stack (5.2 GB)

Stacks are generated (noisy uint16, streamed to disk plane by plane) into --dir; mid2x.nrrd (236 planes, 2.6 GB)
is the raw NRRD of the issue's target. Every contender runs in its own subprocess; wall time is measured inside
the child around the timed work only (after its imports). All runs are warm-cache (the floor is read once before
anything is timed). The floor and ours run --repeats times (default 3), interleaved, and the fastest of each is
kept: the machine is shared, so the ratio of the two from the same minutes is the figure to read, with the load
averages printed at the start and the end. "cpu s" (the child's CPU time, all threads) is less sensitive to the
other load than wall time; when the machine is busy, a process's threads together get about one thread's share,
so ours' wall ratio then tracks its CPU ratio. Ratios are to the
read floor of the bytes the downsampling actually needs (the planes up to the last whole output box) of the same
file: sequential readinto into a reused 16 MiB buffer (for gzip NRRD: streaming decompression alone, ISA-L
igzip, into the same buffer; zlib shown too).
SimpleITK (ReadImage + BinShrink, and smoothing + resampling under RLIMIT_AS so that its failure to allocate is
reported, not fatal) runs once per stack.

Peak RSS is the child's own VmHWM (ru_maxrss would also count the forked parent's pages); "over base" is
the peak during the timed work (VmHWM reset after the imports) minus the resident size after the imports.

Other formats add rows by appending a function to ROW_FUNCTIONS (and their child contenders to CONTENDERS);
measureRows() and printRow() print them in the same columns.

Target spacing: 0.1 mm isotropic from 3.25 x 3.25 x 5 um (factors 30.77 x 30.77 x 20).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MRIHistoReg"))

SPACING_MM = (0.00325, 0.00325, 0.005)
TARGET_MM = 0.1
PLANE = (2160, 2560)
BUFFER = 16 << 20


# ---- generation -----------------------------------------------------------------------------------------------
def _planes(depth, seed=0):
    """Noisy, structured uint16 planes (like autofluorescence): smooth pattern + Poisson-ish noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:PLANE[0], 0:PLANE[1]].astype(np.float32)
    base = 1500 + 800 * np.sin(x / 97.0) * np.cos(y / 131.0)
    for k in range(depth):
        noise = rng.integers(0, 400, PLANE, dtype=np.uint16)
        yield (base + 300 * np.sin(k / 17.0)).astype(np.uint16) + noise


def _writeTiff(path, depth):
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for plane in _planes(depth):
            writer.write(plane, contiguous=True, photometric="minisblack")


def _nrrdHeader(depth, encoding):
    return {"type": "uint16", "dimension": 3, "sizes": [PLANE[1], PLANE[0], depth], "encoding": encoding,
            "endian": "little", "space": "left-posterior-superior",
            "space directions": np.diag(SPACING_MM), "space origin": np.zeros(3)}


def _writeNrrd(path, depth, encoding):
    import nrrd

    with open(path, "wb") as f:
        nrrd.writer._write_header(f, _nrrdHeader(depth, encoding))
        if encoding == "raw":
            for plane in _planes(depth):
                f.write(plane.tobytes())
        else:
            from isal import igzip

            with igzip.IGzipFile(fileobj=f, mode="wb", compresslevel=1) as gz:
                for plane in _planes(depth):
                    gz.write(plane.tobytes())


def generate(folder, full):
    os.makedirs(folder, exist_ok=True)
    specs = [("mid.tif", 118, "tiff"), ("mid2x.tif", 236, "tiff"), ("mid.nrrd", 118, "raw"), ("mid2x.nrrd", 236, "raw"),
             ("mid_gz.nrrd", 60, "gzip")]
    if full:
        specs.append(("full.tif", 472, "tiff"))
    for name, depth, kind in specs:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            continue
        t = time.perf_counter()
        temp = path + ".part"
        if kind == "tiff":
            _writeTiff(temp, depth)
        else:
            _writeNrrd(temp, depth, kind)
        os.replace(temp, path)
        print(f"generated {name} ({os.path.getsize(path) / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
    return specs


# ---- contenders (run in a child process) ----------------------------------------------------------------------
def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _resetPeak():
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _neededBytes(source):
    """(offset, length) of the voxel bytes the downsampling reads: planes 0 .. the last one inside a whole
    output box (a raw source's contiguous run; for gzip, decompressed bytes from the stream start)."""
    from MRIHistoRegLib.downsample import _AxisPlan

    cover = _AxisPlan(source.shape[0], TARGET_MM / SPACING_MM[2]).cover
    planeBytes = source.planeShape[0] * source.planeShape[1] * source.dtype.itemsize
    offset = source.rawPlaneOffset(0)
    if offset is not None and source.rawPlaneOffset(cover - 1) == offset + (cover - 1) * planeBytes:
        return offset, cover * planeBytes
    return getattr(source, "dataOffset", 0), cover * planeBytes


def _floorRead(path, extra, result):
    """Sequential readinto of the needed bytes into a reused 16 MiB buffer."""
    from MRIHistoRegLib import stacks

    offset, length = _neededBytes(stacks.openStack(path))
    view = memoryview(bytearray(BUFFER))
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length > 0:
            length -= f.readinto(view[:min(length, BUFFER)]) or length
    result["seconds"] = time.perf_counter() - t


def _floorGunzip(path, extra, result):
    """Streaming decompression of the needed bytes alone (ISA-L igzip, else zlib) into the same buffer."""
    from MRIHistoRegLib import stacks

    source = stacks.openStack(path)
    _, length = _neededBytes(source)
    view = memoryview(bytearray(BUFFER))
    t = time.perf_counter()
    with open(path, "rb") as raw:
        raw.seek(source.dataOffset)
        if extra == "igzip":
            from isal import igzip

            stream = igzip.IGzipFile(fileobj=raw, mode="rb")
        else:
            import gzip

            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        while length > 0:
            length -= stream.readinto(view[:min(length, BUFFER)]) or length
    result["seconds"] = time.perf_counter() - t


def _ours(path, extra, result):
    from MRIHistoRegLib import downsample, stacks

    t = time.perf_counter()
    source = stacks.openStack(path, spacingMm=SPACING_MM)
    array, _ = downsample.downsampleStack(source, TARGET_MM)
    result["seconds"] = time.perf_counter() - t
    result["output_shape"] = array.shape
    result["output_mb"] = array.nbytes / 1e6


def _sitkBinShrink(path, extra, result):
    import SimpleITK as sitk

    t = time.perf_counter()
    try:
        image = sitk.ReadImage(path)
        shrunk = sitk.BinShrink(image, [31, 31, 20])
        result["output_shape"] = sitk.GetArrayViewFromImage(shrunk).shape
    except (RuntimeError, MemoryError) as error:
        result["failed"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:90]}"
    result["seconds"] = time.perf_counter() - t


def _sitkSmoothResample(path, extra, result):
    import SimpleITK as sitk

    t = time.perf_counter()
    try:
        image = sitk.Cast(sitk.ReadImage(path), sitk.sitkFloat32)
        image.SetSpacing(SPACING_MM)
        smooth = sitk.SmoothingRecursiveGaussian(image, TARGET_MM / 2.0)
        size = [int(n * s / TARGET_MM) for n, s in zip(image.GetSize(), SPACING_MM)]
        out = sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                            (TARGET_MM,) * 3, image.GetDirection(), 0.0, sitk.sitkFloat32)
        result["output_shape"] = sitk.GetArrayViewFromImage(out).shape
    except (RuntimeError, MemoryError) as error:
        result["failed"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:90]}"
    result["seconds"] = time.perf_counter() - t


# name -> function(path, extra, result) run in a child process: it sets result["seconds"] (the timed work only)
# and may set "output_shape", "output_mb", "failed". Row functions of other formats register theirs here.
CONTENDERS = {
    "floor-read": _floorRead,
    "floor-igzip": lambda path, extra, result: _floorGunzip(path, "igzip", result),
    "floor-zlib": lambda path, extra, result: _floorGunzip(path, "zlib", result),
    "ours": _ours,
    "sitk-binshrink": _sitkBinShrink,
    "sitk-smooth-resample": _sitkSmoothResample,
}


def child(name, path, extra):
    import SimpleITK  # noqa: F401  imported by every child so the baselines compare

    import MRIHistoRegLib.downsample  # noqa: F401
    import MRIHistoRegLib.stacks  # noqa: F401
    import nrrd  # noqa: F401  the readers openStack imports on first use: not part of anyone's timed work
    import tifffile  # noqa: F401

    if name.startswith("sitk"):
        cap = int(extra)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    importPeak = _status("VmHWM")
    reset = _resetPeak()
    base = _status("VmRSS")
    result = {}
    cpu = time.process_time()
    CONTENDERS[name](path, extra, result)
    result["cpu"] = time.process_time() - cpu  # all threads; with setup such as opening the file
    result["base_rss"] = base
    result["work_peak_rss"] = _status("VmHWM") if reset else None
    result["import_peak_rss"] = importPeak
    print(json.dumps(result))


def run(name, path, extra="0", timeout=900):
    command = [sys.executable, os.path.abspath(__file__), "--child", name, path, str(extra)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    started = time.perf_counter()
    _, status, usage = os.wait4(process.pid, 0)
    out = process.stdout.read()
    err = process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    result = {"peak_rss": usage.ru_maxrss * 1024, "wall_total": time.perf_counter() - started}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if lines:
        result.update(json.loads(lines[-1]))
        if result.get("work_peak_rss"):
            # ru_maxrss also counts the forked parent's pages before exec: use the child's own high-water marks
            result["peak_rss"] = max(result["work_peak_rss"], result["import_peak_rss"])
    else:
        result["failed"] = f"exit {process.returncode}: {(err.strip().splitlines() or ['?'])[-1][:90]}"
    return result


def measureRows(label, depth, path, floorName, contenders, repeats=3, extras=None):
    """Rows for one stack: the floor and each contender, best of `repeats`, interleaved (floor, contenders,
    floor, ...) so that the load of this shared machine hits them alike. extras: contender -> child argument."""
    extras = extras or {}
    names = [floorName] + [c for c in contenders if c != floorName]
    run(floorName, path, extras.get(floorName, "0"))  # warm the cache
    results = {}
    for _ in range(max(1, repeats)):
        for name in names:
            result = run(name, path, extras.get(name, "0"))
            old = results.get(name)
            if old is None or "seconds" in result and ("seconds" not in old or result["seconds"] < old["seconds"]):
                results[name] = result
    floor = results[floorName].get("seconds")
    rows = [(label, depth, name, results[name], floor) for name in names]
    for row in rows:
        printRow(row)
    return rows


def stackRows(args):
    """The generated TIFF and NRRD stacks (raw and gzip): floor, ours, SimpleITK."""
    specs = generate(args.dir, args.full)
    cap = str(int(args.sitk_cap_gb * (1 << 30)))
    binCap = str(int(args.binshrink_cap_gb * (1 << 30)))
    rows = []
    for name, depth, kind in specs:
        if args.only and name not in args.only.split(","):
            continue
        path = os.path.join(args.dir, name)
        floorName = "floor-igzip" if kind == "gzip" else "floor-read"
        contenders = ["ours"]
        if kind == "gzip":
            contenders.insert(0, "floor-zlib")
        if not args.skip_sitk and name in ("mid.tif", "mid.nrrd", "full.tif", "mid_gz.nrrd"):
            contenders += ["sitk-binshrink", "sitk-smooth-resample"]
        extras = {"sitk-binshrink": binCap, "sitk-smooth-resample": cap}
        # SimpleITK takes tens of seconds per run: once is enough for its order of magnitude
        sitkRows = [c for c in contenders if c.startswith("sitk")]
        rows += measureRows(name, depth, path, floorName, [c for c in contenders if c not in sitkRows], args.repeats)
        for contender in sitkRows:
            result = run(contender, path, extras[contender])
            rows.append((name, depth, contender, result, rows[-1][4]))
            printRow(rows[-1])
    return rows


# Row functions, run in this order by main(): each takes the parsed arguments and returns its printed rows
# (label, planes, contender, result, floor seconds). Other formats append theirs below.
ROW_FUNCTIONS = [stackRows]

HEADER = (f"{'stack':<14} {'planes':>6} {'contender':<22} {'seconds':>8} {'x floor':>8} {'cpu s':>7} {'peak RSS MB':>11} "
          f"{'over base MB':>12}  note")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=os.path.join(ROOT, "bench", "output"), help="where the stacks are written")
    parser.add_argument("--full", action="store_true", help="also the seed's full 5.2 GB stack")
    parser.add_argument("--sitk-cap-gb", type=float, default=6.0, help="address-space cap for the SimpleITK smoothing run")
    parser.add_argument("--binshrink-cap-gb", type=float, default=8.0,
                        help="address-space cap for SimpleITK ReadImage+BinShrink (the machine is shared)")
    parser.add_argument("--skip-sitk", action="store_true")
    parser.add_argument("--only", help="comma-separated stack names to run (e.g. mid.tif,full.tif)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs for the floor and ours")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    load = os.getloadavg()
    print(f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} cores", flush=True)
    print(HEADER)
    rows = []
    for rowFunction in ROW_FUNCTIONS:
        rows += rowFunction(args)
    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print(HEADER)
    for row in rows:
        printRow(row)


def printRow(row):
    """Print one row: (label, planes, contender, result dict from run(), floor seconds or None)."""
    name, depth, contender, result, floor = row
    seconds = result.get("seconds")
    ratio = f"{seconds / floor:8.2f}" if seconds is not None and floor else f"{'-':>8}"
    note = result.get("failed", "")
    if "output_mb" in result:
        note = f"output {tuple(result['output_shape'])} {result['output_mb']:.2f} MB float32 " + note
    over = ((result.get("work_peak_rss") or result["peak_rss"]) - result.get("base_rss", 0)) / 1e6
    secondsText = f"{seconds:8.3f}" if seconds is not None else f"{'-':>8}"
    cpuText = f"{result['cpu']:7.3f}" if result.get("cpu") is not None else f"{'-':>7}"
    print(f"{name:<14} {depth:>6} {contender:<22} {secondsText} {ratio} {cpuText} {result['peak_rss'] / 1e6:11.1f} "
          f"{over:12.1f}  {note}", flush=True)


if __name__ == "__main__":
    main()
