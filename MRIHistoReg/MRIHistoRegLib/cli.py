"""Command-line entry point: `python -m MRIHistoRegLib <command> ...`.

Each subcommand is a thin adapter: parse arguments, call the logic, print a summary. Heavy imports stay
inside the command functions so `--help` is instant.
"""
import argparse
import logging
import os
import sys


def _addBigWarpFlag(p):
    p.add_argument("--bigwarp-no-flip", action="store_true",
                   help="BigWarp CSV: take x, y as written (default: Fiji's x, y of an orientation-less stack -> RAS -x, -y)")


def _addSample(subparsers):
    p = subparsers.add_parser("sample", help="write the generated sample data set (MRI, LSM stack, landmarks, truth)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--size", default="small", help="small (default, fast), full (the seed's 2160x2560x472 stack, 5.2 GB) or a factor N in 1-20 (N times the full spacing)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_runSample)


def _runSample(args):
    from MRIHistoRegLib import sampledata
    from MRIHistoRegLib.progress import TerminalProgress

    sampledata.generateSampleData(args.out, size=args.size, seed=args.seed, progress=TerminalProgress("sample"))
    return 0


def _addRun(subparsers):
    p = subparsers.add_parser("run", help="run the whole pipeline for one subject (CONFIG.json) or a cohort (several configs or folders)")
    p.add_argument("configs", nargs="+", help="CONFIG.json file(s) or folder(s) of them")
    p.add_argument("--out", required=True, help="report folder (replaced atomically if it holds a previous MRIHistoReg output)")
    p.add_argument("--resample-channels", nargs="+", metavar="INDEX|NAME",
                   help="also resample these channels of a multi-channel stack (or 'all') onto the MRI grid through the "
                        "same mapping (overrides the config's resample_channels; one config only)")
    p.set_defaults(func=_runRun)


def _runRun(args):
    import dataclasses

    from MRIHistoRegLib import pipeline
    from MRIHistoRegLib.config import loadConfig, resampleChannels
    from MRIHistoRegLib.errors import UserInputError
    from MRIHistoRegLib.progress import TerminalProgress

    single = len(args.configs) == 1 and not os.path.isdir(args.configs[0])
    if args.resample_channels and not single:
        raise UserInputError("--resample-channels applies to one config: for a cohort, give each config its "
                             "'resample_channels' field.")
    if single:
        config = loadConfig(args.configs[0])
        if args.resample_channels:
            wanted = "all" if args.resample_channels == ["all"] else args.resample_channels
            config = dataclasses.replace(config, resampleChannels=resampleChannels(wanted, "--resample-channels"))
        report = pipeline.runPipeline(config, args.out, progress=TerminalProgress("run"))
        _printSummary(report)
        logging.info("report: %s", os.path.join(os.path.abspath(args.out), "report.json"))
    else:
        rows = pipeline.runCohort(args.configs, args.out, progress=TerminalProgress("cohort"))
        logging.info("cohort of %d subjects: summary in %s", len(rows), os.path.join(args.out, "summary.csv"))
    return 0


def _addDemo(subparsers):
    p = subparsers.add_parser("demo", help="generate the sample data and run the whole pipeline on it (the main job)")
    p.add_argument("--out", default="output/demo", help="folder for sample/ and report/ (default: output/demo)")
    p.add_argument("--size", default="small", help="sample size: small (default) or full")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_runDemo)


def _runDemo(args):
    from MRIHistoRegLib import pipeline
    from MRIHistoRegLib.progress import TerminalProgress

    report = pipeline.runDemo(args.out, size=args.size, seed=args.seed, progress=TerminalProgress("demo"))
    _printSummary(report)
    logging.info("demo report: %s", os.path.join(os.path.abspath(args.out), "report", "report.json"))
    return 0


