"""The zoo tier, vision and audio models: transformers ViT, ResNet, ConvNeXt, MobileNetV2, a
Conv1d audio net, and the GRU text classifier (which balances the two halves of the tier, this
file and tests/test_zoo_text.py, by their measured cost), in every format (tests/zoo.py)."""

from tests.zoo_cells import make_tests

zoo_results, test_zoo_cell = make_tests(["vit", "resnet", "convnext", "mobilenetv2", "audio", "gru"])
