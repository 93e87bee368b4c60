"""The frontier study: at the same clean accuracy, does R2ET give more robust explanations?

``python -m benchmarks.reproduce --preset cpu --data-dir /tmp/cifar10_jpg
--weights-file ../shared/weights/cifar10_resnet20.th --out docs/results --threads 2`` adapts the
published CIFAR ResNet-20 to the JPEG images, fine-tunes every method over a sweep of its strength
(training seeds per setting), evaluates every model with the evaluation protocol's attack ensemble
and the paper protocol on one fixed test subset, compares methods at matched validation accuracy
(validation images from CIFAR-10's test split, disjoint from the test images) and writes
docs/results.md. See ``benchmarks/reproduce/presets.py`` for the presets and ``__main__.py`` for
the options.
"""
