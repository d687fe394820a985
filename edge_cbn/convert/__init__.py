"""The workstation side, the `[convert]` extra (may import TensorFlow): Keras ports of the paper's models
(`models`), their published weight files (`weights`), building them (`build`), folding BatchNorm and
exporting a bundle (`export`), offline calibration, the paper's Algorithm 1 (`offline_calibration`,
`batch_moments`), and the `convert` command (`command`).

Importing this package imports nothing heavy, and it is imported before any of its modules imports
TensorFlow: so this is where TensorFlow's C++ start-up noise (the oneDNN notice, CUDA probing, absl's
pre-init warning) is silenced, unless the user's environment sets a level or `--verbose` asks for it.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # --verbose (edge_cbn.options) sets 0
