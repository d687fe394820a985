"""edge-cbn: Calibrated BatchNorm for CNNs on noisy analog-style hardware at the edge."""
__version__ = "0.1.0"
