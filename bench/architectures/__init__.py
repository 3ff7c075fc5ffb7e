"""Network architectures of the harness that stock nnU-Net builds from plans.json.

nnU-Net v2 locates ``architecture.network_class_name`` with ``pydoc.locate`` and calls it with
``input_channels``, ``num_classes``, ``deep_supervision`` and the plans' ``arch_kwargs``; every class here
follows that contract (and nnU-Net's module layout: ``encoder.stages``, ``decoder.stages``,
``decoder.seg_layers``, ``decoder.deep_supervision``), so an exported model folder naming one of them
loads in ``nnUNetPredictor`` wherever this package is importable.

- ``light.LightUNet``: a small depthwise-separable U-Net (``scratch-light``).
- ``stunet.STUNet``: STU-Net's scalable residual U-Net (converted v1 checkpoints, ``bench.stunet``).
- ``swin_unetr.SwinUNETRNet``: MONAI's SwinUNETR with its own state-dict keys (it has no encoder/decoder
  split: methods that select by one refuse it).
"""


def stage_outputs(stages, x) -> list:
    """An encoder's forward: every stage's output, in order (the decoder's skips)."""
    skips = []
    for stage in stages:
        x = stage(x)
        skips.append(x)
    return skips


def class_path(cls) -> str:
    """The dotted name nnU-Net's plans use for a class (``pydoc.locate`` finds it again)."""
    return f"{cls.__module__}.{cls.__qualname__}"
