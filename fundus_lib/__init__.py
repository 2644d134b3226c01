"""fundus_lib: tested building blocks for the fundus-dr-tutorials notebooks.

Deep learning for diabetic retinopathy grading on retinal fundus images — preprocessing, a
synthetic benchmark, dataset sources, the models of five papers (CANet, CLPI, L-Net/SiAN, ELLG,
DeepMT-DR), one training loop, metrics, explanations and figures.
"""
__version__ = "0.1.0"
