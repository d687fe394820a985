import os

# Quiet TensorFlow's C++ logging and keep it off any GPU in every test process and subprocess.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from ray_cluster import ray_cluster  # noqa: E402,F401  (one local Ray cluster per session, started on first use)
