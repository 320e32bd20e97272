"""The zoo tier, vision and audio models: transformers ViT, ResNet, ConvNeXt, MobileNetV2, and a
Conv1d audio net, in every format (tests/zoo.py)."""

from tests.zoo_cells import make_tests

zoo_results, test_zoo_cell = make_tests(["vit", "resnet", "convnext", "mobilenetv2", "audio"])
