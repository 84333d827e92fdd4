"""Benchmark: streamed downsampling of huge stacks against the read floor and SimpleITK (run by hand).

    .venv/bin/python bench/downsample.py                 # mid size (2160 x 2560 x 118 and 2x depth), ~3 GB disk
    .venv/bin/python bench/downsample.py --full          # adds the seed's full 2160 x 2560 x 472 stack (5.2 GB)
    .venv/bin/python bench/downsample.py --omezarr       # only the OME-Zarr pyramid rows (a generated 0.3 GB store)
    .venv/bin/python bench/downsample.py --ims           # only the Imaris rows (a generated .ims, 2x pyramid)

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
    return _runChild([sys.executable, os.path.abspath(__file__), "--child", name, path, str(extra)])


def _runChild(command):
    """Run one contender's child process; its JSON line with the peak RSS from the child's own high-water marks."""
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
    parser.add_argument("--omezarr", action="store_true", help="only the OME-Zarr pyramid rows (omeZarrRows)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs for the floor and ours")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.omezarr:
        return omeZarrRows(args.dir)
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



# ---- OME-Zarr pyramid rows (issue 14; engineer E1) -------------------------------------------------------------
# A generated NGFF 0.4 store: 128 x 1024 x 1280 uint16 at 3.25 x 3.25 x 5 um, chunks 64^3, five levels made by
# 2x mean pooling (rounded), so a 0.1 mm target reads level 4 (52 x 52 x 80 um), 1/4096 of level 0's voxels.
# Rows: the read floor of the bytes actually needed (level 4's chunk files read raw), zarr's own read of that
# level (decoded, whole), ome-zarr-py's reader (its dask array of level 4, computed), ours (auto level), and ours
# forced to level 0 (what the same downsampling costs without the pyramid), each in its own subprocess.
OME_ZARR_SHAPE = (128, 1024, 1280)
OME_ZARR_LEVELS = 5


def _generateOmeZarr(path):
    import zarr

    if os.path.isdir(path):
        return
    temp = path + ".part"
    import shutil

    shutil.rmtree(temp, ignore_errors=True)
    t = time.perf_counter()
    kwargs = {"zarr_format": 2} if int(zarr.__version__.split(".")[0]) >= 3 else {}
    group = zarr.open_group(temp, mode="w", **kwargs)
    nz, ny, nx = OME_ZARR_SHAPE
    create = group.create_array if hasattr(group, "create_array") else group.create_dataset
    arrays = [create(str(n), shape=(nz >> n, ny >> n, nx >> n), chunks=(64, 64, 64), dtype=np.uint16)
              for n in range(OME_ZARR_LEVELS)]
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    base = 1500 + 800 * np.sin(x / 97.0) * np.cos(y / 131.0)
    slab = 1 << (OME_ZARR_LEVELS - 1)
    for z0 in range(0, nz, 64):  # 64 planes at a time: every level gets whole chunks of z
        block = np.stack([(base + 300 * np.sin(k / 17.0)).astype(np.uint16) + rng.integers(0, 400, (ny, nx), dtype=np.uint16)
                          for k in range(z0, z0 + 64)])
        level = block.astype(np.float64)
        for n in range(OME_ZARR_LEVELS):
            if n:
                d, h, w = level.shape
                level = level.reshape(d // 2, 2, h // 2, 2, w // 2, 2).mean(axis=(1, 3, 5))
            arrays[n][z0 >> n:(z0 + 64) >> n] = np.round(level).astype(np.uint16)
        assert 64 % slab == 0
    s0 = [5.0, 3.25, 3.25]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
                                   "datasets": [{"path": str(n), "coordinateTransformations": [
                                       {"type": "scale", "scale": [s * 2 ** n for s in s0]},
                                       {"type": "translation", "translation": [(2 ** n - 1) / 2 * s for s in s0]}]}
                                       for n in range(OME_ZARR_LEVELS)]}]
    os.replace(temp, path)
    print(f"generated {os.path.basename(path)} ({_folderBytes(path) / 1e9:.2f} GB on disk) in {time.perf_counter() - t:.1f} s",
          flush=True)


def _folderBytes(path):
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def omeZarrChild(name, path):
    """One OME-Zarr contender, in its own process; prints one JSON line like `child`."""
    import SimpleITK  # noqa: F401 (every child imports it, so the baselines compare)
    import zarr

    from MRIHistoRegLib import downsample, stacks

    if name.startswith("ome-zarr"):
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Reader
    importPeak = _status("VmHWM")
    reset = _resetPeak()
    base = _status("VmRSS")
    t = time.perf_counter()
    result = {}
    level = os.path.join(path, str(OME_ZARR_LEVELS - 1))
    if name == "floor-level4-bytes":
        buffer = bytearray(BUFFER)
        view = memoryview(buffer)
        total = 0
        for folder, _, names in os.walk(level):
            for file in names:
                with open(os.path.join(folder, file), "rb", buffering=0) as f:
                    while True:
                        got = f.readinto(view)
                        if not got:
                            break
                        total += got
        result["bytes"] = total
    elif name == "zarr-level4":
        result["output_shape"] = np.asarray(zarr.open_group(path, mode="r")[str(OME_ZARR_LEVELS - 1)][...]).shape
    elif name == "ome-zarr-level4":
        node = next(iter(Reader(parse_url(path))()))
        result["output_shape"] = np.asarray(node.data[OME_ZARR_LEVELS - 1].compute()).shape
    elif name in ("ours-auto", "ours-level0"):
        source = stacks.openStack(path)
        array, _ = downsample.downsampleStack(source, TARGET_MM, level=None if name == "ours-auto" else 0)
        result["output_shape"] = array.shape
        result["output_mb"] = array.nbytes / 1e6
    result["seconds"] = time.perf_counter() - t
    result["base_rss"] = base
    result["work_peak_rss"] = _status("VmHWM") if reset else None
    result["import_peak_rss"] = importPeak
    print(json.dumps(result))


def _runOmeZarrChild(name, path):
    code = ("import sys; sys.path.insert(0, {bench!r}); import downsample as bench; bench.omeZarrChild({name!r}, {path!r})"
            .format(bench=os.path.dirname(os.path.abspath(__file__)), name=name, path=path))
    return _runChild([sys.executable, "-c", code])


def omeZarrRows(folder, repeats=5):
    """Generate the pyramid store (once) and print one row per contender (best of `repeats`), warm cache."""
    path = os.path.join(folder, "pyramid.ome.zarr")
    os.makedirs(folder, exist_ok=True)
    _generateOmeZarr(path)
    level0 = _folderBytes(os.path.join(path, "0"))
    needed = _folderBytes(os.path.join(path, str(OME_ZARR_LEVELS - 1)))
    print(f"{os.path.basename(path)}: level 0 {level0 / 1e6:.1f} MB on disk, level {OME_ZARR_LEVELS - 1} "
          f"{needed / 1e6:.3f} MB ({level0 / max(needed, 1):.0f}x less)")
    contenders = ["floor-level4-bytes", "zarr-level4", "ome-zarr-level4", "ours-auto", "ours-level0"]
    _runOmeZarrChild("floor-level4-bytes", path)  # warm the cache
    results = {}
    for name in contenders:
        for _ in range(repeats if name != "ours-level0" else 1):
            result = _runOmeZarrChild(name, path)
            if name not in results or result.get("seconds", 1e9) < results[name].get("seconds", 1e9):
                results[name] = result
    floor = results["floor-level4-bytes"].get("seconds")
    print(f"{'contender':<22} {'seconds':>9} {'x floor':>8} {'peak RSS MB':>11} {'over base MB':>12}  note")
    for name, result in results.items():
        seconds = result.get("seconds")
        ratio = f"{seconds / floor:8.1f}" if seconds is not None and floor else f"{'-':>8}"
        over = ((result.get("work_peak_rss") or result["peak_rss"]) - result.get("base_rss", 0)) / 1e6
        note = result.get("failed", "") or (f"output {tuple(result['output_shape'])}" if "output_shape" in result else
                                             f"{result.get('bytes', 0) / 1e6:.3f} MB read")
        secondsText = f"{seconds:9.4f}" if seconds is not None else f"{'-':>9}"
        print(f"{name:<22} {secondsText} {ratio} {result['peak_rss'] / 1e6:11.1f} {over:12.1f}  {note}", flush=True)


# ---- Imaris .ims rows (issue 14: a pyramid read touches only the level it needs) -------------------------------
#     .venv/bin/python bench/downsample.py --ims [--dir DIR] [--ims-depth 128]
# The .ims is written with h5py like Imaris writes it: gzip-1 chunks of 256 x 256 x 16, levels 2x in x, y and z
# (each the exact mean-pool of the previous, here an even 2160 x 2560 x depth so the halving divides). Rows: the
# read floor (h5py decompressing the level's chunks, one chunk layer at a time, nothing else) and ours
# (downsampleStack) for level 0 and for the level the pyramid selection picks for 0.1 mm (the coarsest level finer
# than the target along every axis: level 4 of a 2x pyramid).
IMS_CHUNKS = (16, 256, 256)


def _writeIms(path, depth, levels=5):
    import h5py

    def chars(text):
        return np.array([c.encode() for c in str(text)], dtype="S1")

    shapes = [(depth >> r, PLANE[0] >> r, PLANE[1] >> r) for r in range(levels)]
    with h5py.File(path, "w") as f:
        image = f.create_group("DataSetInfo/Image")
        for key, value in (("X", PLANE[1]), ("Y", PLANE[0]), ("Z", depth), ("Unit", "um")):
            image.attrs[key] = chars(value)
        for a, n in enumerate((PLANE[1], PLANE[0], depth)):
            image.attrs[f"ExtMin{a}"] = chars("0")
            image.attrs[f"ExtMax{a}"] = chars(f"{n * SPACING_MM[a] * 1000:.4f}")
        f.create_group("DataSetInfo/Channel 0").attrs["Name"] = chars("autofluorescence")
        datasets = []
        for r, shape in enumerate(shapes):
            group = f.create_group(f"DataSet/ResolutionLevel {r}/TimePoint 0/Channel 0")
            for key, n in zip("XYZ", shape[::-1]):
                group.attrs[f"ImageSize{key}"] = chars(n)
            chunks = tuple(min(c, n) for c, n in zip(IMS_CHUNKS, shape))
            padded = tuple(-(-n // c) * c for n, c in zip(shape, chunks))
            datasets.append(group.create_dataset("Data", shape=padded, dtype=np.uint16, chunks=chunks,
                                                 compression="gzip", compression_opts=1))
        step = 1 << levels  # planes per slab: whole planes at every level
        planes = _planes(depth)
        for k0 in range(0, depth, step):
            slab = np.stack([next(planes) for _ in range(min(step, depth - k0))]).astype(np.float64)
            for r, ds in enumerate(datasets):
                if r:
                    z, y, x = slab.shape
                    slab = slab.reshape(z // 2, 2, y // 2, 2, x // 2, 2).mean(axis=(1, 3, 5))
                n = slab.shape[0]
                ds[(k0 >> r):(k0 >> r) + n, :slab.shape[1], :slab.shape[2]] = np.round(slab).astype(np.uint16)


def _imsChild(name, path):
    from MRIHistoRegLib import downsample, stacks

    source = stacks.openStack(path)
    from MRIHistoRegLib.downsample import resolveCrop
    from MRIHistoRegLib.stacks.pyramid import chooseLevel

    level = source.levels[0]
    if name.endswith("-selected"):  # the level downsampleStack's own rule picks (stacks/pyramid.py)
        level = chooseLevel(source, (TARGET_MM,) * 3, resolveCrop(source, None))[1]
    base = _status("VmRSS")
    reset = _resetPeak()
    t = time.perf_counter()
    result = {"level": level.levelIndex, "level_shape": level.shape}
    if name.startswith("floor"):
        import h5py

        with h5py.File(path, "r") as f:
            ds = f[level.datasetName]
            nz, ny, nx = level.shape
            for k0 in range(0, nz, ds.chunks[0]):
                ds[k0:min(k0 + ds.chunks[0], nz), :ny, :nx]
    else:
        array, _ = downsample.downsampleStack(source, TARGET_MM, level=level.levelIndex)
        result["output_shape"] = array.shape
        result["output_mb"] = array.nbytes / 1e6
    result["seconds"] = time.perf_counter() - t
    result["base_rss"] = base
    result["work_peak_rss"] = _status("VmHWM") if reset else None
    result["import_peak_rss"] = 0
    print(json.dumps(result))


def _imsRun(name, path):
    command = [sys.executable, os.path.abspath(__file__), "--ims-child", name, path]
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"failed": (process.stderr.strip().splitlines() or ["?"])[-1][:90], "peak_rss": 0}
    result = json.loads(lines[-1])
    result["peak_rss"] = result["work_peak_rss"] or 0
    result["wall_total"] = time.perf_counter() - started
    return result


def imsMain():
    """The .ims rows: floor and ours at level 0 and at the selected level (best of two runs each)."""
    parser = argparse.ArgumentParser(description="Imaris .ims downsampling rows")
    parser.add_argument("--ims", action="store_true")
    parser.add_argument("--ims-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=os.path.join(ROOT, "bench", "output"))
    parser.add_argument("--ims-depth", type=int, default=128, help="planes (a multiple of 32)")
    args = parser.parse_args()
    if args.ims_child:
        _imsChild(*args.ims_child)
        return
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"mid_{args.ims_depth}.ims")
    if not os.path.exists(path):
        t = time.perf_counter()
        _writeIms(path + ".part", args.ims_depth)
        os.replace(path + ".part", path)
        print(f"generated {path} ({os.path.getsize(path) / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
    rows = []
    for level in ("level0", "selected"):
        results = {}
        for contender in (f"floor-{level}", f"ours-{level}") * 2:
            result = _imsRun(contender, path)
            if contender not in results or result.get("seconds", 1e9) < results[contender].get("seconds", 1e9):
                results[contender] = result
        floor = results[f"floor-{level}"].get("seconds")
        for contender, result in results.items():
            result.setdefault("failed", f"level {result.get('level')} {tuple(result.get('level_shape', ()))}")
            rows.append((os.path.basename(path), args.ims_depth, contender, result, floor))
    print(HEADER)
    for row in rows:
        printRow(row)


if __name__ == "__main__":  # after every row function (the OME-Zarr and Imaris rows are defined above)
    if "--ims" in sys.argv or "--ims-child" in sys.argv:
        imsMain()
    else:
        main()