def _printSummary(report):
    """The figures a user looks for first, on the log."""
    summary = report["landmark_summary"]
    logging.info("model %s: landmark residual RMS %.3f mm, leave-one-out RMS %.3f mm, shrinkage %.1f%% by volume",
                 report["transform"]["model"], summary.get("residual_rms_mm", float("nan")),
                 summary.get("loo_rms_mm", float("nan")), report["transform"]["shrinkage_volume_percent"])
    if report.get("evaluation"):
        logging.info("held-out TRE median %.3f mm (%d points)", report["evaluation"]["tre_median_mm"], report["evaluation"]["count"])
    for label, row in (report.get("labels") or {}).items():
        logging.info("label %s: MRI %.3f mm3, histology in MRI %.3f mm3 (Jacobian %.3f mm3), Dice %.3f, HD95 %.3f mm",
                     label, row["mri_mm3"], row["histology_in_mri_resampled_mm3"], row["histology_in_mri_jacobian_mm3"],
                     row["dice"], row["hd95_mm"])


def _addRegister(subparsers):
    p = subparsers.add_parser("register", help="landmark registration from two point files (paired by label)")
    p.add_argument("--fixed-points", required=True, help="MRI points: .mrk.json, .fcsv, Slicer markups CSV, plain CSV label,x,y,z or BigWarp CSV")
    p.add_argument("--moving-points", required=True, help="histology points (same formats; a BigWarp file gives its moving columns)")
    p.add_argument("--model", default="affine+tps", help="rigid, similarity, affine or affine+tps (default)")
    p.add_argument("--regularization", type=float, default=0.0, help="TPS smoothing (mm, >= 0; 0 interpolates)")
    p.add_argument("--out", default="output/landmarks", help="report folder: transform.h5, report.json, report.csv")
    _addBigWarpFlag(p)
    p.set_defaults(func=_runRegister)


def _runRegister(args):
    from MRIHistoRegLib import pipeline
    from MRIHistoRegLib.config import RunConfig

    config = RunConfig(path=None, name="register", mri=None, histology=None, model=args.model,
                       landmarks={"mri": os.path.abspath(args.fixed_points), "histology": os.path.abspath(args.moving_points)},
                       tpsRegularization=args.regularization, bigWarpFlipXY=not args.bigwarp_no_flip)
    report = pipeline.runPipeline(config, args.out)
    _printSummary(report)
    if report["landmark_summary"].get("outliers"):
        logging.warning("possible outliers (leave-one-out > 3x median): %s", ", ".join(report["landmark_summary"]["outliers"]))
    logging.info("written to %s", args.out)
    return 0


def _addMapPoints(subparsers):
    p = subparsers.add_parser("map-points", help="map points through a transform file (.h5), keeping labels")
    p.add_argument("--transform", required=True, help="transform file written by run, register or refine (transform.h5)")
    p.add_argument("--points", required=True, help="point file (plain CSV label,x,y,z in RAS mm, or any format register reads)")
    p.add_argument("--direction", default="fixed-to-moving", choices=("fixed-to-moving", "moving-to-fixed"))
    p.add_argument("--out", required=True, help="output plain CSV label,x,y,z")
    _addBigWarpFlag(p)
    p.set_defaults(func=_runMapPoints)


def _runMapPoints(args):
    from MRIHistoRegLib import workflow

    result = workflow.mapPointFile(args.transform, args.points, args.direction, args.out,
                                   bigWarpFlipXY=not args.bigwarp_no_flip)
    logging.info("%d points mapped %s (max inverse residual %.2g mm) -> %s", result["count"], args.direction,
                 result["max_residual_mm"], args.out)
    return 0


def _addSpacingArguments(p):
    group = p.add_mutually_exclusive_group()
    group.add_argument("--spacing-um", nargs="+", type=float, metavar="S",
                       help="true voxel spacing in micrometres: one value or three (x y z = i j k); overrides the file")
    group.add_argument("--spacing-mm", nargs="+", type=float, metavar="S", help="the same in millimetres")


