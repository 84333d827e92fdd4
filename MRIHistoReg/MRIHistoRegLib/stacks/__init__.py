"""Stack sources: huge 3-D microscopy stacks opened without reading their voxels, then read plane by plane.

`openStack(path, spacingMm=None)` understands
- a multipage TIFF (classic or BigTIFF, compressed or not; OME-XML and ImageJ spacing metadata are read),
- a folder of 2-D TIFF files (natural sort, all slices the same shape and dtype; one file is fine),
- a NRRD file with raw or gzip data, attached or detached (.nhdr + .raw / .raw.gz),
- an OME-Zarr image folder (OME-NGFF 0.4 / 0.5, *.zarr / *.ome.zarr; stacks/omezarr.py), whose `levels` are its pyramid,
- an Imaris .ims or a BigDataViewer/BigStitcher .xml + .h5 (stacks/imaris.py, bdv.py; HDF5 pyramids as `levels`);
a multi-channel file or a per-channel TIFF series is one channel's source (`channel=`).

Arrays are [k, j, i]; spacing tuples are (i, j, k) in millimetres. A TIFF stack gets the geometry Slicer/ITK
give it on load: LPS axes along i, j, k with voxel (0, 0, 0) centred at the origin, so RAS = (-i*sx, -j*sy, k*sz).
A NRRD keeps its own directions and origin (converted LPS -> RAS) but with the effective spacing.

Every source is a StackSource (base.py: the one reader interface and its capability methods); voxels are read
into a caller's buffer where possible (`readPlane(k, out=...)`). The modules: base (interface, memory guard),
tiff (TIFF file and series), nrrd (NRRD reader), header (NRRD header-only rewrites), array (ArraySource:
an in-memory array as a source), units (spacing units, shared with spacing.py), omezarr (OME-Zarr reader and
writer), pyramid (which of a source's `levels` the downsampler reads).

`checkMemoryFor(nbytes, what)` is the memory guard to call before loading anything whole.
"""
import os

from MRIHistoRegLib.stacks.array import ArraySource
from MRIHistoRegLib.stacks.bdv import BDV_EXTENSIONS, BdvStack
from MRIHistoRegLib.stacks.imaris import IMARIS_EXTENSIONS, ImarisStack
from MRIHistoRegLib.stacks.base import StackSource, chooseChannel, availableMemoryBytes, checkMemoryFor
from MRIHistoRegLib.stacks.header import formatNrrdHeader, rewriteNrrdSpacing
from MRIHistoRegLib.stacks.nrrd import NRRD_EXTENSIONS, NrrdStack, nrrdDtype
from MRIHistoRegLib.stacks.omezarr import OME_ZARR_EXTENSIONS, OmeZarrStack, isOmeZarr
from MRIHistoRegLib.stacks.tiff import TIFF_EXTENSIONS, TiffSeries, TiffStack, naturalSortKey
from MRIHistoRegLib.stacks.units import toMillimetres, unitToMillimetres
from ..errors import UserInputError

__all__ = ["ArraySource", "NrrdStack", "OmeZarrStack", "StackSource", "TiffSeries", "TiffStack", "availableMemoryBytes",
           "checkMemoryFor", "formatNrrdHeader", "naturalSortKey", "nrrdDtype", "openStack", "rewriteNrrdSpacing",
           "toMillimetres", "unitToMillimetres"]


def openStack(path, spacingMm=None, channel=None):
    """Open a multipage TIFF, a folder of 2-D TIFFs or a NRRD (.nrrd/.nhdr) without reading voxels.

    spacingMm: (i, j, k) in mm (or one value), overriding whatever the file says. channel: index or name of the
    channel to read (default 0); a wrong one is a UserInputError listing `source.channelNames`."""
    source = _open(os.fspath(path), spacingMm, channel)
    if channel is not None and not isinstance(source, (TiffStack, NrrdStack, ImarisStack, BdvStack)):
        chooseChannel(channel, source.channelNames, source.path)
    return source


def _open(path, spacingMm, channel):
    path = os.fspath(path)
    if path.lower().rstrip("/\\").endswith(OME_ZARR_EXTENSIONS) or isOmeZarr(path):
        return OmeZarrStack(path.rstrip("/\\") or path, spacingMm=spacingMm, channel=channel)
    if os.path.isdir(path):
        return TiffSeries(path, spacingMm=spacingMm, channel=channel)
    if not os.path.isfile(path):
        raise UserInputError(f"Stack not found: {path}. Give a TIFF file, a folder of TIFF slices, a NRRD, an OME-Zarr "
                             f"folder, an Imaris .ims or a BigDataViewer .xml.")
    lower = path.lower()
    if lower.endswith(NRRD_EXTENSIONS):
        return NrrdStack(path, spacingMm=spacingMm, channel=channel)
    if lower.endswith(IMARIS_EXTENSIONS):  # HDF5 pyramids (issue 14): stacks/imaris.py, stacks/bdv.py
        return ImarisStack(path, spacingMm=spacingMm, channel=channel)
    if lower.endswith(BDV_EXTENSIONS):
        return BdvStack(path, spacingMm=spacingMm, channel=channel)
    if lower.endswith(TIFF_EXTENSIONS) or lower.endswith((".btf", ".tf8", ".ome.tif")):
        return TiffStack(path, spacingMm=spacingMm, channel=channel)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"NRRD":
        return NrrdStack(path, spacingMm=spacingMm, channel=channel)
    if magic[:2] in (b"II", b"MM"):
        return TiffStack(path, spacingMm=spacingMm, channel=channel)
    raise UserInputError(f"{path}: unknown stack format. Supported: .tif/.tiff (multipage), a folder of TIFF slices, .nrrd/.nhdr, "
                         "Imaris .ims, BigDataViewer .xml (+ .h5).")
