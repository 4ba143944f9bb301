"""An empty stand-in for torchvision, on the path of the mmcls oracle only.

mmcv 1.x imports torchvision at module level only to list its model-zoo URLs, which the oracle
never uses; PyPI's torchvision for this torch links the CUDA build, so it is not installed.
"""