def _spacingFromArgs(args):
    """The user's --spacing-um / --spacing-mm as three values in mm (one value means isotropic), or None."""
    from MRIHistoRegLib.spacing import toMillimetres

    spacing = None
    if args.spacing_um is not None:
        spacing = toMillimetres(args.spacing_um, "um")
    elif args.spacing_mm is not None:
        spacing = toMillimetres(args.spacing_mm, "mm")
    if spacing is not None and len(spacing) == 1:
        spacing = spacing * 3
    return spacing


def _openFromArgs(args):
    from MRIHistoRegLib.stacks import openStack

    return openStack(args.input, spacingMm=_spacingFromArgs(args), channel=getattr(args, "channel", None))


def _addChannelArgument(p):
    p.add_argument("--channel", metavar="INDEX|NAME",
                   help="channel of a multi-channel stack to read, by index or name (`info` lists them; default 0)")


def _addInfo(subparsers):
    p = subparsers.add_parser("info", help="describe a stack (TIFF file, TIFF folder, NRRD or OME-Zarr) without reading its voxels")
    p.add_argument("input", help="multipage TIFF, folder of 2-D TIFFs, NRRD (.nrrd/.nhdr) or OME-Zarr folder (.zarr)")
    _addSpacingArguments(p)
    _addChannelArgument(p)
    p.add_argument("--reference", help="reference volume (e.g. the MRI) whose size the plausibility check compares with")
    p.add_argument("--reference-mm", type=float, nargs="+", help="reference size in mm (one value or x y z) instead")
    p.set_defaults(func=_runInfo)


def _runInfo(args):
    from MRIHistoRegLib.spacing import checkPlausibility

    source = _openFromArgs(args)
    reference = args.reference_mm
    if args.reference:
        from MRIHistoRegLib.context import createScene
        from MRIHistoRegLib.volumes import loadVolume

        reference = loadVolume(createScene(), args.reference)
    for line in source.describe():
        logging.info("%s", line)
    verdict = checkPlausibility(source, referenceExtentMm=reference)
    (logging.info if verdict.ok else logging.warning)("plausibility: %s", verdict.message)
    return 0


def _addDownsample(subparsers):
    p = subparsers.add_parser("downsample", help="streamed, exact area-weighted downsampling of a huge stack to a NRRD or OME-Zarr")
    p.add_argument("input", help="multipage TIFF, folder of 2-D TIFFs, NRRD (.nrrd/.nhdr) or OME-Zarr folder (.zarr)")
    _addSpacingArguments(p)
    _addChannelArgument(p)
    p.add_argument("--target-mm", nargs="+", type=float, required=True, metavar="T",
                   help="output spacing in mm: one value (isotropic) or three (x y z)")
    p.add_argument("--crop", nargs=6, type=int, metavar=("I0", "I1", "J0", "J1", "K0", "K1"),
                   help="crop box in input voxels (half-open ranges), applied while streaming")
    p.add_argument("--out", help="output .nrrd (default: <input>_<target>mm.nrrd in the current folder), any "
                   "SimpleITK format, or an OME-Zarr folder NAME.ome.zarr (NGFF 0.4 with a pyramid, units mm)")
    p.add_argument("--level", default="auto", metavar="auto|N",
                   help="pyramid level of a multi-resolution stack to read (OME-Zarr): auto (default) = the coarsest "
                   "mean-pooled level still finer than the target; 0 = full resolution")
    p.set_defaults(func=_runDownsample)


def _runDownsample(args):
    from MRIHistoRegLib.downsample import downsampleToFile
    from MRIHistoRegLib.progress import TerminalProgress
    from MRIHistoRegLib.spacing import checkPlausibility

    source = _openFromArgs(args)
    target = args.target_mm if len(args.target_mm) != 1 else args.target_mm * 3
    if len(target) != 3:
        from MRIHistoRegLib.errors import UserInputError

        raise UserInputError(f"--target-mm takes one value or three (x y z), got {args.target_mm}.")
    verdict = checkPlausibility(source)
    if not verdict.ok:
        logging.warning("%s (spacing from %s; give --spacing-um if it is wrong)", verdict.message, source.spacingSource)
    out = args.out
    if out is None:
        base = os.path.basename(os.path.normpath(args.input)).split(".")[0]
        label = f"{target[0]:g}" if len(set(target)) == 1 else "x".join(f"{t:g}" for t in target)
        out = f"{base}_{label}mm.nrrd"
    crop = None
    if args.crop:
        c = args.crop
        crop = ((c[0], c[1]), (c[2], c[3]), (c[4], c[5]))
    logging.info("%s %s, spacing %s mm (%s) -> %s mm", source.kind, source.shape, source.spacingMm, source.spacingSource, target)
    level = None if str(args.level).lower() == "auto" else _levelArgument(args.level)
    downsampleToFile(source, target, out, crop=crop, progress=TerminalProgress("downsample"), level=level)
    logging.info("wrote %s", out)
    return 0


