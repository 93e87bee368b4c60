"""The reproduction study: does R2ET buy ranking robustness at equal accuracy?

``python -m benchmarks.reproduce --preset cpu --data-dir /tmp/cifar10_jpg
--weights-file ../shared/weights/cifar10_resnet20.th --out docs/results`` adapts the published
CIFAR ResNet-20 to the JPEG images, fine-tunes it with every objective (weights chosen on the
validation split, three training seeds for the central methods), evaluates all of them with the
evaluation protocol's attack ensemble on one fixed test subset, compares R2ET with every method by
paired bootstrap intervals, runs a validation-only sweep, and writes docs/results.md. See
``benchmarks/reproduce/presets.py`` for the presets and ``__main__.py`` for the options.
"""
