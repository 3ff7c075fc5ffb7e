"""lnbench: few-shot fine-tuning benchmark for 3D segmentation foundation models."""
__version__ = "0.1.0"
