"""The workstation side, the `[convert]` extra (may import TensorFlow): Keras ports of the paper's models
(`models`), their published weight files (`weights`), building them (`build`), folding BatchNorm and
exporting a bundle (`export`), offline calibration, the paper's Algorithm 1 (`offline_calibration`), and
the `convert` command (`command`).  Importing this package imports nothing heavy; its modules do."""