def _addSegment(subparsers):
    p = subparsers.add_parser("segment", help="streamed segmentation of a signal channel (e.g. a fluorescent tumour) "
                                              "at the stack's native resolution, written as a label map")
    p.add_argument("input", help="multipage TIFF, folder of 2-D TIFFs, or NRRD (.nrrd/.nhdr)")
    _addSpacingArguments(p)
    _addChannelArgument(p)
    p.add_argument("--threshold", type=float, help="foreground is value >= THRESHOLD (default: Otsu's threshold)")
    p.add_argument("--seed", nargs=3, type=int, metavar=("I", "J", "K"),
                   help="a voxel of the tumour: its connected component is kept (default: the largest component)")
    p.add_argument("--crop", nargs=6, type=int, metavar=("I0", "I1", "J0", "J1", "K0", "K1"),
                   help="region of interest in voxels (half-open ranges); nothing outside it is segmented")
    p.add_argument("--no-fill-holes", action="store_true", help="keep enclosed dark regions out of the label")
    p.add_argument("--out", required=True, help="output label map (.nrrd, on the stack's own grid)")
    p.set_defaults(func=_runSegment)


def _runSegment(args):
    import json

    from MRIHistoRegLib.progress import TerminalProgress
    from MRIHistoRegLib.segment import segmentStack

    source = _openFromArgs(args)
    crop = None
    if args.crop:
        c = args.crop
        crop = ((c[0], c[1]), (c[2], c[3]), (c[4], c[5]))
    result = segmentStack(source, threshold=args.threshold, seedIjk=args.seed, roi=crop,
                          fillHoles=not args.no_fill_holes, outPath=args.out, progress=TerminalProgress("segment"))
    logging.info("threshold %.6g (%s): %d voxels, native volume %.6g mm3; wrote %s", result.threshold,
                 result.thresholdMethod, result.voxelCount, result.volumeMm3, args.out)
    logging.info("%s", json.dumps(result.toDict()))
    return 0

def _levelArgument(text):
    from MRIHistoRegLib.errors import UserInputError

    if not str(text).isdigit():
        raise UserInputError(f"--level takes 'auto' or a level number (0 = full resolution; `info` lists them), got {text!r}.")
    return int(text)


def _addRefine(subparsers):
    from MRIHistoRegLib.settings import DEFAULT_REFINE_PRESET, REFINE_PRESETS

    p = subparsers.add_parser("refine", help="landmark fit + automatic intensity refinement (no resampling)")
    p.add_argument("--mri", required=True, help="MRI volume (NRRD, NIfTI, ...)")
    p.add_argument("--histology", required=True, help="histology stack (multipage TIFF, folder of TIFFs, NRRD)")
    _addSpacingArguments(p)
    p.add_argument("--fixed-points", required=True, help="MRI landmarks (any format register reads)")
    p.add_argument("--moving-points", required=True, help="histology landmarks (paired by label)")
    p.add_argument("--model", default="affine+tps", help="landmark model the refinement starts from (default affine+tps)")
    p.add_argument("--working-mm", type=float, default=0.1, help="spacing the stack is streamed down to (default 0.1)")
    p.add_argument("--mri-mask", help="optional MRI brain mask (label map on the MRI grid)")
    p.add_argument("--mri-labels", help="optional MRI tumour label map (on the MRI grid): the elastix engine then "
                   "refines each tumour's region (the tumour focus, report.json refinement.tumour_focus)")
    p.add_argument("--no-tumour-focus", action="store_true", help="no tumour focus even with --mri-labels")
    p.add_argument("--preset", default=DEFAULT_REFINE_PRESET, choices=list(REFINE_PRESETS),
                   help=f"refinement preset (default {DEFAULT_REFINE_PRESET!r})")
    p.add_argument("--control-spacing-mm", type=float, help="B-spline control-point spacing (default: the preset's)")
    _addChannelArgument(p)
    p.add_argument("--out", default="output/refine", help="report folder: transform.h5 (the refined chain when accepted, "
                   "else the landmark fit), refinement_transform.h5 when accepted, report.json, report.csv")
    _addBigWarpFlag(p)
    p.set_defaults(func=_runRefine)


