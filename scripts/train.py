"""Train a recipe: `accelerate launch scripts/train.py --recipe bert_sentiment` (or plain python)."""

import sys

from hf_transfer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
