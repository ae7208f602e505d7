"""The output folder: its layout and kind detection, staged writes, model cards, plots, Hub push."""
