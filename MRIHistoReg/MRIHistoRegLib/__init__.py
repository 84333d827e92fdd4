"""MRIHistoRegLib: Qt-free logic of the MRIHistoReg Slicer extension.

Every step of the pipeline (stack reading, spacing correction, streamed downsampling, landmark fits,
single resampling, refinement, tumour comparison, report) lives here and takes an MRML scene explicitly,
so the same calls serve the Slicer panel, the Python console, headless Slicer and plain Python
(slicer-core). Only numpy, SimpleITK, vtk and MRML are imported at module import time.
"""

__version__ = "0.1.0"
