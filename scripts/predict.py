"""Label images with a saved image model: `python scripts/predict.py OUTPUT_DIR IMAGE_OR_FOLDER ... [--top-k K]`."""

import sys

from hf_transfer.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