def _runRefine(args):
    from MRIHistoRegLib import pipeline
    from MRIHistoRegLib.config import RunConfig
    from MRIHistoRegLib.progress import TerminalProgress

    spacing = _spacingFromArgs(args)
    overrides = {} if args.control_spacing_mm is None else {"controlPointSpacingMm": args.control_spacing_mm}
    if args.no_tumour_focus:
        overrides["tumourFocus"] = False
    config = RunConfig(path=None, name="refine", mri=os.path.abspath(args.mri), histology=os.path.abspath(args.histology),
                       landmarks={"mri": os.path.abspath(args.fixed_points), "histology": os.path.abspath(args.moving_points)},
                       histologySpacingMm=None if spacing is None else tuple(spacing), model=args.model,
                       refine=True, workingSpacingMm=args.working_mm, refinePreset=args.preset,
                       histologyChannel=args.channel,
                       refineOverrides=overrides, mriMask=os.path.abspath(args.mri_mask) if args.mri_mask else None,
                       resample=False, bigWarpFlipXY=not args.bigwarp_no_flip,
                       labels={"mri": os.path.abspath(args.mri_labels)} if args.mri_labels else {})
    report = pipeline.runPipeline(config, args.out, progress=TerminalProgress("refine"))
    summary = report["refinement"]
    landmarks = summary["landmarks"] or {}
    logging.info("metric %s -> %s, %d iterations, %.1f s; landmark residual median %s -> %s mm",
                 summary["metric_before"], summary["metric_after"], summary["iterations"] or 0, summary["seconds"] or 0.0,
                 landmarks.get("median_before_mm"), landmarks.get("median_after_mm"))
    if summary["accepted"]:
        logging.info("refinement accepted (%s): transform.h5 is the refined chain", summary["reason"])
    else:
        logging.warning("refinement NOT accepted: %s. transform.h5 holds the landmark-only result.", summary["reason"])
    return 0


def buildParser():
    parser = argparse.ArgumentParser(prog="python -m MRIHistoRegLib", description="MRI to light-sheet histology registration")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


# Subcommand registrations, in the order of the pipeline.
_SUBCOMMANDS = [_addSample, _addRun, _addDemo]
_SUBCOMMANDS += [_addRegister, _addMapPoints]  # landmark registration (issue 4)
_SUBCOMMANDS += [_addInfo, _addDownsample]  # stacks: describe, streamed downsampling (issue 3)
_SUBCOMMANDS += [_addSegment]  # the tumour from a signal channel, at native resolution (issue 14)
_SUBCOMMANDS += [_addRefine]  # automatic intensity refinement (issue 5)


def main(argv=None) -> int:
    parser = buildParser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from MRIHistoRegLib.errors import UserInputError
    from MRIHistoRegLib.progress import Cancelled

    try:
        return int(args.func(args) or 0)
    except UserInputError as error:  # the message names the fix
        logging.error("%s", error)
        return 2
    except Cancelled as cancelled:
        logging.warning("%s", cancelled)
        return 130
    except Exception:  # a programming error: the traceback is what a bug report needs
        logging.exception("MRIHistoReg failed with an internal error (please report it with this traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
