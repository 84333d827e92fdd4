"""`python -m MRIHistoRegLib ...` (also under `Slicer --no-main-window --python-script`)."""
import sys

from MRIHistoRegLib.cli import main

if __name__ == "__main__":
    sys.exit(main())
