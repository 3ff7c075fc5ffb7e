"""Network architectures of the harness that stock nnU-Net builds from plans.json.

nnU-Net v2 locates ``architecture.network_class_name`` with ``pydoc.locate`` and calls it with
``input_channels``, ``num_classes``, ``deep_supervision`` and the plans' ``arch_kwargs``; every class here
follows that contract (and nnU-Net's module layout: ``encoder.stages``, ``decoder.stages``,
``decoder.seg_layers``, ``decoder.deep_supervision``), so an exported model folder naming one of them
loads in ``nnUNetPredictor`` wherever this package is importable.

- ``light.LightUNet``: a small depthwise-separable U-Net (``scratch-light``).
- ``stunet.STUNet``: STU-Net's scalable residual U-Net (converted v1 checkpoints, ``bench.stunet``).
"""


def class_path(cls) -> str:
    """The dotted name nnU-Net's plans use for a class (``pydoc.locate`` finds it again)."""
    return f"{cls.__module__}.{cls.__qualname__}"
